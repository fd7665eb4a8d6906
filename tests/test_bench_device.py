"""``make bench`` on the device torch sees (issue 21, item 5): benchmarks/suite.py's
``--device auto|cpu|cuda``, its models, tokens and clocks on that device, peak memory of
CUDA allocations there, the CPU-only roofline skipped (its target n/a); on the CPU the
same figures as before, without a single CUDA call.

The test marked ``cuda`` runs the suite's pieces at tiny shapes on a GPU (skipped without
one); ``RHN_TEST_CUDA_ON=cpu pytest -m cuda tests/test_bench_device.py`` runs it on the CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the suite imports its neighbours, as `make bench` runs it
import peers  # noqa: E402
import suite  # noqa: E402

CPU = torch.device("cpu")


def tiny_shape() -> suite.Shape:
    shape = suite.shape_of("ptb_sota", 3)
    shape.config.update(hidden_size=64, depth=2)  # as the suite's warm-up shape
    return shape


def tiny_evaluation(shape: suite.Shape, device: torch.device) -> dict:
    return suite.evaluation(
        shape, full_tokens=30, mc_tokens=20, samples=4, sequential_samples=2, device=device
    )


@pytest.fixture
def peak_memory_asked(monkeypatch) -> list:
    """The suite's per-model memory subprocess, recorded instead of run: it rebuilds the
    named config at full width (tested on its own below)."""
    asked = []

    def peak_memory_of(kind, shape, device):
        asked.append((kind, device))
        return 2**20

    monkeypatch.setattr(suite, "peak_memory_of", peak_memory_of)
    return asked


@pytest.fixture
def no_cuda_call(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA call while measuring on the CPU")

    for name in (
        "synchronize",
        "reset_peak_memory_stats",
        "memory_allocated",
        "max_memory_allocated",
    ):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_on_the_cpu_the_suite_measures_with_its_roofline_and_no_cuda_call(
    no_cuda_call, peak_memory_asked, capsys
):
    shape = tiny_shape()
    row = suite._training_row(shape, rounds=2, device=CPU)
    printed = capsys.readouterr().out
    assert peak_memory_asked == [(kind, CPU) for kind in suite.KINDS]
    for kind in suite.KINDS:
        assert len(row[kind]["step_seconds"]) == 2 and row[kind]["tokens_per_s"] > 0
    assert 0 < row["roofline_fraction"] and row["roofline"]["tokens_per_s"] > 0
    assert "rhn vs baseline" in printed

    ev = tiny_evaluation(shape, CPU)
    assert ev["batched_tokens_per_s"] > 0 and ev["full_tokens_per_s"] > 0
    assert ev["mc_max_difference"] < 1e-3

    suite._print_roofline([shape], {shape.name: row}, CPU)
    assert "Roofline (the step's matrix products alone" in capsys.readouterr().out
    what, figure, ok = suite._roofline_check("ptb_sota", row)
    assert figure == f"{row['roofline_fraction']:.0%}" and ok is not None
    what, figure, ok = suite._roofline_check("enwik8_sota", row)
    assert what == "enwik8_sota training >= 85% of roofline"
    assert ok == (row["roofline_fraction"] >= 0.85)
    what, figure, ok = suite._roofline_check("enwik8_sota", row, quick=True)
    assert ok is None and f"at T={shape.T}, not the target's shape" in figure


def measured_peak(peak: int | None, device: torch.device) -> bool:
    """A ptb_sota-sized model's first step (23.5M parameters: weights and gradients alone
    are 188 MB) seen in ``peak``; None only off Linux on the CPU (no /proc to read)."""
    if peak is None:
        return device.type == "cpu" and sys.platform != "linux"
    return peak > 150 * 2**20


def test_the_memory_subprocess_measures_on_the_device_it_is_given():
    peak = suite.peak_memory_of("lstm", suite.shape_of("ptb_sota", 2), CPU)
    assert measured_peak(peak, CPU)


def test_on_cuda_the_roofline_is_skipped_and_its_target_reads_n_a(capsys):
    suite._print_roofline([tiny_shape()], {}, torch.device("cuda"))
    assert capsys.readouterr().out.strip().startswith("roofline: CPU only")
    for name in ("ptb_sota", "enwik8_sota"):
        what, figure, ok = suite._roofline_check(name, {"speedup": 1.5})  # none measured
        assert (what, figure, ok) == (f"{name} training >= 85% of roofline", "n/a (CPU only)", None)
    assert suite.verdict(ok) == "n/a "


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "suite.py"), "--device", "cuda", "--json", "out.json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "--device cuda: torch sees no CUDA device here; use --device cpu or auto"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def device() -> torch.device:
    """CUDA where torch sees it; the CPU under RHN_TEST_CUDA_ON=cpu (as tests/test_cuda.py)."""
    override = os.environ.get("RHN_TEST_CUDA_ON")
    if override is not None:
        if override != "cpu":
            pytest.fail(f"RHN_TEST_CUDA_ON={override!r}: expected 'cpu' (or unset)")
        return CPU
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; RHN_TEST_CUDA_ON=cpu runs this test on the CPU")
    return torch.device("cuda")


@pytest.mark.cuda
def test_the_suite_pieces_run_on_the_device(device, peak_memory_asked, monkeypatch, capsys):
    synchronized = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synchronized.append(a) or real(*a))
    shape = tiny_shape()
    for kind in suite.KINDS:
        trainee = suite.Trainee(suite.build(kind, shape), shape, device)
        assert {p.device.type for p in trainee.model.parameters()} == {device.type}
        assert trainee.step() > 0
    row = suite._training_row(shape, rounds=2, device=device)
    assert peak_memory_asked == [(kind, device) for kind in suite.KINDS]
    assert ("roofline_fraction" in row) == (device.type == "cpu")  # the roofline: CPU only
    assert all(row[kind]["tokens_per_s"] > 0 for kind in suite.KINDS)
    ev = tiny_evaluation(shape, device)
    assert ev["batched_tokens_per_s"] > 0 and ev["mc_max_difference"] < 1e-3
    rows = peers.peer_rows(rounds=1, quick=True, device=device, overrides={"hidden_size": 8})
    assert all(math.isfinite(row["ratio"]) for row in rows)
    # The clock waits for the device's queued work on CUDA, and only there.
    assert bool(synchronized) == (device.type == "cuda")

    # Peak memory in a fresh process on the same device: CUDA allocations on a GPU.
    monkeypatch.undo()
    for kind in ("rhn", "lstm"):
        peak = suite.peak_memory_of(kind, suite.shape_of("ptb_sota", 2), device)
        assert measured_peak(peak, device)
