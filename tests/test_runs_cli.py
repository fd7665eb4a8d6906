"""``rhn runs ls | show | compare | plot | export | rm`` over the file store and MongoDB.

Most tests read one file store made once for this module by real ``rhn train`` runs:
three completed runs differing in depth and hidden size, one that FAILED (its loss
turns NaN) and one INTERRUPTED (Ctrl-C in epoch 1). Tests that change a store work on
a copy. One test reads runs recorded live in a real SecantusDB server (``--mongo``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from rhn_cli.cli import cli
from tests.conftest import FAST_RUN
from tests.test_mongo_recording import mongo_url  # noqa: F401  (a fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLEAN_ENV = {name: None for name in ("RHN_RUNS_DIR", "RHN_MONGO_URL", "RHN_CONFIG_PATH")}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def _train(runs_dir: Path, *args: str, expect: int = 0):
    result = _runner().invoke(
        cli, ["train", "with", *FAST_RUN, *args, "--runs-dir", str(runs_dir)], env=CLEAN_ENV
    )
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """runs/1 small, 2 wide (hidden_size=24), 3 deep (depth=3): COMPLETED;
    4 diverged: FAILED; 5 stopped: INTERRUPTED."""
    import torch

    import rhn_cli.engine.train as engine

    runs_dir = tmp_path_factory.mktemp("store") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(runs_dir, "--name", "small")
        _train(runs_dir, "hidden_size=24", "--name", "wide", "--comment", "twice as wide")
        _train(runs_dir, "depth=3", "--name", "deep")
        real_loss = engine.sequence_loss
        calls = {"n": 0}

        def nan_at_step_5(*args):
            calls["n"] += 1
            value = real_loss(*args)
            return value * math.nan if calls["n"] == 5 else value

        def ctrl_c_in_epoch_2(*args):
            calls["n"] += 1
            if calls["n"] == 20:  # the training loss only: epoch 2, step 9 (11 an epoch)
                raise KeyboardInterrupt
            return real_loss(*args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "sequence_loss", nan_at_step_5)
            _train(runs_dir, "--name", "diverged", expect=1)
            calls["n"] = 0
            patch.setattr(engine, "sequence_loss", ctrl_c_in_epoch_2)
            _train(runs_dir, "--name", "stopped", expect=130)
    finally:
        torch.set_num_threads(threads)
    return runs_dir


def rhn(*args: str, runs_dir: Path | None = None, **kwargs):
    """``rhn runs ARGS --runs-dir RUNS_DIR``."""
    extra = ["--runs-dir", str(runs_dir)] if runs_dir is not None else []
    kwargs.setdefault("env", {"COLUMNS": None})  # full width, whatever the shell exported
    return _runner().invoke(cli, ["runs", *args, *extra], **kwargs)


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def error(result, code: int = 2) -> str:
    """The one-line error of a failed command."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


def table(output: str) -> dict[str, dict[str, str]]:
    """An ``ls`` table as {id: {column: cell}} (cells split on runs of 2+ spaces)."""
    lines = output.splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("(")]  # a note may wrap
    lines = [line for line in lines[: notes[0] if notes else None] if line]
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), (header, cells)
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def ids(output: str) -> list[str]:
    return list(table(output))


def write_run(
    runs_dir: Path,
    run_id: str,
    config: dict,
    valid: list[float] | None = None,
    status: str = "COMPLETED",
    name: str = "rhn",
    heartbeat: datetime | None = None,
) -> Path:
    """A minimal run directory, as Sacred's file store writes it."""
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True)
    start = datetime(2026, 1, 2, 3, 4, 5)
    beat = heartbeat or start + timedelta(minutes=5)
    run = {
        "status": status,
        "experiment": {"name": name},
        "command": "main",
        "host": {"hostname": "node7"},
        "start_time": start.isoformat(),
        "heartbeat": beat.isoformat(),
        "meta": {"options": {"--name": name}},
        "artifacts": [],
    }
    if status != "RUNNING":
        run["stop_time"] = (start + timedelta(minutes=5)).isoformat()
    (run_dir / "run.json").write_text(json.dumps(run))
    (run_dir / "config.json").write_text(json.dumps(config))
    valid = valid or []
    steps = list(range(1, len(valid) + 1))
    metrics = {"valid.ppl": {"steps": steps, "values": valid, "timestamps": []}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def _copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy" / "runs"
    shutil.copytree(store, copy)
    return copy


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0.4, "0s"), (12, "12s"), (185, "3m05s"), (3720, "1h02m"), (183600, "2d03h")],
)
def test_durations(seconds, shown):
    from rhn_cli.tracking.report import format_duration

    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("valid.ppl", 81.23456, "81.235"),
        ("test.bpc", 1.234567, "1.2346"),
        ("tokens_per_s", 49197.87, "49,198"),
        ("lr", 0.3333333, "0.3333"),
        ("valid.ppl", None, "-"),
    ],
)
def test_metric_numbers(name, value, shown):
    from rhn_cli.tracking.report import format_metric

    assert format_metric(name, value) == shown


