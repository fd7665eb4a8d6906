"""The reference training objective, one term per function.

``sequence_loss`` is the cross-entropy summed over the T steps of a window and
averaged over the B streams (T times the per-token mean): the magnitude the reference
learning rate of 0.2 was tuned for. ``l2_penalty`` is TensorFlow's ``l2_loss`` over
every trainable tensor, biases included, added to the loss *before* gradient clipping
(not the decoupled ``weight_decay`` of ``torch.optim.SGD``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> sum over B*T tokens of the NLL, divided by B."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return total / targets.shape[0]


def l2_penalty(parameters: Iterable[torch.Tensor], weight_decay: float) -> torch.Tensor | float:
    """weight_decay * sum(p^2) / 2 over ``parameters`` (0.0 when weight_decay is 0)."""
    if weight_decay == 0:
        return 0.0
    return weight_decay * 0.5 * sum(p.pow(2).sum() for p in parameters)


def learning_rate_at(epoch: int, learning_rate: float, lr_decay: float, max_epoch: int) -> float:
    """The reference schedule for 0-based ``epoch``: lr / lr_decay^max(epoch - max_epoch + 1, 0)."""
    return learning_rate / lr_decay ** max(epoch - max_epoch + 1, 0)
