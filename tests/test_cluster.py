"""rhn on a real one-node Slurm cluster (the ``slurm_cluster`` fixture): sweeps and runs
submitted with --launcher slurm, requeued by ``scontrol requeue`` and by the time-limit
warning, cancelled, failing, and data-parallel over two tasks."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rhn_cli.engine import checkpoint
from tests.test_mongo_recording import mongo_client, mongo_url  # noqa: F401 -- fixtures

pytestmark = pytest.mark.slurm

TINY = [
    "depth=2",
    "max_epoch=1",
    "synthetic.valid_tokens=4000",
    "synthetic.test_tokens=4000",
]
# Four epochs of a few seconds each: long enough to be interrupted mid-epoch.
LONG = [*TINY, "hidden_size=16", "max_max_epoch=4", "synthetic.train_tokens=1000000"]
# About 50 s of training. Slurm checks time limits every 30 s, so a job with a one-minute
# limit, warned 40 s before it, gets the warning 20 to 50 s after it starts: this run
# cannot end within its first job.
LONGER = [*TINY, "hidden_size=16", "max_max_epoch=4", "synthetic.train_tokens=5000000"]


@pytest.fixture
def cluster_env(slurm_cluster, monkeypatch, tmp_path):
    """One thread per process (the jobs and the reference runs compute alike, and two
    cores are shared), the cluster in SLURM_CONF, and a settings file whose slurm:
    section gives the warning 40 s before a time limit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = tmp_path / "settings.yaml"
    settings.write_text("slurm:\n  warning_seconds: 40\n  time: 10\n")
    monkeypatch.setenv("RHN_CONFIG_FILE", str(settings))
    return slurm_cluster


