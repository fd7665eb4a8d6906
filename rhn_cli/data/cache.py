"""The on-disk cache of prepared datasets: layout, atomic writes, metadata and locking.

Layout under ``RHN_DATA_DIR`` (default ``./data``, relative to the working directory)::

    ptb/                     one directory per dataset
        train.npy valid.npy test.npy   token ids (uint8, uint16 or uint32), memory-mapped
        vocab.json           the symbol of each id
        meta.json            sources and their checksums, statistics, convention, version
    textfile/<level>-<key>/  one directory per prepared text file (key: its contents' hash)
    .locks/NAME.lock         serialises processes preparing or reading the same dataset
    .staging/NAME-*/         downloads and extracted raw files while preparing (removed after)

``meta.json`` is written last, after every other file is in place, so a directory without
one (a crash mid-way) is never taken for a complete cache. Every file is written to a
temporary name in its own directory, fsynced and renamed into place (``os.replace``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from rhn_cli.atomic import fsync_directory, temporary_name, write_atomically
from rhn_cli.data.errors import DatasetError

if TYPE_CHECKING:
    import numpy as np

DATA_DIR_ENV = "RHN_DATA_DIR"
DEFAULT_DATA_DIR = "data"
META_FILE = "meta.json"
VOCAB_FILE = "vocab.json"
CACHE_FORMAT = "rhn-dataset-cache"
# Bump when tokenisation or the layout changes: older caches are then rebuilt.
PREPROCESSING_VERSION = 1

_CHUNK = 1 << 20


def data_dir() -> Path:
    """The cache root: ``RHN_DATA_DIR`` or ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def dataset_dir(name: str) -> Path:
    return data_dir() / name


def split_file(split: str) -> str:
    return f"{split}.npy"


# --- hashing -------------------------------------------------------------------------


def parse_hash(published: str) -> tuple[str, str]:
    """``'md5:abc'`` -> ``('md5', 'abc')``; a bare hex string is sha256 (pooch's rule)."""
    algorithm, _, digest = published.rpartition(":")
    return (algorithm or "sha256").lower(), digest.lower()


class Hasher:
    """Several digests of one byte stream, computed in a single pass."""

    def __init__(self, algorithms: set[str] | tuple[str, ...]) -> None:
        self._digests = {alg: hashlib.new(alg, usedforsecurity=False) for alg in algorithms}
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        for digest in self._digests.values():
            digest.update(chunk)
        self.size += len(chunk)

    def hexdigests(self) -> dict[str, str]:
        return {alg: digest.hexdigest() for alg, digest in self._digests.items()}


