"""Recurrent Highway Network language model (Zilly et al. 2016), as the reference TF code.

One RHN layer with recurrence depth D keeps a single state vector s (width H). At time
step t it applies D highway micro-layers; the input x_t enters only the first one:

    s^0 = s_{t-1}
    for i = 0 .. D-1:
        h^i = tanh   ( [i == 0] W_H x_t + R_H^i (s^i * m_h) + b_H^i )
        t^i = sigmoid( [i == 0] W_T x_t + R_T^i (s^i * m_h) + b_T^i )
        s^{i+1} = h^i * t^i + s^i * (1 - t^i)          (coupled carry gate c = 1 - t)
    s_t = y_t = s^D

x_t is the layer input times its dropout mask m_i; m_h drops the copy of the state
that feeds the matrix products, never the carry path s^i * (1 - t^i). The masks are
drawn once per minibatch and reused at all micro-layers and all time steps
(:mod:`rhn_cli.models.dropout`). With ``tied_noise`` (the TF default) the H and T
transforms share one m_i and one m_h; without it each transform gets its own pair, as
in the Torch7 code and Theano's ``tied_noise=False``.

The language model is

    e_t = E[w_t] * m_x(w_t)         embedding, whole word vectors dropped per word type
    y_t = RHN layers (e_t)          each layer's outputs are the next layer's inputs
    logits_t = (y_t * m_o) W_out + b_out,   W_out = E^T when ``tied``

with the embedding width ``in_size = V`` if V < H and the model is untied, else H.

Parameters and initialisation follow the reference exactly: per layer W_x = [W_H; W_T]
(no bias of its own: micro-layer 0's bias is b^0), R^i = [R_H^i; R_T^i] and
b^i = [b_H^i; b_T^i] for every micro-layer; everything is U(-init_scale, init_scale)
except the T biases, which are the constant ``init_bias`` at every micro-layer.
Theano's ``init_other_bias`` option sets every other bias (H biases and the output bias)
to a constant instead.
The output bias exists also when tied. For V=10000, H=830, D=10, tied this gives
23,482,400 parameters.

Optionally (``z_states`` > 0, not in the RHN paper) the state is zoned out between time
steps: s_t = zoneout(s^D, s_{t-1}) (:mod:`rhn_cli.models.zoneout`).

The layer's recurrence runs through :func:`rhn_cli.kernels.rhn_recurrence.recurrence`
(the fast path): the same loop with a hand-written backward that keeps only the gates
and computes the weight gradients as a few large products after the time loop, in C++
on the CPU. ``RHNLayer.fast = False`` selects
the loop below, differentiated by autograd; both give the same numbers up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rhn_cli.kernels import output_layer, projection, rhn_recurrence
from rhn_cli.models.base import LanguageModel
from rhn_cli.models.dropout import variational_mask, word_type_mask
from rhn_cli.models.zoneout import zoneout


@dataclass(frozen=True)
class RHNConfig:
    vocab_size: int
    hidden_size: int
    depth: int
    num_layers: int = 1
    tied: bool = True
    init_scale: float = 0.04
    init_bias: float = -2.0
    drop_x: float = 0.0
    drop_i: float = 0.0
    drop_h: float = 0.0
    drop_o: float = 0.0
    tied_noise: bool = True
    init_other_bias: float | None = None  # None: uniform like the weights (TF)
    z_states: float = 0.0  # zoneout of the state between time steps (0: none)

    @property
    def in_size(self) -> int:
        """Embedding width, by the reference rule."""
        if self.vocab_size < self.hidden_size and not self.tied:
            return self.vocab_size
        return self.hidden_size


class RHNLayer(nn.Module):
    """One RHN layer of recurrence depth ``depth`` (see the module docstring)."""

    def __init__(self, input_size: int, hidden_size: int, depth: int, z_states: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.depth = depth
        self.z_states = z_states
        # Rows [0:H] feed the H transform, rows [H:2H] the T transform.
        self.input_weight = nn.Parameter(torch.empty(2 * hidden_size, input_size))
        self.recurrent_weight = nn.Parameter(torch.empty(depth, 2 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(depth, 2 * hidden_size))
        self.fast = True  # rhn_recurrence.recurrence; False: _loop, differentiated by autograd

    def reset_parameters(
        self, init_scale: float, init_bias: float, other_bias: float | None = None
    ) -> None:
        with torch.no_grad():
            for p in (self.input_weight, self.recurrent_weight, self.bias):
                p.uniform_(-init_scale, init_scale)
            if other_bias is not None:
                self.bias[:, : self.hidden_size] = other_bias
            self.bias[:, self.hidden_size :] = init_bias

    def forward(
        self,
        inputs: torch.Tensor,
        state: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        state_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [B, T, in], state [B, H] -> (outputs [B, T, H], final state [B, H]).

        Masks are [B, width] when shared by the H and T transforms, or [B, 2, width]
        with separate masks for H (index 0) and T (index 1).
        """
        projected = self._project(inputs, input_mask)
        if self._fast_applies(projected, state, state_mask):
            return rhn_recurrence.recurrence(
                projected,
                state,
                self.recurrent_weight,
                self.bias,
                state_mask,
                z_states=self.z_states,
                training=self.training,
            )
        return self._loop(projected, state, state_mask)

    def _fast_applies(self, projected, state, state_mask) -> bool:
        """The fast path takes one dtype throughout, no autocast, and no gradient for a mask."""
        if not self.fast or torch.is_autocast_enabled(projected.device.type):
            return False
        tensors = [projected, state, self.recurrent_weight, self.bias]
        if state_mask is not None:
            if state_mask.requires_grad:
                return False
            tensors.append(state_mask)
        return len({t.dtype for t in tensors}) == 1

    def _project(self, inputs: torch.Tensor, input_mask: torch.Tensor | None) -> torch.Tensor:
        """(x * m_i) W_x^T for all steps at once: the input only enters micro-layer 0."""
        if input_mask is None:
            return projection.project(inputs, self.input_weight)
        if input_mask.dim() == 2:
            return projection.project(inputs * input_mask.unsqueeze(1), self.input_weight)
        # Split, not sliced: autograd joins split's gradients in one copy.
        W_H, W_T = self.input_weight.split(self.hidden_size)
        return torch.cat(
            [
                projection.project(inputs * input_mask[:, 0].unsqueeze(1), W_H),
                projection.project(inputs * input_mask[:, 1].unsqueeze(1), W_T),
            ],
            dim=-1,
        )

    def _loop(
        self, projected: torch.Tensor, state: torch.Tensor, state_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence written out, differentiated by autograd (``fast = False``)."""
        H = self.hidden_size
        outputs = []
        s = state
        for t in range(projected.shape[1]):
            previous = s
            for i in range(self.depth):
                pre = self._recurrent(i, s, state_mask)
                if i == 0:
                    pre = pre + projected[:, t]
                h = torch.tanh(pre[:, :H])
                gate = torch.sigmoid(pre[:, H:])
                s = (h - s) * gate + s
            if self.z_states:
                s = zoneout(s, previous, self.z_states, self.training)
            outputs.append(s)
        return torch.stack(outputs, dim=1), s

    def _recurrent(self, i: int, s: torch.Tensor, state_mask: torch.Tensor | None):
        """b^i + R^i (s * m_h), for shared or separate H/T state masks."""
        weight, bias = self.recurrent_weight[i], self.bias[i]
        if state_mask is None:
            return torch.addmm(bias, s, weight.t())
        if state_mask.dim() == 2:
            return torch.addmm(bias, s * state_mask, weight.t())
        H = self.hidden_size
        return bias + torch.cat(
            [(s * state_mask[:, 0]) @ weight[:H].t(), (s * state_mask[:, 1]) @ weight[H:].t()],
            dim=-1,
        )


class RHNLanguageModel(LanguageModel):
    """Embedding -> RHN layer(s) -> (tied) softmax output, with variational dropout."""

    def __init__(self, config: RHNConfig) -> None:
        super().__init__()
        self.config = config
        V, H, in_size = config.vocab_size, config.hidden_size, config.in_size
        self.embedding = nn.Embedding(V, in_size)
        self.layers = nn.ModuleList(
            RHNLayer(in_size if layer == 0 else H, H, config.depth, config.z_states)
            for layer in range(config.num_layers)
        )
        self.output_weight = None if config.tied else nn.Parameter(torch.empty(V, H))
        self.output_bias = nn.Parameter(torch.empty(V))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.config.init_scale
        with torch.no_grad():
            self.embedding.weight.uniform_(-scale, scale)
            if self.output_weight is not None:
                self.output_weight.uniform_(-scale, scale)
            if self.config.init_other_bias is None:
                self.output_bias.uniform_(-scale, scale)
            else:
                self.output_bias.fill_(self.config.init_other_bias)
        for layer in self.layers:
            layer.reset_parameters(scale, self.config.init_bias, self.config.init_other_bias)

    def describe(self) -> str:
        c = self.config
        return f"RHN depth {c.depth} x {c.hidden_size} units x {c.num_layers} layer(s)"

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero state, [num_layers, B, H]."""
        weight = self.output_bias
        return weight.new_zeros(self.config.num_layers, batch_size, self.config.hidden_size)

    def draw_masks(self, tokens: torch.Tensor) -> dict:
        """Fresh dropout masks for one minibatch (None entries mean 'no dropout')."""
        c, like, B = self.config, self.output_bias, tokens.shape[0]
        per_transform = () if c.tied_noise else (2,)  # one mask for H and T, or one each
        return {
            "x": word_type_mask(tokens, c.vocab_size, c.drop_x, like=like),
            "i": [
                variational_mask(
                    (B, *per_transform, c.in_size if layer == 0 else c.hidden_size),
                    c.drop_i,
                    like=like,
                )
                for layer in range(c.num_layers)
            ],
            "h": [
                variational_mask((B, *per_transform, c.hidden_size), c.drop_h, like=like)
                for _ in range(c.num_layers)
            ],
            "o": variational_mask((B, c.hidden_size), c.drop_o, like=like),
        }

    def forward(
        self,
        tokens: torch.Tensor,
        state: torch.Tensor,
        masks: dict | None = None,
        *,
        return_hidden: bool = False,
    ):
        """tokens [B, T], state [L, B, H] -> (logits [B, T, V], new state [L, B, H]).

        In training mode fresh masks are drawn unless ``masks`` is given; in eval mode
        nothing is dropped.
        """
        if not self.training:
            masks = None
        elif masks is None:
            masks = self.draw_masks(tokens)
        # The tied weight's two gradients meet in the output layer's (output_layer).
        tied = output_layer.TiedGradient() if self.output_weight is None else None
        x = output_layer.embedding(tokens, self.embedding.weight, tied)
        if masks is not None and masks["x"] is not None:
            x = x * masks["x"]
        final_states = []
        for layer_index, layer in enumerate(self.layers):
            input_mask = masks["i"][layer_index] if masks is not None else None
            state_mask = masks["h"][layer_index] if masks is not None else None
            x, s = layer(x, state[layer_index], input_mask, state_mask)
            final_states.append(s)
        hidden = x
        if masks is not None and masks["o"] is not None:
            x = x * masks["o"].unsqueeze(1)
        weight = self.embedding.weight if self.output_weight is None else self.output_weight
        logits = output_layer.logits(x, weight, self.output_bias, tied)
        if return_hidden:
            return logits, torch.stack(final_states), hidden
        return logits, torch.stack(final_states)


def build(config: Mapping[str, Any], vocab_size: int) -> RHNLanguageModel:
    """The RHN that ``config`` describes: the general keys (hidden_size, num_layers)
    and those declared in rhn_keys.py, torch-free so validation needs no torch."""
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
            tied_noise=config["tied_noise"],
            init_other_bias=config["init_other_bias"],
            z_states=config.get("z_states", 0.0),
        )
    )
