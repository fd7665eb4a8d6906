"""Variational (per-sequence) dropout masks with the reference RHN semantics.

Masks are *inverted* dropout: each entry is 0 with probability ``drop`` and
``1 / (1 - drop)`` otherwise, drawn once per minibatch and reused at every time step
(and, for the state mask, at every micro-layer). ``drop`` is a drop rate, as in the
reference configs: ``drop_i=0.75`` keeps a quarter of the units and scales them by 4.
"""

from __future__ import annotations

import torch


def variational_mask(
    shape: tuple[int, ...], drop: float, *, like: torch.Tensor
) -> torch.Tensor | None:
    """A mask of ``shape``, or None when nothing is dropped (so callers skip the multiply)."""
    if drop <= 0.0:
        return None
    keep = 1.0 - drop
    return torch.bernoulli(torch.full(shape, keep, dtype=like.dtype, device=like.device)) / keep


def word_type_mask(
    tokens: torch.Tensor, vocab_size: int, drop: float, *, like: torch.Tensor
) -> torch.Tensor | None:
    """Embedding dropout that drops whole word vectors, tied per word type within a row.

    Returns [B, T, 1]: every occurrence of a token id within a batch row shares one
    mask value, as the reference's ``noise_x`` (which copies the first occurrence's
    mask to the later ones). Drawing one value per (row, type) and gathering gives the
    same distribution.
    """
    per_type = variational_mask((tokens.shape[0], vocab_size), drop, like=like)
    if per_type is None:
        return None
    return per_type.gather(1, tokens).unsqueeze(-1)


def step_dropout(x: torch.Tensor, drop: float, training: bool) -> torch.Tensor:
    """Standard (Zaremba, char-rnn) inverted dropout on [B, T, width]: every element
    independent, so a fresh mask at every time step. Identity in eval or at rate 0."""
    if not training or drop <= 0.0:
        return x
    return torch.nn.functional.dropout(x, drop, training=True)