def hash_file(path: Path, algorithms: set[str] | tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of a file, read once in 1 MiB chunks."""
    hasher = Hasher(algorithms)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigests()


# --- atomic writes (rhn_cli.atomic) and JSON -----------------------------------------


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


class NpyStream:
    """Writes a 1-D ``.npy`` file chunk by chunk (so a 100 MB split never sits in memory),
    hashing the bytes as they go."""

    def __init__(self, handle: BinaryIO, dtype: np.dtype, length: int) -> None:
        import numpy as np

        self._handle = handle
        self._dtype = np.dtype(dtype)
        self._expected = length
        self.written = 0
        self.hasher = Hasher(("sha256",))
        header = io.BytesIO()
        descriptor = np.lib.format.dtype_to_descr(self._dtype)
        np.lib.format.write_array_header_1_0(
            header, {"descr": descriptor, "fortran_order": False, "shape": (length,)}
        )
        self._write(header.getvalue())

    def _write(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self.hasher.update(data)

    def write(self, chunk: np.ndarray) -> None:
        import numpy as np

        if chunk.dtype != self._dtype:
            raise TypeError(f"chunk of {chunk.dtype} written to a {self._dtype} array")
        self._write(memoryview(np.ascontiguousarray(chunk).reshape(-1)).cast("B"))
        self.written += chunk.size

    def check_complete(self) -> None:
        if self.written != self._expected:
            raise RuntimeError(f"wrote {self.written} of {self._expected} tokens")


@dataclass
class WrittenFile:
    name: str
    size: int
    sha256: str


class CacheWriter:
    """Stages the files of a new cache next to the old ones, then swaps them in.

    Files are written to temporary names in the dataset directory (fsynced). Until
    :meth:`commit` the old cache, if any, is untouched, so a failed rebuild loses
    nothing; :meth:`commit` removes the old ``meta.json``, renames every staged file into
    place and writes the new ``meta.json`` last.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # Temporary files left by a process that was killed mid-way (we hold the lock).
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        self._staged: dict[str, Path] = {}
        self.files: dict[str, WrittenFile] = {}

    @contextlib.contextmanager
    def npy(self, name: str, dtype: Any, length: int) -> Iterator[NpyStream]:
        """A :class:`NpyStream` for ``name``; the file is staged when the block ends."""
        final = self.directory / name
        temporary = temporary_name(final)
        self._staged[name] = temporary
        with open(temporary, "wb") as handle:
            stream = NpyStream(handle, dtype, length)
            yield stream
            stream.check_complete()
            handle.flush()
            os.fsync(handle.fileno())
        digest = stream.hasher.hexdigests()["sha256"]
        self.files[name] = WrittenFile(name, stream.hasher.size, digest)

    def save_array(self, name: str, array: np.ndarray) -> None:
        with self.npy(name, array.dtype, array.size) as stream:
            stream.write(array)

    def save_bytes(self, name: str, data: bytes) -> None:
        final = self.directory / name
        temporary = temporary_name(final)
        self._staged[name] = temporary
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.files[name] = WrittenFile(name, len(data), hashlib.sha256(data).hexdigest())

    def commit(self, meta: dict[str, Any]) -> None:
        (self.directory / META_FILE).unlink(missing_ok=True)
        fsync_directory(self.directory)
        for name, temporary in self._staged.items():
            os.replace(temporary, self.directory / name)
        self._staged.clear()
        write_atomically(self.directory / META_FILE, dump_json(meta))

    def discard(self) -> None:
        for temporary in self._staged.values():
            temporary.unlink(missing_ok=True)
        self._staged.clear()


# --- locking and staging ---------------------------------------------------------------


@contextlib.contextmanager
def locked(name: str, echo: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock of dataset ``name`` (for preparing, reading or removing it).

    A second process waits, saying so once, until the first is done; it then finds the
    cache complete and uses it.
    """
    from filelock import FileLock, Timeout

    lock_dir = data_dir() / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / f"{name.replace('/', '-')}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        echo(f"{name}: waiting for another process that is preparing or reading it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def staging_area(name: str) -> Iterator[Path]:
    """A fresh directory inside the cache for downloads and extracted files, removed after."""
    root = data_dir() / ".staging"
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"{name.replace('/', '-')}-"
    # Staging directories of killed processes (we hold the dataset's lock, so none is live).
    for leftover in root.glob(prefix + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only if empty: keeps the cache tidy


# --- reading ---------------------------------------------------------------------------


@dataclass
class CacheState:
    """What a dataset directory holds: ``ready`` (complete and current), ``missing``,
    ``stale`` (with the reason) or ``corrupted`` (a file's bytes changed since it was
    written: the reason names it)."""

    status: str
    directory: Path
    meta: dict[str, Any] | None = None
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.status == "ready"


def read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def inspect(
    directory: Path, expect: Callable[[dict[str, Any]], str | None], contents: bool = False
) -> CacheState:
    """Checks that the cache in ``directory`` is complete and current.

    Reads the metadata and each array's header and size, never the data; with
    ``contents`` also the SHA-256 of every file against the one recorded when it was
    written (what training does before using a cache: about 0.1 s for enwik8's 95 MB).
    ``expect`` returns why the metadata does not fit the dataset's spec (or None).
    """
    meta = read_meta(directory)
    if meta is None:
        has_files = directory.is_dir() and any(directory.iterdir())
        if has_files:
            return CacheState("stale", directory, None, "no meta.json (an interrupted fetch?)")
        return CacheState("missing", directory)
    reason = _meta_problem(directory, meta) or expect(meta)
    if reason:
        return CacheState("stale", directory, meta, reason)
    changed = _changed_file(directory, meta) if contents else None
    if changed is not None:
        reason = f"{changed} does not match the sha256 recorded in its meta.json"
        return CacheState("corrupted", directory, meta, reason)
    return CacheState("ready", directory, meta)


def _changed_file(directory: Path, meta: dict[str, Any]) -> Path | None:
    """The first file of a complete cache whose bytes are not the ones written."""
    for entry in [meta["vocab"], *meta["splits"].values()]:
        path = directory / entry["file"]
        if hash_file(path)["sha256"] != entry.get("sha256"):
            return path
    return None


def _meta_problem(directory: Path, meta: dict[str, Any]) -> str | None:
    if meta.get("format") != CACHE_FORMAT:
        return "meta.json is unreadable or not rhn's"
    version = meta.get("preprocessing_version")
    if version != PREPROCESSING_VERSION:
        return f"preprocessing version {version}, this rhn writes {PREPROCESSING_VERSION}"
    try:
        splits = meta["splits"]
        vocab = meta["vocab"]
        for split, entry in splits.items():
            problem = _array_problem(
                directory / entry["file"], entry["dtype"], entry["tokens"], entry["bytes"]
            )
            if problem:
                return f"{split}: {problem}"
        vocab_path = directory / vocab["file"]
        if not vocab_path.is_file() or vocab_path.stat().st_size != vocab["bytes"]:
            return f"{vocab['file']} is missing or has the wrong size"
    except (KeyError, TypeError):
        return "meta.json lacks required fields"
    return None


def _array_problem(path: Path, dtype: str, tokens: int, size: int) -> str | None:
    import numpy as np

    if not path.is_file():
        return f"{path.name} is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path.name} has {actual:,} bytes, meta.json says {size:,} (truncated?)"
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as error:
        return f"{path.name} is not a readable .npy file ({error})"
    if array.dtype != np.dtype(dtype) or array.shape != (tokens,):
        return (
            f"{path.name} holds {array.dtype}{list(array.shape)}, meta.json says {dtype}[{tokens}]"
        )
    return None


def load_arrays(directory: Path, meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The memory-mapped splits and the vocabulary of a ready cache."""
    import numpy as np

    splits = {
        split: np.load(directory / entry["file"], mmap_mode="r")
        for split, entry in meta["splits"].items()
    }
    vocab = json.loads((directory / meta["vocab"]["file"]).read_text(encoding="utf-8"))
    if len(vocab) != meta["vocab"]["size"]:
        raise DatasetError(
            f"{directory / meta['vocab']['file']} has {len(vocab)} symbols, meta.json says "
            f"{meta['vocab']['size']}; run 'rhn data fetch {meta['dataset']} --force'"
        )
    return splits, vocab


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove_tree(path: Path) -> int:
    """Delete a cache directory; returns the bytes freed."""
    freed = size_on_disk(path)
    if path.exists():
        shutil.rmtree(path)
    return freed


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
