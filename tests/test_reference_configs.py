"""The reference RHN experiments as named configs, and the reference evaluation commands."""

from __future__ import annotations

import json

import pytest
import torch

from rhn_cli.cli import cli
from rhn_cli.experiment.resolve import discover, resolve
from rhn_cli.experiment.sacred_app import build_experiment
from rhn_cli.experiment.schema import plain
from rhn_cli.models import build_model

# Spec table §1.1 of the reference rhn_train.py, column by column.
SPEC: dict[str, dict] = {
    "ptb_sota": dict(
        dataset="ptb",
        init_scale=0.04,
        init_bias=-2.0,
        num_layers=1,
        depth=10,
        learning_rate=0.2,
        lr_decay=1.02,
        weight_decay=1e-7,
        max_grad_norm=10,
        num_steps=35,
        hidden_size=830,
        max_epoch=20,
        max_max_epoch=500,
        batch_size=20,
        drop_x=0.25,
        drop_i=0.75,
        drop_h=0.25,
        drop_o=0.75,
        tied=True,
        vocab_size=10000,
        load_model="",
        mc_steps=0,
    ),
    "enwik8_sota": dict(
        dataset="enwik8",
        init_scale=0.04,
        init_bias=-4.0,
        num_layers=1,
        depth=10,
        learning_rate=0.2,
        lr_decay=1.03,
        weight_decay=1e-7,
        max_grad_norm=10,
        num_steps=50,
        hidden_size=1500,
        max_epoch=5,
        max_max_epoch=500,
        batch_size=128,
        drop_x=0.10,
        drop_i=0.40,
        drop_h=0.10,
        drop_o=0.40,
        tied=False,
        vocab_size=205,
        load_model="",
        mc_steps=0,
    ),
}

# text8_sota differs from enwik8_sota only in its data.
SPEC["text8_sota"] = {**SPEC["enwik8_sota"], "dataset": "text8", "vocab_size": 27}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_print_config_shows_every_value_of_the_spec_table(runner, name):
    result = runner.invoke(cli, ["print-config", "with", name])
    assert result.exit_code == 0, result.output
    lines = {
        line.split("=")[0].strip(" *"): line for line in result.output.splitlines() if " = " in line
    }
    for key, value in SPEC[name].items():
        assert f"{key} = {value!r}" in lines[key], (key, lines[key])


def parameter_count(name: str, **changes) -> int:
    config = resolve([name] + [f"{k}={v!r}" for k, v in changes.items()]).config
    with torch.device("meta"):
        return build_model(config, config["vocab_size"]).num_parameters()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ptb_sota", 23_482_400),
        ("enwik8_sota", 45_994_730),
        ("text8_sota", 45_152_256),
        ("enwik8_depth5", 23_479_730),
    ],
)
def test_named_configs_have_the_published_parameter_counts(name, expected):
    assert parameter_count(name) == expected


DEPTH_TABLE = {  # depth: (units, params untied, params with weight tying), spec §6.1
    1: (1275, 32_015_050, 19_265_050),
    2: (1180, 31_969_120, 20_169_120),
    3: (1110, 32_073_460, 20_973_460),
    4: (1050, 32_043_400, 21_543_400),
    5: (1000, 32_020_000, 22_020_000),
    6: (960, 32_123_920, 22_523_920),
    7: (920, 31_965_280, 22_765_280),
    8: (890, 32_082_040, 23_182_040),
    9: (860, 32_017_480, 23_417_480),
    10: (830, 31_782_400, 23_482_400),
}


@pytest.mark.parametrize("depth", sorted(DEPTH_TABLE))
def test_depth_table_configs(depth):
    units, untied, tied = DEPTH_TABLE[depth]
    config = resolve([f"ptb_depth{depth}"]).config
    assert (config["depth"], config["hidden_size"], config["tied"]) == (depth, units, False)
    assert parameter_count(f"ptb_depth{depth}") == untied
    assert parameter_count(f"ptb_depth{depth}", tied=True) == tied


def test_configs_describes_each_with_its_published_result(runner):
    output = runner.invoke(cli, ["configs"]).output
    assert "ptb_sota" in output and "65.4" in output
    assert any(line.startswith("ptb_depth8 ") and "68.5" in line for line in output.splitlines())
    assert any(
        line.startswith("enwik8_sota ") and "1.27 BPC" in line for line in output.splitlines()
    )


def test_training_records_the_reference_info_keys_and_full_evaluation(runner, tmp_path):
    assert runner.invoke(cli, ["train", "with", "tiny"]).exit_code == 0
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    for key in (
        "epoch_nr",
        "nr_parameters",
        "logs",
        "best_val_epoch",
        "best_valid_perplexity",
        "full_best_valid_perplexity",
        "full_test_perplexity",
    ):
        assert key in info, key
    metrics = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())
    assert metrics["full_valid.ppl"]["values"] == [info["full_best_valid_perplexity"]]
    assert metrics["full_test.ppl"]["steps"] == [info["best_val_epoch"]]


def test_evaluate_records_its_own_run_linked_to_the_trained_one(runner, tmp_path):
    assert runner.invoke(cli, ["train", "with", "tiny", "drop_h=0.3"]).exit_code == 0
    result = runner.invoke(cli, ["evaluate", "1", "--split", "test", "--mc-steps", "3"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "runs" / "2" / "run.json").read_text())
    info = json.loads((tmp_path / "runs" / "2" / "info.json").read_text())
    trained = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert run["command"] == "evaluate" and run["status"] == "COMPLETED"
    assert info["evaluated_run"] == "1"
    assert info["full_test_ppl"] == pytest.approx(trained["full_test_perplexity"], rel=1e-9)
    assert "mc_test_ppl" in info and "full_valid_ppl" not in info
    assert runner.invoke(cli, ["evaluate", "9"]).exit_code == 2


def _typed(config):
    """Values with their types: 1 and 1.0 differ here."""
    return {k: _typed(v) if isinstance(v, dict) else (type(v), v) for k, v in config.items()}


SHIPPED = sorted(name for name, named in discover().items() if named.shipped)


@pytest.mark.parametrize("name", SHIPPED)
def test_sacred_resolves_each_shipped_config_as_rhn_validated_it(name):
    """rhn validates its own resolution once; inside the run, Sacred's copy (resolved
    again from the same named config) must be that config, as plain typed values."""
    resolved = resolve([name, "seed=7"])
    experiment = build_experiment(resolved, [])

    def sacred_config(_config):
        return plain(_config)

    experiment.command(sacred_config)
    run = experiment.run("sacred_config", config_updates=resolved.updates, named_configs=[name])
    assert _typed(run.result) == _typed(resolved.config)


def test_sacred_copy_of_whole_numbers_is_widened_as_validation_widens_them():
    resolved = resolve(["tiny", "learning_rate=1", "max_grad_norm=5", "init_scale=0"])
    experiment = build_experiment(resolved, [])

    def sacred_config(_config):
        return _config["learning_rate"], plain(_config)

    experiment.command(sacred_config)
    run = experiment.run("sacred_config", config_updates=resolved.updates, named_configs=["tiny"])
    sacred_value, config = run.result
    assert type(sacred_value) is int  # what Sacred records, as it was typed
    assert _typed(config) == _typed({**resolved.config, "seed": config["seed"]})
    assert config["learning_rate"] == 1.0 and type(config["max_grad_norm"]) is float
