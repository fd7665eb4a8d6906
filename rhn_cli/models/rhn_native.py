"""Builds and loads rhn_native.cpp, the C++ time loop of rhn_fast's recurrence (CPU),
and the fused softmax cross-entropy of rhn_cli.engine.cross_entropy.

The first use on a machine compiles it with torch's C++ extension builder (gcc/g++ and
ninja; about a minute), into ``<user cache>/rhn/extensions/<name>``, where ``<name>``
carries a hash of the source, the compiler flags, torch's version and the CPU's vector
capability, so a changed source, another torch or a home directory shared with a
different CPU builds afresh instead of loading a stale or illegal binary. Later
processes load it in well under a second; concurrent first uses wait on torch's build
lock.

When it cannot be built (no compiler, no ninja, a failed build), :func:`load` logs one
warning with the reason and returns None, and rhn_fast runs its Python loop (and the
training loss and step their torch paths): the same model (float32 sums differ by
rounding), with a ptb_sota training step taking about 1.6x as long (1.09 s against
0.68 s on the 2-core dev CPU). ``RHN_NATIVE=0`` in the
environment skips the native loop altogether.
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

SOURCE = Path(__file__).with_name("rhn_native.cpp")

# Flags of torch's own kernels for its CPU capability, so that ATen's Vectorized (and
# the SLEEF tanh/exp behind it) compile to the instructions torch.tanh itself uses.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def enabled() -> bool:
    return os.environ.get("RHN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def load():
    """The compiled module (``forward``, ``backward``, ``cross_entropy_forward``,
    ``cross_entropy_backward``), or None when it cannot be built."""
    if not enabled():
        return None
    try:
        return _build()
    except Exception as error:  # any build failure leaves the Python loop in charge
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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode()])
    ).hexdigest()[:12]
    name = f"rhn_native_{capability.lower()}_{key}"
    directory = Path(platformdirs.user_cache_dir("rhn")) / "extensions" / name
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory / "lock")
    if not (directory / f"{name}.so").exists():  # a pause of a minute deserves a word
        print(
            f"rhn: building the native RHN loop for this machine (once, about a minute) in "
            f"{directory}",
            file=sys.stderr,
            flush=True,
        )
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


# A build takes about a minute; torch's builder waits without end for the lock file of a
# build that was killed (SIGKILL, a lost node) before it could remove it.
STALE_LOCK_SECONDS = 15 * 60


def _remove_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("rhn: removing %s, left by a native-loop build that did not finish", lock)
        lock.unlink(missing_ok=True)
