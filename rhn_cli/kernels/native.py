"""Builds and loads rhn's native kernels (``csrc/``), one C++ extension module: the
RHN recurrence's time loop (:mod:`rhn_cli.kernels.rhn_recurrence`), the fused softmax
cross-entropy (:mod:`rhn_cli.engine.cross_entropy`), the fused penalised SGD step
(:mod:`rhn_cli.engine.optim`) and the transposes they share.

A build compiles it with torch's C++ extension builder (gcc/g++ and ninja; about a
minute) into ``<user cache>/rhn/extensions/<name>``, where ``<name>`` carries a hash of
every source file, the compiler flags, torch's version, Python's ABI and the CPU's vector
capability: a changed source, another torch or Python, or a home directory shared with a
different CPU builds afresh instead of loading a stale or illegal binary. A build is made
by ``rhn kernels build`` (``make install`` runs it) or, where none was, by the first use,
which a run makes before its clock starts (:mod:`rhn_cli.experiment.preflight`).

A build is finished when its record, ``rhn-build.json``, is written beside the module:
what it was built from and the module's digest. A finished build is loaded as it is (in
well under a second), without asking ninja, which would recompile it silently whenever
its sources, torch's headers or Python's include directory sit at another path or carry
newer times (a reinstall elsewhere) although the hash says the code is the same; a module
without a matching record (a build killed while linking leaves half a file, which would
crash the process that loads it) is built again. Every build says so on stderr, with its
reason (:func:`why_build`): the first on this machine, the sources, torch, Python or CPU
that changed since the last build (from the records), an earlier build that did not
finish. Builds take a lock (released by the system if the process dies): a second process
says it waits, and loads what the first built.

When it cannot be built (no compiler, no ninja, a failed build), :func:`load` logs one
warning with the reason and returns None, and everything runs its Python path: the RHN
recurrence its Python loop, the training loss and step their torch paths; the same model
(float32 sums differ by rounding), with a ptb_sota training step taking about 1.6x as
long (1.09 s against 0.68 s on the 2-core dev CPU). ``RHN_NATIVE=0`` in the environment
skips the native kernels altogether, as ``USE_NATIVE = False`` does in a process.

Importing this module is cheap (torch is imported when the kernels are first asked for).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rhn_cli.atomic import write_atomically

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
# Every file the build reads: compiled (.cpp) and included (.h); all of them are hashed
# into the build's name.
SOURCES = tuple(sorted(SOURCE_DIR.glob("*.cpp")))
HEADERS = tuple(sorted(SOURCE_DIR.glob("*.h")))
# In each build directory, written once its module is built and loaded: what it was built
# from (so that the next build can say what changed) and the module's digest.
RECORD = "rhn-build.json"
# rhn's build lock, and torch's own inside it (which torch leaves behind when killed).
BUILD_LOCK, TORCH_LOCK = "rhn-build.lock", "lock"
# The reason of a build another process was making: this one waits for it.
WAITED = "by another process, which this one waited for"
BUILD_PREFIX = "rhn_kernels_"

# False: the Python paths everywhere (the RHN recurrence's Python loop, torch's training
# loss and step), whatever load() could give; for comparisons and tests.
USE_NATIVE = True

# Flags of torch's own kernels for its CPU capability, so that ATen's Vectorized (and
# the SLEEF tanh/exp behind it) compile to the instructions torch.tanh itself uses.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


@dataclass(frozen=True)
class Target:
    """The build that the current sources, torch, Python and CPU call for: its module
    ``name``, its ``directory`` and ``facts`` (what it is built from, as its record)."""

    name: str
    directory: Path
    flags: tuple[str, ...]
    facts: dict[str, Any]

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"


@dataclass(frozen=True)
class Outcome:
    """One attempt at the kernels: the ``module`` (None when it could not be built, and
    ``error`` says why in one line), its ``target``, the ``reason`` it was built in this
    attempt (None: an earlier build was loaded) and the ``seconds`` it all took."""

    module: Any
    target: Target | None
    reason: str | None = None
    error: str | None = None
    seconds: float = 0.0


def enabled() -> bool:
    """False when ``RHN_NATIVE`` says 0 (or false, no, off): the kernels are not built."""
    return os.environ.get("RHN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def kernels_for(*tensors):
    """The compiled module when the native kernels apply to ``tensors`` (CPU, one float
    dtype throughout; None entries are skipped), ``USE_NATIVE`` is on and it could be
    built; else None, and the caller takes its Python path."""
    import torch

    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if not USE_NATIVE or dtype not in (torch.float32, torch.float64):
        return None
    if any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return None
    return load()


def loaded() -> bool | None:
    """Whether the compiled module is in use: None while nothing has asked for it yet
    (so nothing ran on it), else whether :func:`load` built and loaded it."""
    if load.cache_info().currsize == 0:
        return None
    return load() is not None


# What load()'s attempt gave (None: none made, or RHN_NATIVE=0), and the words a build it
# makes is announced with (prepare's occasion).
_last: Outcome | None = None
_occasion = ""


@functools.cache
def load():
    """The compiled module (``rhn_forward``, ``rhn_backward``, ``transpose_into``,
    ``release``, ``cross_entropy_forward``, ``cross_entropy_backward``, ``l2_squares``,
    ``l2_sgd_update``), built first if need be, or None when it cannot be built; tried
    once per process."""
    global _last
    _last = attempt(_occasion) if enabled() else None
    if _last is None:
        return None
    if _last.error is not None:
        log.warning(
            "rhn: the native kernels could not be built (%s); using the Python loop "
            "(same results, slower). Set RHN_NATIVE=0 to skip the attempt.",
            _last.error,
        )
    return _last.module


def prepare(occasion: str) -> Outcome | None:
    """:func:`load` now, announcing a build it makes as done ``occasion`` (e.g. "before
    the run's clock starts"); the outcome of this process's attempt, None when
    ``RHN_NATIVE`` switches the kernels off."""
    global _occasion
    _occasion = occasion
    try:
        load()
    finally:
        _occasion = ""
    return _last


def attempt(occasion: str = "") -> Outcome:
    """The kernels, loaded from this machine's finished build, or built first (announced on
    stderr with :func:`why_build`'s reason, and ``occasion``); never raises: an Outcome
    without a module says why."""
    started = time.perf_counter()
    aim = None
    try:
        aim = target()
        if finished(aim):
            return Outcome(_import(aim), aim, seconds=time.perf_counter() - started)
        module, reason = _build_under_lock(aim, occasion)
        return Outcome(module, aim, reason, seconds=time.perf_counter() - started)
    except Exception as error:  # any build failure leaves the Python paths in charge
        seconds = time.perf_counter() - started
        return Outcome(None, aim, error=one_line(error), seconds=seconds)


def target() -> Target:
    """The build this machine needs for the current sources (imports torch)."""
    import platformdirs
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inline and runs on one thread without it.
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if capability in _CAPABILITY_FLAGS:
        flags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        flags += _CAPABILITY_FLAGS[capability]
    python = sys.implementation.cache_tag  # the extension is built for one Python ABI
    name = build_name(capability, flags, torch.__version__, python=python)
    facts = {
        "capability": capability,
        "torch": torch.__version__,
        "python": python,
        "flags": flags,
        "sources": {path.name: _digest(path) for path in (*SOURCES, *HEADERS)},
        "source_dir": str(SOURCE_DIR),
    }
    directory = Path(platformdirs.user_cache_dir("rhn")) / "extensions" / name
    return Target(name, directory, tuple(flags), facts)


def build_name(
    capability: str, flags: list[str], torch_version: str, files=None, python: str = ""
) -> str:
    """The build's module (and directory) name, ``rhn_kernels_<capability>_<hash>``: 12 hex
    digits of a hash of every source file (``files``, by default ``SOURCES`` and
    ``HEADERS``; by name and content), the flags, torch's version and ``python`` (its
    ABI tag, cpython-311), so that a change to any of them builds afresh."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS) if files is None else files:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    digest.update(" ".join(flags).encode() + b"\0" + torch_version.encode())
    if python:
        digest.update(b"\0" + python.encode())
    return f"{BUILD_PREFIX}{capability.lower()}_{digest.hexdigest()[:12]}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def finished(aim: Target) -> bool:
    """Whether ``aim``'s directory holds a finished build: its record, naming the digest
    of the module that is there."""
    record = _read_record(aim.directory / RECORD)
    return (
        record is not None
        and aim.library.is_file()
        and record.get("library") == _digest(aim.library)
    )


