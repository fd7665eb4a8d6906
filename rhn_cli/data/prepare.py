"""Tokenisation: verified raw files in, integer splits and a vocabulary out.

Each tokenizer writes the three splits through a :class:`~rhn_cli.data.cache.CacheWriter`
(staged, not yet in place) and returns the vocabulary and per-split statistics; the
caller checks them against the published ones before committing the cache. Ids use the
smallest unsigned type that holds the vocabulary: uint8 for bytes and characters,
uint16 for PTB words.

Conventions (recorded in each cache's ``meta.json``):

* ``ptb_words``: ``line.split() + ['<eos>']`` for every line, vocabulary from train with
  ids by (-count, word), as the TF reader; valid/test must have no unknown word.
* ``ptb_chars``: a ``ptb.char`` file is its symbols joined by single spaces plus one
  final space (spec §2.1), so the symbols are the characters at even offsets and every
  odd offset must hold a space. ``\\n`` is a symbol (the end of a sentence), ``_`` the
  word boundary, ``<unk>`` five symbols. This gives exactly 5,017,482 / 393,042 / 442,423
  symbols and 50 types. (awd-lstm's ``line.split() + ['<eos>']`` sees one more token per
  split, from the space after the last newline.) Ids: train symbols by byte value.
* ``bytes`` (enwik8, text8): one raw file; ids = the distinct byte values of the whole
  file in increasing order (the RHN reference's ``np.unique(..., return_inverse=True)``,
  done with a 256-entry lookup table in two streaming passes, so 100 MB needs little
  memory); the last ``2 * held_out`` bytes are valid then test.
* ``text_chars`` / ``text_words`` (``textfile``): Unicode characters with ids sorted by
  code point over all splits, or words as ``ptb_words`` where valid/test words unseen
  in train become ``<unk>``; one file is split 90/5/5 by tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rhn_cli.data.cache import CacheWriter, split_file
from rhn_cli.data.errors import DataInputError, DatasetError
from rhn_cli.data.spec import SPLITS, DatasetSpec

EOS = "<eos>"
UNK = "<unk>"
SPACE = ord(" ")
NEWLINE = ord("\n")
TEXTFILE_HELD_OUT_PERCENT = 5
# 4 MiB per streaming step: np.bincount widens each chunk to int64 (32 MiB).
_CHUNK = 1 << 22


@dataclass
class Prepared:
    """What a tokenizer produced (the arrays themselves are staged in the writer)."""

    vocab: list[str]
    vocab_kind: str
    splits: dict[str, dict[str, int]]  # per split: tokens, types and level-specific counts
    notes: dict[str, Any] = field(default_factory=dict)


def id_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DatasetError(f"a vocabulary of {vocab_size:,} symbols is too large")


def prepare(spec: DatasetSpec, paths: list[Path], writer: CacheWriter) -> Prepared:
    """Tokenise ``paths`` (one per ``spec.files``) as ``spec.tokenizer`` says."""
    tokenizer = TOKENIZERS.get(spec.tokenizer or "")
    if tokenizer is None:
        raise DatasetError(f"{spec.name}: unknown tokenizer {spec.tokenizer!r}")
    return tokenizer(spec, paths, writer)


def check_expected(spec: DatasetSpec, prepared: Prepared) -> None:
    """Raise unless the statistics are the published ones (when the spec lists them)."""
    expected = spec.expected
    if expected is None:
        return
    for split in SPLITS:
        got, want = prepared.splits[split]["tokens"], expected.tokens[split]
        if got != want:
            raise DatasetError(
                f"{spec.name}: the {split} split has {got:,} tokens, the published dataset "
                f"{want:,}; the source is not the published {spec.name}"
            )
    if len(prepared.vocab) != expected.vocab_size:
        raise DatasetError(
            f"{spec.name}: the vocabulary has {len(prepared.vocab):,} symbols, the published "
            f"dataset {expected.vocab_size:,}; the source is not the published {spec.name}"
        )
    if expected.symbols is not None and "".join(prepared.vocab) != expected.symbols:
        extra = sorted(set(prepared.vocab) - set(expected.symbols))
        raise DatasetError(
            f"{spec.name}: the vocabulary is not the published one (unexpected symbols "
            f"{''.join(extra)!r}); the source is not the published {spec.name}"
        )


# --- helpers -----------------------------------------------------------------------------


def read_utf8(path: Path) -> str:
    """The text of ``path``; DataInputError unless it is UTF-8 text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataInputError(
            f"{path} is not UTF-8 text (byte {error.start:,} is 0x{data[error.start]:02x})"
        ) from None
    # NUL decodes as UTF-8 but never occurs in text: it marks a binary file (a tar, an
    # image) that would otherwise be trained on as characters.
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataInputError(f"{path} is not UTF-8 text but a binary file (byte {nul:,} is 0x00)")
    return text


