"""Builds and loads rhn's native kernels (``csrc/``), one C++ extension module: the RHN
recurrence's time loop (:mod:`rhn_cli.kernels.rhn_recurrence`), the fused softmax
cross-entropy (:mod:`rhn_cli.engine.cross_entropy`), the fused penalised SGD step
(:mod:`rhn_cli.engine.optim`) and the transposes they share.

The first use on a machine compiles it with torch's C++ extension builder (gcc/g++ and
ninja; about a minute), into ``<user cache>/rhn/extensions/<name>``, where ``<name>``
carries a hash of every source file, the compiler flags, torch's version and the CPU's
vector capability, so a changed source, another torch or a home directory shared with a
different CPU builds afresh instead of loading a stale or illegal binary. Later
processes load it in well under a second; concurrent first uses wait on torch's build
lock.

When it cannot be built (no compiler, no ninja, a failed build), :func:`load` logs one
warning with the reason and returns None, and everything runs its Python path: the RHN
recurrence its Python loop, the training loss and step their torch paths; the same model
(float32 sums differ by rounding), with a ptb_sota training step taking about 1.6x as
long (1.09 s against 0.68 s on the 2-core dev CPU). ``RHN_NATIVE=0`` in the environment
skips the native kernels altogether, as ``USE_NATIVE = False`` does in a process.

Importing this module is cheap (torch is imported when the kernels are first asked for).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
# Every file the build reads: compiled (.cpp) and included (.h); all of them are hashed
# into the build's name.
SOURCES = tuple(sorted(SOURCE_DIR.glob("*.cpp")))
HEADERS = tuple(sorted(SOURCE_DIR.glob("*.h")))

# False: the Python paths everywhere (the RHN recurrence's Python loop, torch's training
# loss and step), whatever load() could give; for comparisons and tests.
USE_NATIVE = True

# Flags of torch's own kernels for its CPU capability, so that ATen's Vectorized (and
# the SLEEF tanh/exp behind it) compile to the instructions torch.tanh itself uses.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


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


@functools.cache
def load():
    """The compiled module (``rhn_forward``, ``rhn_backward``, ``transpose_into``,
    ``release``, ``cross_entropy_forward``, ``cross_entropy_backward``, ``l2_squares``,
    ``l2_sgd_update``), or None when it cannot be built; tried once per process."""
    if not enabled():
        return None
    try:
        return _build()
    except Exception as error:  # any build failure leaves the Python paths in charge
        reason = str(error).strip().splitlines()
        log.warning(
            "rhn: the native RHN loop could not be built (%s); using the Python loop "
            "(same results, slower). Set RHN_NATIVE=0 to skip the attempt.",
            reason[-1] if reason else type(error).__name__,
        )
        return None


def _build():
    import platformdirs
    import torch
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inline and runs on one thread without it.
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if capability in _CAPABILITY_FLAGS:
        flags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        flags += _CAPABILITY_FLAGS[capability]
    name = build_name(capability, flags, torch.__version__)
    directory = Path(platformdirs.user_cache_dir("rhn")) / "extensions" / name
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_lock(directory / "lock")
    if not (directory / f"{name}.so").exists():  # a pause of a minute deserves a word
        print(
            f"rhn: building the native RHN loop for this machine (once, about a minute) in "
            f"{directory}",
            file=sys.stderr,
            flush=True,
        )
    return cpp_extension.load(
        name=name,
        sources=[str(path) for path in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def build_name(capability: str, flags: list[str], torch_version: str, files=None) -> str:
    """The build's module (and directory) name, ``rhn_kernels_<capability>_<hash>``: 12 hex
    digits of a hash of every source file (``files``, by default ``SOURCES`` and
    ``HEADERS``; by name and content), the flags and torch's version, so that a change to
    any of them builds afresh."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS) if files is None else files:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    digest.update(" ".join(flags).encode() + b"\0" + torch_version.encode())
    return f"rhn_kernels_{capability.lower()}_{digest.hexdigest()[:12]}"


# A build takes about a minute; torch's builder waits without end for the lock file of
# a build that was killed (SIGKILL, a lost node) before it could remove it.
STALE_LOCK_SECONDS = 15 * 60


def remove_stale_lock(lock: Path) -> None:
    """Removes ``lock``, a build's lock file, when it is older than any build can take
    (``STALE_LOCK_SECONDS``: left by a killed build), with a warning; leaves a fresh one
    (a build under way) alone."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("rhn: removing %s, left by a native-loop build that did not finish", lock)
        lock.unlink(missing_ok=True)