def why_build(aim: Target) -> str | None:
    """Why ``aim`` must be built (None: it is finished): an unfinished or damaged build in
    its directory, the first build on this machine, or what changed since the last build."""
    if finished(aim):
        return None
    if _read_record(aim.directory / RECORD) is not None:
        return "its module is missing or damaged since it was built"
    if aim.directory.is_dir() and any(
        path.name not in (BUILD_LOCK, TORCH_LOCK) for path in aim.directory.iterdir()
    ):
        return "an earlier build there did not finish"
    extensions = aim.directory.parent
    last = last_record(extensions)
    if last is not None:
        return "; ".join(changes_since(last, aim.facts)) or "no build of these sources yet"
    if any(extensions.glob("rhn_*/*.so")):  # builds of an rhn that kept no records
        return f"no build for these sources, torch {aim.facts['torch']} and this Python yet"
    return "first build on this machine"


def _read_record(path: Path) -> dict[str, Any] | None:
    """A build's record (None: none, or unreadable: half a build or a damaged file)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def last_record(extensions: Path) -> dict[str, Any] | None:
    """The record of the most recent finished build in ``extensions`` (None: none)."""
    records = []
    for path in extensions.glob(f"{BUILD_PREFIX}*/{RECORD}"):
        record = _read_record(path)
        if record is not None:
            with contextlib.suppress(OSError):
                records.append((path.stat().st_mtime, record))
    return max(records, key=lambda entry: entry[0])[1] if records else None


def changes_since(last: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """What differs between the last build's record and ``facts``, in words."""
    changes = []
    for key, what in (("capability", "a {} CPU"), ("torch", "torch {}"), ("python", "{}")):
        if last.get(key) != facts[key]:
            changes.append(f"{what.format(facts[key])}, the last build was for {last.get(key)}")
    if last.get("flags") != facts["flags"] and last.get("capability") == facts["capability"]:
        changes.append("other compiler flags")
    before, now = last.get("sources") or {}, facts["sources"]
    changed = sorted(name for name in {*before, *now} if before.get(name) != now.get(name))
    if changed:
        changes.append(f"sources changed since the last build: {', '.join(changed)}")
    return changes


