"""The RHN's output layer, ``logits = x W^T + b`` (x the dropped-out top-layer outputs
[B, T, H], W = E when tied), with a hand-written backward for its weight gradient.

    dx = dlogits W,    dW = dlogits^T x,    db = sum over rows of dlogits

dW is the step's largest product after the recurrence ([V, B*T] x [B*T, H]); it goes
through MKL or oneDNN, whichever runs its shape faster on this machine (timed once per
machine and setup and kept on disk, as rhn_fast's weight gradients are: see
rhn_cli.models.library_choice): at ptb_sota's shape oneDNN takes about 63 ms where MKL
(autograd's ``mm``) takes 88 ms on the 2-core dev CPU. oneDNN takes dlogits^T row-major,
which the training loss's gradient already is (rhn_cli.engine.cross_entropy writes it
column-major); any other gradient is copied. The forward and dx stay ATen's products,
which MKL runs as fast as oneDNN there.

Used where rhn_fast's native loop and oneDNN are (CPU, float32, a gradient wanted);
everywhere else the layer is ``torch.nn.functional.linear``, differentiated by autograd.

Tied weights (W = E, the embedding): autograd would give the embedding lookup's
gradient as a dense [V, H] tensor, zero but for the looked-up rows, and add it to dW
(ptb_sota: 33 MB zeroed and added, ~8 ms). With a :class:`TiedGradient` given to both
:func:`embedding` and :func:`logits`, the output layer leaves its dW there and the
lookup's backward, which autograd runs later in the same backward pass, adds its rows
into it (dW[tokens] += dx) and gives no gradient of its own: W's gradient is the same
sum. Where the output layer's dW is not there (another backward pass, F.linear), the
lookup gives the dense gradient as autograd would.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.models import rhn_fast


class TiedGradient:
    """One forward's hand-over of the output layer's dW to the tied embedding's lookup."""

    def __init__(self) -> None:
        self.d_weight: torch.Tensor | None = None
        self.backward_pass: int | None = None  # the autograd graph task that made it


def _backward_pass() -> int | None:
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return None if probe is None else probe()


def _applies(*tensors) -> bool:
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        wanted
        and rhn_fast.onednn_applies(tensors[0].dtype)
        and rhn_fast.native_loop(*tensors) is not None
    )


def embedding(tokens: torch.Tensor, weight: torch.Tensor, tied: TiedGradient | None = None):
    """weight[tokens] [..., H]: the embedding lookup, sharing its gradient with the output
    layer's through ``tied`` (see the module's docstring)."""
    if tied is None or not _applies(weight):
        return torch.nn.functional.embedding(tokens, weight)
    return _Lookup.apply(weight, tokens, tied)


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
        tied = ctx.tied
        handed_over = tied.d_weight is not None and tied.backward_pass == _backward_pass()
        d_weight, tied.d_weight = tied.d_weight, None  # no reference left for autograd
        if handed_over:  # already on its way to W's gradient: add the rows there
            d_weight.index_add_(0, rows, d_rows)
            return None, None, None
        return d_x.new_zeros(ctx.weight_shape).index_add_(0, rows, d_rows), None, None


def logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tied: TiedGradient | None = None
) -> torch.Tensor:
    """x [..., H], weight [V, H], bias [V] -> x W^T + b [..., V]; ``tied`` receives dW for
    the tied embedding's lookup."""
    if _applies(x, weight, bias):
        return _Logits.apply(x, weight, bias, tied)
    return torch.nn.functional.linear(x, weight, bias)


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tied):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.shape, ctx.tied = x.shape, tied
        return torch.addmm(bias, rows, weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, d_logits):
        rows, weight = ctx.saved_tensors
        d_rows = d_logits.reshape(-1, weight.shape[0])
        d_x = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_x = (d_rows @ weight).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            # a new tensor: oneDNN's result itself, not a copy of it (33 MB at ptb_sota)
            onednn = rhn_fast.weight_gradients_through_onednn([d_rows], [rows])
            d_weight = rhn_fast.weight_gradient(None, d_rows, rows, False, onednn)
            if ctx.tied is not None:
                ctx.tied.d_weight, ctx.tied.backward_pass = d_weight, _backward_pass()
        if ctx.needs_input_grad[2]:
            d_bias = d_rows.sum(0)
        return d_x, d_weight, d_bias, None
