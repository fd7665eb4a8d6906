"""Omniboard's first view (issue 20, item 4): the metrics plot holds only model-quality
series and lr (throughput is run info, still a metric to ``rhn runs`` and pandas), the
Result column a rounded result, and nested config keys are columns of their own
(Omniboard custom columns, against a real SecantusDB server and, marked ``omniboard``,
a real Omniboard 2.16.1)."""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.request
from pathlib import Path

import pymongo
import pytest

from rhn_cli.tracking.frames import load_metrics
from rhn_cli.tracking.omniboard_view import prepare_omniboard_view, rounded_result
from tests.test_mongo_recording import mongo_url  # noqa: F401  (a fixture)
from tests.test_runs_cli import _read_image, _train, ok, rhn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL_QUALITY = re.compile(r"^[a-z_]+\.(ppl|bpc)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """runs/1: a real two-epoch ``rhn train`` (file store only)."""
    import torch

    runs_dir = tmp_path_factory.mktemp("view") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(runs_dir, "--name", "view", "--mongo", "none")
    finally:
        torch.set_num_threads(threads)
    return runs_dir


def _saved(runs_dir: Path, name: str) -> dict:
    return json.loads((runs_dir / "1" / name).read_text())


# --------------------------------------------------------------------------------------
# Throughput: run info, not a metric Omniboard would plot beside the perplexities
# --------------------------------------------------------------------------------------


def test_the_metrics_omniboard_plots_are_model_quality_and_lr(trained):
    metrics = _saved(trained, "metrics.json")
    assert {"train.ppl", "valid.ppl", "valid.bpc", "lr"} <= set(metrics)
    others = [name for name in metrics if name != "lr" and not MODEL_QUALITY.match(name)]
    assert others == [], f"metrics.json holds {others}: Omniboard plots them by default"
    throughput = _saved(trained, "info.json")["throughput"]["tokens_per_s"]
    assert throughput["steps"] == [1, 2]
    assert all(value > 100 for value in throughput["values"])  # tokens a second


def test_rhn_runs_and_pandas_still_show_tokens_per_s(trained, tmp_path):
    values = _saved(trained, "info.json")["throughput"]["tokens_per_s"]["values"]
    points = load_metrics(trained, metrics="tokens_per_s")
    assert points["step"].tolist() == [1, 2]
    assert points["value"].tolist() == values

    ok(rhn("plot", "1", "--metric", "tokens_per_s", "-o", "speed.png", runs_dir=trained))
    assert _read_image(tmp_path / "speed.png").ndim == 3
    # An unknown sort key would be an error: tokens_per_s is a metric of the run.
    listed = ok(rhn("ls", "--sort", "tokens_per_s", runs_dir=trained)).splitlines()
    assert listed[1].split()[0] == "1"
    shown = ok(rhn("show", "1", runs_dir=trained))
    assert re.search(rf"^  tokens_per_s +{values[-1]:,.0f} ", shown, re.M), shown
    assert "throughput" not in shown  # no second copy of the series in the info section
    exported = ok(rhn("export", "-o", "-", "--format", "csv", runs_dir=trained))
    [row] = csv.DictReader(io.StringIO(exported))
    assert float(row["tokens_per_s.last"]) == values[-1]


# --------------------------------------------------------------------------------------
# The result: what Omniboard's Result column shows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (9.636169145001027, 9.636),
        (65.4012, 65.4),
        (123.456, 123.46),
        (2.41339, 2.413),
        (1234.5678, 1234.57),
        (0.0123456, 0.01235),
        (float("inf"), float("inf")),
        (None, None),
    ],
)
def test_results_keep_four_significant_digits_and_two_decimals(value, stored):
    assert rounded_result(value) == stored


def test_a_trained_run_stores_its_result_rounded_and_the_metrics_whole(trained):
    best = min(_saved(trained, "metrics.json")["valid.ppl"]["values"])
    result = _saved(trained, "run.json")["result"]
    assert result == rounded_result(best) != best
    assert len(repr(result).replace(".", "").lstrip("0")) <= 5  # e.g. 9.636, 65.4, 123.46
    assert _saved(trained, "info.json")["best_valid_perplexity"] == best


# --------------------------------------------------------------------------------------
# Nested config keys as Omniboard custom columns
# --------------------------------------------------------------------------------------


@pytest.fixture
def db(mongo_url, request):  # noqa: F811  (the fixture imported above)
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    name = re.sub(r"\W", "_", request.node.name)[:60]
    client.drop_database(name)
    yield client[name]
    client.drop_database(name)
    client.close()


def _columns(db) -> dict[str, str]:
    docs = list(db["omniboard.custom.columns"].find({}, {"_id": 0}))
    assert len(docs) == len({doc["name"] for doc in docs}), f"duplicate columns: {docs}"
    return {doc["name"]: doc["config_path"] for doc in docs}


def test_nested_config_keys_become_custom_columns_once(db):
    db.runs.insert_many(
        [
            {"_id": 1, "config": {"depth": 2, "synthetic": {"order": 2, "train_tokens": 9}}},
            {"_id": 2, "config": {"depth": 3, "synthetic": {"order": 3, "seed": {"a": 1}}}},
            {"_id": 3, "config": {"depth": 3, "dataset": "ptb"}},
        ]
    )
    # A column a user made in Omniboard, under one of the names rhn would add.
    db["omniboard.custom.columns"].insert_one(
        {"name": "synthetic.order", "config_path": "config.synthetic.order_of_mine"}
    )
    added = prepare_omniboard_view(db)
    assert added == ["synthetic.seed.a", "synthetic.train_tokens"]
    assert _columns(db) == {
        "synthetic.order": "config.synthetic.order_of_mine",  # left as the user made it
        "synthetic.seed.a": "config.synthetic.seed.a",
        "synthetic.train_tokens": "config.synthetic.train_tokens",
    }
    # Again: nothing new, nothing duplicated; a new run's new key is added.
    assert prepare_omniboard_view(db) == []
    db.runs.insert_one({"_id": 4, "config": {"synthetic": {"test_tokens": 5}}})
    assert prepare_omniboard_view(db) == ["synthetic.test_tokens"]
    assert len(_columns(db)) == 4


def test_a_database_without_runs_gets_no_columns(db):
    assert prepare_omniboard_view(db) == []
    assert _columns(db) == {}


@pytest.mark.omniboard
def test_omniboard_lists_the_columns(db, mongo_url):  # noqa: F811
    from tests.test_board import NODE_MISSING, OMNIBOARD_CACHE

    if NODE_MISSING:
        pytest.skip("Node.js and npm are not installed")
    from rhn_cli.board.omniboard import ensure_omniboard, start_omniboard
    from rhn_cli.board.process import free_port

    ensure_omniboard(OMNIBOARD_CACHE, echo=lambda message: print(message, flush=True))
    run = {"_id": 1, "status": "COMPLETED", "result": 9.636}
    db.runs.insert_one({**run, "config": {"depth": 2, "synthetic": {"order": 3}}})
    assert prepare_omniboard_view(db) == ["synthetic.order"]

    omniboard = start_omniboard(f"{mongo_url}/{db.name}", free_port(), cache=OMNIBOARD_CACHE)
    try:
        with urllib.request.urlopen(f"{omniboard.api}/Omniboard.Custom.Columns", timeout=15) as r:
            columns = json.loads(r.read())
        assert [(c["name"], c["config_path"]) for c in columns] == [
            ("synthetic.order", "config.synthetic.order")
        ]
    finally:
        omniboard.stop()
