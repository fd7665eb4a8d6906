"""The reference training objective, one term per function.

``sequence_loss`` is by default the cross-entropy summed over the T steps of a window
and averaged over the B streams (T times the per-token mean): the magnitude the RHN
reference learning rate of 0.2 was tuned for (Zaremba's LSTM and the WildML GRU, whose
cost is a sentence's summed NLL, scale the same way). ``mean`` is the per-token mean of
the Zoneout and char-rnn code. Padded targets (``-100``) count in neither.

``l2_penalty`` is TensorFlow's ``l2_loss`` over
every trainable tensor, biases included, added to the loss *before* gradient clipping
(not the decoupled ``weight_decay`` of ``torch.optim.SGD``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def sequence_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum_over_steps"
) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> the summed NLL divided by B, or by the number
    of (unpadded) targets when ``reduction`` is ``'mean'``."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    if reduction == "mean":
        return total / (targets != -100).sum()
    return total / targets.shape[0]


def l2_penalty(parameters: Iterable[torch.Tensor], weight_decay: float) -> torch.Tensor | float:
    """weight_decay * sum(p^2) / 2 over ``parameters`` (0.0 when weight_decay is 0)."""
    if weight_decay == 0:
        return 0.0
    return weight_decay * 0.5 * sum(p.pow(2).sum() for p in parameters)


def learning_rate_at(epoch: int, learning_rate: float, lr_decay: float, max_epoch: int) -> float:
    """The reference schedule for 0-based ``epoch``: lr / lr_decay^max(epoch - max_epoch + 1, 0).

    Zaremba's ``lr * 0.5^max(i + 1 - max_epoch, 0)`` is lr_decay=2; char-rnn's "x0.97 at
    the end of every epoch from epoch 10 on" is lr_decay=1/0.97 with max_epoch=10."""
    return learning_rate / lr_decay ** max(epoch - max_epoch + 1, 0)
