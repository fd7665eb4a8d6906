"""Training, resume after a kill, evaluation and sampling on a GPU, through the CLI.

The tests marked ``cuda`` run with ``pytest -m cuda`` on a machine where torch sees a CUDA
device, for the RHN and the LSTM (whose layers without a recurrent mask run torch's fused
LSTM: cuDNN on a GPU). Without CUDA they are skipped.

Their bodies take the device from the ``device`` fixture, so that their own logic can be
checked on a machine without a GPU: ``RHN_TEST_CUDA_ON=cpu pytest -m cuda tests/test_cuda.py``
runs the same tests with ``device=cpu``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from rhn_cli.cli import cli
from rhn_cli.engine import checkpoint
from tests.test_resume import start_training

MODELS = {
    # Variational dropout everywhere: a resume must restore the device's RNG to draw the
    # same masks, and MC dropout has masks to draw.
    "rhn": ["depth=2", "hidden_size=16", "drop_x=0.1", "drop_i=0.2", "drop_h=0.1", "drop_o=0.2"],
    # No recurrent (drop_h) mask: each layer runs torch's fused LSTM (cuDNN on a GPU).
    "lstm": ["model=lstm", "num_layers=2", "hidden_size=16", "drop_x=0.1", "drop_o=0.2"],
}
SMALL_DATA = [
    "max_max_epoch=2",
    "max_epoch=1",
    "synthetic.train_tokens=20000",
    "synthetic.valid_tokens=4000",
    "synthetic.test_tokens=4000",
]
# Long enough that a signal sent at the first progress line lands inside epoch 1.
LONG_DATA = [*SMALL_DATA, "synthetic.train_tokens=300000"]


@pytest.fixture(scope="module")
def device() -> str:
    """'cuda' where torch sees a CUDA device; 'cpu' under RHN_TEST_CUDA_ON=cpu."""
    override = os.environ.get("RHN_TEST_CUDA_ON")
    if override is not None:
        if override != "cpu":
            pytest.fail(f"RHN_TEST_CUDA_ON={override!r}: expected 'cpu' (or unset)")
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device here (torch.cuda.is_available() is False); "
            "RHN_TEST_CUDA_ON=cpu runs these tests on the CPU"
        )
    return "cuda"


def train(runner, model: str, device: str, *extra: str):
    args = ["train", "with", *MODELS[model], *SMALL_DATA, f"device={device}", *extra]
    result = runner.invoke(cli, [*args, "--seed", "3"])
    assert result.exit_code == 0, result.output
    return result


def read(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


@pytest.mark.cuda
@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_run_trains_on_the_device_records_it_and_its_weights_load_back(
    runner, tmp_path, device, model
):
    from rhn_cli.data.registry import load_corpus
    from rhn_cli.engine.device import pick_device
    from rhn_cli.engine.evaluation import evaluate
    from rhn_cli.experiment.resume import recorded_config
    from rhn_cli.models import build_model

    result = train(runner, model, device)
    run_dir = tmp_path / "runs" / "1"
    assert f"parameters, on {device}" in (run_dir / "cout.txt").read_text()
    info = read(run_dir, "info.json")
    assert info["device"].startswith(device)  # cuda: 'cuda:0 (the GPU's name)'
    if device == "cuda":
        assert read(run_dir, "run.json")["host"]["rhn"]["cuda_device"] in info["device"]

    saved = checkpoint.load(run_dir / checkpoint.BEST)
    config = recorded_config(saved["config"])
    net = build_model(config, saved["model"]["output_bias"].numel())
    net.to(pick_device(device)).load_state_dict(saved["model"])
    assert all(p.device.type == device for p in net.parameters())
    corpus = load_corpus(config, echo=lambda _: None)
    B, T = config["batch_size"], config["num_steps"]
    valid = evaluate(net, corpus.valid, B, T, pick_device(device), "valid")
    # The loaded weights compute the best valid perplexity the run recorded.
    assert valid == pytest.approx(info["best_valid_perplexity"], rel=1e-6), result.output


def wait_for_progress(process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Read stderr (progress goes there off a terminal) up to epoch 1's first line."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  epoch 1 "):
            return
    process.kill()
    pytest.fail("training never printed progress:\n" + "".join(lines) + process.stdout.read())


def finish(process: subprocess.Popen, exit_code: int = 0) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == exit_code, out + err
    return err


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("model", "sent"), [("rhn", signal.SIGINT), ("lstm", signal.SIGTERM)], ids=["rhn", "lstm"]
)
def test_a_run_killed_mid_epoch_resumes_to_the_numbers_of_an_uninterrupted_run(
    tmp_path, device, model, sent
):
    """--deterministic: on a GPU only deterministic kernels give the same numbers twice."""
    run = ["with", *MODELS[model], *LONG_DATA, f"device={device}", "--seed", "3", "--deterministic"]
    process = start_training(tmp_path, *run)
    wait_for_progress(process)
    process.send_signal(sent)
    err = finish(process, 128 + sent)
    assert "Resume with: rhn train --resume 1" in err
    state = checkpoint.load(tmp_path / "runs" / "1" / checkpoint.LAST)
    assert state["epoch_index"] == 0 and state["step"] > 0  # stopped inside epoch 1
    if device == "cuda":
        assert "cuda" in state["rng"]  # the dropout masks' generator, restored on resume

    finish(start_training(tmp_path, "--resume", "1"))
    finish(start_training(tmp_path, "--runs-dir", "whole", *run))
    resumed = read(tmp_path / "runs" / "1", "metrics.json")
    whole = read(tmp_path / "whole" / "1", "metrics.json")
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert resumed[name]["steps"] == whole[name]["steps"], name
        assert resumed[name]["values"] == whole[name]["values"], name
    final = checkpoint.load(tmp_path / "runs" / "1" / checkpoint.LAST)["model"]
    expected = checkpoint.load(tmp_path / "whole" / "1" / checkpoint.LAST)["model"]
    assert all(torch.equal(final[name], expected[name]) for name in expected)


@pytest.mark.cuda
@pytest.mark.parametrize("model", sorted(MODELS))
def test_evaluate_batched_full_and_mc_dropout_on_the_device(runner, tmp_path, device, model):
    train(runner, model, device)
    trained = read(tmp_path / "runs" / "1", "info.json")
    result = runner.invoke(cli, ["evaluate", "1", "--mc-steps", "3"])
    assert result.exit_code == 0, result.output
    evaluation = tmp_path / "runs" / "2"
    assert read(evaluation, "config.json")["device"] == device
    metrics = {name: series["values"] for name, series in read(evaluation, "metrics.json").items()}
    for split in ("valid", "test"):
        for kind in ("", "full_", "mc_"):
            (ppl,) = metrics[f"{kind}{split}.ppl"]
            assert math.isfinite(ppl) and 1 < ppl < 12, (kind, split, ppl)  # 12 symbols
    # The same weights on the same device: the numbers the training run reported.
    assert metrics["valid.ppl"][0] == pytest.approx(trained["best_valid_perplexity"], rel=1e-6)
    assert metrics["full_valid.ppl"][0] == pytest.approx(
        trained["full_best_valid_perplexity"], rel=1e-6
    )


@pytest.mark.cuda
@pytest.mark.parametrize("model", sorted(MODELS))
def test_sample_runs_on_the_runs_device_and_its_seed_fixes_the_text(
    runner, device, model, monkeypatch
):
    from rhn_cli.engine import sampling

    train(runner, model, device)
    devices = []
    generate = sampling.generate

    def recording_generate(net, *args, **kwargs):
        devices.append(next(net.parameters()).device.type)
        return generate(net, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording_generate)
    first = runner.invoke(cli, ["sample", "1", "--length", "30", "--seed", "5", "--prime", "s1"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["sample", "1", "--length", "30", "--seed", "5", "--prime", "s1"])
    assert again.output == first.output
    words = first.output.split()
    assert words[0] == "s1" and len(words) == 31 and all(w.startswith("s") for w in words)
    argmax = runner.invoke(cli, ["sample", "1", "--length", "30", "--argmax"])
    assert argmax.exit_code == 0 and len(argmax.output.split()) == 30, argmax.output
    assert devices == [device] * 3


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_model_trained_on_a_gpu_evaluates_and_samples_on_a_machine_without_it(runner, tmp_path):
    """A run recorded with device='cuda:7' (a GPU this machine lacks): evaluate and sample
    use the weights on 'auto' (here the CPU, or GPU 0) instead of refusing the device."""
    train(runner, "rhn", "cpu")
    path = tmp_path / "runs" / "1" / checkpoint.BEST
    saved = checkpoint.load(path)
    saved["config"]["device"] = "cuda:7"
    checkpoint.save(path, saved)

    result = runner.invoke(cli, ["evaluate", "1", "--split", "valid"])
    assert result.exit_code == 0, result.output
    assert read(tmp_path / "runs" / "2", "config.json")["device"] == "auto"
    sampled = runner.invoke(cli, ["sample", "1", "--length", "5", "--seed", "1"])
    assert sampled.exit_code == 0, sampled.output
    assert len(sampled.output.split()) == 5
