"""What describes a dataset: its raw files, their archive, the published statistics.

The lowest module of the data layer with :mod:`rhn_cli.data.errors`: the registry
fills these in for every dataset, and fetching, preparing and caching read them. Light
on purpose (no numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rhn_cli.data.corpus import Corpus

SPLITS = ("train", "valid", "test")

# Loaders of config-driven datasets get the config and a function that prints progress.
Loader = Callable[[Mapping[str, Any], Callable[[str], None]], "Corpus"]


@dataclass(frozen=True)
class SourceFile:
    """One raw file the preparation reads.

    ``name`` is the file name a ``--from`` directory must hold (and the name it gets in
    the staging area); ``member`` its path inside the canonical archive. ``hash`` is the
    published checksum as ``'algorithm:hex'``, or None where nobody publishes one (the
    statistics of the prepared splits are checked instead).
    """

    name: str
    member: str
    hash: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Archive:
    """A published archive holding the raw files."""

    filename: str
    hash: str  # 'algorithm:hex'
    size: int
    urls: tuple[str, ...]  # the canonical URL first, then mirrors with the same checksum


@dataclass(frozen=True)
class Expected:
    """Statistics the prepared dataset must have, or it is not the published one."""

    tokens: Mapping[str, int]  # per split
    vocab_size: int
    symbols: str | None = None  # the exact vocabulary, where it is published


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: either a ``load`` function, or everything needed to fetch and prepare it.

    ``tokenizer`` names a function of :mod:`rhn_cli.data.prepare`. With ``held_out``
    the single raw file is split as the reference does: the last ``2 * held_out``
    tokens are valid then test; without it there is one raw file per split, in the
    order train, valid, test.
    """

    name: str
    summary: str
    level: str = "char"  # 'word' or 'char' (bytes count as characters)
    load: Loader | None = None
    tokenizer: str | None = None
    files: tuple[SourceFile, ...] = ()
    archive: Archive | None = None
    file_urls: tuple[str, ...] = ()  # directories (ending in '/') that hold the raw files
    held_out: int | None = None
    expected: Expected | None = None
    convention: str = ""

    @property
    def downloadable(self) -> bool:
        return self.load is None

    def download_urls(self) -> tuple[str, ...]:
        """Where to fetch from when the user names no source, in order of preference."""
        return (self.archive.urls if self.archive else ()) + self.file_urls
