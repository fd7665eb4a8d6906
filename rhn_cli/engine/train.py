"""The reference RHN training loop (``rhn_train.py`` of the original code).

Per epoch: set the scheduled learning rate, one pass of stateful truncated BPTT over
the training streams (fresh dropout masks per minibatch, the state carried and
detached between minibatches, global-norm clipping, plain SGD), then batched
evaluation on valid and test with the training B and T and no dropout. Every pass over
a split starts from a zero state. Perplexity is exp(mean NLL per token); bits are
log2(perplexity). As in the reference, the training perplexity is computed from the
full cost, so it includes the (tiny) L2 term.

The engine knows nothing about Sacred: it reports through a :class:`Reporter`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import numpy as np
import torch
from tqdm import tqdm

from rhn_cli.data.batching import minibatches, num_minibatches
from rhn_cli.data.corpus import Corpus
from rhn_cli.engine.objective import l2_penalty, learning_rate_at, sequence_loss
from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel


class Reporter(Protocol):
    """Where the engine sends metrics and facts about the run."""

    def log_scalar(self, name: str, value: float, step: int) -> None: ...

    def set_info(self, key: str, value: Any) -> None: ...


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainingSummary:
    best_epoch: int  # 1-based
    best_valid_ppl: float
    history: dict[str, list[float]] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but no CUDA device is available here; use device=cpu")
    return torch.device(name)


def build_model(config: Mapping[str, Any], vocab_size: int) -> RHNLanguageModel:
    return RHNLanguageModel(
        RHNConfig(
            vocab_size=vocab_size,
            hidden_size=config["hidden_size"],
            depth=config["depth"],
            num_layers=config["num_layers"],
            tied=config["tied"],
            init_scale=config["init_scale"],
            init_bias=config["init_bias"],
            drop_x=config["drop_x"],
            drop_i=config["drop_i"],
            drop_h=config["drop_h"],
            drop_o=config["drop_o"],
        )
    )


def _bits(ppl: float) -> float:
    return math.log2(ppl)


def _as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)


def train_epoch(
    model: RHNLanguageModel,
    tokens: np.ndarray,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any],
    device: torch.device,
    epoch: int,
    progress: TextIO | None = None,
) -> float:
    """One pass of stateful truncated BPTT; returns the training perplexity.

    ``progress`` is the stream for a progress bar (a terminal), or None for no bar.
    """
    B, T = config["batch_size"], config["num_steps"]
    parameters = list(model.parameters())
    model.train()
    state = model.initial_state(B)
    costs, iters = 0.0, 0
    steps = num_minibatches(len(tokens), B, T)
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch}",
        unit="batch",
        leave=False,
        disable=progress is None,
        file=progress,
        mininterval=1.0,
    )
    with bar:
        for step, (inputs, targets) in enumerate(minibatches(tokens, B, T, "train"), start=1):
            logits, state = model(_as_tensor(inputs, device), state)
            state = state.detach()
            cost = sequence_loss(logits, _as_tensor(targets, device))
            cost = cost + l2_penalty(parameters, config["weight_decay"])
            optimizer.zero_grad(set_to_none=True)
            cost.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config["max_grad_norm"])
            cost_value = cost.item()
            if not (math.isfinite(cost_value) and math.isfinite(grad_norm.item())):
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}, step {step}/{steps}: loss {cost_value}, "
                    f"gradient norm {grad_norm.item()}; try a lower learning_rate or "
                    "max_grad_norm, or a smaller init_scale"
                )
            optimizer.step()
            costs += cost_value
            iters += T
            bar.update()
            if bar.n % 10 == 0:
                bar.set_postfix(ppl=f"{math.exp(costs / iters):.2f}", refresh=False)
    return math.exp(costs / iters)


@torch.no_grad()
def evaluate(
    model: RHNLanguageModel,
    tokens: np.ndarray,
    batch_size: int,
    num_steps: int,
    device: torch.device,
    split: str,
) -> float:
    """Batched perplexity of ``tokens`` with no dropout, state carried from a zero start."""
    model.eval()
    state = model.initial_state(batch_size)
    total_nll, count = 0.0, 0
    for inputs, targets in minibatches(tokens, batch_size, num_steps, split):
        logits, state = model(_as_tensor(inputs, device), state)
        total_nll += sequence_loss(logits, _as_tensor(targets, device)).item() * batch_size
        count += targets.size
    return math.exp(total_nll / count)


def train(
    config: Mapping[str, Any],
    corpus: Corpus,
    reporter: Reporter,
    echo=print,
    progress: TextIO | None = None,
) -> TrainingSummary:
    """Train and evaluate a model on ``corpus`` as ``config`` says; returns the best epoch.

    Epoch summaries go to ``echo``; a per-epoch progress bar goes to ``progress`` if given.
    """
    device = pick_device(config["device"])
    B, T = config["batch_size"], config["num_steps"]
    # Fail on a too-short split now, not after the first training epoch.
    for split in ("train", "valid", "test"):
        next(minibatches(corpus.split(split), B, T, split))

    model = build_model(config, corpus.vocab_size).to(device)
    n_params = model.num_parameters()
    reporter.set_info("nr_parameters", n_params)
    echo(
        f"model: RHN depth {config['depth']} x {config['hidden_size']} units x "
        f"{config['num_layers']} layer(s), {n_params:,} parameters, on {device}"
    )
    entropy = corpus.entropy_rate_bits
    echo(
        f"data: {corpus.name}, vocabulary {corpus.vocab_size}, "
        f"{len(corpus.train):,}/{len(corpus.valid):,}/{len(corpus.test):,} tokens"
        + (f", source entropy rate {entropy:.4f} bits/symbol" if entropy is not None else "")
    )
    if entropy is not None:
        reporter.set_info("source_entropy_bits", entropy)

    optimizer = torch.optim.SGD(model.parameters(), lr=config["learning_rate"])
    history: dict[str, list[float]] = {"train": [], "valid": [], "test": []}
    for epoch_index in range(config["max_max_epoch"]):
        epoch = epoch_index + 1
        lr = learning_rate_at(
            epoch_index, config["learning_rate"], config["lr_decay"], config["max_epoch"]
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        train_ppl = train_epoch(model, corpus.train, optimizer, config, device, epoch, progress)
        train_seconds = time.perf_counter() - started
        tokens_per_s = num_minibatches(len(corpus.train), B, T) * B * T / train_seconds
        valid_ppl = evaluate(model, corpus.valid, B, T, device, "valid")
        test_ppl = evaluate(model, corpus.test, B, T, device, "test")

        for split, ppl in (("train", train_ppl), ("valid", valid_ppl), ("test", test_ppl)):
            history[split].append(ppl)
            reporter.log_scalar(f"{split}.ppl", ppl, epoch)
            reporter.log_scalar(f"{split}.bpc", _bits(ppl), epoch)
        reporter.log_scalar("lr", lr, epoch)
        reporter.log_scalar("tokens_per_s", tokens_per_s, epoch)
        reporter.set_info("epoch_nr", epoch)
        reporter.set_info(
            "logs",
            {
                "train_perplexity": list(history["train"]),
                "valid_perplexity": list(history["valid"]),
                "test_perplexity": list(history["test"]),
            },
        )
        line = (
            f"epoch {epoch:>3}/{config['max_max_epoch']}  lr {lr:.4g}  "
            f"train ppl {train_ppl:8.3f} bits {_bits(train_ppl):.4f}  "
            f"valid ppl {valid_ppl:8.3f} bits {_bits(valid_ppl):.4f}"
        )
        if entropy is not None:
            line += f"  (source entropy {entropy:.4f})"
        echo(line + f"  {tokens_per_s:,.0f} tok/s  {time.perf_counter() - started:.1f}s")

    best_index = int(np.argmin(history["valid"]))
    summary = TrainingSummary(best_index + 1, history["valid"][best_index], history)
    reporter.set_info("best_val_epoch", summary.best_epoch)
    reporter.set_info("best_valid_perplexity", summary.best_valid_ppl)
    best_bits = _bits(summary.best_valid_ppl)
    message = (
        f"best valid: epoch {summary.best_epoch}, ppl {summary.best_valid_ppl:.3f}, "
        f"{best_bits:.4f} bits; test ppl {history['test'][best_index]:.3f}"
    )
    if entropy:
        message += (
            f"; source entropy {entropy:.4f} bits, "
            f"model {100 * (best_bits - entropy) / entropy:+.1f}% above it"
        )
    echo(message)
    return summary
