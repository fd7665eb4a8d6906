"""Which library, MKL or oneDNN, runs each of the RHN's weight-gradient products: decided
once per machine and setup, on disk, so that a run's numbers never depend on a timing.

The two libraries sum in different orders (float32 results differ in the last bits, which
training then amplifies), and neither is faster at every shape, so rhn times both once for
each product and keeps the winner in ``library-decisions.json`` in rhn's cache directory
(``RHN_CACHE_DIR``, else the user cache, ``~/.cache/rhn`` on Linux, which follows
``XDG_CACHE_HOME``). Its entries are grouped by what makes the answer differ: the CPU's
vector capability, torch's version (which brings its MKL and oneDNN) and torch's thread
count, e.g. ``{"AVX512 torch 2.13.0 threads 2": {"weight_gradient 1660x704 704x830
float32": "onednn"}}``. A process that meets a product without an entry takes a file lock,
reads the file again (another process may have timed it meanwhile), times, rewrites the
file atomically and releases the lock; every later process reads the decision. A corrupt
file counts as empty and is rewritten; where the cache cannot be written at all, the
process times for itself (one warning). A timing taken on a busy machine stays: delete the
file to time again.

A process keeps its first decision for a product. A run records the decisions it used
(:func:`library_decisions`) and a resumed run pins them (:func:`pin_library_decisions`):
pins override the file and any timing, so the run goes on with the same libraries even
where the cache was deleted or another machine would decide otherwise.

torch is imported only when a decision is made: importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from rhn_cli.atomic import write_atomically

log = logging.getLogger(__name__)

LIBRARIES = ("mkl", "onednn")
# The same directory as rhn board's Omniboard install (rhn_cli.board.omniboard.cache_dir).
CACHE_DIR_ENV = "RHN_CACHE_DIR"
CACHE_FILE = "library-decisions.json"

_used: dict[str, str] = {}  # product -> library, as this process decided or was pinned to
_pinned: dict[str, str] = {}


def library_decisions() -> dict[str, str]:
    """The libraries this process has used so far, and those it was pinned to, by product
    (``{"weight_gradient 1660x704 704x830 float32": "onednn"}``): JSON-able, for the run's
    record and checkpoint, and for :func:`pin_library_decisions` on resume."""
    return {**_used, **_pinned}


def pin_library_decisions(decisions: Mapping[str, str]) -> None:
    """Use these decisions (from :func:`library_decisions` of an earlier process of the same
    run) for their products, before anything else: this process's own earlier decisions, the
    cache file and timing. ValueError for a library other than 'mkl' or 'onednn'."""
    for product, library in decisions.items():
        if library not in LIBRARIES:
            raise ValueError(
                f"library decision for {product!r}: {library!r} is not one of "
                f"{', '.join(LIBRARIES)}"
            )
    _pinned.update({str(product): library for product, library in decisions.items()})


def forget_decisions() -> None:
    """Forget this process's decisions and pins, as a new process starts: the next
    :func:`decide` for each product reads the cache file (or times) again."""
    _used.clear()
    _pinned.clear()


def decide(product: str, time_libraries: Callable[[], str]) -> str:
    """The library for ``product`` (a readable key: operation, shapes, dtype): pinned, else
    this process's earlier decision, else the cache file's for this setup, else the one
    ``time_libraries`` returns ('mkl' or 'onednn'), which is then written to the file."""
    library = _pinned.get(product) or _used.get(product)
    if library is None:
        library = _cached_or_timed(product, time_libraries)
    _used[product] = library
    return library


def cache_file() -> Path:
    """Where the decisions are kept: ``RHN_CACHE_DIR``, else the user cache directory."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser() / CACHE_FILE
    import platformdirs

    return Path(platformdirs.user_cache_dir("rhn")) / CACHE_FILE


def setup() -> str:
    """What a timing's outcome depends on besides the product: the CPU's vector capability,
    torch's version (its MKL and oneDNN) and its thread count."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return f"{capability} torch {torch.__version__} threads {torch.get_num_threads()}"


def _cached_or_timed(product: str, time_libraries: Callable[[], str]) -> str:
    path, where = cache_file(), setup()
    cached = _read(path, quiet=True).get(where, {}).get(product)
    if cached is not None:
        return cached
    import filelock

    timed = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(path.with_name(path.name + ".lock")):
            decisions = _read(path)
            cached = decisions.get(where, {}).get(product)
            if cached is not None:  # another process timed it while this one waited
                return cached
            timed = time_libraries()
            decisions.setdefault(where, {})[product] = timed
            data = json.dumps(decisions, indent=1, sort_keys=True) + "\n"
            write_atomically(path, data.encode())
            return timed
    except OSError as error:  # a read-only or missing home: time for this process alone
        log.warning(
            "rhn: cannot keep the MKL/oneDNN decision for %s in %s (%s); timing it for this "
            "process only, so another run may choose differently and round differently",
            product,
            path,
            error,
        )
        return timed if timed is not None else time_libraries()


def _read(path: Path, quiet: bool = False) -> dict[str, dict[str, str]]:
    """The cache file's valid entries; {} where it is missing or unreadable."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        if not quiet:
            log.warning("rhn: %s is unreadable (%s); rewriting it", path, error)
        return {}
    if not isinstance(loaded, dict):
        if not quiet:
            log.warning(
                "rhn: %s holds no decisions (a JSON %s); rewriting it", path, type(loaded).__name__
            )
        return {}
    return {
        where: {p: lib for p, lib in entries.items() if lib in LIBRARIES}
        for where, entries in loaded.items()
        if isinstance(entries, dict)
    }
