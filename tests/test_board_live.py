"""The local board follows the file store while it is open (issue 20, item 1).

Against real servers: SecantusDB on 127.0.0.1 for the follower's own behaviour (only the
runs and series that changed are written; stopping makes a last pass), and ``rhn board``
with real Omniboard while a real training process records a run: the run shows up while
it trains, its metrics and heartbeat advance, its end shows within seconds, and a board
started again later finds nothing left to copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rhn_cli.atomic import write_atomically
from rhn_cli.board.follow import Follower
from rhn_cli.board.process import free_port, port_problem
from rhn_cli.tracking.sync import SyncSession, sync_runs
from tests.test_board import (
    OMNIBOARD_CACHE,
    _metrics_by_name,
    _query,
    needs_node,
    omniboard_installed,  # noqa: F401  (a fixture)
)
from tests.test_sync import offline_runs, runs, server_url  # noqa: F401  (fixtures)

pymongo = pytest.importorskip("pymongo")


LATER = "2031-01-01T00:00:00.000000"


def _database(url: str, name: str) -> str:
    return f"{url}/{name}"


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    write_atomically(path, json.dumps(data).encode("utf-8"))


def _add_epoch(run_dir: Path) -> None:
    """What a running run's heartbeat does to metrics.json: one more value of a series."""

    def more(metrics):
        series = metrics["valid.ppl"]
        series["steps"].append(series["steps"][-1] + 1)
        series["values"].append(series["values"][-1] * 0.9)
        series["timestamps"].append(series["timestamps"][-1])

    _rewrite(run_dir / "metrics.json", more)


# --------------------------------------------------------------------------------------
# The follower against a real MongoDB-wire server
# --------------------------------------------------------------------------------------


def test_only_the_runs_and_series_that_changed_are_written(runs, server_url):  # noqa: F811
    url = _database(server_url, "live_changes")
    lines = []
    with SyncSession(runs, url, live=True) as session:
        follower = Follower(session, echo=lines.append)
        first = follower.first_pass(echo=lambda line: None)
        assert sorted(run for run, _ in first.pushed) == ["1", "2"]
        assert follower.step() is None, "nothing changed: nothing read, nothing written"

        metrics = session.db["metrics"]
        # Mark what is in MongoDB: a series written again would lose the mark.
        for doc in metrics.find({"name": {"$in": ["train.ppl", "valid.ppl"]}}):
            metrics.update_one({"_id": doc["_id"]}, {"$set": {"mark": True}})
        _add_epoch(runs / "2")
        report = follower.step()
        marked = {(d["run_id"], d["name"]): d.get("mark") for d in metrics.find()}
        valid = metrics.find_one({"run_id": 2, "name": "valid.ppl"})

    assert report.updated == [("2", 2)] and report.statuses == {"2": "COMPLETED"}
    assert marked[(1, "valid.ppl")] and marked[(1, "train.ppl")], "run 1 was written again"
    assert marked[(2, "train.ppl")], "run 2's unchanged series was written again"
    assert not marked[(2, "valid.ppl")], "run 2's new epoch did not reach MongoDB"
    assert valid["steps"] == [1, 2, 3]
    assert lines == [], "a run's progress is silent"


