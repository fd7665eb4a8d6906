"""Atomic file writes, shared by checkpoints, the dataset cache and the run records.

A file is written under a temporary name in its final directory, fsynced, renamed over
the target and the directory fsynced: a reader (or a crash) sees the old file or the
new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(final: Path) -> Path:
    # Same directory as the final file, so os.replace is a rename on one file system.
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
