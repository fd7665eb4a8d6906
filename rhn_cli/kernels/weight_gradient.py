"""The weight-gradient products left^T right of the RHN layer (dR^i = dp^T (s^i * m_h))
and of its output layer (dW = dlogits^T x), through MKL or oneDNN: whichever runs the
product's shape faster on this machine, as :mod:`rhn_cli.kernels.library_choice` decides
once per machine and setup and keeps on disk (neither library wins everywhere, and they
round differently, so a run's numbers must not depend on a timing of its own).
"""

from __future__ import annotations

import functools
import time

import torch

from rhn_cli.kernels import library_choice, native, onednn

DECISION_ROUNDS = 2


def product(out, left, right, accumulate, onednn_library=False):
    """out = left^T right, or out += left^T right, returning ``out``; with ``out`` None, a
    new tensor left^T right. ATen's (MKL's) product, or oneDNN's on ``left`` transposed
    (a copy unless it is column-major) with ``right`` packed in the call."""
    if not onednn_library:
        if out is None:
            return torch.mm(left.t(), right)
        if accumulate:
            return out.addmm_(left.t(), right)
        return torch.mm(left.t(), right, out=out)
    result = onednn.linear(left.t().contiguous(), onednn.pack(right.t(), left.shape[1]))
    if out is None:
        return result
    return out.add_(result) if accumulate else out.copy_(result)


def through_onednn(lefts, rights) -> bool:
    """Whether the products left^T right of this shape go through oneDNN: only in the
    native kernels' setting (float32, CPU, oneDNN on), and there as
    :mod:`~rhn_cli.kernels.library_choice` decides for the product (pinned by a resumed
    run, else cached on disk for this machine and setup, else timed once by
    :func:`timed_library` and cached), never by a timing of this process alone."""
    left, right = lefts[0], rights[0]
    if native.kernels_for(left, right) is None or not onednn.applies(left.dtype):
        return False
    dtype = str(left.dtype).removeprefix("torch.")
    key = (
        f"weight_gradient {left.shape[1]}x{left.shape[0]} {right.shape[0]}x{right.shape[1]} {dtype}"
    )
    timing = functools.partial(timed_library, lefts, rights)
    return library_choice.decide(key, timing) == "onednn"


def timed_library(lefts, rights) -> str:
    """'onednn' or 'mkl', whichever runs the products left^T right faster here (neither wins
    everywhere; on the 2-core dev CPU oneDNN does at the RHN's column-major operands, by ~25%
    for ptb_sota's ten [1660, 704] x [704, 830] products, while a single such product timed
    again and again, from the caches, comes out even). Times all the given operand pairs
    (the D micro-layers' distinct operands: as cold in the caches as in a step, where a pair
    timed again would run from them) each way, ``DECISION_ROUNDS`` times, interleaved; the
    fastest round counts (the first oneDNN call builds its kernel). Into new tensors:
    nothing the caller holds is written."""
    seconds = {False: [], True: []}
    for onednn_library in (False, True) * DECISION_ROUNDS:
        started = time.perf_counter()
        for left, right in zip(lefts, rights, strict=True):
            product(None, left, right, False, onednn_library)
        seconds[onednn_library].append(time.perf_counter() - started)
    return "onednn" if min(seconds[True]) < min(seconds[False]) else "mkl"