def test_running_runs_are_followed_and_their_end_told(runs, server_url):  # noqa: F811
    """A RUNNING run with a fresh heartbeat, which `rhn runs sync` leaves to its live
    recorder, is copied into the board's own database; its status change is told."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000", time.gmtime())
    _rewrite(runs / "2" / "run.json", lambda run: run.update(status="RUNNING", heartbeat=now))
    url = _database(server_url, "live_running")
    plain = sync_runs(runs, url, echo=lambda line: None)
    assert [run for run, _ in plain.skipped] == ["2"]

    lines = []
    with SyncSession(runs, _database(server_url, "live_running_board"), live=True) as session:
        follower = Follower(session, echo=lines.append)
        follower.first_pass(echo=lambda line: None)
        assert session.db["runs"].find_one({"_id": 2})["status"] == "RUNNING"
        _rewrite(runs / "2" / "run.json", lambda run: run.update(status="COMPLETED"))
        follower.step()
        assert session.db["runs"].find_one({"_id": 2})["status"] == "COMPLETED"
    assert lines == ["run 2: COMPLETED"]


def test_a_new_run_is_told_once(runs, server_url):  # noqa: F811
    lines = []
    with SyncSession(runs, _database(server_url, "live_new"), live=True) as session:
        follower = Follower(session, echo=lines.append)
        follower.first_pass(echo=lambda line: None)
        # A third run appears (a copy of run 2 started later), and run 2's records are
        # rewritten unchanged (as a heartbeat of a finished run would not, but could).
        shutil.copytree(runs / "2", runs / ".incoming")
        (runs / ".incoming" / "mongo.json").unlink()
        _rewrite(runs / ".incoming" / "run.json", lambda run: run.update(start_time=LATER))
        (runs / ".incoming").rename(runs / "3")
        _rewrite(runs / "2" / "run.json", lambda run: None)
        follower.step()
        follower.step()
        assert session.db["runs"].find_one({"_id": 3})["start_time"].year == 2031
    assert lines == ["new run 3 (COMPLETED)"]


def test_stopping_makes_a_last_pass(runs, server_url):  # noqa: F811
    with SyncSession(runs, _database(server_url, "live_stop"), live=True) as session:
        follower = Follower(session, interval_s=3600, echo=lambda line: None)
        follower.first_pass(echo=lambda line: None)
        follower.start()
        _add_epoch(runs / "1")
        follower.stop()  # long before the next look: the last pass copies it
        valid = session.db["metrics"].find_one({"run_id": 1, "name": "valid.ppl"})
    assert valid["steps"] == [1, 2, 3]


# --------------------------------------------------------------------------------------
# rhn board, Omniboard and a run training meanwhile
# --------------------------------------------------------------------------------------

# Long enough to be seen RUNNING for several epochs (about 1-2 s each on one thread).
SLOW_RUN = [
    "depth=2",
    "hidden_size=16",
    "max_max_epoch=6",
    "max_epoch=2",
    "synthetic.train_tokens=150000",
    "synthetic.valid_tokens=4000",
    "synthetic.test_tokens=4000",
]
FOLLOW_WITHIN_S = 10


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHN_")}
    env.update(
        RHN_CACHE_DIR=str(OMNIBOARD_CACHE),
        RHN_CONFIG_FILE=str(tmp_path / "no-settings.yaml"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


class BoardProcess:
    """``rhn board --no-browser`` in ``cwd``, its output read line by line."""

    def __init__(self, cwd: Path, port: int) -> None:
        self.port, self.lines = port, []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rhn_cli", "board", "--no-browser", "--port", str(port)],
            cwd=cwd,
            env=_environment(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_lines, daemon=True)
        self._reader.start()
        self.wait_for(lambda: any(line.startswith("Open ") for line in self.lines), 120)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/sacred/api/v1"

    def _read_lines(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def read(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, condition, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.25)
        pytest.fail(f"rhn board: condition not met within {timeout_s} s:\n{self.read()}")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        return self.read()


def _run(api: str, run_id: int) -> dict | None:
    found = [run for run in _query(api, "Runs") if run["_id"] == run_id]
    return found[0] if found else None


def _valid_steps(api: str, run_id: int) -> list[int]:
    metrics = _metrics_by_name(_query(api, "Metrics", query=json.dumps({"run_id": run_id})))
    return metrics.get("valid.ppl", {}).get("steps", [])


@pytest.mark.omniboard
@needs_node
def test_the_board_follows_a_run_while_it_trains(runs, tmp_path, omniboard_installed):  # noqa: F811
    workdir = runs.parent
    board = BoardProcess(workdir, free_port())
    training = None
    try:
        assert "2 pushed" in board.read()
        # Omniboard's first view: nested config keys as columns, a 10 s table refresh.
        columns = {
            c["name"]: c["config_path"] for c in _query(board.api, "Omniboard.Custom.Columns")
        }
        assert columns["synthetic.train_tokens"] == "config.synthetic.train_tokens"
        settings = {s["name"]: s["value"] for s in _query(board.api, "Omniboard.Settings")}
        assert settings["auto_refresh_interval"] == 10
        training = subprocess.Popen(
            [sys.executable, "-m", "rhn_cli", "train", "--name", "followed", "with", *SLOW_RUN],
            cwd=workdir,
            env=_environment(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # The run shows while it trains, and its epochs and heartbeat come in one by one.
        board.wait_for(lambda: (_run(board.api, 3) or {}).get("status") == "RUNNING", 60)
        seen_steps, heartbeats = set(), set()
        while training.poll() is None:
            run = _run(board.api, 3)
            if run and run["status"] == "RUNNING":
                seen_steps.add(len(_valid_steps(board.api, 3)))
                heartbeats.add(run["heartbeat"])
            time.sleep(0.5)
        ended = time.monotonic()
        assert training.returncode == 0
        # Epochs reached the board while the run trained, not only at its end (on a busy
        # machine a pass may bring several epochs at once).
        during = {count for count in seen_steps if 0 < count < 6}
        assert during, f"epochs seen while running: {sorted(seen_steps)}"
        assert len(heartbeats) >= 2, "the heartbeat did not advance on the board"

        board.wait_for(lambda: _run(board.api, 3)["status"] == "COMPLETED", 30)
        assert time.monotonic() - ended < FOLLOW_WITHIN_S
        assert _valid_steps(board.api, 3) == [1, 2, 3, 4, 5, 6]
        shown = board.read()
        assert "new run 3 (RUNNING)" in shown and "run 3: COMPLETED" in shown, shown
        assert [run["_id"] for run in _query(board.api, "Runs")] == [1, 2, 3]
    finally:
        if training is not None and training.poll() is None:
            training.kill()
            training.wait()
        shown = board.stop()
    assert board.process.returncode == 0, shown
    assert port_problem(board.port) is None

    # Started again, the board finds its database as it left it: nothing to copy.
    again = BoardProcess(workdir, free_port())
    try:
        assert "0 pushed, 0 updated, 3 unchanged" in again.read(), again.read()
        assert _run(again.api, 3)["status"] == "COMPLETED"
        assert _valid_steps(again.api, 3) == [1, 2, 3, 4, 5, 6]
    finally:
        again.stop()