# --------------------------------------------------------------------------------------
# ls
# --------------------------------------------------------------------------------------


def test_ls_lists_every_run_with_status_config_and_best_metrics(store):
    output = ok(rhn("ls", runs_dir=store))
    rows = table(output)
    assert list(rows) == ["1", "2", "3", "4", "5"]
    assert {i: r["status"] for i, r in rows.items()} == {
        "1": "COMPLETED",
        "2": "COMPLETED",
        "3": "COMPLETED",
        "4": "FAILED",
        "5": "INTERRUPTED",
    }
    assert [r["name"] for r in rows.values()] == ["small", "wide", "deep", "diverged", "stopped"]
    # Config columns: model and dataset always, then what differs (never the seed).
    header = output.splitlines()[0].split()
    assert header[:5] == ["id", "name", "status", "start", "duration"]
    assert {"model", "dataset", "depth", "hidden_size", "valid.ppl", "test.ppl"} <= set(header)
    assert "seed" not in header and "batch_size" not in header
    assert rows["2"]["hidden_size"] == "24" and rows["3"]["depth"] == "3"
    # The best valid perplexity with 3 decimals, bits with 4; '-' where nothing was recorded.
    metrics = json.loads((store / "1" / "metrics.json").read_text())
    assert rows["1"]["valid.ppl"] == f"{min(metrics['valid.ppl']['values']):.3f}"
    assert re.fullmatch(r"\d+\.\d{4}", rows["1"]["valid.bpc"])
    assert rows["4"]["valid.ppl"] == "-"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", rows["1"]["start"])
    assert re.fullmatch(r"(\d+s|\d+m\d\ds)", rows["1"]["duration"])
    # Off a terminal: no colour codes; the columns line up.
    assert not ANSI.search(output)
    lines = output.splitlines()
    status_at, ppl_end = lines[0].index("status"), lines[0].index("valid.ppl") + len("valid.ppl")
    for line in lines[1:]:
        run = rows[line.split()[0]]
        assert line[status_at:].startswith(run["status"]), line  # left-aligned text
        assert line[:ppl_end].endswith(run["valid.ppl"]), line  # right-aligned numbers


def test_ls_colours_statuses_only_on_a_terminal(store):
    coloured = rhn("ls", runs_dir=store, color=True).stdout
    assert ANSI.search(coloured)
    assert ANSI.sub("", coloured) == ok(rhn("ls", runs_dir=store))


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (["depth=3"], ["3"]),
        (["hidden_size=24"], ["2"]),
        (["depth!=2"], ["3"]),
        (["hidden_size>16"], ["2"]),
        (["hidden_size<24", "depth<3"], ["1", "4", "5"]),
        (["hidden_size>=24"], ["2"]),
        (["model=rhn", "tied=False", "synthetic.order=2"], ["1", "2", "3", "4", "5"]),
        (["model=lstm"], []),
        (["tied=True"], []),
        (["learning_rate=0.5"], ["1", "2", "3", "4", "5"]),
        (["valid.ppl<1000"], ["1", "2", "3", "5"]),
    ],
)
def test_ls_where(store, where, expected):
    args = [arg for condition in where for arg in ("--where", condition)]
    output = ok(rhn("ls", *args, runs_dir=store))
    if expected:
        assert ids(output) == expected
    else:
        assert output.startswith("No run matches (5 recorded in ")


