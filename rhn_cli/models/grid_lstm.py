"""2D Grid LSTM language model (Kalchbrenner et al. 2015), as coreylynch/grid-lstm.

A stack of n Grid LSTM blocks along two dimensions: time (each layer's temporal LSTM,
carried from step to step) and depth (an LSTM whose memory runs up the layers within a
time step). Both use char-rnn's gated update on the sum of two nn.Linear(H, 4H) outputs,
each WITH its own bias, gates in order [i, f, o, g]:

    lstm(A, B, c_prev):  [i | f | o | g] = A + B
                         c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g)
                         h = sigmoid(o) * tanh(c)

(The paper writes h = tanh(sigmoid(o) * c); the reference code, and so this port, uses
char-rnn's form: grid-lstm issue #4.) At time step t, for layers L = 1..n:

    h_d^0 = E[x_t],  c_d^0 = 0                       (the depth input of layer 1)
    h_d^{L-1} <- dropout(h_d^{L-1})                  (L >= 2 only; c_d is never dropped)
    c_T^L(t), h_T^L(t) = lstm(W_TT^L h_T^L(t-1), W_DT^L h_d^{L-1}, c_T^L(t-1))   temporal
    c_d^L,    h_d^L    = lstm(W_TD^L h_T^L(t),   W_DD^L h_d^{L-1}, c_d^{L-1})    depth
    logits_t = decoder(dropout(h_d^n))

The depth LSTM is "prioritised" (paper §3.2): it reads the NEW temporal output h_T^L(t).
Only the temporal (h_T^L, c_T^L) of every layer is handed to step t+1; the depth memory
restarts from c_d^0 = 0 at every step. The temporal weights W_TT^L, W_DT^L are per layer;
with ``tie_weights`` (the reference default, paper §3.5) W_TD and W_DD, biases included,
are ONE pair of nn.Linear modules shared by every layer, as Torch's ``share``: the same
Parameter objects, counted once, whose gradients accumulate over all layers. Untied,
each layer has its own pair.

Because the depth LSTM has no recurrence in time, each layer runs its temporal LSTM over
the whole sequence first and then its depth LSTM for all steps in one go; this computes
exactly the per-step equations above. That one go is one step of a standard LSTM with
B x T rows: input h_T^L(t) (weights W_TD), hidden state h_d^{L-1} (W_DD), cell c_d^{L-1},
so it runs torch's fused LSTM kernel too (a sequence of length 1; the gradients reach
h_d^{L-1} and c_d^{L-1} through its initial state), the products and the gated update
in one call instead of autograd's dozen elementwise passes over [B, T, 4H]
(``USE_FUSED_DEPTH``; about 1.4x the grid's training speed at wiki_grid3's shape).

Dropout is the standard inverted kind (kept units scaled by 1 / (1 - p)) with a fresh
mask per unit, step and example, in training mode only, on h_d^{L-1} (L >= 2) and on
the decoder's input, as the reference ``nn.Dropout`` nodes.

Initialisation is char-rnn's: every parameter U(-init_scale, init_scale) (0.08 in the
reference), then the forget block (entries H..2H) of the bias of every Linear the Lua
graph annotates ``i2h_L`` is set to 1.0. Those are W_TT^L (the temporal LSTM's
recurrent input) and W_TD (the depth LSTM's input from the temporal h), so both LSTMs
start with forget bias 1 plus the uniform bias of their other Linear (W_DT^L, W_DD).

Parameters: V*H (embedding) + n * 2 * (4H*H + 4H) (temporal) + k * 2 * (4H*H + 4H)
(depth; k = 1 tied, n untied) + H*V + V (decoder), e.g. 32,442,205 for V=205, H=1000,
n=3, tied (the README's 3-layer grid on enwik8) and 412,993 for the tiny Shakespeare
default (V=65, H=128, n=2, tied).

The state is the temporal (h, c), each [num_layers, B, H], zeros at the start.

Each layer's temporal LSTM is char-rnn's standard LSTM layer (input weights W_DT^L,
recurrent W_TT^L), so it runs torch's fused LSTM kernel (what ``nn.LSTM`` calls), the
weights and both biases taken from the layer's own Linears at every forward pass, gate
blocks reordered (:func:`rhn_cli.models.charrnn_lstm.fused_lstm_weights`): parameters,
checkpoints and, in float64, results are the loop's. The Python loop stays the
reference: ``USE_FUSED = False`` forces it. In float32 the two round differently, so a
run records which one computed it, and a resumed or evaluated run computes with the same
one (:mod:`rhn_cli.experiment.recording`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rhn_cli.models.base import LanguageModel, one_layer_lstm
from rhn_cli.models.charrnn_lstm import fused_lstm_weights, lstm_update, set_forget_bias
from rhn_cli.models.dropout import step_dropout

# Off: every temporal LSTM runs the Python loop (the reference), as runs recorded before
# the fused kernel did; recording.pin_recorded_decisions sets it as a run recorded.
USE_FUSED = True
# Off: the depth LSTM runs as torch's elementwise operations on the two Linears' outputs
# (the reference), as runs recorded before its fused kernel did; pinned likewise.
USE_FUSED_DEPTH = True


@dataclass(frozen=True)
class GridLSTMConfig:
    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 2
    dropout: float = 0.0
    init_scale: float = 0.08
    tie_weights: bool = True


class GridLSTMLayer(nn.Module):
    """One Grid LSTM block (temporal then prioritised depth LSTM) run over a sequence.

    ``time_to_depth`` / ``depth_to_depth`` may be modules shared with other layers.
    """

    def __init__(self, hidden_size: int, time_to_depth: nn.Linear, depth_to_depth: nn.Linear):
        super().__init__()
        H = hidden_size
        self.time_to_time = nn.Linear(H, 4 * H)  # W_TT^L, annotated "i2h_L" in the Lua
        self.depth_to_time = nn.Linear(H, 4 * H)  # W_DT^L, "h2h_L"
        self.time_to_depth = time_to_depth  # W_TD, "i2h_L"
        self.depth_to_depth = depth_to_depth  # W_DD, "h2h_L"

    def forward(
        self,
        depth_h: torch.Tensor,
        depth_c: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Depth input h_d^{L-1}, c_d^{L-1} [B, T, H] (h already dropped) and temporal
        state h, c [B, H] -> (h_d^L, c_d^L [B, T, H], final temporal h, c [B, H])."""
        if USE_FUSED:
            temporal, h, c = self._fused_temporal(depth_h, h, c)
        else:
            temporal, h, c = self._loop_temporal(depth_h, h, c)
        # The depth LSTM has no recurrence in time: all steps at once.
        if USE_FUSED_DEPTH:
            depth_h, depth_c = self._fused_depth(temporal, depth_h, depth_c)
        else:
            depth_h, depth_c = lstm_update(
                self.time_to_depth(temporal) + self.depth_to_depth(depth_h), depth_c
            )
        return depth_h, depth_c, h, c

    def _fused_depth(
        self, temporal: torch.Tensor, depth_h: torch.Tensor, depth_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The depth LSTM as one step of the fused kernel over B x T rows: char-rnn's
        layer with input weights W_TD (reading h_T^L) and recurrent W_DD (h_d^{L-1})."""
        B, T, H = depth_h.shape
        weights = fused_lstm_weights(self.time_to_depth, self.depth_to_depth)
        rows = temporal.reshape(B * T, 1, H)  # a copy: the kernel left temporal time-major
        h, _, c = one_layer_lstm(
            rows, depth_h.reshape(B * T, H), depth_c.reshape(B * T, H), weights, self.training
        )
        return h.reshape(B, T, H), c.reshape(B, T, H)

    def _fused_temporal(
        self, depth_h: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The temporal LSTM is char-rnn's layer with input weights W_DT and recurrent W_TT.
        weights = fused_lstm_weights(self.depth_to_time, self.time_to_time)
        # Left time-major in memory (charrnn copies its outputs: dropout draws in memory
        # order): only the depth Linear reads these, and its result is batch-major.
        return one_layer_lstm(depth_h, h, c, weights, self.training)

    def _loop_temporal(
        self, depth_h: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from_below = self.depth_to_time(depth_h)  # no dependence on the state: all steps at once
        temporal = []
        for t in range(depth_h.shape[1]):
            h, c = lstm_update(self.time_to_time(h) + from_below[:, t], c)
            temporal.append(h)
        return torch.stack(temporal, dim=1), h, c


class GridLSTMLanguageModel(LanguageModel):
    """Lookup table -> n Grid LSTM blocks -> dropout -> linear decoder."""

    def __init__(self, config: GridLSTMConfig) -> None:
        super().__init__()
        self.config = config
        V, H, n = config.vocab_size, config.hidden_size, config.num_layers
        self.embedding = nn.Embedding(V, H)
        if config.tie_weights:
            shared = (nn.Linear(H, 4 * H), nn.Linear(H, 4 * H))
            depth_pairs = [shared] * n
        else:
            depth_pairs = [(nn.Linear(H, 4 * H), nn.Linear(H, 4 * H)) for _ in range(n)]
        self.layers = nn.ModuleList(GridLSTMLayer(H, *pair) for pair in depth_pairs)
        self.decoder = nn.Linear(H, V)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.config.init_scale
        with torch.no_grad():
            for p in self.parameters():  # shared parameters come once
                p.uniform_(-scale, scale)
        for layer in self.layers:
            set_forget_bias(layer.time_to_time)
            set_forget_bias(layer.time_to_depth)

    def describe(self) -> str:
        c = self.config
        tied = "tied" if c.tie_weights else "untied"
        line = f"Grid LSTM {c.num_layers} x {c.hidden_size} units ({tied} depth weights)"
        if c.dropout:
            line += f", dropout {c.dropout:g}"
        return line

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero temporal (h, c), each [num_layers, B, H]."""
        c = self.config
        zeros = self.decoder.bias.new_zeros(c.num_layers, batch_size, c.hidden_size)
        return zeros, zeros.clone()

    def forward(
        self,
        tokens: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        masks: dict | None = None,
        *,
        return_hidden: bool = False,
    ):
        """tokens [B, T], temporal state (h, c) [L, B, H] -> (logits [B, T, V], new state).

        ``masks`` is unused: the reference draws a fresh dropout mask at every step.
        ``hidden`` is the top depth output h_d^n before dropout.
        """
        h0, c0 = state
        depth_h = self.embedding(tokens)
        depth_c = torch.zeros_like(depth_h)  # the zero depth memory fed at every step
        final_h, final_c = [], []
        for index, layer in enumerate(self.layers):
            if index > 0:
                depth_h = self._dropout(depth_h)
            depth_h, depth_c, h, c = layer(depth_h, depth_c, h0[index], c0[index])
            final_h.append(h)
            final_c.append(c)
        hidden = depth_h
        logits = self.decoder(self._dropout(depth_h))
        new_state = (torch.stack(final_h), torch.stack(final_c))
        if return_hidden:
            return logits, new_state, hidden
        return logits, new_state

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return step_dropout(x, self.config.dropout, self.training)


def build(config: Mapping[str, Any], vocab_size: int) -> GridLSTMLanguageModel:
    """The Grid LSTM that ``config`` describes: the general keys (hidden_size, num_layers)
    and those declared in grid_lstm_keys.py, torch-free so validation needs no torch."""
    return GridLSTMLanguageModel(
        GridLSTMConfig(
            vocab_size=vocab_size,
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_layers"]),
            dropout=float(config["dropout"]),
            init_scale=float(config["init_scale"]),
            tie_weights=bool(config["tie_weights"]),
        )
    )
