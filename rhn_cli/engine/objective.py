"""The reference training objective, one term per function.

``sequence_loss`` is by default the cross-entropy summed over the T steps of a window
and averaged over the B streams (T times the per-token mean): the magnitude the RHN
reference learning rate of 0.2 was tuned for (Zaremba's LSTM and the WildML GRU, whose
cost is a sentence's summed NLL, scale the same way). ``mean`` is the per-token mean of
the Zoneout and char-rnn code. Padded targets (``-100``) count in neither.

``l2_penalty`` is TensorFlow's ``l2_loss`` over
every trainable tensor, biases included, added to the loss *before* gradient clipping
(not the decoupled ``weight_decay`` of ``torch.optim.SGD``). Its gradient, weight_decay *
p, is added to each ``p.grad`` in place by ``add_l2_gradient`` after the backward pass
instead of being differentiated through the loss: the same sum, without autograd's
temporaries (p^2, weight_decay * p, and their sum with the loss's gradient, each the size
of the largest parameter tensor: 180 MB for enwik8_sota's fused recurrent weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from rhn_cli.engine.cross_entropy import summed_cross_entropy

# The largest mean NLL whose exponential is a float: past it a perplexity is infinite.
MAX_FINITE_NLL = math.log(1.7976931348623157e308)


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL per token); ``inf`` where that overflows (a diverged model), never an
    OverflowError: printing or recording a perplexity must not end a run."""
    return math.exp(mean_nll) if mean_nll <= MAX_FINITE_NLL else math.inf


def sequence_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum_over_steps"
) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> the summed NLL divided by B, or by the number
    of (unpadded) targets when ``reduction`` is ``'mean'``."""
    total = summed_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    if reduction == "mean":
        return total / (targets != -100).sum()
    return total / targets.shape[0]


@torch.no_grad()
def l2_penalty(parameters: Iterable[torch.Tensor], weight_decay: float) -> float:
    """weight_decay * sum(p^2) / 2 over ``parameters`` (0.0 when weight_decay is 0): the
    penalty's value, for the reported cost; its gradient comes from ``add_l2_gradient``."""
    if weight_decay == 0:
        return 0.0
    squares = sum(torch.linalg.vector_norm(p).double().square() for p in parameters)
    return weight_decay * 0.5 * float(squares)


@torch.no_grad()
def add_l2_gradient(parameters: Iterable[torch.Tensor], weight_decay: float) -> None:
    """p.grad += weight_decay * p for every parameter (a missing gradient counts as zero):
    the penalty's gradient, after ``backward()`` and before clipping."""
    if weight_decay == 0:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = p.detach() * weight_decay
        else:
            p.grad.add_(p.detach(), alpha=weight_decay)


def learning_rate_at(epoch: int, learning_rate: float, lr_decay: float, max_epoch: int) -> float:
    """The reference schedule for 0-based ``epoch``: lr / lr_decay^max(epoch - max_epoch + 1, 0).

    Zaremba's ``lr * 0.5^max(i + 1 - max_epoch, 0)`` is lr_decay=2; char-rnn's "x0.97 at
    the end of every epoch from epoch 10 on" is lr_decay=1/0.97 with max_epoch=10."""
    return learning_rate / lr_decay ** max(epoch - max_epoch + 1, 0)
