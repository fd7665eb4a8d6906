"""Robust MongoDB recording and ``rhn runs sync``, against a real MongoDB-wire server.

SecantusDB (``secantusd-py``) is started by the fixtures on a free 127.0.0.1 port (see
``tests/test_mongo_recording.py``); the tests skip only when it is not installed. Runs
train in-process through click's CliRunner (a second or two each); the sync command is
invoked directly, as ``rhn runs sync`` registers the same command object.

Covered: values from numpy and torch land completely; run ids are integers and
``info.metrics`` links every metric; a server down at start and one stopped mid-run
lose nothing after a sync, under the same id; a second sync is a no-op; each source
file is stored once across runs and syncs; credentials never show; the settings file
and the CLI's errors.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rhn_cli.cli import cli, mongo_option
from rhn_cli.commands.sync import sync
from rhn_cli.tracking.observers import database_key, redact
from rhn_cli.tracking.sanitize import clean, clean_number
from rhn_cli.tracking.settings import config_file, resolve_mongo_url
from rhn_cli.tracking.sync import STATE_FILE, read_sync_state, records_signature
from tests.conftest import FAST_RUN
from tests.test_mongo_recording import (
    LOOPBACK,
    SERVER_START_TIMEOUT_S,
    _free_port,
    _runner,
    _secantus_command,
)

pymongo = pytest.importorskip("pymongo")

EPOCHS = 2  # FAST_RUN's max_max_epoch
TRAIN = ["train", "with", *FAST_RUN]


# --------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models train 10-20x faster on one thread when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(*args: str, env: dict | None = None):
    result = _runner().invoke(cli, [*TRAIN, *args], env=env, catch_exceptions=True)
    assert result.exit_code == 0, (
        f"rhn train exited {result.exit_code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    return result


def _sync(*args: str, env: dict | None = None, code: int = 0):
    result = _runner().invoke(sync, list(args), env=env, catch_exceptions=True)
    assert result.exit_code == code, (
        f"sync exited {result.exit_code}, expected {code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    return result


def _summary(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def _load(run_dir: Path, name: str):
    path = run_dir / name
    return json.loads(path.read_text()) if path.exists() else None


def _assert_run_in_mongo(db, mongo_id, run_dir: Path, status: str = "COMPLETED") -> dict:
    """MongoDB holds the whole file-store run ``run_dir`` under ``mongo_id``, in the shape
    Sacred's MongoObserver writes and Omniboard reads."""
    assert type(mongo_id) is int, f"run _id must be an int, got {mongo_id!r}"
    doc = db.runs.find_one({"_id": mongo_id})
    assert doc is not None, f"no run {mongo_id} in {db.name}.runs"
    run = _load(run_dir, "run.json")
    assert doc["status"] == run["status"] == status
    assert doc["format"] == "MongoObserver-0.7.0"
    assert doc["config"] == _load(run_dir, "config.json")
    assert doc["result"] == pytest.approx(run["result"])
    assert doc["captured_out"] == (run_dir / "cout.txt").read_text()
    assert doc["start_time"].isoformat()[:23] == run["start_time"][:23]
    assert isinstance(doc["stop_time"], type(doc["start_time"]))

    # Every metric is in the metrics collection with all its points, and linked.
    stored = _load(run_dir, "metrics.json")
    metrics = {m["name"]: m for m in db.metrics.find({"run_id": mongo_id})}
    links = {link["name"]: link["id"] for link in doc["info"]["metrics"]}
    assert set(metrics) == set(stored), "metrics collection differs from metrics.json"
    assert set(links) == set(metrics), "info.metrics does not link every metric"
    for name, series in stored.items():
        assert links[name] == str(metrics[name]["_id"]), f"dangling link for {name}"
        assert type(metrics[name]["run_id"]) is int
        assert metrics[name]["steps"] == series["steps"], name
        assert metrics[name]["values"] == pytest.approx(series["values"]), name
    assert metrics["valid.ppl"]["steps"] == list(range(1, EPOCHS + 1))
    info = {k: v for k, v in (_load(run_dir, "info.json") or {}).items() if k != "metrics"}
    assert {k: v for k, v in doc["info"].items() if k != "metrics"} == info

    # Sources are in GridFS, as [relpath, file id].
    sources = doc["experiment"]["sources"]
    assert sources and len(sources) == len(run["experiment"]["sources"])
    fs_files = db["fs.files"]
    for relpath, file_id in sources:
        assert fs_files.find_one({"_id": file_id}) is not None, f"source {relpath} missing"
    return doc