def rhn(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rhn_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def submitted(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"^submitted job (\S+):", result.stdout, re.MULTILINE)


def job_log(runs: Path, job: str) -> Path:
    return runs / "_slurm" / job / f"{job}_0_log.out"


def wait_for_text(path: Path, text: str, cluster, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.3)
    shown = path.read_text(errors="replace") if path.exists() else "(no output yet)"
    raise AssertionError(
        f"{text!r} not in {path} after {timeout} s:\n{shown}\n{cluster.log_tail()}"
    )


def run_dirs(runs: Path) -> list[Path]:
    return sorted(
        (p for p in runs.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )


def recorded(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def metrics(run_dir: Path) -> dict[str, tuple[list, list]]:
    """Every metric (timings are run info, not metrics): (steps, values)."""
    return {
        name: (series["steps"], series["values"])
        for name, series in recorded(run_dir, "metrics.json").items()
    }


def assert_identical_runs(run: Path, reference: Path) -> None:
    """Every epoch recorded once, with the same values, and the same final weights."""
    assert metrics(run) == metrics(reference)
    ours, theirs = (checkpoint.load(p / checkpoint.LAST)["model"] for p in (run, reference))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


class Reference:
    """``config`` with seed 7, trained in one go, here, on one thread, in the background
    (while the cluster's jobs run): :meth:`run_dir` waits for it."""

    def __init__(self, where: Path, config: list[str]) -> None:
        self.where = where
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rhn_cli", "train", "--seed", "7", "--runs-dir", str(where)]
            + ["with", *config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def run_dir(self) -> Path:
        _, errors = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, errors
        return self.where / "1"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    reference = Reference(tmp_path_factory.mktemp("reference"), LONG)
    yield reference
    reference.process.kill()
    reference.process.wait()


def test_a_sweep_runs_every_point_as_a_job_and_status_follows_it(cluster_env, tmp_path):
    runs = tmp_path / "runs"
    sweep = ["sweep", "--launcher", "slurm", "--name", "grid", "--runs-dir", str(runs)]
    points = [
        "with",
        *TINY,
        "max_max_epoch=2",
        "synthetic.train_tokens=20000",
        "hidden_size=[8,16]",
    ]
    jobs = submitted(rhn(*sweep, *points))
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_0", f"{array}_1"]  # one job array
    status = rhn("sweep", "status", "grid", "--runs-dir", str(runs))
    assert status.returncode == 0 and "sweep grid: 2 points" in status.stdout, status.stdout
    assert f"job {jobs[0]}" in status.stdout and f"job {jobs[1]}" in status.stdout  # squeue's
    for job in jobs:
        cluster_env.wait_for(job, "COMPLETED", timeout=120)
    final = rhn("sweep", "status", "grid", "--runs-dir", str(runs)).stdout
    print(status.stdout, final, sep="\n")  # for the record (pytest -s)
    assert "point 1/2 hidden_size=8: completed as run" in final
    assert final.rstrip().endswith("sweep grid: 2 points: 2 completed"), final
    by_size = {recorded(d, "config.json")["hidden_size"]: d for d in run_dirs(runs)}
    assert sorted(by_size) == [8, 16]
    for run_dir in by_size.values():
        run = recorded(run_dir, "run.json")
        assert run["status"] == "COMPLETED" and run["meta"]["tags"] == ["grid"]
        slurm = recorded(run_dir, "info.json")["slurm"]
        assert slurm["job"] == run["meta"]["slurm_job"] and slurm["array_job_id"] == array
        assert slurm["requeues"] == 0 and Path(slurm["output"]).is_file()
    # Submitting the sweep again submits nothing: both points are done.
    again = rhn(*sweep, *points)
    assert submitted(again) == [] and again.stdout.count("already completed") == 2
    listing = rhn("runs", "ls", "--runs-dir", str(runs)).stdout
    assert f"{array}_0" in listing and f"{array}_1" in listing, listing


def test_scontrol_requeue_mid_epoch_continues_the_same_run_exactly(
    cluster_env, tmp_path, uninterrupted, request
):
    """Requeued mid-epoch, the job continues its run: same id, every epoch once, the
    numbers and weights of an uninterrupted run; MongoDB (Omniboard) follows it."""
    url = request.getfixturevalue("mongo_url")  # a SecantusDB server on 127.0.0.1
    client = request.getfixturevalue("mongo_client")
    runs = tmp_path / "runs"
    submit = ["train", "--launcher", "slurm", "--seed", "7", "--runs-dir", str(runs)]
    (job,) = submitted(rhn(*submit, "with", *LONG, env={"RHN_MONGO_URL": url}))
    wait_for_text(job_log(runs, job), "epoch   1/4", cluster_env)
    subprocess.run(["scontrol", "requeue", job], check=True)
    cluster_env.wait_for(job, "COMPLETED", timeout=180, restarts=1)
    (run_dir,) = run_dirs(runs)  # no new run
    log = job_log(runs, job).read_text()
    run_id = run_dir.name
    assert re.search(rf"run {run_id} INTERRUPTED: stopped at epoch 2, step \d+/", log), log
    assert f"job {job} (restart 1): continuing its run {run_id}" in log
    assert recorded(run_dir, "run.json")["status"] == "COMPLETED"
    assert recorded(run_dir, "info.json")["slurm"]["requeues"] == 1
    assert_identical_runs(run_dir, uninterrupted.run_dir())
    document = client["rhn"]["runs"].find_one({"_id": int(run_id)})
    assert document["status"] == "COMPLETED", document["status"]
    assert document["info"]["slurm"]["job"] == job
    assert document["info"]["slurm"]["requeues"] == 1


def test_a_preempted_job_checkpoints_requeues_itself_and_continues_exactly(
    cluster_env, tmp_path, uninterrupted
):
    """A job of the urgent partition takes the whole node: the run's job gets SIGTERM and
    30 s of grace; the run checkpoints, the job requeues itself (ending within the grace
    time would count as COMPLETED) and continues the same run once the node is free."""
    runs = tmp_path / "runs"
    submit = ["train", "--launcher", "slurm", "--seed", "7", "--runs-dir", str(runs)]
    (job,) = submitted(rhn(*submit, "with", *LONG))
    wait_for_text(job_log(runs, job), "epoch   1/4", cluster_env)
    urgent = ["sbatch", "--parsable", "--partition", cluster_env.urgent_partition]
    subprocess.run([*urgent, "--exclusive", "--wrap", "sleep 2"], check=True)
    cluster_env.wait_for(job, "COMPLETED", timeout=180, restarts=1)
    log = job_log(runs, job).read_text()
    assert f"pre-empted: requeueing job {job}; it continues run 1" in log, log
    (run_dir,) = run_dirs(runs)
    assert recorded(run_dir, "run.json")["status"] == "COMPLETED"
    assert_identical_runs(run_dir, uninterrupted.run_dir())


def test_a_run_killed_before_its_first_checkpoint_starts_again_under_its_id(
    cluster_env, tmp_path, uninterrupted
):
    """kill -9 of the training process in epoch 1 (no checkpoint yet): the job fails;
    requeued, it runs its run again from the beginning, same id and seed, recorded
    once."""
    runs = tmp_path / "runs"
    submit = ["train", "--launcher", "slurm", "--seed", "7", "--runs-dir", str(runs)]
    (job,) = submitted(rhn(*submit, "with", *LONG))
    wait_for_text(job_log(runs, job), "  epoch 1 ", cluster_env)  # a progress line
    (run_dir,) = run_dirs(runs)
    assert not (run_dir / checkpoint.LAST).exists()
    os.kill(recorded(run_dir, "run.json")["host"]["rhn"]["pid"], signal.SIGKILL)
    cluster_env.wait_for(job, "FAILED", timeout=60)
    subprocess.run(["scontrol", "requeue", job], check=True)
    cluster_env.wait_for(job, "COMPLETED", timeout=180, restarts=1)
    log = job_log(runs, job).read_text()
    assert "stopped before its first checkpoint; running it again from the beginning" in log
    assert run_dirs(runs) == [run_dir]
    assert recorded(run_dir, "run.json")["status"] == "COMPLETED"
    assert_identical_runs(run_dir, uninterrupted.run_dir())
    output = (run_dir / "cout.txt").read_text()
    assert output.count("epoch   1/4") == 1, output  # the first try's lines are gone


def test_the_time_limit_warning_requeues_the_job_until_the_run_completes(cluster_env, tmp_path):
    """A real one-minute time limit, warned 40 s before (the settings file): the run
    checkpoints at the warning and the job requeues itself, as often as it takes."""
    runs = tmp_path / "runs"
    submit = ["train", "--launcher", "slurm", "--time", "1", "--seed", "7", "--runs-dir", str(runs)]
    (job,) = submitted(rhn(*submit, "with", *LONGER))
    uninterrupted = Reference(tmp_path / "reference", LONGER)  # meanwhile, here
    assert "--signal=USR2@40" in (runs / "_slurm" / job / f"{job}_submission.sh").read_text()
    wait_for_text(job_log(runs, job), "time limit near: requeueing job", cluster_env, timeout=120)
    final = cluster_env.wait_for(job, "COMPLETED", timeout=300)
    assert final["restarts"] >= 1
    log = job_log(runs, job).read_text()
    assert "SIGUSR2: stopping after the current step" in log
    # Every restart is a requeue at the warning: rhn's, after its checkpoint, or, where the
    # warning came while the job was still starting (before rhn's handler; a loaded host),
    # submitit's own, which resumes from the checkpoint before.
    requeues = log.count("time limit near: requeueing job") + log.count("Requeued job")
    assert requeues == final["restarts"], log
    (run_dir,) = run_dirs(runs)
    assert recorded(run_dir, "run.json")["status"] == "COMPLETED"
    assert_identical_runs(run_dir, uninterrupted.run_dir())


def test_scancel_leaves_the_run_interrupted_and_not_requeued(cluster_env, tmp_path):
    runs = tmp_path / "runs"
    endless = [*TINY, "hidden_size=16", "max_max_epoch=100", "synthetic.train_tokens=300000"]
    (job,) = submitted(
        rhn("train", "--launcher", "slurm", "--runs-dir", str(runs), "with", *endless)
    )
    wait_for_text(job_log(runs, job), "epoch   1/100", cluster_env)
    subprocess.run(["scancel", job], check=True)
    cluster_env.wait_for(job, "CANCELLED", timeout=60)
    (run_dir,) = run_dirs(runs)
    deadline = time.monotonic() + 30
    while recorded(run_dir, "run.json")["status"] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert recorded(run_dir, "run.json")["status"] == "INTERRUPTED"
    assert (run_dir / checkpoint.LAST).is_file()
    time.sleep(8)  # longer than a requeued job waits before it may start again
    job_now = cluster_env.squeue(job)
    assert job_now["state"] == "CANCELLED" and job_now["restarts"] == 0


def test_a_point_with_bad_data_fails_and_is_not_requeued(cluster_env, tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"some text\n\xff\xfe not UTF-8\n" * 100)
    os.environ["RHN_DATA_DIR"] = str(data)
    try:
        sweep = ["sweep", "--launcher", "slurm", "--name", "bad", "--runs-dir", str(runs)]
        (job,) = submitted(
            rhn(
                *sweep,
                "with",
                *TINY,
                "hidden_size=16",
                "dataset='textfile'",
                f"data_path=['{bad}']",
            )
        )
    finally:
        del os.environ["RHN_DATA_DIR"]
    cluster_env.wait_for(job, "FAILED", timeout=90)
    assert "is not UTF-8 text" in job_log(runs, job).read_text()
    time.sleep(8)
    assert cluster_env.squeue(job)["restarts"] == 0  # not requeued
    status = rhn("sweep", "status", "bad", "--runs-dir", str(runs)).stdout
    assert f"failed job {job} FAILED" in status, status
    assert status.rstrip().endswith("sweep bad: 1 points: 1 failed")


def test_two_tasks_train_data_parallel_like_one_process(cluster_env, tmp_path):
    """--tasks-per-node 2: two ranks under srun, torch.distributed from SLURM_*; the
    same losses as one process here (dropout off)."""
    equal = [
        *TINY,
        "hidden_size=16",
        "batch_size=20",
        "num_steps=10",
        "max_max_epoch=2",
        "weight_decay=1e-4",
    ]
    equal += ["max_grad_norm=1.0", "synthetic.train_tokens=3000"]
    runs = tmp_path / "runs"
    submit = ["train", "--launcher", "slurm", "--tasks-per-node", "2", "--seed", "5"]
    (job,) = submitted(rhn(*submit, "--runs-dir", str(runs), "with", *equal))
    single = rhn("train", "--seed", "5", "--runs-dir", str(tmp_path / "one"), "with", *equal)
    assert single.returncode == 0, single.stderr
    cluster_env.wait_for(job, "COMPLETED", timeout=180)
    (run_dir,) = run_dirs(runs)  # recorded once, by rank 0
    assert recorded(run_dir, "info.json")["world_size"] == 2
    assert recorded(run_dir, "info.json")["slurm"]["tasks"] == 2
    one, two = metrics(run_dirs(tmp_path / "one")[0]), metrics(run_dir)
    assert one.keys() == two.keys()
    for name in one:
        assert one[name][0] == two[name][0], name
        for x, y in zip(one[name][1], two[name][1], strict=True):
            assert math.isclose(x, y, rel_tol=1e-5), (name, x, y)
