"""Data-parallel training: N processes are the same experiment as one, recorded once.

The runs here are real multi-process jobs on the CPU (``gloo``), one thread per rank:
torchrun's own launcher, ``rhn train --nproc 2``, and a rank killed mid-run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rhn_cli.cli import cli
from rhn_cli.engine import checkpoint
from rhn_cli.engine.distributed import LaunchOutcome, Shard, batch_dims, rank_seed

# Dropout off, a little L2 and active clipping: every term of the loss and the update
# has to split exactly over the ranks. 2 x 14 steps of 2 x 10 streams.
EQUAL_RUN = [
    "with",
    "depth=2",
    "hidden_size=16",
    "batch_size=20",
    "num_steps=10",
    "max_max_epoch=2",
    "max_epoch=1",
    "weight_decay=1e-4",
    "max_grad_norm=1.0",
    "synthetic.train_tokens=3000",
    "synthetic.valid_tokens=1000",
    "synthetic.test_tokens=1000",
]
SPLITS_COMPARED = ("train.ppl", "valid.ppl", "test.ppl", "full_valid.ppl", "full_test.ppl")


def job_env() -> dict[str, str]:
    # Two cores: one thread per rank, or the ranks fight over them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_job(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dirs(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("_"))


def metrics(run_dir: Path) -> dict[str, list[float]]:
    recorded = json.loads((run_dir / "metrics.json").read_text())
    return {name: recorded[name]["values"] for name in SPLITS_COMPARED}


def assert_same_run(one: Path, other: Path) -> None:
    """Losses within 1e-5 (relative) and parameters within 1e-5 of each other."""
    a, b = metrics(one), metrics(other)
    for name in SPLITS_COMPARED:
        assert len(a[name]) == len(b[name]), name
        for x, y in zip(a[name], b[name], strict=True):
            assert math.isclose(x, y, rel_tol=1e-5), (name, x, y)
    for filename in (checkpoint.BEST, checkpoint.LAST):
        wa = checkpoint.load(one / filename)["model"]
        wb = checkpoint.load(other / filename)["model"]
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key], rtol=0, atol=1e-5), (filename, key)


def test_two_processes_train_exactly_like_one(tmp_path, runner):
    """1 process, torchrun with 2, and rhn train --nproc 2: the same losses and weights,
    each run recorded once (by rank 0), with the world size noted."""
    single = runner.invoke(cli, ["train", "--seed", "5", "--runs-dir", "one", *EQUAL_RUN])
    assert single.exit_code == 0, single.output

    torchrun = run_job(
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "rhn_cli", "train", "--seed", "5", "--runs-dir", "torchrun", *EQUAL_RUN],
        tmp_path,
    )
    assert torchrun.returncode == 0, torchrun.stderr
    launched = run_job(
        ["-m", "rhn_cli", "train", "--nproc", "2", "--seed", "5", "--runs-dir", "nproc"]
        + EQUAL_RUN,
        tmp_path,
    )
    assert launched.returncode == 0, launched.stderr
    # Rank 0 alone speaks: one result line, one progress summary per epoch.
    assert launched.stdout.count("COMPLETED") == 1
    assert "data-parallel: 2 processes (gloo), 10 of the 20 streams each" in launched.stdout

    (one,) = run_dirs(tmp_path / "one")
    for runs_dir in ("torchrun", "nproc"):
        recorded = run_dirs(tmp_path / runs_dir)
        assert [p.name for p in recorded] == ["1"], f"{runs_dir}: one run, recorded once"
        (run_dir,) = recorded
        assert json.loads((run_dir / "run.json").read_text())["status"] == "COMPLETED"
        assert json.loads((run_dir / "info.json").read_text())["world_size"] == 2
        assert json.loads((run_dir / "config.json").read_text())["seed"] == 5
        assert_same_run(one, run_dir)
    # The checkpoint is a one-process checkpoint: all B streams of state, and every
    # rank's random state for an exact resume on the same number of processes.
    saved = checkpoint.load(tmp_path / "nproc" / "1" / checkpoint.LAST)
    assert saved["hidden_state"].shape == (1, 20, 16)
    assert saved["world_size"] == 2 and len(saved["rank_rng"]) == 2


def test_a_parameter_used_in_some_steps_only_trains_like_one_process(tmp_path, runner):
    """The Zoneout LSTM's learned initial state takes part in the first window only:
    DistributedDataParallel must expect unused parameters, and leave their gradient
    None as one process does (Adam would move them with a zero gradient)."""
    lstm_run = [update for update in EQUAL_RUN if not update.startswith("depth=")]
    run = ["--seed", "4", *lstm_run, "model='zoneout_lstm'", "z_cells=0.0", "z_states=0.0"]
    run += ["optimizer='adam'", "learning_rate=0.01"]
    single = runner.invoke(cli, ["train", "--runs-dir", "one", *run])
    assert single.exit_code == 0, single.output
    launched = run_job(
        ["-m", "rhn_cli", "train", "--nproc", "2", "--runs-dir", "two", *run], tmp_path
    )
    assert launched.returncode == 0, launched.stderr
    (one,), (two,) = run_dirs(tmp_path / "one"), run_dirs(tmp_path / "two")
    assert_same_run(one, two)


def test_a_killed_rank_ends_the_job_naming_it(tmp_path):
    """kill -9 of rank 1: the survivors are stopped, the job fails within seconds, the
    error names rank 1, and rank 0's run is recorded as FAILED."""
    job = start_training(
        tmp_path,
        ["--nproc", "2", "--runs-dir", "runs", "with", "depth=2", "hidden_size=16"]
        + ["max_max_epoch=100", "synthetic.train_tokens=200000", "checkpoint_every=0"],
    )
    try:
        rank1 = [pid for pid in children(job.pid) if environment(pid).get("RANK") == "1"]
        assert len(rank1) == 1
        killed = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        stderr = job_stderr(job, tmp_path)
        took = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 1, stderr
    assert "Error: rank 1 failed (exit code -9, killed by SIGKILL)" in stderr
    assert took < 60
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"


