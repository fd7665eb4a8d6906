"""Sacred's command-line flags on ``rhn train`` and ``rhn sweep``, with Sacred's meanings:
-n, -c, -u, -F, -m, -p, -l, -d, -D, -f; and Sacred's print_config command pointing to
``rhn print-config``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from tests.conftest import FAST_RUN

ONE_EPOCH = [*FAST_RUN, "max_max_epoch=1"]


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def _broken_training(monkeypatch) -> None:
    """Training that raises once the run has started (so Sacred records it FAILED)."""
    import rhn_cli.engine.train as engine

    def broken(config, data, reporter, context):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "train", broken)


def test_train_takes_sacreds_run_flags_with_sacreds_meanings(runner):
    """-n names the run, -c comments it, -F is the file store, -p prints the config
    first, -l INFO shows (and records) Sacred's log lines."""
    arguments = ["train", "-n", "nm", "-c", "a note", "-F", "store", "-p", "-l", "INFO"]
    result = runner.invoke(cli, [*arguments, "with", *ONE_EPOCH])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines.index("Configuration (* = changed by command line):")
    rule = lines.index("-" * 79)
    started = next(i for i, line in enumerate(lines) if line.startswith("run 1: recording to"))
    assert header < rule < started  # the config first, then training
    assert any(line.startswith("*") and "hidden_size = 16" in line for line in lines[header:rule])
    assert "rhn: INFO: Completed after" in result.output
    run = json.loads(Path("store/1/run.json").read_text())
    assert run["experiment"]["name"] == "nm"
    assert run["meta"]["comment"] == "a note"
    assert run["meta"]["options"]["--loglevel"] == 20
    assert "Completed after" in Path("store/1/cout.txt").read_text()
    assert not Path("runs").exists()


def test_unobserved_short_flag_records_nothing(runner):
    result = runner.invoke(cli, ["train", "-u", "-F", "store", "with", *ONE_EPOCH])
    assert result.exit_code == 0, result.output
    assert "unobserved: not recorded" in result.output
    assert not Path("store").exists()


def test_force_lets_unknown_keys_through_and_the_run_records_them(runner):
    """Without -f an unknown key stops the run before anything is recorded; with it the
    run trains, its config holds the keys, its info lists them, its meta says --force.
    -m takes Sacred's HOST:PORT:DB form (nothing answers there: the file store records)."""
    extra = ["my_note=3", "synthetic.extra=1"]
    refused = runner.invoke(cli, ["train", "-F", "store", "with", *ONE_EPOCH, *extra])
    assert refused.exit_code == 2
    assert "unknown config key 'synthetic.extra'" in refused.output
    assert not Path("store").exists()

    mongo = ["-m", "localhost:1:sacredflags"]
    result = runner.invoke(cli, ["train", "-f", *mongo, "-F", "store", "with", *ONE_EPOCH, *extra])
    assert result.exit_code == 0, result.output
    assert "not rhn config keys, recorded unchecked and ignored by training: my_note" in (
        result.output
    )
    assert "MongoDB at mongodb://localhost:1/sacredflags" in result.output
    config = json.loads(Path("store/1/config.json").read_text())
    assert config["my_note"] == 3 and config["synthetic"]["extra"] == 1
    info = json.loads(Path("store/1/info.json").read_text())
    assert info["unchecked_config_keys"] == ["my_note", "synthetic.extra"]
    run = json.loads(Path("store/1/run.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["meta"]["options"]["--force"] is True
    # Without -l the run's log stays at WARNING: Sacred's INFO lines are not recorded.
    assert "Completed after" not in Path("store/1/cout.txt").read_text()


def test_force_still_checks_the_keys_rhn_knows(runner):
    result = runner.invoke(cli, ["train", "-f", "-F", "store", "with", "depth='deep'"])
    assert result.exit_code == 2
    assert _error_lines(result) == [
        "Error: depth='deep' (from the command line): expected an integer"
    ]
    assert not Path("store").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-l", "loud"], "--loglevel 'loud': expected DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (["-l", "51"], "--loglevel '51': expected"),
        (["-m", "a b"], "--mongo 'a b': expected a mongodb:// URL or Sacred's [HOST:PORT:]DB_NAME"),
        (["-m", "rhn.runs"], "--mongo 'rhn.runs': rhn records into the database's own runs"),
        (["-m", "h:1:db!5"], "drop the collection, run id or priority"),
        (["-D", "--nproc", "2"], "-D/--pdb debugs this process, and --nproc trains in others"),
        (["-f", "--resume", "1"], "-f/--force lets new config keys into a new run"),
        (["--launcher", "slurm", "-l", "INFO", "-d"], "--launcher slurm: drop -l, -d"),
    ],
)
def test_bad_flag_values_are_one_line_and_exit_2(runner, arguments, message):
    result = runner.invoke(cli, ["train", *arguments, "-F", "store", "with", *ONE_EPOCH])
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert not Path("store").exists()


