"""A run's record is complete whatever ends its process: SIGKILL, Ctrl-C (once or twice),
SIGTERM, a failure, divergence; and it records the code, libraries and machine facts
that made it. Real processes, real signals."""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.slow

EPOCHS = 6
# About half a second an epoch on two cores: long enough to kill one in the middle.
KILLABLE_RUN = [
    "--seed",
    "7",
    "with",
    "tiny",
    "synthetic.train_tokens=60000",
    f"max_max_epoch={EPOCHS}",
]


def rhn(cwd: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rhn_cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def wait_for_checkpoint(run_dir: Path, epochs: int, process, timeout: float = 120) -> None:
    """Until the run's checkpoint is at ``epochs`` completed epochs (or past them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if checkpoint.load(run_dir / checkpoint.LAST)["epoch_index"] >= epochs:
                return
        except checkpoint.CheckpointError:
            pass
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint after {epochs} epochs: {process.communicate()}")


def record(run_dir: Path) -> dict:
    """What a run recorded that its numbers decide: metric steps and values (every
    metric: timings are run info), its status and the final weights."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    weights = checkpoint.load(run_dir / checkpoint.LAST)["model"]
    return {
        "metrics": {name: (series["steps"], series["values"]) for name, series in metrics.items()},
        "status": run["status"],
        "result": run["result"],
        "weights": {name: tensor.tolist() for name, tensor in weights.items()},
    }


def epoch_lines(run_dir: Path) -> list[str]:
    text = (run_dir / "cout.txt").read_text()
    return re.findall(rf"^epoch +(\d+)/{EPOCHS} ", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    where = tmp_path_factory.mktemp("uninterrupted")
    out, err = finish(rhn(where, "train", *KILLABLE_RUN))
    assert "run 1 COMPLETED" in out, err
    return record(where / "runs" / "1")


def test_sigkill_then_resume_records_every_epoch_once_and_matches_the_uninterrupted_run(
    tmp_path, uninterrupted
):
    run_dir = tmp_path / "runs" / "1"
    process = rhn(tmp_path, "train", *KILLABLE_RUN)
    wait_for_checkpoint(run_dir, 3, process)
    process.send_signal(signal.SIGKILL)
    finish(process)
    killed_at = checkpoint.load(run_dir / checkpoint.LAST)["epoch_index"]
    # Everything up to the checkpoint was on disk when the process died.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["valid.ppl"]["steps"][:killed_at] == list(range(1, killed_at + 1))
    assert epoch_lines(run_dir)[:killed_at] == [str(e) for e in range(1, killed_at + 1)]

    # Its process is gone: no waiting for the heartbeat to go stale.
    out, err = finish(rhn(tmp_path, "train", "--resume", "1"))
    assert "run 1 COMPLETED" in out, err
    assert record(run_dir) == uninterrupted
    assert epoch_lines(run_dir) == [str(e) for e in range(1, EPOCHS + 1)]
    cout = (run_dir / "cout.txt").read_text()
    assert "(the process before was killed; resumed at epoch" in cout
    throughput = json.loads((run_dir / "info.json").read_text())["throughput"]["tokens_per_s"]
    assert throughput["steps"] == list(range(1, EPOCHS + 1))  # each epoch once


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_then_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted, sent):
    run_dir = tmp_path / "runs" / "1"
    process = rhn(tmp_path, "train", *KILLABLE_RUN)
    wait_for_checkpoint(run_dir, 2, process)
    process.send_signal(sent)
    finish(process)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "INTERRUPTED"
    cout = (run_dir / "cout.txt").read_text()
    assert "INTERRUPTED: stopped at epoch" in cout  # the end of the output is recorded
    out, err = finish(rhn(tmp_path, "train", "--resume", "1"))
    assert "run 1 COMPLETED" in out, err
    assert record(run_dir) == uninterrupted
    assert epoch_lines(run_dir) == [str(e) for e in range(1, EPOCHS + 1)]


def test_resume_refuses_a_run_whose_process_is_alive(tmp_path):
    run_dir = tmp_path / "runs" / "1"
    # Far more epochs than the check takes: the run must still be training when asked.
    process = rhn(tmp_path, "train", *KILLABLE_RUN, "max_max_epoch=1000")
    try:
        wait_for_checkpoint(run_dir, 1, process)
        out, err = finish(rhn(tmp_path, "train", "--resume", "1"))
        assert f"still running (process {process.pid} on this host)" in err
    finally:
        process.kill()
        finish(process)


def test_ctrl_c_pressed_again_and_again_still_records_interrupted(tmp_path):
    run_dir = tmp_path / "runs" / "1"
    process = rhn(tmp_path, "train", *KILLABLE_RUN)
    wait_for_checkpoint(run_dir, 1, process)
    # Ctrl-C held down: the first asks for a stop, the second stops at once, and the rest
    # land while the run is being recorded.
    while process.poll() is None:
        process.send_signal(signal.SIGINT)
        time.sleep(0.005)
    finish(process)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "INTERRUPTED" and run.get("stop_time")


@pytest.mark.parametrize("learning_rate", ["1e5", "30"])
def test_divergence_fails_the_run_naming_epoch_and_step(tmp_path, learning_rate):
    process = rhn(
        tmp_path, "train", "with", "tiny", f"learning_rate={learning_rate}", "clip='none'"
    )
    out, err = finish(process)
    assert process.returncode == 1
    assert re.search(r"Error: training diverged at epoch \d+, step \d+/\d+", err), err
    assert "math range error" not in err + out and "Traceback" not in err
    run_dir = tmp_path / "runs" / "1"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"
    # The output up to the end is recorded, the error included.
    cout = (run_dir / "cout.txt").read_text()
    assert "model: RHN" in cout and "FAILED: TrainingDiverged: training diverged" in cout


def test_a_failed_run_records_its_output_and_the_error(tmp_path):
    # A time limit of a millisecond stops in the first step: TIMEOUT, output recorded.
    process = rhn(tmp_path, "train", "with", "tiny", "max_time=0.001")
    out, err = finish(process)
    assert process.returncode == 0, err
    cout = (tmp_path / "runs" / "1" / "cout.txt").read_text()
    assert "data: synthetic" in cout and "TIMEOUT: max_time=0.001 reached at epoch 1" in cout


def test_a_run_records_the_code_libraries_and_machine_that_made_it(tmp_path):
    out, err = finish(rhn(tmp_path, "train", "with", "tiny", "max_max_epoch=1"))
    assert "COMPLETED" in out, err
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    sources = {name for name, _ in run["experiment"]["sources"]}
    package = Path(sys.modules["rhn_cli"].__file__).parent
    expected = {
        str(p.relative_to(package)) for p in package.rglob("*") if p.suffix in (".py", ".cpp", ".h")
    }
    assert sources == expected  # models/, engine/, data/ and the C++ kernels included
    assert {
        "models/rhn.py",
        "engine/train.py",
        "data/registry.py",
        "kernels/csrc/rhn_forward.cpp",
        "kernels/csrc/common.h",
    } <= (sources)
    dependencies = dict(d.split("==") for d in run["experiment"]["dependencies"])
    assert dependencies["torch"] == torch.__version__
    for name in ("numpy", "sacred", "pymongo", "click", "rhn"):
        assert name in dependencies
    facts = run["host"]["rhn"]
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch_threads"] == 1  # OMP_NUM_THREADS=1 above
    assert facts["native_loop"] == "enabled" and isinstance(facts["pid"], int)
    # What computed it: the native loop ran, and each product's library is recorded.
    kernels = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())["kernels"]
    assert kernels["native_loop"] is True
    assert set(kernels["library_decisions"].values()) <= {"mkl", "onednn"}
    # The sources themselves are stored (once for each content).
    for _, stored in run["experiment"]["sources"]:
        assert (tmp_path / "runs" / stored).is_file()