def test_a_stop_is_agreed_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 alone: every rank stops at the same step, rank 0 checkpoints
    all the streams and every rank's masks; resuming on 2 processes (dropout on) ends
    exactly where an uninterrupted 2-process run with the same seed ends."""
    run = ["--seed", "3", "with", "depth=2", "hidden_size=16", "max_max_epoch=2"]
    run += ["max_epoch=1", "synthetic.train_tokens=80000", "synthetic.valid_tokens=2000"]
    run += ["synthetic.test_tokens=2000", "drop_x=0.2", "drop_i=0.3", "drop_h=0.2"]
    job = start_training(tmp_path, ["--nproc", "2", "--runs-dir", "stopped", *run])
    try:
        (rank1,) = [pid for pid in children(job.pid) if environment(pid).get("RANK") == "1"]
        os.kill(rank1, signal.SIGTERM)
        stderr = job_stderr(job, tmp_path)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert "Error" not in stderr
    assert "checkpoint saved in stopped/1/checkpoint.pt" in stderr
    assert "Resume with: rhn train --nproc 2 --resume 1 --runs-dir stopped" in stderr
    saved = checkpoint.load(tmp_path / "stopped" / "1" / checkpoint.LAST)
    assert (saved["epoch_index"], saved["step"]) != (0, 0)
    resumed = run_job(
        ["-m", "rhn_cli", "train", "--nproc", "2", "--runs-dir", "stopped", "--resume", "1"],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = run_job(
        ["-m", "rhn_cli", "train", "--nproc", "2", "--runs-dir", "whole", *run], tmp_path
    )
    assert whole.returncode == 0, whole.stderr
    assert_same_run(tmp_path / "whole" / "1", tmp_path / "stopped" / "1")


def start_training(tmp_path: Path, arguments: list[str]) -> subprocess.Popen:
    """``rhn train ARGUMENTS`` in the background, once both ranks are training (its
    output in tmp_path/stdout.txt, its stderr, where progress goes off a terminal, in
    tmp_path/stderr.txt: :func:`job_stderr` waits for the end and reads it)."""
    log = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as out, open(log, "w") as err:
        job = subprocess.Popen(
            [sys.executable, "-m", "rhn_cli", "train", *arguments],
            cwd=tmp_path,
            env=job_env(),
            stdout=out,
            stderr=err,
            text=True,
        )
    deadline = time.monotonic() + 60
    try:
        while "  epoch 1 " not in log.read_text():
            assert job.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
    except BaseException:
        job.kill()
        job.wait()
        raise
    return job


def job_stderr(job: subprocess.Popen, tmp_path: Path) -> str:
    """The job's stderr, once it has ended (within 60 s)."""
    job.wait(timeout=60)
    return (tmp_path / "stderr.txt").read_text()


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found = []
    for task in tasks.iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = [e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e]
    return dict(pairs)


@pytest.mark.parametrize(
    "updates, message",
    [
        (["batch_size=50"], "batch_size=50 cannot be split over 3 processes"),
        (["batch_size=30", "batching='chunks'"], "batching='chunks' cannot be split"),
        (["batch_size=30", "weight_noise=0.01"], "weight_noise=0.01 is not supported"),
    ],
)
def test_what_cannot_split_is_refused_before_launching(runner, updates, message):
    result = runner.invoke(cli, ["train", "--nproc", "3", "--runs-dir", "runs", "with", *updates])
    assert result.exit_code == 2
    assert message in result.output
    assert not Path("runs").exists()


def test_rank_streams_and_seeds():
    """Rank r owns rows [r B/N, (r+1) B/N); every rank has its own mask stream."""
    shards = [Shard(rank, 4) for rank in range(4)]
    assert [s.rows(20) for s in shards] == [slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 20)]
    seeds = {rank_seed(7, s.rank) for s in shards}
    assert len(seeds) == 4 and rank_seed(7, 1) == rank_seed(7, 1) != rank_seed(8, 1)
    # The state of every model runs over the streams along dimension 1.
    from rhn_cli.experiment.schema import defaults
    from rhn_cli.models import build_model

    model = build_model({**defaults(), "hidden_size": 8, "depth": 2}, 10)
    assert batch_dims(model.initial_state) == [1]


def test_failed_rank_is_named_first():
    # Rank 0 was stopped by the launcher after rank 1 died: rank 1 is the cause.
    outcome = LaunchOutcome(1, {0: -signal.SIGTERM, 1: -signal.SIGKILL})
    assert outcome.describe().startswith("rank 1 failed (exit code -9, killed by SIGKILL)")
    assert LaunchOutcome(1, {1: 1, 0: -15}).describe().startswith("rank 1 failed (exit code 1)")
