"""Helpers for the sweep tests that watch real processes: a sweep started as a
subprocess, its children found in /proc (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# One point of these takes a few seconds, most of it importing torch.
QUICK = [
    "tiny",
    "max_max_epoch=1",
    "synthetic.train_tokens=5000",
    "synthetic.valid_tokens=2000",
    "synthetic.test_tokens=2000",
]


def sweep_environment(**extra: str) -> dict[str, str]:
    """This environment without the user's RHN_ settings, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHN_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start_sweep(args: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    """``rhn sweep ARGS`` in the background, its stdout and stderr in ``out``."""
    with open(out, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "rhn_cli", "sweep", *args],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def is_gone(pid: int) -> bool:
    """Ended: no such process, or a zombie nobody has reaped yet."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def read_proc(pid: int, name: str) -> bytes:
    """/proc/PID/NAME (cmdline, environ); b"" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``condition()`` until it returns something true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)