def word_tokens(text: str) -> list[str]:
    """``line.split() + ['<eos>']`` for every line; a final newline ends the last line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def held_out_bounds(length: int, held_out: int, what: str) -> dict[str, tuple[int, int]]:
    """The reference's split: the last ``2 * held_out`` tokens are valid, then test."""
    if held_out < 1 or length - 2 * held_out < 1:
        raise DataInputError(
            f"{what} has {length:,} tokens, too few to hold out {held_out:,} each for valid "
            "and test"
        )
    train_end, valid_end = length - 2 * held_out, length - held_out
    return {"train": (0, train_end), "valid": (train_end, valid_end), "test": (valid_end, length)}


def _types(ids: np.ndarray, vocab_size: int) -> int:
    return int(np.count_nonzero(np.bincount(ids, minlength=vocab_size)))


def _sorted_vocab(counts: Counter[str]) -> list[str]:
    """Most frequent first, ties by the word itself: the TF PTB reader's order."""
    return [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def _encode_words(tokens: list[str], index: dict[str, int], unknown: int | None) -> np.ndarray:
    dtype = id_dtype(len(index))
    if unknown is None:
        return np.fromiter((index[t] for t in tokens), dtype=dtype, count=len(tokens))
    return np.fromiter((index.get(t, unknown) for t in tokens), dtype=dtype, count=len(tokens))


def _word_stats(tokens: list[str], ids: np.ndarray, vocab_size: int, oov: int) -> dict[str, int]:
    return {
        "tokens": len(tokens),
        "types": _types(ids, vocab_size),
        "lines": tokens.count(EOS),
        "unk": tokens.count(UNK) + oov,
        "oov": oov,
    }


# --- tokenizers ----------------------------------------------------------------------------


def _ptb_words(spec: DatasetSpec, paths: list[Path], writer: CacheWriter) -> Prepared:
    tokens = {
        split: word_tokens(read_utf8(path)) for split, path in zip(SPLITS, paths, strict=True)
    }
    vocab = _sorted_vocab(Counter(tokens["train"]))
    index = {word: i for i, word in enumerate(vocab)}
    stats = {}
    for split in SPLITS:
        unknown = set(tokens[split]) - index.keys()
        if unknown:
            example = sorted(unknown)[0]
            raise DatasetError(
                f"{spec.name}: the {split} split has {len(unknown):,} word types that train "
                f"lacks (e.g. {example!r}); the published PTB has none"
            )
        ids = _encode_words(tokens[split], index, None)
        writer.save_array(split_file(split), ids)
        stats[split] = _word_stats(tokens[split], ids, len(vocab), 0)
    return Prepared(vocab, "words", stats)


def _ptb_char_symbols(path: Path) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    separators = data[1::2]
    if data.size % 2 or not np.all(separators == SPACE):
        bad = np.flatnonzero(separators != SPACE)
        where = f"byte {2 * int(bad[0]) + 1:,} is not a space" if bad.size else "odd length"
        raise DatasetError(
            f"{path.name} is not in the ptb.char format (symbols separated by single spaces, "
            f"one final space): {where}"
        )
    return np.ascontiguousarray(data[0::2])


def _ptb_chars(spec: DatasetSpec, paths: list[Path], writer: CacheWriter) -> Prepared:
    symbols = {split: _ptb_char_symbols(path) for split, path in zip(SPLITS, paths, strict=True)}
    in_train = np.bincount(symbols["train"], minlength=256) > 0
    present = np.flatnonzero(in_train)
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[present] = np.arange(present.size)
    stats = {}
    for split in SPLITS:
        counts = np.bincount(symbols[split], minlength=256)
        unseen = np.flatnonzero((counts > 0) & ~in_train)
        if unseen.size:
            raise DatasetError(
                f"{spec.name}: the {split} split has symbols that train lacks "
                f"({bytes(unseen.astype(np.uint8))!r})"
            )
        writer.save_array(split_file(split), lookup[symbols[split]])
        stats[split] = {
            "tokens": int(symbols[split].size),
            "types": int(np.count_nonzero(counts)),
            "lines": int(counts[NEWLINE]),
        }
    return Prepared([chr(b) for b in present], "characters", stats)


def _bytes(spec: DatasetSpec, paths: list[Path], writer: CacheWriter) -> Prepared:
    (path,) = paths
    length = path.stat().st_size
    bounds = held_out_bounds(length, spec.held_out or 0, path.name)

    # Pass 1: which byte values occur, per split (np.bincount on 16 MiB chunks).
    counts = {split: np.zeros(256, dtype=np.int64) for split in SPLITS}
    with open(path, "rb") as handle:
        for split, (start, end) in bounds.items():
            for chunk in _chunks(handle, start, end):
                counts[split] += np.bincount(chunk, minlength=256)
    present = np.flatnonzero(sum(counts.values()))
    # The RHN reference's np.unique(data, return_inverse=True), as a table lookup.
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[present] = np.arange(present.size)

    # Pass 2: map and stream each split into its .npy file.
    with open(path, "rb") as handle:
        for split, (start, end) in bounds.items():
            with writer.npy(split_file(split), np.uint8, end - start) as stream:
                for chunk in _chunks(handle, start, end):
                    stream.write(lookup[chunk])
    stats = {
        split: {
            "tokens": end - start,
            "types": int(np.count_nonzero(counts[split])),
            "newlines": int(counts[split][NEWLINE]),
        }
        for split, (start, end) in bounds.items()
    }
    # One character per byte value (latin-1), so the vocabulary file stays plain JSON.
    return Prepared([chr(b) for b in present], "bytes (latin-1: one character per byte)", stats)


def _chunks(handle, start: int, end: int):
    handle.seek(start)
    remaining = end - start
    while remaining > 0:
        data = handle.read(min(_CHUNK, remaining))
        if not data:
            raise DatasetError(f"{handle.name} ended early")
        remaining -= len(data)
        yield np.frombuffer(data, dtype=np.uint8)


def _text_splits(paths: list[Path], tokenize: Callable[[str], Any], length=len) -> dict:
    """Tokens per split: three files as they are, or one file split 90/5/5."""
    if len(paths) == 3:
        splits = {
            split: tokenize(read_utf8(path)) for split, path in zip(SPLITS, paths, strict=True)
        }
        for split, path in zip(SPLITS, paths, strict=True):
            if length(splits[split]) == 0:
                raise DataInputError(f"{path} has no tokens; the {split} split needs some")
        return splits
    (path,) = paths
    tokens = tokenize(read_utf8(path))
    held_out = length(tokens) * TEXTFILE_HELD_OUT_PERCENT // 100
    if held_out < 1:
        raise DataInputError(
            f"{path} has {length(tokens):,} tokens, too few for a 90/5/5 split (at least 20)"
        )
    bounds = held_out_bounds(length(tokens), held_out, str(path))
    return {split: tokens[start:end] for split, (start, end) in bounds.items()}


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _text_chars(spec: DatasetSpec, paths: list[Path], writer: CacheWriter) -> Prepared:
    codes = _text_splits(paths, _code_points)
    alphabet = np.unique(np.concatenate([codes[split] for split in SPLITS]))
    dtype = id_dtype(alphabet.size)
    stats = {}
    for split in SPLITS:
        ids = np.searchsorted(alphabet, codes[split]).astype(dtype)
        writer.save_array(split_file(split), ids)
        stats[split] = {
            "tokens": int(ids.size),
            "types": _types(ids, alphabet.size),
            "lines": int(np.count_nonzero(codes[split] == NEWLINE)),
        }
    return Prepared([chr(c) for c in alphabet.tolist()], "characters", stats)


def _text_words(spec: DatasetSpec, paths: list[Path], writer: CacheWriter) -> Prepared:
    tokens = _text_splits(paths, word_tokens)
    vocab = _sorted_vocab(Counter(tokens["train"]))
    index = {word: i for i, word in enumerate(vocab)}
    unseen = {split: sum(t not in index for t in tokens[split]) for split in SPLITS}
    if any(unseen.values()) and UNK not in index:
        index[UNK] = len(vocab)
        vocab.append(UNK)
    stats = {}
    for split in SPLITS:
        ids = _encode_words(tokens[split], index, index.get(UNK))
        writer.save_array(split_file(split), ids)
        stats[split] = _word_stats(tokens[split], ids, len(vocab), unseen[split])
    return Prepared(vocab, "words", stats)


TOKENIZERS: dict[str, Callable[[DatasetSpec, list[Path], CacheWriter], Prepared]] = {
    "ptb_words": _ptb_words,
    "ptb_chars": _ptb_chars,
    "bytes": _bytes,
    "text_chars": _text_chars,
    "text_words": _text_words,
}
