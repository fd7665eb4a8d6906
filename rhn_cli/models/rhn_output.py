"""The RHN's output layer, ``logits = x W^T + b`` (x the dropped-out top-layer outputs
[B, T, H], W = E when tied), with a hand-written backward for its weight gradient.

    dx = dlogits W,    dW = dlogits^T x,    db = sum over rows of dlogits

dW is the step's largest product after the recurrence ([V, B*T] x [B*T, H]); it goes
through MKL or oneDNN, whichever runs its shape faster on this machine (timed once per
process and shape, as rhn_fast's weight gradients are): at ptb_sota's shape oneDNN takes
about 63 ms where MKL (autograd's ``mm``) takes 88 ms on the 2-core dev CPU. oneDNN
takes dlogits^T row-major, which the training loss's gradient already is
(rhn_cli.engine.cross_entropy writes it column-major); any other gradient is copied. The forward
and dx stay ATen's products, which MKL runs as fast as oneDNN there.

Used where rhn_fast's native loop and oneDNN are (CPU, float32, a gradient wanted);
everywhere else the layer is ``torch.nn.functional.linear``, differentiated by autograd.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.models import rhn_fast


def logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [..., H], weight [V, H], bias [V] -> x W^T + b [..., V]."""
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    if (
        wanted
        and rhn_fast.onednn_applies(x.dtype)
        and rhn_fast.native_loop(x, weight, bias) is not None
    ):
        return _Logits.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.shape = x.shape
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
            onednn = rhn_fast.weight_gradients_through_onednn(None, d_rows, rows)
            d_weight = rhn_fast.weight_gradient(None, d_rows, rows, False, onednn)
        if ctx.needs_input_grad[2]:
            d_bias = d_rows.sum(0)
        return d_x, d_weight, d_bias
