"""Stateful truncated-BPTT batching, exactly as the reference ``data_iterator``.

The token stream is cut into ``batch_size`` contiguous rows (the tail that does not
fill a row is dropped); step k yields columns ``[kT, (k+1)T)`` as inputs and the same
window shifted by one as targets. Rows continue across steps, which is what lets the
hidden state be carried from one minibatch to the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class SplitTooShortError(ValueError):
    """A split cannot fill a single minibatch."""


def batchify(tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """[batch_size, batch_len] view of ``tokens`` as contiguous row streams."""
    batch_len = len(tokens) // batch_size
    return np.asarray(tokens[: batch_size * batch_len]).reshape(batch_size, batch_len)


def num_minibatches(num_tokens: int, batch_size: int, num_steps: int) -> int:
    """Minibatches per pass: ``(batch_len - 1) // num_steps`` as in the reference."""
    return max((num_tokens // batch_size - 1) // num_steps, 0)


def minibatches(
    tokens: np.ndarray, batch_size: int, num_steps: int, split: str = "data"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(inputs, targets)``, each [batch_size, num_steps], over one pass of ``tokens``."""
    steps = num_minibatches(len(tokens), batch_size, num_steps)
    if steps == 0:
        raise SplitTooShortError(
            f"the {split} split has {len(tokens):,} tokens, too few for one minibatch of "
            f"batch_size={batch_size} x num_steps={num_steps} "
            f"(needs at least {batch_size * (num_steps + 1):,})"
        )
    rows = batchify(tokens, batch_size)
    for k in range(steps):
        window = rows[:, k * num_steps : (k + 1) * num_steps + 1]
        yield window[:, :-1], window[:, 1:]