def test_ls_status_name_sort_and_limit(store):
    assert ids(ok(rhn("ls", "--status", "failed", runs_dir=store))) == ["4"]
    both = rhn("ls", "--status", "FAILED", "--status", "Interrupted", runs_dir=store)
    assert ids(ok(both)) == ["4", "5"]
    assert ids(ok(rhn("ls", "--status", "completed,failed", runs_dir=store))) == [
        "1",
        "2",
        "3",
        "4",
    ]
    assert ids(ok(rhn("ls", "--name", "d*", runs_dir=store))) == ["3", "4"]
    assert ids(ok(rhn("ls", "--name", "WIDE", runs_dir=store))) == ["2"]
    assert "(2 of 5 runs in " in ok(rhn("ls", "--name", "d*", runs_dir=store))

    by_ppl = ids(ok(rhn("ls", "--sort", "valid.ppl", runs_dir=store)))
    records = {i: json.loads((store / i / "metrics.json").read_text()) for i in "1235"}
    best = {i: min(m["valid.ppl"]["values"]) for i, m in records.items()}
    assert by_ppl == [*sorted(best, key=best.get), "4"]  # a run without the metric goes last
    assert ids(ok(rhn("ls", "--sort", "-valid.ppl", runs_dir=store)))[:4] == by_ppl[:4][::-1]
    assert ids(ok(rhn("ls", "--sort", "-hidden_size", runs_dir=store)))[0] == "2"
    assert ids(ok(rhn("ls", "--sort", "-depth", runs_dir=store)))[0] == "3"
    assert ids(ok(rhn("ls", "--sort", "name", runs_dir=store))) == ["3", "4", "1", "5", "2"]
    assert ids(ok(rhn("ls", "--sort", "-id", runs_dir=store))) == ["5", "4", "3", "2", "1"]
    assert ids(ok(rhn("ls", "--limit", "2", runs_dir=store))) == ["4", "5"]
    best_two = rhn(
        "ls", "--sort", "valid.ppl", "--status", "completed", "--limit", "2", runs_dir=store
    )
    assert ids(ok(best_two)) == [i for i in by_ppl if i in "123"][:2]


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def ranked(tmp_path) -> Path:
    """Seven runs whose best valid.ppl, test.ppl (at that epoch), throughput, start and
    duration each order them differently; run 4 recorded no metric. Runs 6 and 2 record
    throughput as rhn does now, in info.json; the others as a metric, as it used to."""
    runs_dir = tmp_path / "runs"
    valid = {"1": 95.0, "2": 70.0, "3": 130.0, "5": 80.0, "6": 110.0, "7": 75.0}
    starts = ["1", "7", "3", "5", "2", "6", "4"]  # run 7 second oldest, run 4 newest
    for run_id in "1234567":
        epochs = [valid[run_id] + 20, valid[run_id]] if run_id in valid else None
        run_dir = write_run(runs_dir, run_id, {"model": "rhn", "depth": 8 - int(run_id)}, epochs)
        start = datetime(2026, 1, 2) + timedelta(hours=starts.index(run_id))
        stop = start + timedelta(minutes=10 * ((int(run_id) * 3) % 7 + 1))
        _edit_json(run_dir / "run.json", start_time=start.isoformat(), stop_time=stop.isoformat())
        if run_id in valid:  # test.ppl at the best (last) epoch, lower at the first
            test = {"steps": [1, 2], "values": [10.0, 200 - valid[run_id]]}
            throughput = {"steps": [1, 2], "values": [1000.0 * int(run_id), 5.0]}
            if run_id in "26":
                info = {"throughput": {"tokens_per_s": throughput}}
                (run_dir / "info.json").write_text(json.dumps(info))
                _edit_json(run_dir / "metrics.json", **{"test.ppl": test})
            else:
                metrics = {"test.ppl": test, "tokens_per_s": throughput}
                _edit_json(run_dir / "metrics.json", **metrics)
    return runs_dir


def test_ls_sort_shows_the_best_first_and_limit_takes_the_top(ranked):
    """The README's `--sort valid.ppl --limit 5` gives the five best runs, best first."""
    assert ids(ok(rhn("ls", "--sort", "valid.ppl", "--limit", "5", runs_dir=ranked))) == [
        "2",
        "7",
        "5",
        "1",
        "6",
    ]
    # --desc (or a leading '-') reverses: worst first; a run without the value stays last.
    worst_first = ["3", "6", "1", "5", "7", "2", "4"]
    assert ids(ok(rhn("ls", "--sort", "valid.ppl", "--desc", runs_dir=ranked))) == worst_first
    assert ids(ok(rhn("ls", "--sort", "-valid.ppl", runs_dir=ranked))) == worst_first
    assert ids(ok(rhn("ls", "--sort", "valid.ppl", "--desc", "--limit", "2", runs_dir=ranked))) == [
        "3",
        "6",
    ]
    # test.ppl orders by the value shown (at the best valid epoch), not its own minimum.
    by_test = ok(rhn("ls", "--sort", "test.ppl", runs_dir=ranked))
    assert ids(by_test) == ["3", "6", "1", "5", "7", "2", "4"]
    assert [row["test.ppl"] for row in table(by_test).values()][:2] == ["70.000", "90.000"]
    # Higher is better for throughput; start is newest first, duration longest first.
    assert ids(ok(rhn("ls", "--sort", "tokens_per_s", runs_dir=ranked)))[:3] == ["7", "6", "5"]
    assert ids(ok(rhn("ls", "--sort", "start", runs_dir=ranked))) == starts_newest_first()
    assert ids(ok(rhn("ls", "--sort", "start", "--desc", runs_dir=ranked)))[:2] == ["1", "7"]
    assert ids(ok(rhn("ls", "--sort", "duration", "--limit", "3", runs_dir=ranked))) == [
        "2",
        "4",
        "6",
    ]
    # Config keys ascending; with no --sort, --limit keeps the newest and --desc flips.
    assert ids(ok(rhn("ls", "--sort", "depth", "--limit", "2", runs_dir=ranked))) == ["7", "6"]
    assert ids(ok(rhn("ls", "--limit", "3", runs_dir=ranked))) == ["5", "6", "7"]
    assert ids(ok(rhn("ls", "--limit", "3", "--desc", runs_dir=ranked))) == ["7", "6", "5"]


def starts_newest_first() -> list[str]:
    return ["4", "6", "2", "5", "3", "7", "1"]