def _filename_counts(db) -> collections.Counter:
    return collections.Counter(f["filename"] for f in db["fs.files"].find({}, {"filename": 1}))


def _assert_sources_stored_once(db) -> None:
    counts = _filename_counts(db)
    sources = {name: n for name, n in counts.items() if not name.startswith("artifact://")}
    assert sources, "no sources in GridFS"
    repeated = {name: n for name, n in sources.items() if n > 1}
    assert not repeated, f"source files stored more than once: {repeated}"


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory) -> Path:
    """A file store with two completed runs recorded without MongoDB."""
    base = tmp_path_factory.mktemp("offline")
    runs_dir = base / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        for name in ("RHN_MONGO_URL", "RHN_RUNS_DIR", "RHN_CONFIG_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("XDG_CONFIG_HOME", str(base / ".config"))
        for name in ("first", "second"):
            _train("--runs-dir", str(runs_dir), "--name", name)
    return runs_dir


@pytest.fixture
def runs(offline_runs: Path, tmp_path: Path) -> Path:
    """A private copy of ``offline_runs``."""
    target = tmp_path / "runs"
    shutil.copytree(offline_runs, target)
    return target


class Secantus:
    """A SecantusDB server on 127.0.0.1 (a free port), keeping its data in ``storage``
    (restartable on the same port and data) or in memory."""

    def __init__(self, logs: Path, storage: Path | None = None) -> None:
        self.storage = storage
        self.port = _free_port()
        self.url = f"mongodb://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = logs / f"secantusdb-{self.port}.log"

    def start(self) -> None:
        if self.storage is not None:
            self.storage.mkdir(parents=True, exist_ok=True)
        storage = ":memory:" if self.storage is None else str(self.storage)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*_secantus_command(), "--host", LOOPBACK, "--port", str(self.port)]
                + ["--storage-path", storage],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"secantusd-py exited: {self.log.read_text(errors='replace')}")
            client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=500)
            try:
                client.admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    pytest.fail(f"secantusd-py did not answer on {self.url}")
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    """``mongodb://127.0.0.1:PORT`` of an in-memory SecantusDB for this module; each
    test uses a database of its own."""
    server = Secantus(tmp_path_factory.mktemp("secantusdb"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator:
    client = pymongo.MongoClient(server_url, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def durable_server(tmp_path: Path) -> Iterator[Secantus]:
    server = Secantus(tmp_path, storage=tmp_path / "mongo-data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------------------
# sanitize.clean: one rule for every value recorded
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.float32(1.5), 1.5),
        (np.float64(2.25), 2.25),
        (np.int64(7), 7),
        (np.bool_(True), True),
        (np.array(2.0), 2.0),
        (np.array([1, 2, 3]), [1, 2, 3]),
        (np.array([[1.0, np.nan]]), [[1.0, None]]),
        (torch.tensor(3.0), 3.0),
        (torch.tensor(4), 4),
        (torch.tensor([1.0, 2.0]), [1.0, 2.0]),
        (torch.tensor(float("nan")), None),
        (float("nan"), None),
        (float("inf"), None),
        (-math.inf, None),
        (np.float32("inf"), None),
        ((1, (2, 3)), [1, [2, 3]]),
        ({1: "a", ("x", 2): np.float32(0.5)}, {"1": "a", "('x', 2)": 0.5}),
        ({"a": {"b": [np.int32(1), None, "s"]}}, {"a": {"b": [1, None, "s"]}}),
        (2**70, float(2**70)),
        (b"bytes", "bytes"),
        (Path("/tmp/x"), "/tmp/x"),
        (None, None),
        (True, True),
    ],
)
def test_clean(value, expected) -> None:
    cleaned = clean(value)
    assert cleaned == expected
    assert type(cleaned) is type(expected)
    json.dumps(cleaned, allow_nan=False)  # valid JSON
    from bson import BSON

    BSON.encode({"value": cleaned})  # valid BSON


def test_clean_keeps_plain_values_and_never_raises() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd"

    loop: list = [1]
    loop.append(loop)
    assert clean({"x": Odd(), "set": {3, 1, 2}, "loop": loop}) == {
        "x": "odd",
        "set": [1, 2, 3],
        "loop": [1, "<recursive reference>"],
    }
    assert clean_number(np.float32(0.5)) == 0.5
    assert clean_number(float("nan")) is None
    assert clean_number("text") is None


# --------------------------------------------------------------------------------------
# Where the MongoDB URL comes from
# --------------------------------------------------------------------------------------


def _write_settings(text: str) -> Path:
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_settings_file_lives_in_the_user_config_dir(tmp_path: Path, monkeypatch) -> None:
    # conftest points XDG_CONFIG_HOME into tmp_path: a real ~/.config never leaks in.
    assert config_file() == tmp_path / ".config" / "rhn" / "config.yaml"
    monkeypatch.setenv("RHN_CONFIG_FILE", str(tmp_path / "elsewhere.yaml"))
    assert config_file() == tmp_path / "elsewhere.yaml"


def test_mongo_url_resolution_order(monkeypatch) -> None:
    import click

    @click.command()
    @mongo_option
    def show(mongo_url) -> None:
        click.echo(repr(mongo_url))

    def url(*args: str, env: dict | None = None) -> str:
        result = _runner().invoke(show, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.stdout.strip()

    assert url() == "None"
    path = _write_settings("mongo_url: mongodb://file.example:27017/from_file\n")
    assert url() == "'mongodb://file.example:27017/from_file'"
    assert resolve_mongo_url(None).source == str(path)
    env = {"RHN_MONGO_URL": "mongodb://env.example/from_env"}
    assert url(env=env) == "'mongodb://env.example/from_env'"
    assert url("--mongo", "mongodb://cli.example/x", env=env) == "'mongodb://cli.example/x'"
    # Switched off for one command, whatever is configured.
    assert url("--mongo", "none", env=env) == "None"
    assert url("--mongo", "", env=env) == "None"
    assert url(env={"RHN_MONGO_URL": "none"}) == "None"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("mongo_url: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("mongo_url: 27017\n", "must be a MongoDB URL"),
    ],
)
def test_malformed_settings_file_is_a_one_line_error(text: str, problem: str) -> None:
    path = _write_settings(text)
    for args in (TRAIN, ["--dry-run"]):
        command = cli if args is TRAIN else sync
        result = _runner().invoke(command, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("Error: ") and str(path) in lines[0] and problem in lines[0]


def test_database_key_is_credential_free_and_canonical() -> None:
    key = database_key("mongodb://user:secret@B.example,a.example:27018/lab?authSource=admin")
    assert key == "mongodb://a.example:27018,b.example:27017/lab"
    assert database_key("mongodb://127.0.0.1") == "mongodb://127.0.0.1:27017/rhn"
    assert database_key("mongodb://127.0.0.1:27017/rhn") == "mongodb://127.0.0.1:27017/rhn"


# --------------------------------------------------------------------------------------
# Live recording
# --------------------------------------------------------------------------------------


def test_numpy_and_torch_values_land_completely(tmp_path: Path, server_url, client):
    """Values BSON cannot encode make Sacred's MongoObserver stop recording silently;
    rhn records them clean, in MongoDB and the file store alike."""
    from rhn_cli.experiment.sacred_app import (
        SacredReporter,
        finish_mongo_recording,
        make_observers,
    )
    from rhn_cli.tracking import quiet_sacred_import

    with quiet_sacred_import():
        from sacred import Experiment

    warnings: list[str] = []
    url = f"{server_url}/rhn_values"
    observers, recorded_at = make_observers(tmp_path / "runs", url, warnings.append)
    assert recorded_at == url and len(observers) == 2
    experiment = Experiment("values", save_git_info=False, interactive=True)
    experiment.add_config({"lr": np.float32(0.5), "grid": np.arange(3), "cap": float("inf")})

    @experiment.main
    def main(_run):
        reporter = SacredReporter(_run)
        reporter.log_scalar("f32", np.float32(1.5), np.int64(1))
        reporter.log_scalar("array0d", np.array(2.0), 1)
        reporter.log_scalar("tensor", torch.tensor(3.0), torch.tensor(1))
        reporter.log_scalar("diverged", float("nan"), 1)
        _run.log_scalar("raw_array0d", np.array(4.0), 1)  # past the reporter
        _run.log_scalar("raw_tensor", torch.tensor(5.0), 1)
        reporter.set_info("np", {"f": np.float32(0.25), "a": np.arange(2), "inf": np.inf})
        _run.info["raw"] = {"t": torch.tensor(7), "v": torch.tensor([1.0, 2.0]), (1, 2): 3}
        return np.float64(1.25)

    experiment.observers.extend(observers)
    run = experiment.run(options={"--capture": "sys"})
    assert not warnings, warnings
    assert not run._failed_observers
    mongo = observers[0]
    assert mongo.lost is None and mongo.complete

    db = client["rhn_values"]
    doc = db.runs.find_one({"_id": run._id})
    assert type(run._id) is int and doc is not None
    assert doc["status"] == "COMPLETED"
    assert doc["result"] == 1.25
    assert doc["config"]["lr"] == 0.5 and doc["config"]["grid"] == [0, 1, 2]
    assert doc["config"]["cap"] is None  # non-finite: None, like everywhere
    assert doc["info"]["np"] == {"f": 0.25, "a": [0, 1], "inf": None}
    assert doc["info"]["raw"] == {"t": 7, "v": [1.0, 2.0], "(1, 2)": 3}
    expected = {
        "f32": 1.5,
        "array0d": 2.0,
        "tensor": 3.0,
        "diverged": None,
        "raw_array0d": 4.0,
        "raw_tensor": 5.0,
    }
    metrics = {m["name"]: m for m in db.metrics.find({"run_id": run._id})}
    assert {name: m["values"] for name, m in metrics.items()} == {
        name: [value] for name, value in expected.items()
    }
    assert {m["steps"][0] for m in metrics.values()} == {1}
    links = {link["name"]: link["id"] for link in doc["info"]["metrics"]}
    assert links == {name: str(m["_id"]) for name, m in metrics.items()}

    # The file store holds the same clean values, as strict JSON.
    run_dir = tmp_path / "runs" / str(run._id)
    for name in ("config.json", "info.json", "metrics.json", "run.json"):
        json.loads((run_dir / name).read_text(), parse_constant=pytest.fail)
    stored = _load(run_dir, "metrics.json")
    assert {name: series["values"] for name, series in stored.items()} == {
        name: [value] for name, value in expected.items()
    }
    assert _load(run_dir, "config.json")["grid"] == [0, 1, 2]
    assert _load(run_dir, "info.json")["raw"]["v"] == [1.0, 2.0]
    # What rhn notes at the end of every run: MongoDB has all of it.
    assert finish_mongo_recording(experiment, observers, run_dir, url) is True
    state = read_sync_state(run_dir)[database_key(url)]
    assert state.pop("synced").endswith("Z")
    assert state == {
        "id": run._id,
        "complete": True,
        "signature": records_signature(run_dir),
        "artifacts": {},
    }


def test_mongo_gone_between_probe_and_start_never_fails_the_run(tmp_path: Path, closed_port: int):
    """Sacred fails the whole run when an observer fails at start; rhn's MongoDB
    observer steps aside instead, and the file store picks the run id."""
    from rhn_cli.experiment.sacred_app import finish_mongo_recording
    from rhn_cli.tracking import quiet_sacred_import
    from rhn_cli.tracking.observers import file_store_observer, mongo_observer

    with quiet_sacred_import():
        from sacred import Experiment

    url = f"mongodb://{LOOPBACK}:{closed_port}/rhn_gone"
    warnings: list[str] = []
    mongo = mongo_observer(url, tmp_path / "failures", warn=warnings.append, timeout_s=0.3)
    observers = [mongo, file_store_observer(tmp_path / "runs")]
    experiment = Experiment("gone", save_git_info=False, interactive=True)

    @experiment.main
    def main(_run):
        _run.log_scalar("loss", np.float32(0.5), 1)
        return 1.0

    experiment.observers.extend(observers)
    start = time.monotonic()
    run = experiment.run(options={"--capture": "sys"})
    assert time.monotonic() - start < 10
    assert run.status == "COMPLETED" and run._id == "1"  # the file store's id
    assert mongo.lost is not None and mongo.lost.startswith("start: ")
    assert mongo.run_id is None and not mongo.complete
    assert len(warnings) == 1 and "marked for 'rhn runs sync'" in warnings[0]
    run_dir = tmp_path / "runs" / "1"
    assert _load(run_dir, "metrics.json")["loss"]["values"] == [0.5]
    assert finish_mongo_recording(experiment, observers, run_dir, url) is False
    state = read_sync_state(run_dir)[database_key(url)]
    assert state["complete"] is False and state["id"] is None
    assert state["reason"] == mongo.lost
    assert not (tmp_path / "failures").exists()


@pytest.mark.slow
def test_live_runs_have_integer_ids_linked_metrics_and_need_no_sync(
    tmp_path: Path, server_url, client
):
    url = f"{server_url}/rhn_live"
    runs_dir = tmp_path / "runs"
    for _ in range(2):
        _train("--runs-dir", str(runs_dir), "--mongo", url)
    db = client["rhn_live"]
    ids = sorted(doc["_id"] for doc in db.runs.find({}, {"_id": 1}))
    assert ids == [1, 2]
    for mongo_id in ids:
        run_dir = runs_dir / str(mongo_id)
        _assert_run_in_mongo(db, mongo_id, run_dir)
        state = read_sync_state(run_dir)[database_key(url)]
        assert state["id"] == mongo_id and state["complete"] is True
    # Sources are stored once, not on every run (Sacred's dedup is broken on pymongo 4).
    _assert_sources_stored_once(db)
    # MongoDB has both runs already: nothing to push.
    result = _sync("--mongo", url, "--runs-dir", str(runs_dir))
    assert _summary(result).startswith("0 pushed, 0 updated, 2 unchanged"), result.stdout
    assert db.runs.count_documents({}) == 2


@pytest.mark.slow
def test_mongo_down_at_start_then_sync_pushes_everything(
    runs: Path, closed_port: int, server_url, client
):
    down = f"mongodb://{LOOPBACK}:{closed_port}/rhn_down"
    result = _train("--runs-dir", str(runs), "--mongo", down)
    assert "marked for 'rhn runs sync'" in result.stderr
    assert "and in MongoDB" not in result.stdout
    state = read_sync_state(runs / "3")[database_key(down)]
    assert state["complete"] is False and state["id"] is None

    # Later, with MongoDB at hand: all three runs (two recorded offline) go in.
    url = f"{server_url}/rhn_down"
    first = _sync("--mongo", url, "--runs-dir", str(runs))
    lines = first.stdout.splitlines()
    for run_id in ("1", "2", "3"):
        assert any(line.startswith(f"pushed run {run_id} -> MongoDB id ") for line in lines)
    assert "checkpoints (*.pt) of 3 run(s) not pushed: use --with-checkpoints" in first.stdout
    assert _summary(first).startswith("3 pushed, 0 updated, 0 unchanged"), first.stdout
    db = client["rhn_down"]
    for run_id in ("1", "2", "3"):
        entry = read_sync_state(runs / run_id)[database_key(url)]
        assert entry["complete"] is True
        doc = _assert_run_in_mongo(db, entry["id"], runs / run_id)
        assert doc["artifacts"] == []  # checkpoints stay local by default
    names = {doc["experiment"]["name"] for doc in db.runs.find()}
    assert names == {"first", "second", "rhn"}

    # A second sync is a no-op; the sources were stored once across runs and syncs.
    second = _sync("--mongo", url, "--runs-dir", str(runs))
    assert _summary(second).startswith("0 pushed, 0 updated, 3 unchanged"), second.stdout
    assert "pushed run" not in second.stdout and "checkpoints" not in second.stdout
    assert db.runs.count_documents({}) == 3
    _assert_sources_stored_once(db)


@pytest.mark.slow
def test_mongo_stopped_mid_run_training_completes_and_sync_restores_it(
    tmp_path: Path, durable_server: Secantus, monkeypatch
):
    from rhn_cli.tracking import quiet_sacred_import

    with quiet_sacred_import():
        from sacred.settings import SETTINGS

    # Heartbeats (when Sacred writes metrics) every 0.2 s instead of 10 s.
    monkeypatch.setattr(SETTINGS, "DEFAULT_BEAT_INTERVAL", 0.2)
    epochs = 8
    url = f"{durable_server.url}/rhn_killed"
    runs_dir = tmp_path / "runs"
    seen: list[list[int]] = []

    def stop_server_after_first_epoch() -> None:
        client = pymongo.MongoClient(durable_server.url, serverSelectionTimeoutMS=1000)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                try:
                    doc = client.rhn_killed.metrics.find_one({"name": "valid.ppl"})
                except pymongo.errors.PyMongoError:
                    doc = None
                if doc and doc["steps"]:
                    seen.append(list(doc["steps"]))
                    durable_server.stop()
                    return
                time.sleep(0.02)
        finally:
            client.close()

    watcher = threading.Thread(target=stop_server_after_first_epoch, daemon=True)
    watcher.start()
    start = time.monotonic()
    result = _train(
        "--runs-dir", str(runs_dir), "--mongo", url, f"max_max_epoch={epochs}", "max_epoch=3"
    )
    elapsed = time.monotonic() - start
    watcher.join(timeout=30)
    assert seen and len(seen[0]) < epochs, f"MongoDB was not stopped mid-run: {seen}"

    # Training went on to the end, said once that MongoDB stopped, and ended promptly.
    assert "COMPLETED" in _summary(result) and "and in MongoDB" not in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "MongoDB" in line]
    assert len(warnings) == 1 and "stopped recording this run" in warnings[0], result.stderr
    assert "marked for 'rhn runs sync'" in warnings[0]
    assert elapsed < 60, f"the run took {elapsed:.0f} s with MongoDB gone"
    run_dirs = [p for p in runs_dir.iterdir() if (p / "run.json").exists()]
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    stored = _load(run_dir, "metrics.json")
    assert stored["valid.ppl"]["steps"] == list(range(1, epochs + 1))
    assert _load(run_dir, "run.json")["status"] == "COMPLETED"
    state = read_sync_state(run_dir)[database_key(url)]
    assert state["complete"] is False and type(state["id"]) is int
    mongo_id = state["id"]
    assert not (runs_dir / "_mongo_failures").exists()

    # MongoDB is back (same data, same port): the sync completes the run in place.
    durable_server.start()
    first = _sync("--mongo", url, "--runs-dir", str(runs_dir))
    assert f"updated run {run_dir.name} -> MongoDB id {mongo_id} " in first.stdout, first.stdout
    client = pymongo.MongoClient(durable_server.url, serverSelectionTimeoutMS=5000)
    try:
        db = client.rhn_killed
        assert db.runs.count_documents({}) == 1
        doc = db.runs.find_one({"_id": mongo_id})
        assert doc["status"] == "COMPLETED"
        metrics = {m["name"]: m for m in db.metrics.find({"run_id": mongo_id})}
        assert metrics["valid.ppl"]["steps"] == list(range(1, epochs + 1))
        assert set(metrics) == set(stored)
        links = {link["name"]: link["id"] for link in doc["info"]["metrics"]}
        assert links == {name: str(m["_id"]) for name, m in metrics.items()}
        assert db.metrics.count_documents({}) == len(stored)  # no stale duplicates
        assert doc["captured_out"] == (run_dir / "cout.txt").read_text()
        _assert_sources_stored_once(db)
        second = _sync("--mongo", url, "--runs-dir", str(runs_dir))
        assert _summary(second).startswith("0 pushed, 0 updated, 1 unchanged"), second.stdout
    finally:
        client.close()


# --------------------------------------------------------------------------------------
# rhn runs sync
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_changed_run_is_updated_under_the_same_id(runs: Path, server_url, client):
    url = f"{server_url}/rhn_changed"
    db = client["rhn_changed"]
    _sync("--mongo", url, "--runs-dir", str(runs))
    mongo_id = read_sync_state(runs / "2")[database_key(url)]["id"]
    before = {m["name"]: m["_id"] for m in db.metrics.find({"run_id": mongo_id})}
    # Omniboard's tags and notes live in the run document; an update keeps them.
    db.runs.update_one({"_id": mongo_id}, {"$set": {"omniboard": {"tags": ["keep"]}}})

    # The run goes on in the file store (as a resumed run does): one more epoch.
    metrics = _load(runs / "2", "metrics.json")
    for series in metrics.values():
        series["steps"].append(series["steps"][-1] + 1)
        series["values"].append(series["values"][-1])
        series["timestamps"].append(series["timestamps"][-1])
    (runs / "2" / "metrics.json").write_text(json.dumps(metrics))

    result = _sync("--mongo", url, "--runs-dir", str(runs))
    assert f"updated run 2 -> MongoDB id {mongo_id} (COMPLETED" in result.stdout
    assert _summary(result).startswith("0 pushed, 1 updated, 1 unchanged"), result.stdout
    assert db.runs.count_documents({}) == 2
    doc = db.runs.find_one({"_id": mongo_id})
    assert doc["omniboard"] == {"tags": ["keep"]}
    after = {m["name"]: m for m in db.metrics.find({"run_id": mongo_id})}
    assert {name: m["_id"] for name, m in after.items()} == before  # links stay valid
    assert after["valid.ppl"]["steps"] == [1, 2, 3]

    # Deleted in MongoDB (e.g. from Omniboard): pushed again, under its old id.
    db.runs.delete_one({"_id": mongo_id})
    db.metrics.delete_many({"run_id": mongo_id})
    again = _sync("--mongo", url, "--runs-dir", str(runs))
    assert f"pushed run 2 -> MongoDB id {mongo_id} " in again.stdout, again.stdout
    assert db.metrics.count_documents({"run_id": mongo_id}) == len(metrics)


@pytest.mark.slow
def test_dry_run_lists_and_pushes_nothing(runs: Path, server_url, client):
    url = f"{server_url}/rhn_dry"
    result = _sync("--mongo", url, "--runs-dir", str(runs), "--dry-run")
    assert "would push run 1 (COMPLETED)" in result.stdout
    assert "would push run 2 (COMPLETED)" in result.stdout
    assert _summary(result).startswith("2 would push, 0 would update, 0 unchanged")
    assert "rhn_dry" not in client.list_database_names()
    assert not (runs / "1" / STATE_FILE).exists()


@pytest.mark.slow
def test_checkpoints_only_with_flag(runs: Path, server_url, client):
    url = f"{server_url}/rhn_ckpt"
    db = client["rhn_ckpt"]
    _sync("--mongo", url, "--runs-dir", str(runs))
    assert all(doc["artifacts"] == [] for doc in db.runs.find())

    result = _sync("--mongo", url, "--runs-dir", str(runs), "--with-checkpoints")
    assert _summary(result).startswith("0 pushed, 2 updated, 0 unchanged"), result.stdout
    import gridfs

    fs = gridfs.GridFS(db)
    for doc in db.runs.find():
        names = {a["name"]: a["file_id"] for a in doc["artifacts"]}
        assert set(names) == {"checkpoint.pt", "best_model.pt"}
        file = fs.get(names["best_model.pt"])
        assert file.filename == f"artifact://runs/{doc['_id']}/best_model.pt"
        local = next(
            runs / d
            for d in ("1", "2")
            if read_sync_state(runs / d)[database_key(url)]["id"] == doc["_id"]
        )
        assert file.read() == (local / "best_model.pt").read_bytes()
    # A plain sync keeps what was pushed; nothing to do.
    plain = _sync("--mongo", url, "--runs-dir", str(runs))
    assert _summary(plain).startswith("0 pushed, 0 updated, 2 unchanged"), plain.stdout
    assert sum(1 for _ in db["fs.files"].find({"filename": {"$regex": "^artifact://"}})) == 4


@pytest.mark.slow
def test_broken_run_fails_alone_with_its_reason(runs: Path, server_url, client):
    (runs / "1" / "run.json").write_text("{not json")
    url = f"{server_url}/rhn_broken"
    result = _sync("--mongo", url, "--runs-dir", str(runs), code=1)
    assert "pushed run 2 -> MongoDB id 2 " in result.stdout  # its own id: one id per run
    assert _summary(result).startswith("1 pushed, 0 updated, 0 unchanged, 1 failed")
    assert "run 1: run.json is not valid JSON" in result.stderr
    assert client["rhn_broken"].runs.count_documents({}) == 1


def test_sync_needs_a_mongodb(runs: Path) -> None:
    result = _sync("--runs-dir", str(runs), code=2)
    assert "no MongoDB to sync to" in result.stderr
    assert "--mongo URL" in result.stderr and "RHN_MONGO_URL" in result.stderr
    assert str(config_file()) in result.stderr
    off = _sync("--runs-dir", str(runs), "--mongo", "none", code=2)
    assert "switched off" in off.stderr
    missing = _sync("--runs-dir", "nowhere", "--mongo", "mongodb://127.0.0.1/x", code=2)
    assert "no runs directory nowhere" in missing.stderr


def test_sync_mongo_unreachable_is_a_clear_error(runs: Path, closed_port: int) -> None:
    url = f"mongodb://user:s3cret-pw@{LOOPBACK}:{closed_port}/rhn"
    result = _sync("--mongo", url, "--runs-dir", str(runs), code=1)
    assert result.stderr.strip() == (
        f"Error: MongoDB at {redact(url)}: no answer within 3 s; nothing was pushed"
    )
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert not (runs / "1" / STATE_FILE).exists()


@pytest.mark.slow
def test_sync_takes_the_url_from_the_settings_file(runs: Path, server_url, client):
    _write_settings(f"mongo_url: {server_url}/rhn_settings\n")
    result = _sync("--runs-dir", str(runs))
    assert _summary(result).startswith("2 pushed"), result.stdout
    assert client["rhn_settings"].runs.count_documents({}) == 2


@pytest.mark.slow
def test_credentials_are_never_printed_or_recorded(tmp_path: Path, server_url, client):
    password = "Pw-s3cret-4711"
    client.admin.command("createUser", "syncer", pwd=password, roles=["root"])
    host = server_url.partition("://")[2]
    url = f"mongodb://syncer:{password}@{host}/rhn_auth?authSource=admin"
    runs_dir = tmp_path / "runs"
    trained = _train("--runs-dir", str(runs_dir), "--mongo", url)
    assert f"mongodb://syncer:***@{host}/rhn_auth" in trained.stdout
    _train("--runs-dir", str(runs_dir))  # offline
    synced = _sync("--mongo", url, "--runs-dir", str(runs_dir))
    assert _summary(synced).startswith("1 pushed, 0 updated, 1 unchanged"), synced.stdout
    dry = _sync("--mongo", url, "--runs-dir", str(runs_dir), "--dry-run")
    output = trained.stdout + trained.stderr + synced.stdout + synced.stderr + dry.stdout
    assert password not in output
    assert "syncer:***@" in synced.stdout
    leaking = [
        str(path)
        for path in runs_dir.rglob("*")
        if path.is_file() and password.encode() in path.read_bytes()
    ]
    assert not leaking, f"the password is stored in {leaking}"
    docs = list(client["rhn_auth"].runs.find())
    assert len(docs) == 2 and password not in repr(docs)
