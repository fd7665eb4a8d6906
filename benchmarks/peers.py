"""The peer models' training speed beside torch's fused nn.LSTM, for ``make bench``.

One row per peer family, at its named config's shape (layers, hidden size, B, T), built
by rhn's own builder as ``rhn train`` builds it: one training step of the peer and one
of an nn.LSTM language model of the same layers, hidden size, B and T (embedding ->
nn.LSTM -> linear decoder), each with the config's optimizer and clipping, on random
tokens, on the suite's device (CUDA: the clock waits for the device's queued work). The
two are measured in interleaved rounds, and the ratio is the median over
rounds of nn.LSTM's step time over the peer's: a machine that speeds up or slows down
during the run moves both sides alike. Targets (issue 21): >= 0.95x where the peer's
math is a standard LSTM (``lstm`` without drop_h, ``charrnn_lstm``), >= 0.7x for the
others. ``gru_tutorial`` trains one sentence per update: its row is B = 1 at T = 22,
PTB's mean sentence (21.1 words and the <eos>).

The Grid LSTM's row also prints its ceiling against nn.LSTM: its temporal LSTMs, embedding
and decoder are nn.LSTM's model, on the same kernels, and its depth LSTMs add as many
products again, so its step takes at least nn.LSTM's step plus those products timed alone
(each round, the faster of ATen's mm and oneDNN), whatever else it does.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from device_clock import clock  # benchmarks/, the script's own directory
from torch import nn

from rhn_cli.engine.objective import sequence_loss
from rhn_cli.engine.optim import make_optimizer, penalised_step
from rhn_cli.experiment.resolve import resolve
from rhn_cli.kernels import onednn
from rhn_cli.models import build_model
from rhn_cli.models.base import detach_state

# (named config, what its row shows, the target: nn.LSTM's step time / the peer's)
PEERS = (
    ("ptb_lstm_medium", "lstm", 0.95),
    ("wiki_stacked3", "charrnn_lstm", 0.95),
    ("zoneout_char_ptb", "zoneout_lstm", 0.7),
    ("ptb_variational_lstm", "lstm, Gal drop_h", 0.7),
    ("wiki_grid3", "grid_lstm", 0.7),  # the same shape as wiki_stacked3: the README's pair
    ("gru_tutorial", "gru", 0.7),
)
# Where each model applies the config's ``dropout`` besides between its layers, so that the
# nn.LSTM model beside it draws as many masks: Zaremba's ``lstm`` also on the embedding
# and the last layer's output (as pytorch/examples' word_language_model does), char-rnn
# and the Grid LSTM on the last layer's output (the others have ``dropout`` = 0).
OUTER_DROPOUT = {
    "lstm": ("embedding", "output"),
    "charrnn_lstm": ("output",),
    "grid_lstm": ("output",),
}
SENTENCE_TOKENS = 22  # PTB train: 929,589 tokens in 42,068 sentences, <eos> included
QUICK_STEPS = 10  # --quick's T


@dataclass
class PeerShape:
    name: str
    config: dict
    B: int
    T: int

    @property
    def layers(self) -> int:
        return self.config["num_layers"]

    @property
    def hidden(self) -> int:
        return self.config["hidden_size"]

    @property
    def describe(self) -> str:
        return f"{self.layers} x {self.hidden}, B {self.B}, T {self.T}"


def peer_shape(name: str, max_steps: int | None, overrides: Mapping[str, Any]) -> PeerShape:
    config = resolve([name], extra_updates=dict(overrides)).config
    sentences = config["batching"] == "sentences"
    steps = SENTENCE_TOKENS if sentences else config["num_steps"]
    return PeerShape(name, config, config["batch_size"], min(steps, max_steps or steps))


class FusedLSTMLanguageModel(nn.Module):
    """Embedding -> nn.LSTM (the peer's layers and width) -> linear decoder, with the
    peer's ``dropout`` where the peer applies it (between layers, and per
    ``OUTER_DROPOUT`` on the embedding and the output): what the peer's step is compared
    with."""

    def __init__(self, shape: PeerShape) -> None:
        super().__init__()
        V, H, L = shape.config["vocab_size"], shape.hidden, shape.layers
        dropout = float(shape.config.get("dropout") or 0.0)
        outer = OUTER_DROPOUT.get(shape.config["model"], ())
        self.embedding = nn.Embedding(V, H)
        self.lstm = nn.LSTM(H, H, L, batch_first=True, dropout=dropout if L > 1 else 0.0)
        self.decoder = nn.Linear(H, V)
        self.shape = (L, H)
        self.drop_embedding = nn.Dropout(dropout if "embedding" in outer else 0.0)
        self.drop_output = nn.Dropout(dropout if "output" in outer else 0.0)

    def initial_state(self, batch_size: int):
        zeros = self.decoder.bias.new_zeros(self.shape[0], batch_size, self.shape[1])
        return zeros, zeros.clone()

    def forward(self, tokens, state):
        x, state = self.lstm(self.drop_embedding(self.embedding(tokens)), state)
        return self.decoder(self.drop_output(x)), state


class PeerTrainee:
    """A model taking training steps as rhn's trainer does for its config: the config's
    optimizer, loss reduction and clipping; the state carried across steps, or each
    step from the initial one where the config's batching makes windows independent."""

    def __init__(self, model: nn.Module, shape: PeerShape, device: torch.device) -> None:
        self.model, self.shape, self.device = model.to(device), shape, device
        self.parameters = list(model.parameters())
        self.optimizer = make_optimizer(shape.config, self.parameters)
        self.independent = shape.config["batching"] in ("chunks", "sentences")
        self.rng = np.random.default_rng(0)
        self.state = model.initial_state(shape.B)
        model.train()

    def step(self) -> float:
        """One training step; returns its seconds."""
        config, shape = self.shape.config, self.shape
        V = config["vocab_size"]
        tokens = torch.from_numpy(self.rng.integers(0, V, (shape.B, shape.T + 1)))
        tokens = tokens.to(self.device)
        started = clock(self.device)
        start = self.model.initial_state(shape.B) if self.independent else self.state
        logits, state = self.model(tokens[:, :-1], start)
        cost = sequence_loss(logits, tokens[:, 1:], config["loss"])
        self.optimizer.zero_grad(set_to_none=True)
        cost.backward()
        penalised_step(
            self.optimizer,
            self.parameters,
            config["clip"],
            config["max_grad_norm"],
            config["weight_decay"],
        )
        self.state = detach_state(state)
        return clock(self.device) - started