def _wide_store(runs_dir: Path) -> Path:
    """Five runs with long names, six differing config keys and a Slurm job each."""
    for index in range(1, 6):
        config = {
            "model": "rhn",
            "dataset": "ptb",
            "depth": index,
            "hidden_size": 100 * index,
            "dropout_input": 0.05 * index,
            "data_path": f"/data/corpora/penn-treebank/copy-{index}/data",
            "learning_rate": index,
            "init_scale": index / 10,
            "seq_len": 30 + index,
        }
        name = f"rhn-depth-{index}-ptb-variational-long-name"
        run_dir = write_run(runs_dir, str(index), config, [200.0 - index, 150.0 - index], name=name)
        info = {"slurm": {"job": f"123456_{index}", "requeues": index % 2}}
        (run_dir / "info.json").write_text(json.dumps(info))
    return runs_dir


def _check_fits(output: str, width: int) -> dict[str, dict[str, str]]:
    """Every line within ``width``; id, status and every metric still there, right."""
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    rows = table(output)
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header[0] == "id" and "status" in header
    assert header[-2:] == ["valid.ppl", "valid.bpc"]  # the metrics these runs recorded
    assert list(rows) == ["1", "2", "3", "4", "5"]
    assert [row["valid.ppl"] for row in rows.values()] == [f"{150.0 - i:.3f}" for i in range(1, 6)]
    assert {row["status"] for row in rows.values()} == {"COMPLETED"}
    return rows


def test_ls_fits_the_width_that_columns_gives(tmp_path):
    runs_dir = _wide_store(tmp_path / "runs")
    full = ok(rhn("ls", runs_dir=runs_dir))  # a pipe: every column, however wide
    assert max(len(line) for line in full.splitlines()) > 120
    assert {"slurm", "depth", "data_path", "duration"} <= set(full.splitlines()[0].split())
    narrow = ok(rhn("ls", runs_dir=runs_dir, env={"COLUMNS": "80"}))
    rows = _check_fits(narrow, 80)
    assert rows["1"]["name"].endswith("…") and rows["1"]["name"].startswith("rhn-depth-1")
    # What gave way is named under the table (wrapped to the width too).
    note = " ".join(line for line in narrow.splitlines() if not line.startswith(("id ", " ")))
    assert "left out to fit 80 columns:" in note
    for key in ("model", "dataset", "slurm job", "data_path"):
        assert key in note and key not in narrow.splitlines()[0]
    assert "also differing: " in note
    # A width with room keeps the differing config values, shortened.
    wider = ok(rhn("ls", runs_dir=runs_dir, env={"COLUMNS": "120"}))
    assert _check_fits(wider, 120)["5"]["depth"] == "5"
    assert "model" in wider and "model" not in wider.splitlines()[0]  # shared: first to go


