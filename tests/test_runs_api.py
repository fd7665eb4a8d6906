"""Runs in Python (issue 20, item 9): ``rhn_cli.tracking.frames.load_runs`` and
``load_metrics`` give pandas DataFrames of runs recorded by real ``rhn train`` runs, in
the file store and in MongoDB (a real SecantusDB server), and ``rhn runs export``'s CSV
is the same table."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas
import pytest

from rhn_cli.tracking.frames import load_metrics, load_records, load_runs, runs_frame
from rhn_cli.tracking.records import QueryError, RunSelectionError
from tests.test_mongo_recording import mongo_url  # noqa: F401  (a fixture)
from tests.test_runs_cli import _train, ok, rhn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """runs/1 small; 2 deep (depth=3) and 3 wide (hidden_size=24), both tagged sweep-a."""
    import torch

    runs_dir = tmp_path_factory.mktemp("api") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(runs_dir, "--name", "small", "--mongo", "none")
        _train(runs_dir, "depth=3", "--name", "deep", "--tag", "sweep-a", "--mongo", "none")
        _train(runs_dir, "hidden_size=24", "--name", "wide", "--tag", "sweep-a", "--mongo", "none")
    finally:
        torch.set_num_threads(threads)
    return runs_dir


def _saved(runs_dir: Path, run_id: int, name: str) -> dict:
    return json.loads((runs_dir / str(run_id) / name).read_text())


def _best_valid(metrics: dict) -> tuple[int, float]:
    """(epoch, value) of the lowest valid.ppl in a metrics.json."""
    series = metrics["valid.ppl"]
    value = min(series["values"])
    return series["steps"][series["values"].index(value)], value


def test_load_runs_has_a_row_per_run_with_config_and_results(store):
    runs = load_runs(store)
    assert runs.index.name == "id" and list(runs.index) == [1, 2, 3]
    assert list(runs["name"]) == ["small", "deep", "wide"]
    assert list(runs["status"]) == ["COMPLETED"] * 3
    assert list(runs["config.depth"]) == [2, 3, 2]
    assert list(runs["config.hidden_size"]) == [16, 16, 24]
    assert runs.loc[1, "tags"] == [] and runs.loc[2, "tags"] == ["sweep-a"]
    for run_id in (1, 2, 3):
        config, run = _saved(store, run_id, "config.json"), _saved(store, run_id, "run.json")
        metrics = _saved(store, run_id, "metrics.json")
        row = runs.loc[run_id]
        assert row["config.synthetic.order"] == config["synthetic"]["order"]
        assert row["result"] == run["result"]
        epoch, best = _best_valid(metrics)
        assert row["valid.ppl"] == best and row["best_epoch"] == epoch
        test = metrics["test.ppl"]
        assert row["test.ppl"] == test["values"][test["steps"].index(epoch)]
        assert row["valid.bpc"] == min(metrics["valid.bpc"]["values"])
        throughput = _saved(store, run_id, "info.json")["throughput"]["tokens_per_s"]
        assert "tokens_per_s" not in metrics  # kept out of what Omniboard plots
        assert row["tokens_per_s.last"] == throughput["values"][-1]
        assert row["start_time"] == pandas.Timestamp(run["start_time"], tz="UTC")
    assert str(runs["start_time"].dt.tz) == "UTC"
    assert runs["duration_s"].gt(0).all()
    # Without info.published, no published column; the table is still usable.
    assert not [c for c in runs.columns if c.startswith("published")]
    assert runs.sort_values("valid.ppl").index[0] == runs["valid.ppl"].idxmin()


def test_load_runs_chooses_runs_as_the_command_line_does(store):
    assert list(load_runs(store, ids="3,1").index) == [3, 1]
    assert list(load_runs(store, ids=[2, "3"]).index) == [2, 3]
    assert list(load_runs(store, ids="1-2").index) == [1, 2]
    assert list(load_runs(store, tag="sweep-a").index) == [2, 3]
    assert list(load_runs(store, where="depth=3").index) == [2]
    assert list(load_runs(store, where=["depth=2", "hidden_size>16"]).index) == [3]
    assert list(load_runs(store, status="completed").index) == [1, 2, 3]
    assert load_runs(store, status="FAILED").empty
    assert list(load_runs(store, status="FAILED").columns[:3]) == ["name", "status", "start_time"]
    with pytest.raises(RunSelectionError, match="no run '9'"):
        load_runs(store, ids=9)
    with pytest.raises(QueryError, match="did you mean depth"):
        load_runs(store, where="dept=3")
    with pytest.raises(QueryError, match="not a run status"):
        load_runs(store, status="done")


def test_published_targets_are_columns_beside_the_results(store, tmp_path):
    """A run whose info records the published figures of the paper its config
    reproduces gets published.METRIC columns; the others have none (NaN)."""
    runs_dir = tmp_path / "runs"
    shutil.copytree(store, runs_dir)
    info = _saved(runs_dir, 2, "info.json")
    info["published"] = {"valid.ppl": 67.9, "test": {"ppl": 65.4}, "source": "Zilly et al."}
    (runs_dir / "2" / "info.json").write_text(json.dumps(info))

    runs = load_runs(runs_dir)
    assert runs.loc[2, "published.valid.ppl"] == 67.9
    assert runs.loc[2, "published.test.ppl"] == 65.4
    assert runs.loc[2, "published.source"] == "Zilly et al."
    assert math.isnan(runs.loc[1, "published.valid.ppl"])
    gap = (runs["test.ppl"] / runs["published.test.ppl"] - 1) * 100
    assert gap.notna().tolist() == [False, True, False]

    ok(rhn("export", "-o", str(tmp_path / "runs.csv"), runs_dir=runs_dir))
    exported = pandas.read_csv(tmp_path / "runs.csv", index_col="id")
    assert exported.loc[2, "published.test.ppl"] == 65.4


def test_load_metrics_gives_every_point_with_dotted_names_usable(store):
    points = load_metrics(store)
    assert list(points.columns) == ["id", "metric", "step", "value"]
    for run_id in (1, 2, 3):
        for name, series in _saved(store, run_id, "metrics.json").items():
            mine = points[(points["id"] == run_id) & (points["metric"] == name)]
            assert mine["step"].tolist() == series["steps"]
            assert mine["value"].tolist() == pytest.approx(series["values"])
        # Throughput, recorded in the info, is a metric here as it always was.
        series = _saved(store, run_id, "info.json")["throughput"]["tokens_per_s"]
        mine = points[(points["id"] == run_id) & (points["metric"] == "tokens_per_s")]
        assert mine["step"].tolist() == series["steps"] == [1, 2]
        assert mine["value"].tolist() == series["values"]

    wide = load_metrics(store, tag="sweep-a", metrics=["valid.ppl", "lr"], wide=True)
    assert list(wide.columns) == ["lr", "valid.ppl"]
    assert wide.index.names == ["id", "step"]
    curves = wide["valid.ppl"].unstack("id")  # epochs down, one column per run
    assert list(curves.columns) == [2, 3]
    saved = _saved(store, 3, "metrics.json")["valid.ppl"]
    assert curves[3].tolist() == pytest.approx(saved["values"])
    assert (
        wide.loc[(2, 1), "valid.ppl"] == _saved(store, 2, "metrics.json")["valid.ppl"]["values"][0]
    )


def test_export_csv_is_the_load_runs_table(store, tmp_path):
    ok(rhn("export", "--tag", "sweep-a", "-o", str(tmp_path / "runs.csv"), runs_dir=store))
    exported = pandas.read_csv(tmp_path / "runs.csv", index_col="id")
    runs = load_runs(store, tag="sweep-a")
    assert list(exported.columns) == list(runs.columns)
    assert list(exported.index) == [2, 3]
    numeric = [c for c in runs.columns if pandas.api.types.is_float_dtype(runs[c])]
    assert {"valid.ppl", "test.ppl", "valid.bpc", "result", "valid.ppl.best"} <= set(numeric)
    pandas.testing.assert_frame_equal(exported[numeric], runs[numeric])
    assert exported.loc[3, "tags"] == '["sweep-a"]'
    assert pandas.to_datetime(exported["start_time"]).equals(runs["start_time"])

    tagged = rhn("export", "--tag", "nope", "-o", str(tmp_path / "none.csv"), runs_dir=store)
    assert tagged.exit_code == 1 and "no run tagged 'nope'" in tagged.stderr
    assert not (tmp_path / "none.csv").exists()


@pytest.mark.filterwarnings("ignore")
def test_load_runs_from_mongodb_matches_the_file_store(tmp_path, mongo_url):  # noqa: F811
    """A run recorded in MongoDB and the file store gives the same row and points from
    either (times aside: MongoDB keeps milliseconds)."""
    import torch

    url, runs_dir = f"{mongo_url}/api_db", tmp_path / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(runs_dir, "--name", "recorded", "--tag", "both", "--mongo", url)
    finally:
        torch.set_num_threads(threads)
    from_mongo, from_files = load_runs(mongo_url=url), load_runs(runs_dir)
    assert list(from_mongo.index) == list(from_files.index) == [1]
    assert from_mongo.loc[1, "name"] == "recorded" and from_mongo.loc[1, "tags"] == ["both"]
    timeless = [c for c in from_files.columns if c not in ("start_time", "stop_time", "duration_s")]
    pandas.testing.assert_frame_equal(from_mongo[timeless], from_files[timeless])
    pandas.testing.assert_frame_equal(load_metrics(mongo_url=url), load_metrics(runs_dir))
    assert "tokens_per_s" in set(load_metrics(mongo_url=url)["metric"])  # from info.throughput
    assert list(load_runs(mongo_url=url, where="depth=2", tag="both").index) == [1]
    assert runs_frame(load_records(mongo_url=url, ids=1)).loc[1, "valid.ppl"] > 0


def test_the_cli_does_not_import_pandas(store):
    """pandas is for notebooks: `rhn runs export` and `rhn --help` stay as quick as before."""
    code = (
        "import sys; from rhn_cli.cli import cli\n"
        f"for args in (['--help'], ['runs', 'export', '-o', '-', '--format', 'csv', "
        f"'--runs-dir', {str(store)!r}]):\n"
        "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
        "print('PANDAS', 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "PANDAS False" in out.stdout and "id,name,status" in out.stdout
