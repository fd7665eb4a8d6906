"""GRU language model of the WildML tutorial (dennybritz/rnn-tutorial-gru-lstm).

The reference (``gru_theano.py``) embeds token w_t as x_e = E[w_t] and stacks GRU
layers (two in the reference) of width H. Layer l reads x = x_e (l = 1) or x = s^{l-1}_t
(l > 1) and keeps a state s; at time step t, with U, W [3, H, H] and b [3, H] its
parameters:

    z = hs(U_0 x + W_0 s_{t-1} + b_0)                 update gate
    r = hs(U_1 x + W_1 s_{t-1} + b_1)                 reset gate
    c = tanh(U_2 x + W_2 (s_{t-1} * r) + b_2)          reset applied BEFORE the product
    s_t = (1 - z) * c + z * s_{t-1}
    logits_t = V s^L_t + c_out                        Linear(H -> V) with bias

hs is Theano's ``hard_sigmoid``, clip(0.2 x + 0.5, 0, 1): slope 0.2, saturated
outside |x| >= 2.5. It is neither the logistic sigmoid nor PyTorch's
``F.hardsigmoid`` (slope 1/6).

``gru_variant='standard'`` swaps the cell for the torch.nn.GRU / cuDNN one (logistic
gates, the reset gate applied AFTER the recurrent product, two bias vectors):

    r = sigmoid(W_ir x + b_ir + W_hr s_{t-1} + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz s_{t-1} + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn s_{t-1} + b_hn))
    s_t = (1 - z) * n + z * s_{t-1}

Without zoneout it runs as ``nn.GRU`` (the fused kernel); with zoneout the same
parameters run these equations step by step.

Optionally (``z_states`` > 0, not in the tutorial) each layer's state is zoned out after
its update, s_t = zoneout(s_t, s_{t-1}) (:mod:`rhn_cli.models.zoneout`); the zoned-out
s_t feeds the next step, the next layer and the output layer.

Initialisation is the reference's: E ~ U(+-sqrt(1/V)); U, W and the output weight
~ U(+-sqrt(1/H)); all biases 0. The standard variant uses the same: its weights
U(+-sqrt(1/H)) (which is also PyTorch's default range) and its biases 0 (PyTorch would
draw them from the same uniform).

The embedding width is H, as in the reference: ``train.py`` reads ``EMBEDDING_DIM``
(default 48) but only puts it in the output file name; E has H rows. For V=8000,
H=128 and two layers the tutorial model has 2,253,376 parameters.

The tutorial layer without zoneout runs :mod:`rhn_cli.kernels.gru_recurrence` (a time
loop without autograd and a hand-written backward): the same parameters and, in float64,
results as the step-by-step autograd loop here, the reference, which
``gru_recurrence.USE_RECURRENCE = False`` forces (and zoneout needs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rhn_cli.kernels import gru_recurrence
from rhn_cli.models.base import LanguageModel
from rhn_cli.models.gru_keys import GRU_VARIANTS
from rhn_cli.models.zoneout import zoneout


def theano_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """clip(0.2 x + 0.5, 0, 1), Theano's ``hard_sigmoid``."""
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class GRUConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int = 2
    gru_variant: str = "tutorial"
    z_states: float = 0.0  # zoneout probability of the state (0: none)

    def __post_init__(self) -> None:
        if self.gru_variant not in GRU_VARIANTS:
            raise ValueError(f"gru_variant must be one of {GRU_VARIANTS}, not {self.gru_variant!r}")


class TutorialGRULayer(nn.Module):
    """One layer of the tutorial GRU (hard-sigmoid gates, reset before the product)."""

    def __init__(self, hidden_size: int, z_states: float = 0.0):
        super().__init__()
        H = hidden_size
        self.hidden_size = H
        self.z_states = z_states
        # Index 0: update gate z, 1: reset gate r, 2: candidate c, as the reference's U, W, b.
        self.U = nn.Parameter(torch.empty(3, H, H))
        self.W = nn.Parameter(torch.empty(3, H, H))
        self.b = nn.Parameter(torch.empty(3, H))

    def reset_parameters(self) -> None:
        bound = math.sqrt(1.0 / self.hidden_size)
        with torch.no_grad():
            self.U.uniform_(-bound, bound)
            self.W.uniform_(-bound, bound)
            self.b.zero_()

    def forward(self, inputs: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, T, H], s [B, H] -> (outputs [B, T, H], final state [B, H])."""
        H = self.hidden_size
        # U x + b does not depend on the state: one product for all steps.
        projected = inputs @ self.U.reshape(3 * H, H).t() + self.b.reshape(3 * H)
        if gru_recurrence.USE_RECURRENCE and self.z_states <= 0.0:
            return gru_recurrence.recurrence(projected, s, self.W)
        return self._loop(projected, s)

    def _loop(self, projected: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The autograd loop: the reference, and the path with zoneout."""
        H = self.hidden_size
        gates_weight = self.W[:2].reshape(2 * H, H).t()
        candidate_weight = self.W[2].t()
        outputs = []
        for t in range(projected.shape[1]):
            gates = theano_hard_sigmoid(projected[:, t, : 2 * H] + s @ gates_weight)
            z, r = gates[:, :H], gates[:, H:]
            c = torch.tanh(projected[:, t, 2 * H :] + (s * r) @ candidate_weight)
            s = zoneout((1.0 - z) * c + z * s, s, self.z_states, self.training)
            outputs.append(s)
        return torch.stack(outputs, dim=1), s


