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
    """A split cannot fill a single minibatch; ``split`` names it where it is known."""

    def __init__(self, message: str, split: str | None = None) -> None:
        super().__init__(message)
        self.split = split


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
            f"(needs at least {batch_size * (num_steps + 1):,})",
            split,
        )
    rows = batchify(tokens, batch_size)
    for k in range(steps):
        window = rows[:, k * num_steps : (k + 1) * num_steps + 1]
        yield window[:, :-1], window[:, 1:]


# -- independent chunks (the Zoneout scripts) -----------------------------------------


def chunk_batches(
    tokens: np.ndarray, batch_size: int, num_steps: int, rng: np.random.Generator, shuffle=True
) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(number of minibatches, minibatches) of independent chunks, as ``zoneout_char_ptb``.

    The split is cut after a random offset in [0, num_steps] into non-overlapping chunks
    of ``num_steps + 1`` tokens (inputs ``chunk[:-1]``, targets ``chunk[1:]``); the
    reference keeps ``floor(n / chunk) - 1`` of them, visits them in a shuffled order
    and keeps the last, partial minibatch.
    """
    length = num_steps + 1
    offset = int(rng.integers(0, length))
    count = (len(tokens) - offset) // length - 1
    if count < 1:
        raise SplitTooShortError(
            f"{len(tokens):,} tokens are too few for two chunks of num_steps+1={length}"
        )
    chunks = np.asarray(tokens[offset : offset + count * length]).reshape(count, length)
    order = rng.permutation(count) if shuffle else np.arange(count)
    batches = -(-count // batch_size)

    def generate():
        for start in range(0, count, batch_size):
            chosen = chunks[order[start : start + batch_size]]
            yield chosen[:, :-1], chosen[:, 1:]

    return batches, generate()


# -- sentences (the WildML tutorial) --------------------------------------------------

PAD_TARGET = -100  # ignored by the loss (torch's cross-entropy ignore_index)


def sentences(tokens: np.ndarray, end_id: int) -> list[np.ndarray]:
    """Every sentence as ``[end] w_1 .. w_n [end]``: the end symbol also starts a
    sentence, as the tutorial's SENTENCE_START. Tokens after the last end are dropped."""
    ends = np.flatnonzero(np.asarray(tokens) == end_id)
    starts = np.concatenate([[-1], ends[:-1]])
    out = []
    for start, end in zip(starts, ends, strict=True):
        body = np.asarray(tokens[start + 1 : end + 1])
        out.append(np.concatenate([[end_id], body]))
    return out


def sentence_batches(
    corpus_sentences: list[np.ndarray],
    batch_size: int,
    rng: np.random.Generator | None,
) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(number of minibatches, minibatches) of whole sentences, padded to the longest.

    Inputs are ``sentence[:-1]``, targets ``sentence[1:]``; padded targets are
    ``PAD_TARGET``. With ``rng`` the sentences are visited in a random order (the
    tutorial's permutation per epoch), else in corpus order.
    """
    count = len(corpus_sentences)
    if count == 0:
        raise SplitTooShortError("the split has no complete sentence")
    order = rng.permutation(count) if rng is not None else np.arange(count)
    batches = -(-count // batch_size)

    def generate():
        for start in range(0, count, batch_size):
            chosen = [corpus_sentences[i] for i in order[start : start + batch_size]]
            width = max(len(s) for s in chosen) - 1
            inputs = np.zeros((len(chosen), width), dtype=np.int64)
            targets = np.full((len(chosen), width), PAD_TARGET, dtype=np.int64)
            for row, sentence in enumerate(chosen):
                inputs[row, : len(sentence) - 1] = sentence[:-1]
                targets[row, : len(sentence) - 1] = sentence[1:]
            yield inputs, targets

    return batches, generate()


# -- char-rnn's stream-wise split ------------------------------------------------------


def stream_split(
    text: np.ndarray, batch_size: int, num_steps: int, fractions=(0.95, 0.05)
) -> dict[str, np.ndarray]:
    """char-rnn's ``CharSplitLMMinibatchLoader`` split of one text, as three streams.

    The text is truncated to whole minibatches and viewed as ``batch_size`` rows (targets
    are the text shifted by one, the last wrapping to the first symbol); minibatch k is
    columns [kT, (k+1)T). The first floor(0.95 n) minibatches train, the next
    floor(0.05 n) validate and the remaining ones (0 or 1) test: validation is the end of
    every row, not the end of the text. Each split is returned as its rows concatenated,
    each row followed by its last target, so that :func:`minibatches` with the same
    ``batch_size`` and ``num_steps`` yields exactly char-rnn's minibatches.
    """
    text = np.asarray(text)
    per_batch = batch_size * num_steps
    total = len(text) // per_batch
    if total < 2:
        raise SplitTooShortError(
            f"{len(text):,} tokens are too few for char-rnn's split into minibatches of "
            f"batch_size={batch_size} x num_steps={num_steps}"
        )
    x = text[: total * per_batch]
    y = np.concatenate([text[1 : total * per_batch], text[:1]])
    x_rows, y_rows = x.reshape(batch_size, -1), y.reshape(batch_size, -1)
    n_train = int(np.floor(total * fractions[0]))
    n_valid = int(np.floor(total * fractions[1]))
    bounds = {
        "train": (0, n_train),
        "valid": (n_train, n_train + n_valid),
        "test": (n_train + n_valid, total),
    }
    out = {}
    for split, (first, last) in bounds.items():
        if last == first:
            out[split] = text[:0]
            continue
        a, b = first * num_steps, last * num_steps
        out[split] = np.concatenate([x_rows[:, a:b], y_rows[:, b - 1 : b]], axis=1).reshape(-1)
    return out
