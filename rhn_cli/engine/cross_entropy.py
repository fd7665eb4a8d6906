"""The summed softmax cross-entropy of ``sequence_loss``, with a fused CPU backward.

    loss = sum_n [t_n != ignore] (lse_n - x_n,t_n),    lse_n = log sum_v exp(x_nv)
    dloss/dx_n = [t_n != ignore] (softmax(x_n) - onehot(t_n))

``F.cross_entropy`` computes the same: its backward runs log-softmax's and nll's
backward passes, about 11 ms at ptb_sota's [700, 10000] logits on the 2-core dev CPU,
and hands the gradient on row-major, which the output layer's weight-gradient product
(dlogits^T x, through oneDNN) first copies into column-major: another 16 ms. Where
the native kernels apply (CPU, float32/float64, a gradient wanted), one pass writes
the gradient column-major instead ([V, N], passed on as its transposed view [N, V]:
the same tensor to every consumer, which ATen's products take in either layout), and
the forward keeps only the rows' log-sum-exp. Elsewhere it is ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rhn_cli.kernels import native

IGNORE_INDEX = -100  # F.cross_entropy's default, rhn's padding target


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [N, V], targets [N] (``IGNORE_INDEX`` for none) -> the loss summed over rows."""
    native = _native(logits, targets)
    if native is None:
        return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)
    return _SummedCrossEntropy.apply(logits, targets, native)


def _native(logits, targets):
    """The native kernels where they apply (as for the RHN's time loop), else None."""
    wanted = torch.is_grad_enabled() and logits.requires_grad
    if not wanted or logits.dim() != 2 or targets.device != logits.device:
        return None
    return native.kernels_for(logits)


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, native):
        logits, targets = logits.contiguous(), targets.long().contiguous()
        total, lse = native.cross_entropy_forward(logits, targets, IGNORE_INDEX)
        ctx.save_for_backward(logits, lse, targets)
        ctx.native = native
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, d_total):
        logits, lse, targets = ctx.saved_tensors
        scale = float(d_total)
        columns = ctx.native.cross_entropy_backward(logits, lse, targets, IGNORE_INDEX, scale)
        return columns.t(), None, None
