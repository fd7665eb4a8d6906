"""The Zoneout paper's baseline regularisers, one function each (any model can use them).

* Norm stabiliser (Krueger & Memisevic 2016), as ``zoneout_char_ptb.py --penalty hids``:
  with n_t = ||h_t||_2 over the T hidden states of a minibatch,
  penalty = beta * mean_over_batch( sum_{t=1}^{T-1} (n_{t+1} - n_t)^2 ) / T.
  (The reference divides by ``seq_len - 1``, which is T, the number of predicted steps.)
* Weight noise (Blocks ``apply_noise`` on the WEIGHT role): fresh N(0, sigma^2) noise is
  added to every weight matrix (parameters with two or more dimensions: embeddings,
  input, recurrent and output weights; never biases or learned initial states) for the
  forward and backward pass of one update; the gradient, taken at the noisy weights, is
  then applied to the clean weights. Evaluation uses the clean weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def norm_stabilizer(hidden: torch.Tensor, beta: float) -> torch.Tensor:
    """hidden [B, T, H] -> beta * mean_b sum_t (||h_{t+1}|| - ||h_t||)^2 / T."""
    norms = hidden.norm(dim=-1)
    return beta * (norms[:, 1:] - norms[:, :-1]).pow(2).sum(dim=1).mean() / hidden.shape[1]


def noisy_weights(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() >= 2]


@contextmanager
def weight_noise(model: nn.Module, std: float) -> Iterator[None]:
    """Within the block, every weight matrix carries fresh Gaussian noise of std ``std``."""
    if std <= 0:
        yield
        return
    weights = noisy_weights(model)
    clean = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn_like(w), alpha=std)
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(weights, clean, strict=True):
                w.copy_(original)
