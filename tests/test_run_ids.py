"""One id per run (issue 20, item 2): with MongoDB, a run's directory carries MongoDB's
id, even when the file store already holds runs MongoDB never saw (recorded while it
was away, or with --mongo none), so ``rhn runs show ID`` shows the run the console
named. Against a real SecantusDB server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from tests.test_mongo_recording import (  # noqa: F401 -- fixtures
    _invoke,
    isolated,
    mongo_client,
    mongo_url,
)


def _recorded_as(output: str) -> tuple[str, str]:
    """(run id, directory name) of the console's 'run N: recording to DIR' line."""
    found = re.search(r"^run (\d+): recording to (\S+)$", output, re.MULTILINE)
    assert found, output
    return found.group(1), Path(found.group(2)).name


@pytest.mark.usefixtures("isolated")  # one thread, no RHN_* variables
def test_a_run_gets_one_id_in_both_stores(tmp_path: Path, request):
    url, client = request.getfixturevalue("mongo_url"), request.getfixturevalue("mongo_client")
    runs_dir = tmp_path / "runs"
    store = ["--runs-dir", str(runs_dir)]
    for _ in range(3):  # three runs MongoDB never saw: directories 1, 2, 3
        _invoke([*store, "--mongo", "none"])
    assert sorted(p.name for p in runs_dir.iterdir() if p.name.isdigit()) == ["1", "2", "3"]

    result = _invoke([*store, "--mongo", f"{url}/ids_db"])
    run_id, directory = _recorded_as(result.stdout)
    assert run_id == directory == "4"  # not MongoDB's first id, 1, in directory 4
    assert [d["_id"] for d in client["ids_db"]["runs"].find({}, {"_id": 1})] == [4]
    assert result.stdout.strip().splitlines()[-1].startswith("run 4 COMPLETED")

    from click.testing import CliRunner

    shown = CliRunner().invoke(cli, ["runs", "show", "4", *store])
    assert shown.exit_code == 0 and "run 4 " in shown.output

    # MongoDB ahead of the file store (another machine's runs): the next free in both.
    client["ids_db"]["runs"].insert_one({"_id": 9, "status": "COMPLETED"})
    run_id, directory = _recorded_as(_invoke([*store, "--mongo", f"{url}/ids_db"]).stdout)
    assert run_id == directory == "10"


@pytest.mark.usefixtures("isolated")
def test_runs_recorded_offline_are_synced_under_their_own_id_where_free(tmp_path, request):
    url, client = request.getfixturevalue("mongo_url"), request.getfixturevalue("mongo_client")
    runs_dir = tmp_path / "runs"
    store = ["--runs-dir", str(runs_dir)]
    for _ in range(3):
        _invoke([*store, "--mongo", "none"])  # runs 1, 2, 3: MongoDB never saw them
    runs = client["sync_ids_db"]["runs"]
    runs.insert_one({"_id": 2, "status": "COMPLETED"})  # another machine's run 2

    from click.testing import CliRunner

    synced = CliRunner().invoke(cli, ["runs", "sync", *store, "--mongo", f"{url}/sync_ids_db"])
    assert synced.exit_code == 0, synced.output
    assert "pushed run 1 -> MongoDB id 1 " in synced.output
    assert "pushed run 3 -> MongoDB id 3 " in synced.output
    assert "pushed run 2 -> MongoDB id 4 " in synced.output  # 2 was taken: said so
    # (4, not 3: the file store's run 3 keeps its own id.)
    assert sorted(d["_id"] for d in runs.find({}, {"_id": 1})) == [1, 2, 3, 4]
