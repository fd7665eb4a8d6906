"""Zoneout (Krueger et al. 2016) of a recurrent state, with true zoneout probabilities.

At train time each unit keeps its previous value with probability ``z`` (a fresh mask
per unit, per time step, per example) and takes its new value otherwise; at eval time
the state is the expectation of that:

    train:  s_t = d_t * s_{t-1} + (1 - d_t) * s~_t,   d_t ~ Bernoulli(z)
    eval:   s_t = z * s_{t-1} + (1 - z) * s~_t

``z`` is the probability of *keeping* the old value. The reference scripts
(teganmaharaj/zoneout) take the opposite, an "update probability" 1 - z, under flags
named ``drop_prob_*``; their README warns of it. rhn's ``z_cells=0.5, z_states=0.05``
is the reference's ``--drop_prob_cells=0.5 --drop_prob_states=0.95``.
"""

from __future__ import annotations

import torch


def zoneout(new: torch.Tensor, old: torch.Tensor, z: float, training: bool) -> torch.Tensor:
    """The zoned-out state from the candidate ``new`` and the previous ``old``."""
    if z <= 0.0:
        return new
    if training:
        keep_old = torch.rand_like(new) < z
        return torch.where(keep_old, old, new)
    return z * old + (1.0 - z) * new