class DepthProducts:
    """The Grid LSTM's depth-LSTM products alone, as a training step makes them: per layer
    the gates [h_T, h_d] [W_TD; W_DD]^T ([N, 2H] x [2H, 4H], N = B T rows), their input
    gradient and their weight gradient, on random operands."""

    def __init__(self, shape: PeerShape, device: torch.device) -> None:
        N, H = shape.B * shape.T, shape.hidden
        generator = torch.Generator().manual_seed(0)

        def rand(*size):
            return torch.rand(*size, generator=generator).to(device)

        self.x, self.weight, self.dy = rand(N, 2 * H), rand(4 * H, 2 * H), rand(N, 4 * H)
        self.layers, self.device = shape.layers, device
        self.flops = shape.layers * 3 * 2 * N * 2 * H * 4 * H
        self.onednn = device.type == "cpu" and onednn.applies(torch.float32)
        if self.onednn:  # the left operands as oneDNN's products want them
            self.dy_t, self.x_t = self.dy.t().contiguous(), self.x.t().contiguous()
            self.weight_t = self.weight.t().contiguous()

    def seconds(self) -> float:
        """The products' seconds, the faster of ATen's mm and oneDNN (with its weights
        packed in the call)."""
        started = clock(self.device)
        for _ in range(self.layers):
            torch.mm(self.x, self.weight.t())
            torch.mm(self.dy, self.weight)
            torch.mm(self.dy.t(), self.x)
        aten = clock(self.device) - started
        if not self.onednn:
            return aten
        started = clock(self.device)
        N = self.x.shape[0]
        for _ in range(self.layers):
            onednn.linear(self.x, onednn.pack(self.weight, N))
            onednn.linear(self.dy, onednn.pack(self.weight_t, N))
            onednn.linear(self.dy_t, onednn.pack(self.x_t, self.dy_t.shape[0]))
        return min(aten, clock(self.device) - started)