class StandardGRULayer(nn.Module):
    """One torch.nn.GRU layer; zoneout needs the step-by-step equations instead."""

    def __init__(self, hidden_size: int, z_states: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.z_states = z_states
        # Parameters weight_ih_l0, weight_hh_l0 [3H, H], bias_ih_l0, bias_hh_l0 [3H];
        # rows in torch's gate order r, z, n.
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)

    def reset_parameters(self) -> None:
        bound = math.sqrt(1.0 / self.hidden_size)
        with torch.no_grad():
            self.gru.weight_ih_l0.uniform_(-bound, bound)
            self.gru.weight_hh_l0.uniform_(-bound, bound)
            self.gru.bias_ih_l0.zero_()
            self.gru.bias_hh_l0.zero_()

    def forward(self, inputs: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, T, H], s [B, H] -> (outputs [B, T, H], final state [B, H])."""
        if self.z_states <= 0.0:
            outputs, final = self.gru(inputs, s.unsqueeze(0).contiguous())
            return outputs, final[0]
        H, gru = self.hidden_size, self.gru
        projected = inputs @ gru.weight_ih_l0.t() + gru.bias_ih_l0
        outputs = []
        for t in range(inputs.shape[1]):
            recurrent = torch.addmm(gru.bias_hh_l0, s, gru.weight_hh_l0.t())
            gates = torch.sigmoid(projected[:, t, : 2 * H] + recurrent[:, : 2 * H])
            r, z = gates[:, :H], gates[:, H:]
            n = torch.tanh(projected[:, t, 2 * H :] + r * recurrent[:, 2 * H :])
            s = zoneout((1.0 - z) * n + z * s, s, self.z_states, self.training)
            outputs.append(s)
        return torch.stack(outputs, dim=1), s


class GRULanguageModel(LanguageModel):
    """Embedding (width H) -> GRU layers -> Linear(H -> V); no dropout."""

    def __init__(self, config: GRUConfig) -> None:
        super().__init__()
        self.config = config
        V, H = config.vocab_size, config.hidden_size
        layer_class = TutorialGRULayer if config.gru_variant == "tutorial" else StandardGRULayer
        self.embedding = nn.Embedding(V, H)
        self.layers = nn.ModuleList(
            layer_class(H, config.z_states) for _ in range(config.num_layers)
        )
        self.output_weight = nn.Parameter(torch.empty(V, H))  # the reference's V
        self.output_bias = nn.Parameter(torch.empty(V))  # the reference's c
        self.reset_parameters()

    def reset_parameters(self) -> None:
        V, H = self.config.vocab_size, self.config.hidden_size
        with torch.no_grad():
            self.embedding.weight.uniform_(-math.sqrt(1.0 / V), math.sqrt(1.0 / V))
            self.output_weight.uniform_(-math.sqrt(1.0 / H), math.sqrt(1.0 / H))
            self.output_bias.zero_()
        for layer in self.layers:
            layer.reset_parameters()

    def describe(self) -> str:
        c = self.config
        gates = "hard-sigmoid gates" if c.gru_variant == "tutorial" else "torch.nn.GRU cell"
        line = f"GRU {c.num_layers} x {c.hidden_size} units ({gates}"
        if c.z_states:
            line += f", zoneout {c.z_states:g}"
        return line + ")"

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero state, [num_layers, B, H]."""
        c = self.config
        return self.output_bias.new_zeros(c.num_layers, batch_size, c.hidden_size)

    def forward(
        self,
        tokens: torch.Tensor,
        state: torch.Tensor,
        masks: dict | None = None,
        *,
        return_hidden: bool = False,
    ):
        """tokens [B, T], state [L, B, H] -> (logits [B, T, V], new state [L, B, H]).

        ``masks`` is unused (no dropout); zoneout masks are drawn per step in training
        mode, and eval mode uses the zoneout expectation.
        """
        x = self.embedding(tokens)
        final_states = []
        # Layer by layer over the whole sequence: layer l at step t only needs layer
        # l - 1 at step t, so this equals the reference's step-by-step order.
        for layer_index, layer in enumerate(self.layers):
            x, s = layer(x, state[layer_index])
            final_states.append(s)
        logits = x @ self.output_weight.t() + self.output_bias
        if return_hidden:
            return logits, torch.stack(final_states), x
        return logits, torch.stack(final_states)


def build(config: Mapping[str, Any], vocab_size: int) -> GRULanguageModel:
    """The GRU that ``config`` describes: the general keys (hidden_size, num_layers)
    and those declared in gru_keys.py, torch-free so validation needs no torch."""
    return GRULanguageModel(
        GRUConfig(
            vocab_size=vocab_size,
            hidden_size=config["hidden_size"],
            num_layers=config["num_layers"],
            gru_variant=config["gru_variant"],
            z_states=config["z_states"],
        )
    )