def test_a_checkout_run_records_its_commit_and_a_dirty_flag(tmp_path):
    from rhn_cli.experiment import provenance

    state = provenance.git_state()
    package = Path(sys.modules["rhn_cli"].__file__).resolve().parent
    top = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if top.returncode != 0:
        assert state is None
        return
    assert state["commit"] == top.stdout.strip() and isinstance(state["dirty"], bool)
    assert "@" not in state["url"].split("://")[-1].split("/")[0]


def test_remote_urls_lose_their_credentials():
    from rhn_cli.experiment.provenance import _without_credentials

    assert _without_credentials("https://alice:s3cret@github.com/x/rhn.git") == (
        "https://github.com/x/rhn.git"
    )
    assert _without_credentials("git@github.com:x/rhn.git") == "git@github.com:x/rhn.git"


def test_resuming_with_another_models_checkpoint_is_one_line_and_leaves_the_run_alone(tmp_path):
    for config in (["max_max_epoch=2", "max_time=0.001"], ["depth=3", "max_max_epoch=1"]):
        out, err = finish(rhn(tmp_path, "train", "--seed", "1", "with", "tiny", *config))
    first, second = tmp_path / "runs" / "1", tmp_path / "runs" / "2"
    (first / checkpoint.LAST).write_bytes((second / checkpoint.LAST).read_bytes())
    before = (first / "run.json").read_text()
    process = rhn(tmp_path, "train", "--resume", "1")
    out, err = finish(process)
    assert process.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the checkpoint was written with another config" in lines[0]
    assert "depth=3 (the run: 2)" in lines[0]
    assert (first / "run.json").read_text() == before
