"""A killed ``rhn sweep`` (SIGKILL: no chance to pass anything on) leaves no point
training as an orphan: on Linux each point gets SIGTERM from the kernel, checkpoints,
records INTERRUPTED, and the same sweep run again resumes it."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from tests.sweep_processes import (
    QUICK,
    children_of,
    is_gone,
    start_sweep,
    sweep_environment,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="parent-death signals are Linux only"
)

EPOCHS = 30  # about 0.1 s each: the points are mid-training when the sweep is killed


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text())["status"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_killed_sweep_takes_its_points_with_it_and_a_rerun_resumes_them(
    runner, tmp_path, monkeypatch
):
    runs = tmp_path / "runs"
    args = ["--name", "orphans", "--jobs", "2", "--runs-dir", str(runs), "with", *QUICK]
    args += [f"max_max_epoch={EPOCHS}", "hidden_size=[8,12]"]
    sweep = start_sweep(args, tmp_path / "sweep.out", sweep_environment())
    logs = [runs / "_sweeps" / "orphans" / f"point-{n}.log" for n in (1, 2)]

    def training() -> bool:  # both points past their first epoch
        return all(log.is_file() and f"epoch   1/{EPOCHS}" in log.read_text() for log in logs)

    try:
        wait_for(training, 60, "both points to train")
        points = children_of(sweep.pid)
        assert len(points) == 2
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=10)
        wait_for(lambda: all(is_gone(pid) for pid in points), 30, "the points to end")
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait(timeout=10)
    for run_id in ("1", "2"):
        assert _status(runs / run_id) == "INTERRUPTED", (runs / run_id / "cout.txt").read_text()
        assert (runs / run_id / "checkpoint.pt").is_file()

    # The same sweep again continues both runs from their checkpoints.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    again = runner.invoke(cli, ["sweep", *args])
    assert again.exit_code == 0, again.output
    for n, size in ((1, 8), (2, 12)):
        assert f"point {n}/2 hidden_size={size}: resuming run" in again.stdout
        assert f"point {n}/2 hidden_size={size}: COMPLETED as run" in again.stdout
    assert sorted(p.name for p in runs.iterdir() if p.name.isdigit()) == ["1", "2"]
    for run_id in ("1", "2"):
        run = json.loads((runs / run_id / "run.json").read_text())
        assert run["status"] == "COMPLETED" and len(run["meta"]["resumed_at"]) == 1
