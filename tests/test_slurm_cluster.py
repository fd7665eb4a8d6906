"""The one-node Slurm cluster of the `slurm_cluster` fixture really runs jobs: srun, a requeued
sbatch job, and a submitit job (what rhn's cluster commands rely on)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm


def answer() -> int:
    return 6 * 7


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{command} exited {result.returncode}: {result.stderr}"
    return result.stdout


def wait_for_lines(path, count: int, cluster, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.2)
    raise AssertionError(f"{path} has not {count} lines after {timeout} s\n{cluster.log_tail()}")


def test_node_is_idle_and_srun_runs_on_it(slurm_cluster):
    states = run("sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N %P %t")
    assert states.split() == [slurm_cluster.hostname, f"{slurm_cluster.partition}*", "idle"]
    assert run("srun", "--time=1", "hostname").strip() == slurm_cluster.hostname


def test_requeued_job_runs_again_with_restart_count_one(slurm_cluster, tmp_path):
    restarts = tmp_path / "restarts.txt"
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\necho "${{SLURM_RESTART_COUNT:-0}}" >> {restarts}\nsleep 60\n')
    output = f"--output={tmp_path}/slurm-%j.out"
    job_id = run("sbatch", "--parsable", "--requeue", output, str(script)).strip()
    slurm_cluster.wait_for(job_id, "RUNNING", restarts=0)
    assert wait_for_lines(restarts, 1, slurm_cluster) == ["0"]

    run("scontrol", "requeue", job_id)
    job = slurm_cluster.wait_for(job_id, "RUNNING", timeout=30, restarts=1)
    assert job["restarts"] == 1
    assert wait_for_lines(restarts, 2, slurm_cluster) == ["0", "1"]

    run("scancel", job_id)
    assert slurm_cluster.wait_for(job_id, "CANCELLED")["restarts"] == 1


def test_submitit_job_returns_its_result(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    import cloudpickle

    executor = submitit.AutoExecutor(folder=tmp_path / "sub", cluster="slurm")
    executor.update_parameters(timeout_min=2, slurm_partition=slurm_cluster.partition)
    # The job's Python cannot import this test module: send `answer` by value.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        job = executor.submit(answer)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    # Without accounting storage sacct fails, so submitit would wait forever for a job that
    # died without a result: wait on Slurm's own state first.
    slurm_cluster.wait_for(job.job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert job.result() == 42
    assert slurm_cluster.squeue(job.job_id)["state"] == "COMPLETED"
