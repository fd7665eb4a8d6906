"""Stopped runs are a non-event: checkpoints, exact resume, signals, divergence, time limits."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rhn_cli.cli import cli
from rhn_cli.data.corpus import Corpus
from rhn_cli.engine import checkpoint
from rhn_cli.engine.train import (
    RunContext,
    StopRequest,
    TimeLimitReached,
    TrainingStopped,
    train,
)
from rhn_cli.experiment.schema import defaults
from tests.conftest import Recorder


class StopAfterChecks(StopRequest):
    """Asks to stop at the n-th time the trainer looks (it looks after every step)."""

    def __init__(self, checks: int):
        super().__init__()
        self.left = checks

    @property
    def requested(self) -> bool:
        self.left -= 1
        if self.left == 0:
            self.signal = signal.SIGINT
        return self.signal is not None


def toy_corpus() -> Corpus:
    rng = np.random.default_rng(0)
    return Corpus(
        "toy",
        rng.integers(0, 7, 2 * 61),
        rng.integers(0, 7, 40),
        rng.integers(0, 7, 40),
        vocab=list("abcdefg"),
    )


def toy_config(**changes):
    # Dropout everywhere, so resume must restore the RNG to reproduce the masks.
    config = {
        **defaults(),
        "hidden_size": 8,
        "depth": 2,
        "batch_size": 2,
        "num_steps": 5,
        "max_max_epoch": 3,
        "max_epoch": 1,
        "drop_x": 0.2,
        "drop_i": 0.3,
        "drop_h": 0.2,
        "drop_o": 0.3,
        "device": "cpu",
        "checkpoint_every": 0.0,
    }
    config.update(changes)
    return config  # 2 streams of 61 tokens, T=5: 12 steps per epoch


def run(config, run_dir, stop=None, resume_from=None, seed=0):
    torch.manual_seed(seed)
    recorder = Recorder()
    context = RunContext(echo=lambda _: None, run_dir=run_dir, stop=stop, resume_from=resume_from)
    summary = train(config, toy_corpus(), recorder, context)
    return summary, recorder


@pytest.mark.parametrize(
    "checks",
    [
        5,  # middle of epoch 1
        12,  # after the last step of epoch 1, before its evaluation
        13,  # at the end of epoch 1 (after evaluation and the epoch checkpoint)
        20,  # middle of epoch 2
    ],
)
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, checks):
    config = toy_config()
    straight, straight_log = run(config, tmp_path / "straight")

    with pytest.raises(TrainingStopped) as stopped:
        run(config, tmp_path / "stopped", stop=StopAfterChecks(checks))
    assert stopped.value.checkpoint_path == tmp_path / "stopped" / "checkpoint.pt"
    state = checkpoint.load(stopped.value.checkpoint_path)
    # A different seed: everything that matters must come from the checkpoint.
    resumed, resumed_log = run(config, tmp_path / "stopped", resume_from=state, seed=999)

    assert resumed.history == straight.history
    expected = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    final = checkpoint.load(tmp_path / "stopped" / "checkpoint.pt")["model"]
    assert all(torch.equal(expected[name], final[name]) for name in expected)
    # The resumed process logs only the epochs it finished itself.
    done_before = state["epoch_index"]
    assert [s for s, _ in resumed_log.scalars["valid.ppl"]] == list(range(done_before + 1, 4))
    assert resumed_log.info["logs"] == straight_log.info["logs"]
    # Throughput is run info, not a metric: the whole series, each epoch once.
    assert "tokens_per_s" not in resumed_log.scalars
    throughput = resumed_log.info["throughput"]["tokens_per_s"]
    assert throughput["steps"] == [1, 2, 3]
    assert throughput["values"][:done_before] == state["throughput"]["values"]


def test_a_checkpoint_with_throughput_among_its_metrics_continues_the_series(tmp_path):
    """A checkpoint written when throughput was a metric: the resumed run's info holds
    the epochs before it (from the checkpoint's metric entries) and those after it."""
    config = toy_config()
    with pytest.raises(TrainingStopped) as stopped:
        run(config, tmp_path, stop=StopAfterChecks(20))  # in epoch 2
    state = checkpoint.load(stopped.value.checkpoint_path)
    earlier = state.pop("throughput")
    assert earlier["steps"] == [1]
    state["metrics"].append(["tokens_per_s", 1, earlier["values"][0], "2026-01-02T03:04:05"])

    _, resumed_log = run(config, tmp_path, resume_from=state)
    throughput = resumed_log.info["throughput"]["tokens_per_s"]
    assert throughput["steps"] == [1, 2, 3]
    assert throughput["values"][0] == earlier["values"][0]


PEER_VARIANTS = {
    # Independent chunks from a learned initial state, Adam with step clipping, and the
    # weight noise / zoneout / igate masks all drawn from the RNGs a resume must restore.
    "zoneout_chunks": dict(
        model="zoneout_lstm",
        batching="chunks",
        optimizer="adam",
        learning_rate=0.01,
        clip="update_norm",
        max_grad_norm=1.0,
        loss="mean",
        z_cells=0.3,
        z_states=0.2,
        drop_igates=0.2,
        weight_noise=0.01,
        norm_stabilizer=1.0,
    ),
    # A carried (h, c) tuple state, RMSprop and per-step standard dropout.
    "charrnn_streams": dict(
        model="charrnn_lstm",
        optimizer="rmsprop",
        learning_rate=0.01,
        clip="grad_value",
        max_grad_norm=5.0,
        loss="mean",
        dropout=0.2,
        init_scale=0.08,
    ),
}
_RHN_ONLY = dict(depth=3, drop_x=0.0, drop_i=0.0, drop_h=0.0, drop_o=0.0)


@pytest.mark.parametrize("variant", sorted(PEER_VARIANTS))
@pytest.mark.parametrize("checks", [5, 16])
def test_peer_models_resume_bit_for_bit(tmp_path, variant, checks):
    config = toy_config(**_RHN_ONLY, **PEER_VARIANTS[variant], max_max_epoch=2)
    straight, _ = run(config, tmp_path / "straight")
    with pytest.raises(TrainingStopped) as stopped:
        run(config, tmp_path / "stopped", stop=StopAfterChecks(checks))
    state = checkpoint.load(stopped.value.checkpoint_path)
    resumed, _ = run(config, tmp_path / "stopped", resume_from=state, seed=999)
    assert resumed.history == straight.history
    expected = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    final = checkpoint.load(tmp_path / "stopped" / "checkpoint.pt")["model"]
    assert all(torch.equal(expected[name], final[name]) for name in expected)


def test_checkpoints_load_with_weights_only_and_keep_the_best_model(tmp_path):
    summary, _ = run(toy_config(), tmp_path)
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    best = checkpoint.load(tmp_path / "best_model.pt")
    assert last["format_version"] == checkpoint.FORMAT_VERSION
    assert best["epoch"] == summary.best_epoch
    assert best["valid_ppl"] == summary.best_valid_ppl


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_reported_never_loaded(tmp_path, damage):
    run(toy_config(max_max_epoch=1), tmp_path)
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(path)


def test_max_time_stops_with_a_checkpoint(tmp_path):
    with pytest.raises(TimeLimitReached) as stopped:
        run(toy_config(max_time=1e-9), tmp_path)
    assert stopped.value.STATUS == "TIMEOUT"
    assert "step 1/12" in str(stopped.value)
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 1


def test_early_stopping_after_patience_epochs(tmp_path, monkeypatch):
    perplexities = iter([5.0, 5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9, 6.0, 6.0] * 2)
    monkeypatch.setattr("rhn_cli.engine.train.evaluate", lambda *a, **k: next(perplexities))
    summary, log = run(toy_config(max_max_epoch=10, early_stopping=2), tmp_path)
    # valid: 5.0, 4.0, 4.6, 4.8 -> two epochs without improvement after epoch 2
    assert [s for s, _ in log.scalars["valid.ppl"]] == [1, 2, 3, 4]
    assert summary.best_epoch == 2


# -- through the command line ---------------------------------------------------------

LONG_TINY_RUN = ["with", "tiny", "synthetic.train_tokens=150000", "max_max_epoch=2", "--seed", "3"]


def start_training(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "rhn_cli", "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_progress(process: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    """Read stderr, where progress goes off a terminal (never into the recorded output),
    until the first plain progress line of the first epoch."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  epoch 1 "):
            return lines
    process.kill()
    pytest.fail("training never printed progress:\n" + "".join(lines) + process.stdout.read())


@pytest.mark.parametrize(("sent", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_records_interrupted_and_resume_completes_the_same_run(
    tmp_path, runner, sent, exit_code
):
    process = start_training(tmp_path, *LONG_TINY_RUN)
    before = wait_for_progress(process)
    process.send_signal(sent)
    out, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err
    assert "Resume with: rhn train --resume 1" in err
    run_dir = tmp_path / "runs" / "1"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "INTERRUPTED"
    state = checkpoint.load(run_dir / "checkpoint.pt")
    assert state["epoch_index"] == 0 and state["step"] > 0

    # Off a terminal, progress is plain lines; the record has no carriage-return spam.
    assert all("\r" not in line for line in before + out.splitlines())
    assert "\r" not in (run_dir / "cout.txt").read_text()

    result = runner.invoke(cli, ["train", "--resume", "1"])
    assert result.exit_code == 0, result.output
    assert "run 1 COMPLETED" in result.output
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "COMPLETED" and len(run["meta"]["resumed_at"]) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["valid.ppl"]["steps"] == [1, 2]  # no duplicate steps
    assert not (tmp_path / "runs" / "2").exists()


def test_resume_refuses_what_it_cannot_continue(runner, tmp_path):
    assert runner.invoke(cli, ["train", "--resume", "7"]).exit_code == 2
    assert runner.invoke(cli, ["train", "with", "tiny", "max_max_epoch=1"]).exit_code == 0
    done = runner.invoke(cli, ["train", "--resume", "1"])
    assert done.exit_code == 2 and "already COMPLETED" in done.output
    assert runner.invoke(cli, ["train", "with", "tiny", "max_time=0.001"]).exit_code == 0
    mixed = runner.invoke(cli, ["train", "--resume", "2", "with", "depth=4"])
    assert mixed.exit_code == 2 and "'depth' cannot change" in mixed.output


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(runner, tmp_path):
    assert runner.invoke(cli, ["train", "with", "tiny", "max_max_epoch=1"]).exit_code == 0
    run_dir = tmp_path / "runs" / "1"
    record = json.loads((run_dir / "run.json").read_text())
    record["status"] = "INTERRUPTED"
    (run_dir / "run.json").write_text(json.dumps(record))
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    result = runner.invoke(cli, ["train", "--resume", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "runs/1/checkpoint.pt is truncated or corrupted" in lines[0]


def test_a_nan_fails_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    runner, tmp_path, monkeypatch
):
    import rhn_cli.engine.train as engine

    calls = {"n": 0}
    real_loss = engine.sequence_loss

    def loss_that_breaks_in_epoch_2(logits, targets, *args):
        calls["n"] += 1
        value = real_loss(logits, targets, *args)
        # tiny: 17 training minibatches per epoch (evaluation computes its loss elsewhere):
        # call 21 is epoch 2, step 4
        return value * math.nan if calls["n"] == 21 else value

    monkeypatch.setattr(engine, "sequence_loss", loss_that_breaks_in_epoch_2)
    result = runner.invoke(cli, ["train", "with", "tiny"])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: training diverged at epoch 2, step 4/17: loss nan")
    assert "learning_rate" in message
    run_dir = tmp_path / "runs" / "1"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "FAILED"
    assert "TrainingDiverged" in "".join(run["fail_trace"])
    assert checkpoint.load(run_dir / "checkpoint.pt")["epoch_index"] == 1  # end of epoch 1


def test_max_time_through_the_cli_records_timeout_and_exits_0(runner, tmp_path):
    result = runner.invoke(cli, ["train", "with", "tiny", "max_time=0.001"])
    assert result.exit_code == 0, result.output
    assert "Resume with: rhn train --resume 1" in result.output
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert run["status"] == "TIMEOUT"


def test_out_of_memory_is_one_line_with_the_remedy(runner, tmp_path, monkeypatch):
    import rhn_cli.engine.train as engine

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(engine, "sequence_loss", no_memory)
    result = runner.invoke(cli, ["train", "with", "tiny"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: out of memory on cpu at epoch 1, step 1/17; reduce")
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert run["status"] == "FAILED" and "OutOfMemoryError" in "".join(run["fail_trace"])


def test_a_second_ctrl_c_stops_at_once():
    from rhn_cli.experiment.sacred_app import graceful_stop

    stop, warnings = StopRequest(), []
    with graceful_stop(stop, warnings.append):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal == signal.SIGINT
        assert "Ctrl-C again" in warnings[0]
        os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_by_checkpoint_path_and_deterministic_flag(runner, tmp_path):
    result = runner.invoke(cli, ["train", "with", "tiny", "max_time=0.001", "--deterministic"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "runs" / "1" / "config.json").read_text())
    assert config["deterministic"] is True
    # The recorded max_time applies again (one budget per job) unless changed on resume.
    again = runner.invoke(cli, ["train", "--resume", "runs/1/checkpoint.pt"])
    assert again.exit_code == 0 and "TIMEOUT" in again.output
    resumed = runner.invoke(
        cli,
        ["train", "--resume", "runs/1/checkpoint.pt", "with", "max_time=None", "max_max_epoch=3"],
    )
    assert resumed.exit_code == 0, resumed.output
    assert "run 1 COMPLETED" in resumed.output
    metrics = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())
    assert metrics["valid.ppl"]["steps"] == [1, 2, 3]
    assert json.loads((tmp_path / "runs" / "1" / "config.json").read_text())["max_max_epoch"] == 3


@pytest.mark.parametrize("reset", [True, False])
def test_the_state_is_reset_between_epochs_unless_asked_to_carry_it(tmp_path, reset):
    """RHN/Zaremba start every epoch from zeros; char-rnn carries the streams' state on."""
    config = toy_config(**_RHN_ONLY, **PEER_VARIANTS["charrnn_streams"], max_max_epoch=1)
    run({**config, "reset_state_each_epoch": reset}, tmp_path)
    h, c = checkpoint.load(tmp_path / "checkpoint.pt")["hidden_state"]
    assert bool((h == 0).all() and (c == 0).all()) == reset


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_beginning(tmp_path, runner):
    """kill -9 in epoch 1, before any checkpoint: --resume runs it again from the start
    under the same id and recorded seed; the record holds every epoch once, with the
    numbers of a run that was never killed."""
    process = start_training(tmp_path, *LONG_TINY_RUN)
    wait_for_progress(process)
    run_dir = tmp_path / "runs" / "1"
    assert not (run_dir / "checkpoint.pt").exists()
    process.kill()
    process.communicate(timeout=60)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "RUNNING"

    resumed = start_training(tmp_path, "--resume", "1")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "run 1 COMPLETED" in out
    assert not (tmp_path / "runs" / "2").exists()
    record = (run_dir / "cout.txt").read_text()
    assert "before its first checkpoint; started again from the beginning" in record
    assert record.count("epoch   1/2") == 1

    whole = start_training(tmp_path, "--runs-dir", "whole", *LONG_TINY_RUN)
    _, err = whole.communicate(timeout=120)
    assert whole.returncode == 0, err
    ours = json.loads((run_dir / "metrics.json").read_text())
    theirs = json.loads((tmp_path / "whole" / "1" / "metrics.json").read_text())
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name]["steps"] == theirs[name]["steps"], name
        assert ours[name]["values"] == theirs[name]["values"], name
    info = json.loads((run_dir / "info.json").read_text())
    assert info["throughput"]["tokens_per_s"]["steps"] == [1, 2]  # each epoch once


def test_a_resumed_run_keeps_what_computed_its_earlier_epochs(runner, tmp_path):
    """Sacred rewrites run.json (code, host, library versions) for each process; the
    processes before are kept in info, each with the epochs it left complete."""
    assert runner.invoke(cli, ["train", "with", "tiny", "max_time=0.001"]).exit_code == 0
    run_dir = tmp_path / "runs" / "1"
    first = json.loads((run_dir / "run.json").read_text())
    assert runner.invoke(cli, ["train", "--resume", "1"]).exit_code == 0  # TIMEOUT again
    assert json.loads((run_dir / "info.json").read_text())["earlier_processes"][0]["status"] == (
        "TIMEOUT"
    )
    done = runner.invoke(cli, ["train", "--resume", "1", "with", "max_time=None"])
    assert done.exit_code == 0 and "COMPLETED" in done.output, done.output
    last = json.loads((run_dir / "run.json").read_text())
    earlier = json.loads((run_dir / "info.json").read_text())["earlier_processes"]
    # run.json keeps the run's first start and one entry per resumption in meta.
    second_start = last["meta"]["resumed_at"][0]
    assert [p["start_time"] for p in earlier] == [first["start_time"], second_start]
    assert [p["status"] for p in earlier] == ["TIMEOUT", "TIMEOUT"]
    assert all(p["completed_epochs"] == 0 and p["step"] > 0 for p in earlier)
    shown = runner.invoke(cli, ["runs", "show", "1"]).output
    repository = (first["experiment"]["repositories"] or [None])[0]  # none outside a checkout
    commit = "no commit" if repository is None else repository["commit"][:7]
    commit += " + changes" if repository and repository["dirty"] else ""
    assert f"{commit} to epoch 0, timeout; {commit} to epoch 0, timeout" in shown
    for process in earlier:
        assert process["repositories"] == first["experiment"]["repositories"]
        assert process["dependencies"] == first["experiment"]["dependencies"]
        assert process["host"]["cpu"] == first["host"]["cpu"]
