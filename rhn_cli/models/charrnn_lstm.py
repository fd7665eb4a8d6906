"""Stacked LSTM language model of karpathy/char-rnn, as forked by coreylynch/grid-lstm.

This is the baseline the Grid LSTM README compares against (``-model lstm``,
``model/LSTM.lua``). The fork embeds characters with a lookup table of width H instead
of char-rnn's one-hot input, so every layer reads an H-wide input. Per layer L and time
step t, with x^1_t = E[w_t] and x^L_t = dropout(h^{L-1}_t) for L >= 2:

    [i | f | o | g] = i2h^L(x^L_t) + h2h^L(h^L_{t-1})      (two nn.Linear(H, 4H), both with bias)
    c^L_t = sigmoid(f) * c^L_{t-1} + sigmoid(i) * tanh(g)
    h^L_t = sigmoid(o) * tanh(c^L_t)
    logits_t = decoder(dropout(h^n_t))                      (nn.Linear(H, V))

Dropout is the standard inverted kind (kept units scaled by 1 / (1 - p)), a fresh mask
per unit, per time step and per example, in training mode only, and only on the
non-recurrent connections char-rnn drops: the inputs of layers >= 2 and the decoder's
input. The embedding output, the recurrent h_{t-1} and the carried state never are.

Initialisation is char-rnn's: every parameter U(-init_scale, init_scale) (the reference
uses 0.08), then the forget block (entries H..2H of the gate order [i, f, o, g]) of each
layer's ``i2h`` bias is set to 1.0; the ``h2h`` bias keeps its uniform draw, so the
forget gate's total bias starts in 1 +- init_scale.

Parameters: V*H (embedding) + L * 2 * (4H*H + 4H) + H*V + V (decoder), e.g. 24,434,205
for V=205, H=1000, L=3 (the Grid LSTM README's 3-layer stacked LSTM on enwik8).

The state is (h, c), each [num_layers, B, H], zeros at the start; char-rnn carries it
from one minibatch to the next.

Every layer is a standard LSTM (the dropout acts between layers only), so each runs
torch's fused LSTM kernel (what ``nn.LSTM`` calls), its weights and both biases taken
from the layer's own ``i2h`` and ``h2h`` at every forward pass, gate blocks reordered
(:func:`fused_lstm_weights`): parameters, checkpoints and, in float64, results are the
loop's. The Python loop stays the reference: ``USE_FUSED = False`` forces it. In float32
the two round differently, so a run records which one computed it, and a resumed or
evaluated run computes with the same one (:mod:`rhn_cli.experiment.recording`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rhn_cli.models.base import LanguageModel, one_layer_lstm
from rhn_cli.models.dropout import step_dropout

# Off: every layer runs the Python loop (the reference), as runs recorded before the
# fused kernel did; recording.pin_recorded_decisions sets it as a run recorded.
USE_FUSED = True


def lstm_update(gate_sums: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """char-rnn's gated update: gate_sums [..., 4H] in order [i, f, o, g] -> (h, c).

    h = sigmoid(o) * tanh(c), as every char-rnn-derived model (the Grid LSTM paper
    writes tanh(sigmoid(o) * c) instead; grid-lstm issue #4).
    """
    i, f, o, g = gate_sums.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def set_forget_bias(linear: nn.Linear, value: float = 1.0) -> None:
    """Set the forget block (entries H..2H of gate order [i, f, o, g]) of a bias."""
    hidden_size = linear.out_features // 4
    with torch.no_grad():
        linear.bias[hidden_size : 2 * hidden_size] = value


@dataclass(frozen=True)
class CharRNNLSTMConfig:
    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 2
    dropout: float = 0.0
    init_scale: float = 0.08


class CharRNNLSTMLayer(nn.Module):
    """One char-rnn LSTM layer run over a sequence; names follow the Lua annotations."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.i2h = nn.Linear(input_size, 4 * hidden_size)
        self.h2h = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(
        self, inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs [B, T, in], h, c [B, H] -> (outputs [B, T, H], final h, final c)."""
        if USE_FUSED:
            return self._fused_forward(inputs, h, c)
        return self._loop_forward(inputs, h, c)

    def _fused_forward(
        self, inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = fused_lstm_weights(self.i2h, self.h2h)
        outputs, h, c = one_layer_lstm(inputs, h, c, weights, self.training)
        # The kernel hands back a time-major layout; dropout draws its mask in memory
        # order, so only a batch-major copy, as the loop's, gets the loop's masks.
        return outputs.contiguous(), h, c

    def _loop_forward(
        self, inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The input half of the sums does not depend on the state: one product for all steps.
        from_input = self.i2h(inputs)
        outputs = []
        for t in range(inputs.shape[1]):
            h, c = lstm_update(from_input[:, t] + self.h2h(h), c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c


def fused_lstm_weights(i2h: nn.Linear, h2h: nn.Linear) -> list[torch.Tensor]:
    """torch's fused-LSTM weights [w_ih, w_hh, b_ih, b_hh] from a layer's i2h and h2h,
    differentiably (the gradients reach them): nn.Linear already stores [4H, in] as torch
    does; only the gate blocks move, char-rnn's [i, f, o, g] to torch's [i, f, g, o]."""
    return [_torch_gate_order(p) for p in (i2h.weight, h2h.weight, i2h.bias, h2h.bias)]


def _torch_gate_order(rows: torch.Tensor) -> torch.Tensor:
    """[4H, ...] in char-rnn's gate order [i, f, o, g] -> torch's [i, f, g, o] (one copy;
    autograd splits the gradient back, one copy too)."""
    i, f, o, g = rows.chunk(4)
    return torch.cat((i, f, g, o))


class CharRNNLSTMLanguageModel(LanguageModel):
    """Lookup table -> stacked char-rnn LSTM layers -> dropout -> linear decoder."""

    def __init__(self, config: CharRNNLSTMConfig) -> None:
        super().__init__()
        self.config = config
        V, H = config.vocab_size, config.hidden_size
        self.embedding = nn.Embedding(V, H)
        self.layers = nn.ModuleList(CharRNNLSTMLayer(H, H) for _ in range(config.num_layers))
        self.decoder = nn.Linear(H, V)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.config.init_scale
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-scale, scale)
        for layer in self.layers:
            set_forget_bias(layer.i2h)  # train.lua: nodes annotated "i2h_L" only

    def describe(self) -> str:
        c = self.config
        line = f"char-rnn LSTM {c.num_layers} x {c.hidden_size} units"
        if c.dropout:
            line += f", dropout {c.dropout:g}"
        return line

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each [num_layers, B, H]."""
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
        """tokens [B, T], state (h, c) [L, B, H] -> (logits [B, T, V], new state).

        ``masks`` is unused: char-rnn draws a fresh dropout mask at every step.
        """
        h0, c0 = state
        x = self.embedding(tokens)
        final_h, final_c = [], []
        for index, layer in enumerate(self.layers):
            if index > 0:
                x = self._dropout(x)
            x, h, c = layer(x, h0[index], c0[index])
            final_h.append(h)
            final_c.append(c)
        hidden = x
        logits = self.decoder(self._dropout(x))
        new_state = (torch.stack(final_h), torch.stack(final_c))
        if return_hidden:
            return logits, new_state, hidden
        return logits, new_state

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return step_dropout(x, self.config.dropout, self.training)


def build(config: Mapping[str, Any], vocab_size: int) -> CharRNNLSTMLanguageModel:
    """The char-rnn LSTM that ``config`` describes: the general keys (hidden_size, num_layers)
    and those declared in charrnn_lstm_keys.py, torch-free so validation needs no torch."""
    return CharRNNLSTMLanguageModel(
        CharRNNLSTMConfig(
            vocab_size=vocab_size,
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_layers"]),
            dropout=float(config["dropout"]),
            init_scale=float(config["init_scale"]),
        )
    )