def _measure(shape: PeerShape, rounds: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    peer = PeerTrainee(build_model(shape.config, shape.config["vocab_size"]), shape, device)
    reference = PeerTrainee(FusedLSTMLanguageModel(shape), shape, device)
    depth = DepthProducts(shape, device) if shape.config["model"] == "grid_lstm" else None
    peer.step()  # warm-up: one-time costs out of the rounds
    reference.step()
    seconds, depth_seconds = {"peer": [], "lstm": []}, []
    for _ in range(rounds):  # interleaved: a round's steps see the same machine
        seconds["peer"].append(peer.step())
        seconds["lstm"].append(reference.step())
        if depth is not None:
            depth.seconds()  # the first call of each way builds its kernels
            depth_seconds.append(depth.seconds())
    tokens = shape.B * shape.T
    row = {
        "shape": shape.describe,
        "peer_tokens_per_s": tokens / statistics.median(seconds["peer"]),
        "lstm_tokens_per_s": tokens / statistics.median(seconds["lstm"]),
        "ratio": statistics.median(
            own / peer for peer, own in zip(seconds["peer"], seconds["lstm"], strict=True)
        ),
        "step_seconds": seconds,
    }
    if depth is not None:  # the Grid LSTM's step is at least nn.LSTM's plus these
        row["ceiling"] = statistics.median(
            own / (own + extra) for own, extra in zip(seconds["lstm"], depth_seconds, strict=True)
        )
        row["depth_gflops"] = depth.flops / 1e9
        row["depth_rate"] = depth.flops / 1e9 / statistics.median(depth_seconds)
    return row


def peer_rows(
    rounds: int, quick: bool, device: torch.device, overrides: Mapping[str, Any] | None = None
) -> list[dict]:
    """Measure every peer beside nn.LSTM on ``device`` (``quick``: T at most 10), print the
    table and return its rows. ``overrides`` are config updates for every peer (tests shrink
    them)."""
    print(
        f"\nPeers beside nn.LSTM (one training step each, the config's optimizer and "
        f"clipping;\nratio: median over {rounds} round(s) of nn.LSTM's step time / the "
        f"peer's{', T at most ' + str(QUICK_STEPS) if quick else ''})"
    )
    print(
        f"  {'config':<21} {'model':<17} {'shape':<24} {'tok/s':>7} {'nn.LSTM':>8} "
        f"{'ratio':>6} {'target':>7}"
    )
    rows = []
    for name, family, target in PEERS:
        shape = peer_shape(name, QUICK_STEPS if quick else None, overrides or {})
        row = {"config": name, "model": family, "target": target, **_measure(shape, rounds, device)}
        row["pass"] = row["ratio"] >= target
        rows.append(row)
        print(
            f"  {name:<21} {family:<17} {row['shape']:<24} {row['peer_tokens_per_s']:>7.0f} "
            f"{row['lstm_tokens_per_s']:>8.0f} {row['ratio']:>5.2f}x {target:>6.2f}x "
            f"{'PASS' if row['pass'] else 'MISS'}",
            flush=True,
        )
        if "ceiling" in row:
            print(
                f"  {'':<21} ceiling {row['ceiling']:.2f}x: nn.LSTM's step plus the depth "
                f"LSTMs' products alone ({row['depth_gflops']:.0f} GFLOP at "
                f"{row['depth_rate']:.0f} GFLOP/s)",
                flush=True,
            )
    return rows


def peer_checks(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """The suite's target lines: (what, the figure, whether it is met)."""
    return [
        (
            f"peer {row['config']} >= {row['target']:g}x nn.LSTM",
            f"{row['ratio']:.2f}x"
            + (f" (ceiling {row['ceiling']:.2f}x)" if "ceiling" in row else ""),
            row["pass"],
        )
        for row in rows
    ]