def _build_under_lock(aim: Target, occasion: str) -> tuple[Any, str]:
    """(the module, why it was built): built under rhn's build lock, or, where another
    process holds it, that process's build once it is finished (saying it waits)."""
    import filelock

    aim.directory.mkdir(parents=True, exist_ok=True)
    when = f" {occasion}" if occasion else ""
    lock = filelock.FileLock(str(aim.directory / BUILD_LOCK))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        where = aim.directory
        _say(f"rhn: waiting{when} for the native kernels another process is building in {where}")
        lock.acquire()
    try:
        if finished(aim):
            return _import(aim), WAITED
        reason = why_build(aim)
        _say(
            f"rhn: building the native kernels{when} ({reason}; about a minute) in {aim.directory}"
        )
        return _build(aim), reason
    finally:
        lock.release()


def _build(aim: Target):
    """Compile, load and record ``aim`` (about a minute); says how long it took."""
    from torch.utils import cpp_extension

    # Under rhn's lock nobody else builds here: torch's lock is one a killed build left
    # (torch would wait for it without end), and a module without a record is half one
    # (ninja, going by times, could take it for finished).
    remove_stale_lock(aim.directory / TORCH_LOCK, max_age=0)
    aim.library.unlink(missing_ok=True)
    (aim.directory / RECORD).unlink(missing_ok=True)
    # torch renames a module it has built in this process from other sources or another
    # directory (name_v1); the name is rhn's, and the hash in it says what it holds.
    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    getattr(versioner, "entries", {}).pop(aim.name, None)
    started = time.perf_counter()
    with _quiet_torch_builder():
        module = cpp_extension.load(
            name=aim.name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=list(aim.flags),
            extra_ldflags=["-fopenmp"],
            build_directory=str(aim.directory),
            verbose=False,
        )
    record = {**aim.facts, "library": _digest(aim.library)}
    write_atomically(aim.directory / RECORD, json.dumps(record, indent=1).encode())
    _say(f"rhn: native kernels ready in {time.perf_counter() - started:.0f} s: {aim.library}")
    return module


@contextlib.contextmanager
def _quiet_torch_builder():
    """torch's builder logs a screenful about any compiler not named g++ (c++ included);
    a failed build is told in one line (:func:`one_line`), a good one needs no more."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _import(aim: Target):
    """The module of ``aim``'s build (torch is imported first: the module links to it)."""
    import torch  # noqa: F401

    spec = importlib.util.spec_from_file_location(aim.name, aim.library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    """The line of a build's error that says what went wrong: the first line naming an
    error or a missing program, else the message's last line (torch's message holds the
    whole log)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if re.search(r"\berror\b|: not found|no such file", line, re.IGNORECASE)
        and not line.startswith("Error building extension")
    ]
    line = (errors or lines or [type(error).__name__])[0 if errors else -1]
    return line.rstrip(".")  # it goes into a sentence


# A build takes about a minute; torch's builder waits without end for the lock file of
# a build that was killed (SIGKILL, a lost node) before it could remove it.
STALE_LOCK_SECONDS = 15 * 60


def remove_stale_lock(lock: Path, max_age: float = STALE_LOCK_SECONDS) -> None:
    """Removes ``lock``, torch's build lock file, when it is older than ``max_age`` (by
    default older than any build can take: left by a killed build), with a warning;
    leaves a fresher one alone."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age >= max_age:
        log.warning("rhn: removing %s, left by a native build that did not finish", lock)
        lock.unlink(missing_ok=True)
