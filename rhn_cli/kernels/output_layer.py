"""The RHN's output layer, ``logits = x W^T + b`` (x the dropped-out top-layer outputs
[B, T, H], W = E when tied), with a hand-written backward for its weight gradient.

    dx = dlogits W,    dW = dlogits^T x,    db = sum over rows of dlogits

dW is the step's largest product after the recurrence ([V, B*T] x [B*T, H]); it goes
through MKL or oneDNN, whichever runs its shape faster on this machine (timed once per
machine and setup and kept on disk, as the recurrence's weight gradients are: see
:mod:`rhn_cli.kernels.weight_gradient`): at ptb_sota's shape oneDNN takes about 63 ms
where MKL (autograd's ``mm``) takes 88 ms on the 2-core dev CPU. oneDNN takes dlogits^T
row-major, which the training loss's gradient already is (rhn_cli.engine.cross_entropy
writes it column-major); any other gradient is copied. The forward and dx go through
oneDNN too, on W as stored (``onednn.DENSE_PRODUCTS``; recorded as
``kernels.rhn_dense_onednn``, off for runs recorded before): on the AVX-512 EPYC dev CPU
MKL takes 78 and 65 ms for ptb_sota's, oneDNN 33 and 37 (on the earlier dev CPU the two
ran them alike).

Used where :func:`applies` (CPU with the native kernels, float32 through oneDNN, a
gradient wanted); everywhere else the layer is ``torch.nn.functional.linear``, and the
lookup ``torch.nn.functional.embedding``, differentiated by autograd.

Tied weights (W = E, the embedding): autograd would give the embedding lookup's gradient
as a dense [V, H] tensor, zero but for the looked-up rows, and add it to dW (ptb_sota:
33 MB zeroed and added, ~8 ms). With one :class:`TiedGradient` given to both
:func:`embedding` and :func:`logits`, both take W through one node of their own (an
alias of W), and the lookup's backward, which autograd runs after the output layer's in
the same backward pass, adds its rows into the output layer's dW (dW[tokens] += dx) and
gives no gradient of its own: W's gradient is the same sum, built in one tensor.

Why no rows can get lost: only this lookup and this output layer take W through the
alias, so the alias's gradient is the sum of their two alone, and autograd holds the
output layer's dW, untouched, as that sum until the lookup has run (the alias's node
waits for both). Any other use of W (an L2 term inside the loss, ``0 * W.sum()``,
another lookup) reaches W itself, where autograd adds the alias's finished gradient to
the others as to any. The rows go in only where they are sure to land: one lookup and
one output layer on the TiedGradient, dW made by the same backward pass (the autograd
graph task; where torch cannot say, never); otherwise the lookup gives the dense
gradient, as autograd would.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.kernels import buffers, native, onednn, weight_gradient


def applies(*tensors) -> bool:
    """Whether the hand-written layer (and with it the tied hand-over) runs for these
    tensors: a gradient wanted, CPU with the native kernels, float32 through oneDNN."""
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return wanted and onednn.applies(tensors[0].dtype) and native.kernels_for(*tensors) is not None


class TiedGradient:
    """One forward's tied weight W = E: give the same one to :func:`embedding` and
    :func:`logits` (see the module's docstring); a new one for every forward."""

    def __init__(self) -> None:
        self._weight: torch.Tensor | None = None  # W, as given
        self._alias: torch.Tensor | None = None  # what the lookup and the layer take
        self._lookups = 0
        self._output_layers = 0
        self._d_weight: torch.Tensor | None = None  # the output layer's dW, for the rows
        self._backward_pass: int | None = None  # the backward pass that made it

    def _alias_for(self, weight: torch.Tensor) -> torch.Tensor:
        if self._weight is None:
            self._weight, self._alias = weight, _Tie.apply(weight)
        elif weight is not self._weight:
            raise ValueError("a TiedGradient ties one weight: it was given two different ones")
        return self._alias

    def _for_lookup(self, weight: torch.Tensor) -> torch.Tensor:
        self._lookups += 1
        return self._alias_for(weight)

    def _for_output_layer(self, weight: torch.Tensor) -> torch.Tensor:
        self._output_layers += 1
        return self._alias_for(weight)

    def _hand_over(self, d_weight: torch.Tensor) -> None:
        """The output layer's backward: dW, for the lookup's rows, where they will land."""
        backward_pass = buffers.backward_pass()
        if backward_pass is not None and self._lookups == 1 and self._output_layers == 1:
            self._d_weight, self._backward_pass = d_weight, backward_pass

    def _take(self) -> torch.Tensor | None:
        """The lookup's backward: dW when this backward pass made it, else None. No
        reference stays here either way (W's gradient is then dW itself, not a copy)."""
        d_weight, self._d_weight = self._d_weight, None
        backward_pass = buffers.backward_pass()
        if d_weight is None or backward_pass is None or backward_pass != self._backward_pass:
            return None
        return d_weight


class _Tie(torch.autograd.Function):
    """W's alias for the tied lookup and output layer: their two gradients meet here, and
    only theirs; the sum goes on to W."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, d_weight):
        return d_weight


def embedding(tokens: torch.Tensor, weight: torch.Tensor, tied: TiedGradient | None = None):
    """weight[tokens] [..., H]: the embedding lookup, sharing its gradient with the output
    layer's through ``tied`` (see the module's docstring)."""
    if tied is None or not applies(weight):
        return torch.nn.functional.embedding(tokens, weight)
    return _Lookup.apply(tied._for_lookup(weight), tokens, tied)


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tokens, tied):
        ctx.save_for_backward(tokens)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return torch.nn.functional.embedding(tokens, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_x):
        (tokens,) = ctx.saved_tensors
        rows, d_rows = tokens.reshape(-1), d_x.reshape(-1, d_x.shape[-1])
        d_weight = ctx.tied._take()
        if d_weight is not None:  # the alias's gradient in the making: the rows go there
            d_weight.index_add_(0, rows, d_rows)
            return None, None, None
        return d_x.new_zeros(ctx.weight_shape).index_add_(0, rows, d_rows), None, None


def logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tied: TiedGradient | None = None
) -> torch.Tensor:
    """x [..., H], weight [V, H], bias [V] -> x W^T + b [..., V]; ``tied``: W is the
    embedding's, looked up through :func:`embedding` with the same ``tied``."""
    if not applies(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)
    if tied is not None and weight.requires_grad:
        weight = tied._for_output_layer(weight)
    else:
        tied = None
    return _Logits.apply(x, weight, bias, tied)


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tied):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        dense = onednn.DENSE_PRODUCTS and onednn.applies(rows.dtype)
        ctx.shape, ctx.tied, ctx.dense = x.shape, tied, dense
        if ctx.dense:
            return onednn.linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
        return torch.addmm(bias, rows, weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, d_logits):
        rows, weight = ctx.saved_tensors
        d_rows = d_logits.reshape(-1, weight.shape[0])
        d_x = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_x = onednn.linear(d_rows, weight.t()) if ctx.dense else d_rows @ weight
            d_x = d_x.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            # a new tensor: oneDNN's result itself, not a copy of it (33 MB at ptb_sota)
            onednn_library = weight_gradient.through_onednn([d_rows], [rows])
            d_weight = weight_gradient.product(None, d_rows, rows, False, onednn_library)
            if ctx.tied is not None:
                ctx.tied._hand_over(d_weight)
        if ctx.needs_input_grad[2]:
            d_bias = d_rows.sum(0)
        return d_x, d_weight, d_bias, None