def test_ls_fits_an_80_column_terminal(tmp_path):
    """``rhn runs ls`` on a real pseudo-terminal of 80 columns, COLUMNS unset."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    runs_dir = _wide_store(tmp_path / "runs")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    unset = {*CLEAN_ENV, "COLUMNS", "LINES"}
    env = {key: value for key, value in os.environ.items() if key not in unset}
    command = [sys.executable, "-m", "rhn_cli", "runs", "ls", "--runs-dir", str(runs_dir)]
    process = subprocess.Popen(
        command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=tmp_path
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait(timeout=60) == 0
    output = ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")
    assert ANSI.search(b"".join(chunks).decode())  # a terminal: statuses coloured
    _check_fits(output, 80)
    assert "left out to fit 80 columns:" in output


def test_ls_json_is_every_field_of_every_run(store):
    records = json.loads(ok(rhn("ls", "--json", runs_dir=store)))
    assert [r["id"] for r in records] == ["1", "2", "3", "4", "5"]
    first = records[0]
    assert first["status"] == "COMPLETED" and first["name"] == "small"
    assert first["config"]["hidden_size"] == 16 and first["config"]["synthetic"]["order"] == 2
    assert datetime.fromisoformat(first["start_time"]).tzinfo is not None
    assert first["duration_s"] > 0
    saved = json.loads((store / "1" / "metrics.json").read_text())
    assert first["metrics"]["valid.ppl"] == {
        "steps": saved["valid.ppl"]["steps"],
        "values": saved["valid.ppl"]["values"],
    }
    assert records[1]["comment"] == "twice as wide"
    assert records[3]["status"] == "FAILED" and records[3]["fail_trace"]
    filtered = json.loads(ok(rhn("ls", "--json", "--where", "depth=3", runs_dir=store)))
    assert [r["id"] for r in filtered] == ["3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--where", "depth"], "--where 'depth': expected KEY=VALUE, KEY!=VALUE, KEY>VALUE"),
        (["--where", "=3"], "expected KEY=VALUE"),
        (["--where", "depth="], "expected KEY=VALUE"),
        (["--where", "depth>deep"], "> compares numbers"),
        (["--where", "dpth=3"], "no run has a config key or metric 'dpth'; did you mean depth"),
        (["--status", "done"], "--status 'done' is not a run status; one of: QUEUED, RUNNING"),
        (["--sort", "valid.pp"], "--sort 'valid.pp': not a metric, config key or one of id"),
    ],
)
def test_ls_bad_options_are_one_line_errors(store, args, message):
    line = error(rhn("ls", *args, runs_dir=store))
    assert message in line
    assert not rhn("ls", *args, runs_dir=store).stdout


def test_ls_without_runs(tmp_path):
    assert ok(rhn("ls", runs_dir=tmp_path / "nothing")).startswith("No runs recorded in ")
    assert json.loads(ok(rhn("ls", "--json", runs_dir=tmp_path / "nothing"))) == []
    (tmp_path / "runs").mkdir()
    assert ok(rhn("ls")).startswith("No runs recorded in runs")  # the default --runs-dir


def test_ls_lists_damaged_run_directories_as_unreadable(store, tmp_path):
    runs_dir = _copy(store, tmp_path)
    (runs_dir / "6").mkdir()  # run.json missing
    (runs_dir / "7").mkdir()
    (runs_dir / "7" / "run.json").write_text('{"status": "COMPL')  # cut short
    (runs_dir / "8").mkdir()
    (runs_dir / "8" / "run.json").write_text((store / "1" / "run.json").read_text())
    (runs_dir / "8" / "config.json").write_text("[1, 2")
    (runs_dir / "9").mkdir()
    (runs_dir / "9" / "run.json").write_text("[]")  # JSON, but not a run
    rows = table(ok(rhn("ls", runs_dir=runs_dir)))
    assert list(rows) == ["1", "2", "3", "4", "5", "6", "7", "8", "9"]  # no _sources
    assert {rows[i]["status"] for i in "6789"} == {"UNREADABLE"}
    assert rows["1"]["status"] == "COMPLETED"
    shown = ok(rhn("show", "7", runs_dir=runs_dir))
    assert "UNREADABLE" in shown and "run.json is not valid JSON" in shown
    assert "run.json is missing" in ok(rhn("show", "6", runs_dir=runs_dir))
    assert "config.json is not valid JSON" in ok(rhn("show", "8", runs_dir=runs_dir))
    assert ids(ok(rhn("ls", "--status", "unreadable", runs_dir=runs_dir))) == list("6789")


def test_a_running_run_without_heartbeat_for_two_minutes_is_probably_dead(tmp_path):
    now = datetime.now(UTC).replace(tzinfo=None)
    config = {"model": "rhn", "depth": 2}
    write_run(tmp_path, "1", config, status="RUNNING", heartbeat=now - timedelta(seconds=10))
    write_run(tmp_path, "2", config, status="RUNNING", heartbeat=now - timedelta(minutes=3))
    rows = table(ok(rhn("ls", runs_dir=tmp_path)))
    assert rows["1"]["status"] == "RUNNING"
    assert rows["2"]["status"] == "PROBABLY_DEAD"
    assert ids(ok(rhn("ls", "--status", "probably_dead", runs_dir=tmp_path))) == ["2"]


# --------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------


def test_show_a_completed_run(store):
    output = ok(rhn("show", "2", runs_dir=store))
    lines = output.splitlines()
    assert lines[0].split() == ["run", "2", "wide", "COMPLETED"]
    for section in ("config", "metrics", "info", "artifacts"):
        assert section in lines, section
    header = dict(
        re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[1 : lines.index("")]
    )
    assert header["comment"] == "twice as wide"
    assert header["command"] == "main"
    assert header["recorded in"] == f"{store / '2'} (file store)"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", header["start"])
    run = json.loads((store / "2" / "run.json").read_text())
    assert header["host"].startswith(run["host"]["hostname"])
    assert re.search(r"^  hidden_size +24$", output, re.M)
    assert re.search(r"^  synthetic\.order +2$", output, re.M)  # nested keys, dotted
    config_lines = lines[lines.index("config") + 1 : lines.index("", lines.index("config"))]
    keys = [line.split()[0] for line in config_lines]
    assert keys == sorted(keys) and len(keys) > 40
    assert f"result  {run['result']:.3f}" in output
    # metrics: last, best, the step of the best, number of points
    metrics = json.loads((store / "2" / "metrics.json").read_text())
    valid = metrics["valid.ppl"]["values"]
    row = next(line for line in lines if line.startswith("  valid.ppl "))
    assert row.split() == [
        "valid.ppl",
        f"{valid[-1]:.3f}",
        f"{min(valid):.3f}",
        str(metrics["valid.ppl"]["steps"][valid.index(min(valid))]),
        str(len(valid)),
    ]
    assert re.search(r"^  nr_parameters +\d+$", output, re.M)
    assert "logs" not in output  # the per-epoch copy of the metrics is left out
    assert re.search(r"^  best_model\.pt +\d+\.\d KiB", output, re.M)
    assert "fail trace" not in output


def test_show_failed_and_interrupted_runs(store):
    failed = ok(rhn("show", "4", runs_dir=store))
    assert failed.splitlines()[0].split() == ["run", "4", "diverged", "FAILED"]
    trace = failed[failed.index("fail trace") :]
    assert "TrainingDiverged: training diverged at epoch 1, step 5" in trace
    stopped = ok(rhn("show", "5", runs_dir=store))
    assert stopped.splitlines()[0].split() == ["run", "5", "stopped", "INTERRUPTED"]
    assert re.search(r"^  checkpoint\.pt +\d+\.\d KiB", stopped, re.M)


def test_show_json_and_several_ids(store):
    record = json.loads(ok(rhn("show", "3", "--json", runs_dir=store)))
    assert record["id"] == "3" and record["config"]["depth"] == 3
    assert {"metrics", "info", "artifacts", "host", "start_time"} <= set(record)
    both = json.loads(ok(rhn("show", "1,3", "--json", runs_dir=store)))
    assert [r["id"] for r in both] == ["1", "3"]


def test_show_unknown_run_names_the_ids_there_are(store, tmp_path):
    line = error(rhn("show", "9", runs_dir=store))
    assert line == f"Error: no run '9' in {store} (ids: 1-5)"
    assert error(rhn("show", "x", runs_dir=store)).startswith("Error: no run 'x' in ")
    empty = error(rhn("show", "1", runs_dir=tmp_path / "none"))
    assert empty == f"Error: no run '1' in {tmp_path / 'none'} (it holds no runs)"
    assert error(rhn("show", "1-3,40", runs_dir=store)).startswith("Error: no run '40'")


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------


def _rows(output: str) -> dict[str, list[str]]:
    return {
        re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[1:]
        for line in output.splitlines()
        if line.strip()
    }


def test_compare_shows_only_differing_config_then_results(store):
    output = ok(rhn("compare", "1", "2", "3", runs_dir=store))
    rows = _rows(output)
    assert rows["run"] == ["1", "2", "3"]
    assert rows["name"] == ["small", "wide", "deep"]
    assert rows["status"] == ["COMPLETED"] * 3
    assert rows["depth"] == ["2", "2", "3"]
    assert rows["hidden_size"] == ["16", "24", "16"]
    assert "seed" in rows  # drawn at random, so it differs
    assert "batch_size" not in rows and "model" not in rows
    summaries = json.loads(ok(rhn("ls", "--json", runs_dir=store)))
    best = [min(r["metrics"]["valid.ppl"]["values"]) for r in summaries[:3]]
    assert rows["best valid.ppl"] == [f"{v:.3f}" for v in best]
    assert rows["best epoch"] == [
        str(r["metrics"]["valid.ppl"]["steps"][r["metrics"]["valid.ppl"]["values"].index(b)])
        for r, b in zip(summaries[:3], best, strict=True)
    ]
    assert rows["epochs"] == ["2", "2", "2"]
    for label in ("test.ppl at best", "full_test.ppl", "duration"):
        assert len(rows[label]) == 3, label
    # config rows come before metric rows
    lines = [line.strip() for line in output.splitlines()]
    assert lines.index("config") < lines.index("metrics")
    assert output.index("hidden_size") < output.index("best valid.ppl")


def test_compare_all_keys_ranges_and_json(store):
    rows = _rows(ok(rhn("compare", "1-2", "--all", runs_dir=store)))
    assert rows["run"] == ["1", "2"]
    assert rows["batch_size"] == ["50", "50"] and rows["synthetic.order"] == ["2", "2"]
    ranged = _rows(ok(rhn("compare", "3-5", runs_dir=store)))
    assert ranged["run"] == ["3", "4", "5"]
    assert ranged["status"] == ["COMPLETED", "FAILED", "INTERRUPTED"]
    assert ranged["best valid.ppl"][1] == "-"
    assert _rows(ok(rhn("compare", "5,1", runs_dir=store)))["run"] == ["5", "1"]
    data = json.loads(ok(rhn("compare", "1", "3", "--json", runs_dir=store)))
    assert data["runs"] == ["1", "3"]
    assert data["config"]["depth"] == [2, 3]
    assert "hidden_size" not in data["config"]
    assert len(data["metrics"]["best valid.ppl"]) == 2


def test_compare_needs_two_runs_that_exist(store):
    assert "needs at least two runs" in error(rhn("compare", "1", runs_dir=store))
    assert error(rhn("compare", "1", "12", runs_dir=store)) == (
        f"Error: no run '12' in {store} (ids: 1-5)"
    )


def test_compare_ten_runs_stays_readable(tmp_path):
    """The depth table of the RHN paper: ten runs, depth 1..10, in one comparison."""
    for depth in range(1, 11):
        valid = [200.0 / depth + 60, 150.0 / depth + 60]
        config = {
            "model": "rhn",
            "dataset": "ptb",
            "depth": depth,
            "hidden_size": 830,
            "data_path": f"/data/corpora/penn-treebank/copy-{depth}/data",
            "synthetic": {"order": 2},
        }
        write_run(tmp_path, str(depth), config, valid, name=f"rhn-depth-{depth}-ptb-variational")
    output = ok(rhn("compare", "1-10", runs_dir=tmp_path))
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= 150, max(lines, key=len)
    rows = _rows(output)
    assert rows["run"] == [str(d) for d in range(1, 11)]
    assert rows["depth"] == [str(d) for d in range(1, 11)]
    assert rows["best valid.ppl"] == [f"{150.0 / d + 60:.3f}" for d in range(1, 11)]
    # The shared prefix of long names and values gives way to what tells them apart.
    assert rows["name"] == [f"…{d}-ptb-va…" if d < 10 else "…10-ptb-v…" for d in range(1, 11)]
    assert rows["data_path"][0] == "…1/data" and rows["data_path"][9] == "…10/data"
    assert "hidden_size" not in rows and "synthetic.order" not in rows
    # every value is right-aligned under its run id
    ends = [m.end() for m in re.finditer(r"\S+", lines[0])][1:]
    depth_line = next(line for line in lines if line.strip().startswith("depth "))
    assert [m.end() for m in re.finditer(r"\S+", depth_line)][1:] == ends


# --------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------


def _read_image(path: Path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_plot_writes_a_png_of_several_runs(store, tmp_path):
    result = rhn("plot", "1-3", "5", runs_dir=store)
    path = Path(ok(result).strip())
    assert path == Path("curves.png") and (tmp_path / "curves.png").is_file()
    data = (tmp_path / "curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    image = _read_image(tmp_path / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(tmp_path.glob(".curves.png*"))  # no temporary file left behind

    out = tmp_path / "plots" / "two.png"
    out.parent.mkdir()
    args = ["plot", "1", "2", "--metric", "valid.ppl", "--metric", "lr", "-o", str(out), "--log"]
    ok(rhn(*args, runs_dir=store))
    two = _read_image(out)
    assert two.shape[0] > image.shape[0] * 1.5  # one subplot per metric, stacked


def test_plot_errors(store, tmp_path):
    line = error(rhn("plot", "1", "4", runs_dir=store))
    assert line == ("Error: run 4 (diverged) has no metric 'valid.ppl'; it has no metrics recorded")
    line = error(rhn("plot", "1", "--metric", "valid.ppx", runs_dir=store))
    assert "run 1 (small) has no metric 'valid.ppx'; it has " in line
    assert "valid.ppl" in line and "train.ppl" in line
    assert "ending in .png, .svg, .pdf" in error(rhn("plot", "1", "-o", "x.gif", runs_dir=store))
    assert error(rhn("plot", "8", runs_dir=store)).startswith("Error: no run '8'")
    assert not (tmp_path / "curves.png").exists()


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


def test_export_csv_has_one_row_per_run_with_flattened_config(store, tmp_path):
    assert ok(rhn("export", "-o", "runs.csv", runs_dir=store)).strip() == (
        "wrote 5 runs to runs.csv"
    )
    with open(tmp_path / "runs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == ["1", "2", "3", "4", "5"]
    header = list(rows[0])
    assert header[:3] == ["id", "name", "status"]
    assert {"config.depth", "config.hidden_size", "config.synthetic.order"} <= set(header)
    assert {"valid.ppl.best", "valid.ppl.last", "result", "best_epoch"} <= set(header)
    assert rows[1]["config.hidden_size"] == "24" and rows[2]["config.depth"] == "3"
    assert rows[3]["status"] == "FAILED" and rows[3]["valid.ppl.best"] == ""
    run = json.loads((store / "1" / "run.json").read_text())
    assert float(rows[0]["result"]) == run["result"]
    metrics = json.loads((store / "1" / "metrics.json").read_text())
    assert float(rows[0]["valid.ppl.best"]) == min(metrics["valid.ppl"]["values"])

    some = ok(rhn("export", "3", "1", "-o", "-", "--format", "csv", runs_dir=store))
    assert [row["id"] for row in csv.DictReader(io.StringIO(some))] == ["3", "1"]


def test_export_json_round_trips_the_records(store, tmp_path):
    ok(rhn("export", "1-2", "-o", str(tmp_path / "runs.json"), runs_dir=store))
    records = json.loads((tmp_path / "runs.json").read_text())
    assert [r["id"] for r in records] == ["1", "2"]
    for record in records:
        saved = json.loads((store / record["id"] / "metrics.json").read_text())
        config = json.loads((store / record["id"] / "config.json").read_text())
        info = json.loads((store / record["id"] / "info.json").read_text())
        saved.update(info["throughput"])  # rhn's metric tokens_per_s, kept in the info
        assert record["config"] == config
        assert {n: s["values"] for n, s in record["metrics"].items()} == {
            n: s["values"] for n, s in saved.items()
        }
    assert records == json.loads(ok(rhn("show", "1,2", "--json", runs_dir=store)))


def test_export_bad_format(store, tmp_path):
    line = error(rhn("export", "-o", "runs.txt", runs_dir=store))
    assert "'runs.txt'" in line and ".csv or .json" in line
    assert "--format csv|json" in error(rhn("export", "-o", "-", runs_dir=store))
    assert not (tmp_path / "runs.txt").exists()


# --------------------------------------------------------------------------------------
# rm
# --------------------------------------------------------------------------------------


def test_rm_asks_first_and_removes_only_on_yes(store, tmp_path):
    runs_dir = _copy(store, tmp_path)
    declined = rhn("rm", "4", "5", runs_dir=runs_dir, input="n\n")
    assert declined.exit_code == 1
    assert "diverged" in declined.stdout and "INTERRUPTED" in declined.stdout
    assert f"Remove these 2 runs from {runs_dir}?" in declined.stdout
    assert (runs_dir / "4").is_dir() and (runs_dir / "5").is_dir()

    confirmed = rhn("rm", "4", runs_dir=runs_dir, input="y\n")
    assert "removed run 4 (diverged)" in ok(confirmed)
    assert not (runs_dir / "4").exists()

    assert "removed run 5 (stopped)" in ok(rhn("rm", "5", "--yes", runs_dir=runs_dir))
    assert sorted(p.name for p in runs_dir.iterdir()) == ["1", "2", "3", "_sources"]
    assert ids(ok(rhn("ls", runs_dir=runs_dir))) == ["1", "2", "3"]
    assert error(rhn("rm", "4", "--yes", runs_dir=runs_dir)) == (
        f"Error: no run '4' in {runs_dir} (ids: 1-3)"
    )


def test_rm_refuses_a_run_that_is_still_running(tmp_path):
    now = datetime.now(UTC).replace(tzinfo=None)
    write_run(tmp_path, "1", {"depth": 2}, status="RUNNING", heartbeat=now)
    write_run(tmp_path, "2", {"depth": 2}, status="RUNNING", heartbeat=now - timedelta(hours=1))
    line = error(rhn("rm", "1", "2", "--yes", runs_dir=tmp_path), code=1)
    assert "run 1 is RUNNING (last heartbeat" in line and "stop it first" in line
    assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()  # neither removed
    assert "removed run 2" in ok(rhn("rm", "2", "--yes", runs_dir=tmp_path))  # PROBABLY_DEAD


# --------------------------------------------------------------------------------------
# MongoDB
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_read_from_mongodb(tmp_path, mongo_url):  # noqa: F811
    import pymongo
    import torch

    url = f"{mongo_url}/runs_cli"
    runs_dir = tmp_path / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in (["--name", "m1"], ["hidden_size=20", "--name", "m2"]):
            _train(runs_dir, *args, "--mongo", url)
    finally:
        torch.set_num_threads(threads)

    from_mongo = table(ok(rhn("ls", "--mongo", url)))
    from_files = table(ok(rhn("ls", runs_dir=runs_dir)))
    assert list(from_mongo) == ["1", "2"]
    for run_id in ("1", "2"):  # the same runs, read back the same
        for column in ("name", "status", "hidden_size", "valid.ppl", "test.ppl", "full_test.ppl"):
            assert from_mongo[run_id][column] == from_files[run_id][column], column
    records = json.loads(ok(rhn("ls", "--json", runs_dir=None, env={"RHN_MONGO_URL": url})))
    assert [r["id"] for r in records] == [1, 2]  # MongoDB's integer ids
    assert records[0]["source"] == "mongo" and records[0]["location"].startswith("MongoDB ")
    saved = json.loads((runs_dir / "1" / "metrics.json").read_text())
    assert records[0]["metrics"]["valid.ppl"]["values"] == saved["valid.ppl"]["values"]

    shown = ok(rhn("show", "2", "--mongo", url))
    assert shown.splitlines()[0].split() == ["run", "2", "m2", "COMPLETED"]
    assert f"MongoDB {url} (database runs_cli)" in shown
    assert re.search(r"^  valid\.ppl +\d", shown, re.M)
    assert _rows(ok(rhn("compare", "1", "2", "--mongo", url)))["hidden_size"] == ["16", "20"]
    ok(rhn("plot", "1", "2", "--mongo", url, "-o", "mongo.png"))
    assert (tmp_path / "mongo.png").read_bytes().startswith(PNG_MAGIC)
    assert error(rhn("show", "3", "--mongo", url)) == (
        f"Error: no run '3' in MongoDB {url} (database runs_cli) (ids: 1-2)"
    )

    # rm deletes the run document and its metrics; the other run keeps its own.
    assert "removed run 2 (m2)" in ok(rhn("rm", "2", "--yes", "--mongo", url))
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    try:
        db = client["runs_cli"]
        assert [d["_id"] for d in db.runs.find({}, {"_id": 1})] == [1]
        assert db.metrics.count_documents({"run_id": 2}) == 0
        assert db.metrics.count_documents({"run_id": 1}) > 0
    finally:
        client.close()
    assert (runs_dir / "2").is_dir()  # the file store keeps its copy


def test_mongodb_that_does_not_answer_is_one_line(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        url = f"mongodb://user:secret@127.0.0.1:{port}/rhn"
        result = rhn("ls", "--mongo", url)
    line = error(result, code=1)
    assert line.startswith(f"Error: MongoDB at mongodb://user:***@127.0.0.1:{port}/rhn: ")
    assert "secret" not in result.output
