"""``rhn sweep``: expansion, --dry-run, real sweeps of tiny runs (tagged, compared,
resumed after an interruption), run tags in the file store and in MongoDB."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.experiment.sweep import SweepError, default_name, expand
from tests.conftest import FAST_RUN
from tests.sweep_processes import QUICK
from tests.sweep_processes import sweep_environment as _env
from tests.test_mongo_recording import mongo_url  # noqa: F401  (a fixture)


def _run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# --------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------


def test_product_crosses_the_lists_first_key_slowest():
    sweep = expand(["with", "tiny", "depth=[1,2]", "hidden_size=[8,16,24]"], name="s")
    assert sweep.keys == ["depth", "hidden_size"]
    assert [p.values for p in sweep.points] == [
        (("depth", d), ("hidden_size", h)) for d in (1, 2) for h in (8, 16, 24)
    ]
    first = sweep.points[0]
    assert first.tokens == ("tiny", "depth=1", "hidden_size=8")
    assert first.config["depth"] == 1 and first.config["hidden_size"] == 8
    assert first.title == "point 1/6 depth=1 hidden_size=8"


def test_zip_pairs_the_lists_and_keeps_fixed_updates_as_typed():
    sweep = expand(
        ["tiny", "learning_rate=1e-1", "depth=[1,2,3]", "hidden_size=[12,10,8]"], "zip", "s"
    )
    assert [p.label for p in sweep.points] == [
        "depth=1 hidden_size=12",
        "depth=2 hidden_size=10",
        "depth=3 hidden_size=8",
    ]
    assert sweep.points[2].tokens == ("tiny", "learning_rate=1e-1", "depth=3", "hidden_size=8")


def test_nested_keys_and_mixed_dict_tokens_are_swept():
    sweep = expand(["synthetic={'order': [1, 2], 'branching': 2}"], name="s")
    assert sweep.keys == ["synthetic.order"]
    assert sweep.points[1].tokens == ("synthetic.branching=2", "synthetic.order=2")
    assert sweep.points[1].config["synthetic"]["order"] == 2


@pytest.mark.parametrize(
    ("tokens", "mode", "message"),
    [
        (["depth=[1,2]", "hidden_size=[8,16,24]"], "zip", "depth has 2, hidden_size has 3"),
        (["tiny", "depth=3"], "product", "nothing to sweep"),
        (["depth=[]"], "product", "depth=[]: a swept key needs at least one value"),
        (["depth=[1,1]"], "product", "gives 1 more than once"),
        (["depth=[1,2]", "depth=3"], "product", "depth is set twice"),
        (["depth=[1,0]"], "product", "point 2/2 (depth=0): depth=0"),
        (["dept=[1,2]"], "product", "did you mean 'depth'"),
        (["model='gru'", "depth=[1,2]"], "product", "has no effect on model='gru'"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_runs(tokens, mode, message):
    with pytest.raises(SweepError) as caught:
        expand(tokens, mode, "s")
    assert message in str(caught.value)


def test_default_name_is_configs_keys_and_date():
    assert (
        default_name(["ptb_sota", "my/file.yaml"], ["depth", "hidden_size"], date(2025, 6, 12))
        == "ptb_sota-file-depth-hidden_size-2025-06-12"
    )
    assert expand(["tiny", "depth=[1,2]"]).name == f"tiny-depth-{date.today().isoformat()}"


def test_invalid_point_exits_2_with_one_line_and_records_nothing(runner, tmp_path):
    result = runner.invoke(
        cli, ["sweep", "--runs-dir", str(tmp_path / "runs"), "with", "tiny", "depth=[2,0]"]
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [
        "Error: point 2/2 (depth=0): depth=0 (from the command line): expected at least 1"
    ]
    assert not (tmp_path / "runs").exists()


def test_zip_of_unequal_lists_names_the_lengths(runner):
    result = runner.invoke(cli, ["sweep", "--zip", "with", "depth=[1,2]", "hidden_size=[8]"])
    assert result.exit_code == 2
    assert "depth has 2, hidden_size has 1" in result.output


def test_sweep_help_has_examples_and_imports_neither_torch_nor_sacred():
    code = (
        "import sys; from rhn_cli.cli import cli\n"
        "try:\n    cli(['sweep', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'sacred') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "rhn sweep with tiny 'hidden_size=[8,16,32]'" in out.stdout
    assert "--zip" in out.stdout and "--dry-run" in out.stdout and "--jobs" in out.stdout


# --------------------------------------------------------------------------------------
# --dry-run
# --------------------------------------------------------------------------------------


def test_dry_run_prints_one_pasteable_train_command_per_point(runner, tmp_path):
    runs = str(tmp_path / "my runs")
    result = runner.invoke(
        cli,
        [
            "sweep",
            "--dry-run",
            "--name",
            "grid",
            "--runs-dir",
            runs,
            "--mongo",
            "none",
            "with",
            "tiny",
            "dataset='synthetic'",
            "depth=[1,2]",
            "hidden_size=[8,16]",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    commands = [shlex.split(line) for line in lines]
    for command in commands:
        start = command.index("train")
        assert command[:start] in (["rhn"], [sys.executable, "-m", "rhn_cli"])
        assert command[start:start + 7] == [
            "train", "--tag", "grid", "--runs-dir", runs, "--mongo", "none"
        ]  # fmt: skip
    assert [c[c.index("with") :] for c in commands] == [
        ["with", "tiny", "dataset='synthetic'", f"depth={d}", f"hidden_size={h}"]
        for d in (1, 2)
        for h in (8, 16)
    ]
    assert not Path(runs).exists()


def test_dry_run_leaves_out_runs_dir_and_mongo_when_not_given(runner):
    result = runner.invoke(cli, ["sweep", "--dry-run", "--name", "g", "with", "depth=[1,2]"])
    assert result.exit_code == 0
    for line in result.stdout.splitlines():
        assert "--runs-dir" not in line and "--mongo" not in line
        assert line.endswith(("with depth=1", "with depth=2"))


# --------------------------------------------------------------------------------------
# Real sweeps
# --------------------------------------------------------------------------------------


def _invoke(runner, *args: str, expect: int = 0):
    result = runner.invoke(cli, list(args))
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture
def one_thread(monkeypatch):
    """Children train on one core each (two cores, other tests running)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_sweep_of_three_points_resumes_after_the_first(runner, tmp_path, one_thread):
    """The acceptance test: the first point ran (by hand, tagged, as an interrupted sweep
    would have left it); the sweep runs only the missing two, tags all three and ends
    with their comparison table. Runs 'rhn runs ls/compare --tag' on the result."""
    runs = tmp_path / "runs"
    _invoke(
        runner, "train", "--tag", "acc", "--runs-dir", str(runs), "with", *QUICK, "hidden_size=8"
    )
    assert _run_json(runs / "1")["meta"]["tags"] == ["acc"]

    sweep_args = ["sweep", "--name", "acc", "--runs-dir", str(runs), "with", *QUICK]
    text = _invoke(runner, *sweep_args, "hidden_size=[8,12,16]").stdout
    assert "point 1/3 hidden_size=8: already completed as run 1" in text
    assert text.count(": starting") == 2
    assert "point 2/3 hidden_size=12: COMPLETED as run 2, best valid ppl" in text
    assert "point 3/3 hidden_size=16: COMPLETED as run 3, best valid ppl" in text
    assert "epoch   1/1" in text  # the children's output, streamed (one job)
    table = text[text.index("sweep acc (rhn runs compare --tag acc):") :]
    assert table.splitlines()[1].split() == ["run", "1", "2", "3"]
    assert [line.split() for line in table.splitlines() if "hidden_size" in line] == [
        ["hidden_size", "8", "12", "16"]
    ]
    assert "best valid.ppl" in table
    assert text.rstrip().endswith("sweep acc: all 3 points completed")
    for run_id in ("1", "2", "3"):
        assert _run_json(runs / run_id)["meta"]["tags"] == ["acc"]
    logs = sorted(p.name for p in (runs / "_sweeps" / "acc").iterdir())
    assert logs == ["point-2.log", "point-3.log", "sweep.json"]  # sweep.json: its record

    # 'rhn sweep status' reads the sweep's record and its runs.
    status = _invoke(runner, "sweep", "status", "acc", "--runs-dir", str(runs)).stdout
    assert "point 1/3 hidden_size=8: completed as run 1, best valid ppl" in status
    assert "point 3/3 hidden_size=16: completed as run 3, best valid ppl" in status
    assert status.rstrip().endswith("sweep acc: 3 points: 3 completed")

    # Everything is done now: a re-run runs nothing; a dry run prints no command.
    again = _invoke(runner, *sweep_args, "hidden_size=[8,12,16]").stdout
    assert ": starting" not in again and again.count("already completed") == 3
    dry = _invoke(runner, *sweep_args, "hidden_size=[8,12,16,20]", "--dry-run")
    assert len(dry.stdout.splitlines()) == 1 and dry.stdout.strip().endswith("hidden_size=20")
    assert "# point 3/4 hidden_size=16: already completed as run 3" in dry.stderr

    # A run with another tag is not the sweep's.
    _invoke(runner, "train", "--tag", "other", "--runs-dir", str(runs), "with", *QUICK)
    listed = _invoke(runner, "runs", "ls", "--tag", "acc", "--runs-dir", str(runs)).output
    assert [line.split()[0] for line in listed.splitlines()[1:4]] == ["1", "2", "3"]
    assert "(3 of 4 runs in" in listed
    compared = _invoke(runner, "runs", "compare", "--tag", "acc", "--runs-dir", str(runs))
    assert compared.output.splitlines()[0].split() == ["run", "1", "2", "3"]
    shown = _invoke(runner, "runs", "ls", "--tag", "other", "--json", "--runs-dir", str(runs))
    assert [(r["id"], r["tags"]) for r in json.loads(shown.output)] == [("4", ["other"])]
    none = _invoke(runner, "runs", "compare", "--tag", "nope", "--runs-dir", str(runs), expect=1)
    assert "no run tagged 'nope'" in none.output