@pytest.mark.parametrize(
    ("arguments", "instead"),
    [
        (["print_config", "with", "depth=3"], "run 'rhn print-config with depth=3'"),
        (["with", "depth=3", "print-config"], "run 'rhn print-config with depth=3'"),
        (["print_named_configs"], "run 'rhn configs'"),
    ],
)
def test_sacreds_commands_point_to_rhns(runner, arguments, instead):
    result = runner.invoke(cli, ["train", *arguments])
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and instead in lines[0], lines
    assert not Path("runs").exists()


def test_debug_prints_the_whole_traceback_of_a_failed_run(runner, monkeypatch):
    _broken_training(monkeypatch)
    plain = runner.invoke(cli, ["train", "-F", "store", "with", *ONE_EPOCH])
    assert plain.exit_code == 1
    assert "Traceback" not in plain.output
    debug = runner.invoke(cli, ["train", "-d", "-F", "store", "with", *ONE_EPOCH])
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.output
    assert 'in broken\n    raise RuntimeError("injected failure")' in debug.output
    assert debug.output.rstrip().endswith("(traceback recorded in store/2/run.json)")
    assert json.loads(Path("store/2/run.json").read_text())["meta"]["options"]["--debug"]


PDB_SCRIPT = """
import sys
import rhn_cli.engine.train as engine

def broken(config, data, reporter, context):
    where_it_broke = 6 * 7
    raise RuntimeError("injected failure")

engine.train = broken
from rhn_cli.cli import main
sys.argv = ["rhn", *sys.argv[1:]]
main()
"""


def test_pdb_enters_the_debugger_post_mortem_where_training_failed(tmp_path):
    """-D: pdb opens in the failing frame (its locals readable) once the run is recorded
    FAILED; leaving pdb ends the command with exit code 1."""
    script = tmp_path / "broken_training.py"
    script.write_text(PDB_SCRIPT)
    command = [sys.executable, str(script), "train", "-D", "-F", "store", "with", *ONE_EPOCH]
    done = subprocess.run(
        command,
        input="p where_it_broke * 10\nq\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "(Pdb) 420" in done.stdout  # the prompt, and the failing frame's local
    assert "-> raise RuntimeError" in done.stdout
    assert "RuntimeError: injected failure" in done.stderr
    assert json.loads((tmp_path / "store/1/run.json").read_text())["status"] == "FAILED"


def test_sweep_takes_n_as_its_name_and_sacreds_stores(runner):
    """In 'rhn sweep', -n is the sweep's name (each run's tag); -F and -m as in train."""
    arguments = ["sweep", "-n", "lr", "-F", "store", "-m", "db1:27017:exp", "--dry-run"]
    result = runner.invoke(cli, [*arguments, "with", "tiny", "seed=[1,2]"])
    assert result.exit_code == 0, result.output
    commands = [line for line in result.stdout.splitlines() if " train " in line]
    assert len(commands) == 2
    assert all("--tag lr --runs-dir store with tiny" in line for line in commands)
    assert "mongodb://db1:27017/exp" in result.stderr


def test_help_shows_sacreds_flags(runner):
    text = runner.invoke(cli, ["train", "--help"]).output
    for flags in (
        "-n, --name",
        "-c, --comment",
        "-u, --unobserved",
        "-F, --runs-dir, --file_storage",
        "-m, --mongo, --mongo_db",
        "-p, --print-config",
        "-l, --loglevel",
        "-d, --debug",
        "-D, --pdb",
        "-f, --force",
    ):
        assert flags in text
    assert "-n, --name" in runner.invoke(cli, ["sweep", "--help"]).output
