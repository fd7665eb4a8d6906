"""Zoneout LSTM language model, as the char-PTB model of teganmaharaj/zoneout.

The reference (``recurrent.py`` ZoneoutLSTM, ``zoneout_char_ptb.py``) is one-hot(V) ->
Linear(V -> 4H) -> ZoneoutLSTM(H) -> Linear(H -> V) -> softmax. One layer l keeps an
LSTM hidden state h and cell c (width H). At time step t, with x_t its input:

    a_t = x_t W_in + b_in + h_{t-1} W_state          (no recurrent bias)
    a_t = [a0 | a1 | a2 | a3]                         slices: input, forget, candidate, output
    i_t = sigmoid(a0) * m_t                           input-gate dropout mask (see below)
    f_t = sigmoid(a1 + forget_bias)                   forget_bias is +1 in the reference
    c~_t = f_t * c_{t-1} + i_t * tanh(a2)
    h~_t = sigmoid(a3) * tanh(c~_t)                   from the un-zoned c~_t
    c_t = zoneout(c~_t, c_{t-1}, z_cells)
    h_t = zoneout(h~_t, h_{t-1}, z_states)

zoneout (:mod:`rhn_cli.models.zoneout`) keeps each unit's old value with probability z
at train time (a fresh mask per unit, per step, per example) and uses the expectation
z * old + (1 - z) * new at eval time. The zoned-out h_t and c_t feed step t + 1, and the
zoned-out h_t is the layer's output: logits_t = h_t W_out + b_out for the top layer,
the next layer's x_t otherwise.

For the first layer x_t is the one-hot vector of token w_t, so x_t W_in is row w_t of
W_in: an embedding lookup with the same parameters as the reference's Linear(V -> 4H).
Deeper layers (the reference has one; ``num_layers`` > 1 stacks more) read the layer
below's zoned-out h through their own Linear(H -> 4H).

Input-gate dropout ("recurrent dropout without memory loss", the paper's baseline) is
*not* inverted: at train time m_t ~ Bernoulli(1 - drop_igates) per unit, per step, per
example (the reference samples (T, B, H) masks); at eval time m_t = 1 - drop_igates.
``drop_igates`` is a drop rate. The reference's ``--drop_prob_igates`` is the *keep*
probability 1 - drop_igates, and its README's "dropout probability 0.7" for
``--drop_prob_igates=0.7`` is ambiguous: by the code it drops 30% of the gates.

The initial state h_0, c_0 is learned: one zero-initialised vector of each per layer,
broadcast over the batch (the reference starts every char-PTB chunk from it).

Initialisation (the reference's ``ortho``): every weight is block-orthogonal
(:func:`block_orthogonal_`); biases, h_0 and c_0 are 0. For V=50, H=1000 the model has
50*4000 + 4000 + 1000*4000 + 1000*50 + 50 + 1000 + 1000 = 4,256,050 parameters.
Block-orthogonality needs V to divide (or be a multiple of) both H and 4H. The reference
only ever has V=50 (it hard-codes 50 units even for text8's 27 symbols); for any other V
the vocabulary side is initialised as a block-orthogonal draw of the smallest fitting
width V' >= V, keeping its first V rows of W_in and first V columns of W_out (for V=27,
H=1000: V'=40). A fitting V is initialised exactly as the reference.

The layer's time loop runs on :mod:`rhn_cli.kernels.lstm_recurrence` (a hand-written
backward; the same math, draws and, in float64, results); ``ZoneoutLSTMLayer._loop_forward``,
the autograd loop, is the reference (``lstm_recurrence.USE_RECURRENCE = False``).

Weight noise and the norm stabiliser of the paper's baselines are applied by the engine
(:mod:`rhn_cli.engine.regularizers`) to any model; ``return_hidden=True`` gives it the
zoned-out h sequence of the top layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rhn_cli.kernels import lstm_recurrence
from rhn_cli.models.base import LanguageModel
from rhn_cli.models.zoneout import zoneout


def block_orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """In place: the reference's ``OrthogonalInitialization`` of a weight (m, n).

    Draws N(0, 1) of shape (m, n), then replaces every f x f block, f = gcd(m, n), by the
    U factor of its SVD. The orientation is the reference's: (inputs, outputs), the
    weight right-multiplies a row vector (W_in (V, 4H), W_state (H, 4H), W_out (H, V)),
    so W_state is one orthogonal H x H block per gate. The reference asserts that f is m
    or n (one side is a whole number of blocks of the other); so does this.
    """
    m, n = weight.shape
    f = math.gcd(m, n)
    if f not in (m, n):
        raise ValueError(
            f"block-orthogonal init of a {m} x {n} weight needs one side to divide the "
            f"other (gcd {f} is neither {m} nor {n})"
        )
    with torch.no_grad():
        draw = torch.randn(m, n, dtype=torch.float64)
        # [m/f, n/f] grid of f x f blocks -> one batched SVD
        blocks = draw.reshape(m // f, f, n // f, f).transpose(1, 2)
        u = torch.linalg.svd(blocks).U
        weight.copy_(u.transpose(1, 2).reshape(m, n))
    return weight


def fitting_vocab_width(vocab_size: int, hidden_size: int) -> int:
    """The smallest V' >= V for which (V', 4H) and (H, V') are block-orthogonal shapes."""

    def fits(a: int, b: int) -> bool:
        return a % b == 0 or b % a == 0

    width = vocab_size
    while not (fits(width, hidden_size) and fits(width, 4 * hidden_size)):
        width += 1
    return width


def _block_orthogonal_corner_(weight: torch.Tensor, drawn_shape: tuple[int, int]) -> None:
    """weight <- the leading corner of a block-orthogonal draw of ``drawn_shape``."""
    drawn = block_orthogonal_(torch.empty(drawn_shape, dtype=torch.float64))
    with torch.no_grad():
        weight.copy_(drawn[: weight.shape[0], : weight.shape[1]])


@dataclass(frozen=True)
class ZoneoutLSTMConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int = 1
    z_cells: float = 0.0  # probability of keeping the old cell value
    z_states: float = 0.0  # probability of keeping the old hidden value
    drop_igates: float = 0.0  # input-gate drop rate (not rescaled)
    forget_bias: float = 1.0


class ZoneoutLSTMLayer(nn.Module):
    """One LSTM layer with zoneout and input-gate dropout (see the module docstring)."""

    def __init__(self, input_size: int, config: ZoneoutLSTMConfig):
        super().__init__()
        H = config.hidden_size
        self.config = config
        self.input_weight = nn.Parameter(torch.empty(input_size, 4 * H))  # W_in
        self.input_bias = nn.Parameter(torch.zeros(4 * H))  # b_in
        self.state_weight = nn.Parameter(torch.empty(H, 4 * H))  # W_state
        self.initial_h = nn.Parameter(torch.zeros(H))
        self.initial_c = nn.Parameter(torch.zeros(H))

    def reset_parameters(self, drawn_input_size: int) -> None:
        """Ortho init; W_in is the first rows of a (drawn_input_size, 4H) draw."""
        _block_orthogonal_corner_(
            self.input_weight, (drawn_input_size, 4 * self.config.hidden_size)
        )
        block_orthogonal_(self.state_weight)
        with torch.no_grad():
            for p in (self.input_bias, self.initial_h, self.initial_c):
                p.zero_()

    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        """x_t W_in + b_in for all steps at once: [B, T, 4H].

        ``inputs`` is token ids [B, T] for the first layer (row w_t of W_in is the
        one-hot product) or the layer below's outputs [B, T, H].
        """
        if not inputs.is_floating_point():
            return F.embedding(inputs, self.input_weight) + self.input_bias
        return inputs @ self.input_weight + self.input_bias

    def forward(
        self, projected: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """projected [B, T, 4H], h, c [B, H] -> (outputs [B, T, H], final h, final c)."""
        if lstm_recurrence.USE_RECURRENCE:
            return lstm_recurrence.recurrence(projected, h, c, self.state_weight, self.cell())
        return self._loop_forward(projected, h, c)

    def cell(self) -> lstm_recurrence.Cell:
        """The layer's math for :func:`lstm_recurrence.recurrence`."""
        cfg = self.config
        return lstm_recurrence.Cell(
            lstm_recurrence.ZONEOUT_GATES,
            cfg.forget_bias,
            cfg.drop_igates,
            cfg.z_cells,
            cfg.z_states,
            self.training,
        )

    def _loop_forward(
        self, projected: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The autograd loop: the reference, and the path with the recurrence switched off."""
        cfg = self.config
        outputs = []
        for t in range(projected.shape[1]):
            a = projected[:, t] + h @ self.state_weight
            a_input, a_forget, a_candidate, a_output = a.chunk(4, dim=-1)
            input_gate = self._drop_input_gate(torch.sigmoid(a_input))
            forget_gate = torch.sigmoid(a_forget + cfg.forget_bias)
            new_c = forget_gate * c + input_gate * torch.tanh(a_candidate)
            new_h = torch.sigmoid(a_output) * torch.tanh(new_c)
            c = zoneout(new_c, c, cfg.z_cells, self.training)
            h = zoneout(new_h, h, cfg.z_states, self.training)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c

    def _drop_input_gate(self, gate: torch.Tensor) -> torch.Tensor:
        drop = self.config.drop_igates
        if drop <= 0.0:
            return gate
        if self.training:
            return gate * (torch.rand_like(gate) >= drop).to(gate.dtype)
        return gate * (1.0 - drop)


class ZoneoutLSTMLanguageModel(LanguageModel):
    """one-hot -> Zoneout LSTM layer(s) -> Linear(H -> V), with learned h_0 and c_0."""

    def __init__(self, config: ZoneoutLSTMConfig) -> None:
        super().__init__()
        self.config = config
        V, H = config.vocab_size, config.hidden_size
        self.layers = nn.ModuleList(
            ZoneoutLSTMLayer(V if layer == 0 else H, config) for layer in range(config.num_layers)
        )
        self.output_weight = nn.Parameter(torch.empty(H, V))  # W_out
        self.output_bias = nn.Parameter(torch.zeros(V))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        V, H = self.config.vocab_size, self.config.hidden_size
        width = fitting_vocab_width(V, H)  # V unless V does not fit the blocks
        for index, layer in enumerate(self.layers):
            layer.reset_parameters(width if index == 0 else H)
        _block_orthogonal_corner_(self.output_weight, (H, width))
        with torch.no_grad():
            self.output_bias.zero_()

    def describe(self) -> str:
        c = self.config
        line = (
            f"Zoneout LSTM {c.num_layers} x {c.hidden_size} units "
            f"(z_cells {c.z_cells:g}, z_states {c.z_states:g}"
        )
        if c.drop_igates:
            line += f", input-gate dropout {c.drop_igates:g}"
        return line + ")"

    def partly_used_parameters(self) -> list[str]:
        """The learned initial state: used in the first window of carried streams only."""
        return [
            name for name, _ in self.named_parameters() if name.endswith(("initial_h", "initial_c"))
        ]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned (h_0, c_0), each [L, B, H]; gradients flow back to the vectors."""
        H = self.config.hidden_size
        h = torch.stack([layer.initial_h.expand(batch_size, H) for layer in self.layers])
        c = torch.stack([layer.initial_c.expand(batch_size, H) for layer in self.layers])
        return h, c

    def forward(
        self,
        tokens: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        masks: dict | None = None,
        *,
        return_hidden: bool = False,
    ):
        """tokens [B, T], state (h, c) [L, B, H] -> (logits [B, T, V], new state).

        Zoneout and input-gate dropout masks are drawn per step inside the layers
        (``masks`` is unused); eval mode uses their expectations.
        """
        h0, c0 = state
        x = tokens
        final_h, final_c = [], []
        for layer_index, layer in enumerate(self.layers):
            x, h, c = layer(layer.project(x), h0[layer_index], c0[layer_index])
            final_h.append(h)
            final_c.append(c)
        hidden = x
        logits = hidden @ self.output_weight + self.output_bias
        new_state = (torch.stack(final_h), torch.stack(final_c))
        if return_hidden:
            return logits, new_state, hidden
        return logits, new_state


def build(config: Mapping[str, Any], vocab_size: int) -> ZoneoutLSTMLanguageModel:
    """The Zoneout LSTM that ``config`` describes: the general keys (hidden_size, num_layers)
    and those declared in zoneout_lstm_keys.py, torch-free so validation needs no torch."""
    forget_bias = config["forget_bias"]
    return ZoneoutLSTMLanguageModel(
        ZoneoutLSTMConfig(
            vocab_size=vocab_size,
            hidden_size=config["hidden_size"],
            num_layers=config["num_layers"],
            z_cells=config["z_cells"],
            z_states=config["z_states"],
            drop_igates=config["drop_igates"],
            # None means "the reference's": +1, hard-coded in recurrent.py
            forget_bias=1.0 if forget_bias is None else float(forget_bias),
        )
    )
