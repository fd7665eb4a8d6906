"""The click commands as a user drives them: help, errors, exit codes, what gets written."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.experiment.schema import ALIASES
from tests.conftest import FAST_RUN


def test_help_lists_every_command(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "print-config", "configs"):
        assert command in result.output


@pytest.mark.parametrize("command", ["train", "print-config", "configs"])
def test_subcommand_help_is_self_contained(runner, command):
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage: rhn " + command in result.output
    if command != "configs":
        assert "with" in result.output and "key=value" in result.output


def test_train_help_tells_of_the_native_loop_and_its_switch(runner):
    result = runner.invoke(cli, ["train", "--help"])
    text = " ".join(result.output.split())  # click wraps the lines
    assert "compiled for the machine on first use" in text
    assert "RHN_NATIVE=0 runs the Python loop" in text


def test_help_is_instant_and_imports_neither_torch_nor_sacred():
    """`rhn --help` must not pay for torch or Sacred (seconds on a cold start)."""
    code = (
        "import sys; from rhn_cli.cli import cli\n"
        "try:\n    cli(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'sacred') if m in sys.modules))"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    # Generous bound: a cold interpreter plus click; torch alone takes ~1 s or more.
    assert time.perf_counter() - started < 5


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "rhn_cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "print-config" in out.stdout


def test_print_config_marks_changed_values(runner):
    result = runner.invoke(cli, ["print-config", "with", "depth=3"])
    assert result.exit_code == 0, result.output
    depth_line = next(line for line in result.output.splitlines() if " depth = " in line)
    assert depth_line.startswith("*") and "command line" in depth_line
    hidden_line = next(line for line in result.output.splitlines() if "hidden_size =" in line)
    assert not hidden_line.startswith("*")


def test_print_config_names_the_named_config_that_changed_a_value(runner):
    result = runner.invoke(cli, ["print-config", "with", "tiny", "depth=4"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(
        line.startswith("*") and "hidden_size = 32" in line and "tiny" in line for line in lines
    )
    # The update comes after the named config and wins.
    assert any("depth = 4" in line and "command line" in line for line in lines)


def test_print_config_shows_nested_keys_set_with_dots(runner):
    result = runner.invoke(cli, ["print-config", "with", "synthetic.order=3"])
    assert result.exit_code == 0
    assert any(line.startswith("*") and "order = 3" in line for line in result.output.splitlines())


@pytest.mark.parametrize(
    ("updates", "named", "allowed"),
    [
        (["dept=3"], "'dept'", "did you mean 'depth'"),
        (["drop_h=1.5"], "drop_h=1.5", "[0, 1)"),
        (["depth=0"], "depth=0", "at least 1"),
        (["learning_rate=-0.1"], "learning_rate=-0.1", "more than 0"),
        (["batch_size=0"], "batch_size=0", "at least 1"),
        (['dataset="nosuch"'], "dataset='nosuch'", "'synthetic'"),
        (['model="transformer"'], "model='transformer'", "'rhn'"),
        (["tied=3"], "tied=3", "True or False"),
        (["depth=2.5"], "depth=2.5", "an integer"),
        (["lr=0.1"], "'lr'", "did you mean 'learning_rate'"),
        (["synthetic.ordr=2"], "'synthetic.ordr'", "did you mean 'synthetic.order'"),
        (["tny"], "'tny'", "did you mean 'tiny'"),
        (["missing.yaml"], "'missing.yaml'", "does not exist"),
    ],
)
@pytest.mark.parametrize("command", ["train", "print-config"])
def test_bad_config_exits_2_with_one_line_and_records_nothing(
    runner, tmp_path, command, updates, named, allowed
):
    result = runner.invoke(cli, [command, "with", *updates])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("Error:")
    assert named in message and allowed in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("alias", "key"), sorted(ALIASES.items()))
def test_every_alias_suggests_its_key(runner, alias, key):
    """Another codebase's name for a key gets the key suggested; an alias that is itself
    a key (clip: rhn's clipping mode) could never be suggested."""
    result = runner.invoke(cli, ["print-config", "with", f"{alias}=1"])
    assert result.exit_code == 2
    assert f"unknown config key {alias!r} (from the command line); did you mean {key!r}?" in (
        result.output
    )


def test_train_writes_a_complete_run_record(runner, tmp_path):
    result = runner.invoke(
        cli,
        ["train", "with", *FAST_RUN, "--seed", "7", "--name", "smoke", "--comment", "first try"],
    )
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "1"
    run = json.loads((run_dir / "run.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["experiment"]["name"] == "smoke"
    assert run["meta"]["comment"] == "first try"
    assert config["depth"] == 2 and config["seed"] == 7
    for name in ("train.ppl", "train.bpc", "valid.ppl", "valid.bpc", "lr"):
        assert metrics[name]["steps"] == [1, 2], name
    info = json.loads((run_dir / "info.json").read_text())
    assert info["throughput"]["tokens_per_s"]["steps"] == [1, 2]
    assert run["result"] == pytest.approx(min(metrics["valid.ppl"]["values"]), abs=5e-3)
    assert "run 1 COMPLETED" in result.output


def test_runs_dir_option_and_environment(runner, tmp_path, monkeypatch):
    assert (
        runner.invoke(cli, ["train", "with", *FAST_RUN, "--runs-dir", "elsewhere"]).exit_code == 0
    )
    assert (tmp_path / "elsewhere" / "1" / "run.json").exists()
    monkeypatch.setenv("RHN_RUNS_DIR", str(tmp_path / "from_env"))
    assert runner.invoke(cli, ["train", "with", *FAST_RUN]).exit_code == 0
    assert (tmp_path / "from_env" / "1" / "run.json").exists()
    assert not (tmp_path / "runs").exists()


def test_unobserved_records_nothing(runner, tmp_path):
    result = runner.invoke(cli, ["train", "with", *FAST_RUN, "--unobserved"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs").exists()


def test_same_seed_same_result(runner, tmp_path):
    for _ in range(2):
        assert runner.invoke(cli, ["train", "with", *FAST_RUN, "--seed", "3"]).exit_code == 0
    results = [
        json.loads((tmp_path / "runs" / i / "run.json").read_text())["result"] for i in ("1", "2")
    ]
    assert results[0] == results[1]


def test_yaml_file_after_with(runner, tmp_path):
    Path("mine.yaml").write_text("# mine\ndepth: 2\nhidden_size: 24\n")
    result = runner.invoke(cli, ["print-config", "with", "mine.yaml"])
    assert result.exit_code == 0, result.output
    assert any(
        line.startswith("*") and "hidden_size = 24" in line for line in result.output.splitlines()
    )


def test_bad_key_inside_a_named_config_names_the_file(runner, tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "broken.yaml").write_text("# broken\nhiden_size: 10\n")
    monkeypatch.setenv("RHN_CONFIG_PATH", str(tmp_path / "cfgs"))
    result = runner.invoke(cli, ["train", "with", "broken"])
    assert result.exit_code == 2
    assert "'hiden_size' (from named config broken)" in result.output
    assert "did you mean 'hidden_size'" in result.output


def test_configs_lists_shipped_and_user_configs_with_descriptions(runner, tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.yaml").write_text("# My own deeper run\ndepth: 6\n")
    monkeypatch.setenv("RHN_CONFIG_PATH", str(tmp_path / "cfgs"))
    result = runner.invoke(cli, ["configs"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert any(line.startswith("tiny ") and "smoke test" in line for line in lines)
    assert any(line.startswith("mine ") and "My own deeper run" in line for line in lines)
    assert runner.invoke(cli, ["print-config", "with", "mine"]).exit_code == 0


def test_progress_bar_goes_to_the_terminal_not_to_the_recorded_output(
    runner, tmp_path, monkeypatch
):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("rhn_cli.experiment.sacred_app._terminal", lambda: terminal)
    assert runner.invoke(cli, ["train", "with", *FAST_RUN]).exit_code == 0
    assert "epoch 1:" in terminal.getvalue() and "batch" in terminal.getvalue()
    captured = (tmp_path / "runs" / "1" / "cout.txt").read_text()
    assert "batch/s" not in captured and "epoch 1:" not in captured and "\r" not in captured
    assert "epoch   1/2" in captured


def test_sacred_resolves_the_same_config_that_was_validated(runner, tmp_path, monkeypatch):
    """rhn validates its own resolution; Sacred must end up with exactly that config."""
    from rhn_cli.experiment.resolve import resolve

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "deeper.yaml").write_text("# d\ndepth: 3\nsynthetic:\n  order: 1\n")
    monkeypatch.setenv("RHN_CONFIG_PATH", str(tmp_path / "cfgs"))
    tokens = ["tiny", "deeper", "max_max_epoch=1", "synthetic.branching=2", "learning_rate=1"]
    assert runner.invoke(cli, ["train", "with", *tokens, "--seed", "5"]).exit_code == 0
    recorded = json.loads((tmp_path / "runs" / "1" / "config.json").read_text())
    assert recorded == resolve(tokens, {"seed": 5}).config
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert run["meta"]["named_configs"] == ["tiny", "deeper"]