def test_ctrl_c_interrupts_the_sweep_and_a_rerun_resumes_the_stopped_point(
    runner, tmp_path, one_thread
):
    runs = tmp_path / "runs"
    args = ["sweep", "--name", "stop", "--runs-dir", str(runs), "with", *QUICK]
    args += ["max_max_epoch=40", "hidden_size=[8,12]"]
    process = subprocess.Popen(
        [sys.executable, "-m", "rhn_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "epoch   2/40" in line:  # point 1 is training: Ctrl-C
            process.send_signal(signal.SIGINT)
            break
    rest, errors = process.communicate(timeout=60)
    text = "".join(seen) + rest
    assert process.returncode == 130, text + errors
    assert "point 1/2 hidden_size=8: INTERRUPTED as run 1" in text
    assert "hidden_size=12" not in text  # the second point never started
    assert "Continue with:" in errors and "sweep --name stop" in errors
    assert (runs / "1" / "checkpoint.pt").is_file()
    assert not (runs / "2").exists()

    again = _invoke(runner, *args).stdout
    assert "point 1/2 hidden_size=8: resuming run 1" in again
    assert "point 1/2 hidden_size=8: COMPLETED as run 1" in again
    assert "point 2/2 hidden_size=12: COMPLETED as run 2" in again
    resumed = _run_json(runs / "1")
    assert resumed["status"] == "COMPLETED" and resumed["meta"]["tags"] == ["stop"]
    assert len(resumed["meta"]["resumed_at"]) == 1
    assert sorted(p.name for p in runs.iterdir() if p.name.isdigit()) == ["1", "2"]


def test_parallel_sweep_goes_on_past_a_failed_point_and_exits_1(runner, tmp_path, one_thread):
    # A valid split of 1,000 tokens is a valid config but too short to evaluate: the
    # point fails (rhn train refuses it before recording a run).
    runs = tmp_path / "runs"
    quick = [token for token in QUICK if not token.startswith("synthetic.valid_tokens")]
    args = ["sweep", "--name", "par", "--jobs", "2", "--runs-dir", str(runs), "with", *quick]
    out = _invoke(runner, *args, "synthetic.valid_tokens=[1000,2000]", expect=1)
    assert "point 1/2 synthetic.valid_tokens=1000: FAILED" in out.stdout
    assert "point 2/2 synthetic.valid_tokens=2000: COMPLETED as run" in out.stdout
    assert "too few for one minibatch" in out.stdout  # the failed child's last line
    assert "epoch   1/1" not in out.stdout  # parallel: the children's output is in logs
    assert out.stderr.strip().splitlines()[-1] == (
        "Error: 1 of 2 points did not complete: point 1/2 synthetic.valid_tokens=1000 (FAILED)"
    )
    assert "epoch   1/1" in (runs / "_sweeps" / "par" / "point-2.log").read_text()


# --------------------------------------------------------------------------------------
# Tags in MongoDB, where Omniboard shows them
# --------------------------------------------------------------------------------------


def test_train_tags_are_omniboard_tags_in_mongodb(runner, tmp_path, mongo_url):  # noqa: F811
    import pymongo

    url = f"{mongo_url}/tagged"
    result = runner.invoke(
        cli,
        ["train", "--tag", "a", "--tag", "b", "--tag", "a", "--runs-dir", str(tmp_path / "runs")]
        + ["--mongo", url, "with", *FAST_RUN, "max_max_epoch=1"],
    )
    assert result.exit_code == 0, result.output
    client = pymongo.MongoClient(url)
    try:
        doc = client["tagged"].runs.find_one({})
        assert doc["omniboard"]["tags"] == ["a", "b"]
        assert doc["meta"]["tags"] == ["a", "b"]
        # A tag edited in Omniboard is what rhn runs --mongo then sees.
        client["tagged"].runs.update_one({"_id": doc["_id"]}, {"$set": {"omniboard.tags": ["c"]}})
    finally:
        client.close()
    listed = runner.invoke(cli, ["runs", "ls", "--tag", "c", "--mongo", url, "--json"])
    assert [r["tags"] for r in json.loads(listed.output)] == [["c"]]
    local = runner.invoke(cli, ["runs", "ls", "--tag", "b", "--runs-dir", str(tmp_path / "runs")])
    assert "COMPLETED" in local.output

    # A run recorded offline gets its Omniboard tags when 'rhn runs sync' pushes it.
    offline = str(tmp_path / "offline")
    train = ["train", "--tag", "late", "--runs-dir", offline, "with", *FAST_RUN, "max_max_epoch=1"]
    assert runner.invoke(cli, train).exit_code == 0
    synced = runner.invoke(
        cli, ["runs", "sync", "--mongo", f"{mongo_url}/later"] + ["--runs-dir", offline]
    )
    assert synced.exit_code == 0, synced.output
    client = pymongo.MongoClient(mongo_url)
    try:
        assert client["later"].runs.find_one({})["omniboard"] == {"tags": ["late"]}
    finally:
        client.close()


def test_bad_tag_is_refused(runner, tmp_path):
    result = runner.invoke(cli, ["train", "--tag", " ", "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--tag ' ': expected a non-empty tag" in result.output
    assert not (tmp_path / "r").exists()
