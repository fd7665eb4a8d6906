"""Timing and peak memory of torch work on the CPU or a CUDA device, for ``make bench``.

CUDA kernels run asynchronously: a clock read as soon as the Python calls return would
time their launches, not their work. So on CUDA the clock waits for the device first; on
the CPU nothing is queued and no CUDA call is made.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run everything queued on it (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


class CudaPeakMemory:
    """Peak growth (bytes) of the CUDA memory torch's tensors take inside the ``with``
    block, over what they took before it (the allocator's cache not counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, None

    def __enter__(self) -> CudaPeakMemory:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
