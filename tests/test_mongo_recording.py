"""Recording runs in MongoDB (Sacred's MongoObserver) next to the file store.

The MongoDB side is tested against a real MongoDB-wire server, SecantusDB (PyPI
``secantusdb``, console script ``secantusd-py``), started by this module on a free
loopback port with in-memory storage; see ``/work/shared/spec/sacred_ecosystem.md``
§3 (what MongoObserver writes, how it fails) and §7 (SecantusDB). The tests skip only
when that package is not installed. Nothing here talks to any address but 127.0.0.1.

Successful runs go through click's CliRunner (in-process, fast); the runs whose server
does not answer go through a real ``python -m rhn_cli`` subprocess, so that *all* of
stderr (Sacred's logger, Python warnings) is seen when counting warning lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from rhn_cli.cli import cli
from rhn_cli.tracking.observers import (
    DEFAULT_DATABASE,
    MONGO_TIMEOUT_S,
    database_name,
    mongo_observer,
    mongo_problem,
    redact,
)

pymongo = pytest.importorskip("pymongo")

LOOPBACK = "127.0.0.1"
SERVER_START_TIMEOUT_S = 30.0

# A tiny model on a tiny synthetic corpus: a couple of seconds per run on a CPU.
EPOCHS = 2
TINY = [
    "with",
    "depth=2",
    "hidden_size=16",
    f"max_max_epoch={EPOCHS}",
    "synthetic.train_tokens=20000",
    "synthetic.valid_tokens=4000",
    "synthetic.test_tokens=4000",
]
# Metrics the engine logs once per epoch (Omniboard reads them via info.metrics).
EPOCH_METRICS = ("train.ppl", "valid.ppl", "valid.bpc", "lr")
FILE_STORE_FILES = ("config.json", "run.json", "metrics.json")


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _secantus_command() -> list[str]:
    """How to start SecantusDB from this interpreter's environment; skip if not installed."""
    script = Path(sys.executable).parent / "secantusd-py"
    if script.exists():
        return [str(script)]
    if importlib.util.find_spec("secantus") is not None:
        return [sys.executable, "-c", "import sys; from secantus.cli import main; sys.exit(main())"]
    pytest.skip(
        "SecantusDB is not installed (no 'secantusd-py' next to "
        f"{sys.executable} and no 'secantus' module): pip install secantusdb==0.7.0b3 "
        "(it is in rhn's [test] extra) to run the MongoDB recording tests"
    )


@pytest.fixture(scope="module")
def mongo_url(tmp_path_factory) -> Iterator[str]:
    """``mongodb://127.0.0.1:PORT`` of a fresh in-memory SecantusDB server."""
    command = _secantus_command()
    port = _free_port()
    logs = tmp_path_factory.mktemp("secantusdb")
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    url = f"mongodb://{LOOPBACK}:{port}"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        server = subprocess.Popen(
            [*command, "--host", LOOPBACK, "--port", str(port), "--storage-path", ":memory:"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"secantusd-py exited with code {server.returncode} before answering "
                    f"on {url}; its stderr:\n{err_path.read_text(errors='replace')}"
                )
            client = pymongo.MongoClient(url, serverSelectionTimeoutMS=500)
            try:
                client.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"secantusd-py did not answer a ping on {url} within "
                        f"{SERVER_START_TIMEOUT_S:g} s; its stderr:\n"
                        f"{err_path.read_text(errors='replace')}"
                    )
            finally:
                client.close()
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def mongo_client(mongo_url: str) -> Iterator:
    client = pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but
    never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Work in ``tmp_path`` with no rhn environment variables leaking in, and train on one
    thread: the model is tiny, and torch's spinning worker threads make a run 10-20x slower
    when the machine's cores are busy with anything else."""
    import torch

    monkeypatch.chdir(tmp_path)
    for name in ("RHN_MONGO_URL", "RHN_RUNS_DIR"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def _invoke(args: list[str], env: dict[str, str] | None = None):
    result = _runner().invoke(cli, ["train", *TINY, *args], env=env, catch_exceptions=True)
    assert result.exit_code == 0, (
        f"rhn train exited {result.exit_code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )
    return result


def _run_subprocess(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RHN_MONGO_URL", "RHN_RUNS_DIR")}
    env["OMP_NUM_THREADS"] = "1"  # see `isolated`
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rhn_cli", "train", *TINY, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc, time.monotonic() - start


def _file_store_run(run_dir: Path) -> dict:
    missing = [name for name in FILE_STORE_FILES if not (run_dir / name).is_file()]
    assert not missing, f"{run_dir} lacks {missing}; has {sorted(os.listdir(run_dir))}"
    return {name: json.loads((run_dir / name).read_text()) for name in FILE_STORE_FILES}


def _assert_file_store_completed(run_dir: Path) -> dict:
    stored = _file_store_run(run_dir)
    assert stored["run.json"]["status"] == "COMPLETED"
    assert isinstance(stored["run.json"]["result"], float)
    assert stored["config.json"]["depth"] == 2
    assert stored["config.json"]["hidden_size"] == 16
    for name in EPOCH_METRICS:
        assert stored["metrics.json"][name]["steps"] == list(range(1, EPOCHS + 1)), name
    return stored


def _assert_mongo_run(db, run_id) -> dict:
    """Check one run as Omniboard needs it; returns the runs document."""
    assert type(run_id) is int, f"MongoDB run _id must be an int, got {run_id!r}"
    run = db.runs.find_one({"_id": run_id})
    assert run is not None, f"no run {run_id} in {db.name}.runs"
    assert run["status"] == "COMPLETED"
    assert run["config"]["depth"] == 2
    assert run["config"]["hidden_size"] == 16
    assert run["config"]["max_max_epoch"] == EPOCHS
    assert run["config"]["synthetic"]["train_tokens"] == 20000
    assert isinstance(run["result"], float)

    links = {link["name"]: link["id"] for link in run["info"]["metrics"]}
    metrics = {doc["name"]: doc for doc in db.metrics.find({"run_id": run_id})}
    for name in EPOCH_METRICS:
        assert name in links, f"info.metrics lacks {name}: {sorted(links)}"
        assert name in metrics, f"no {name} document in {db.name}.metrics"
        doc = metrics[name]
        assert type(doc["run_id"]) is int and doc["run_id"] == run_id
        assert links[name] == str(doc["_id"]), f"info.metrics link for {name} is dangling"
        assert doc["steps"] == list(range(1, EPOCHS + 1)), (name, doc["steps"])
        assert len(doc["values"]) == EPOCHS
        assert all(isinstance(v, float) for v in doc["values"]), (name, doc["values"])
    # Omniboard plots every metric on one axis: throughput is in the info, not among them.
    assert "tokens_per_s" not in metrics and "tokens_per_s" not in links
    throughput = run["info"]["throughput"]["tokens_per_s"]
    assert throughput["steps"] == list(range(1, EPOCHS + 1)) and min(throughput["values"]) > 0
    # The best valid perplexity is the run's result, rounded for Omniboard's Result column.
    assert min(metrics["valid.ppl"]["values"]) == pytest.approx(run["result"], abs=5e-3)
    return run


def _only_run_id(db) -> int:
    ids = [doc["_id"] for doc in db.runs.find({}, {"_id": 1})]
    assert len(ids) == 1, f"expected exactly one run in {db.name}.runs, found {ids}"
    return ids[0]


# --------------------------------------------------------------------------------------
# Units: redact, database_name, mongo_problem, mongo_observer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017"),
        ("mongodb://127.0.0.1:27017/rhn", "mongodb://127.0.0.1:27017/rhn"),
        ("mongodb://user@127.0.0.1:27017/rhn", "mongodb://user@127.0.0.1:27017/rhn"),
        ("mongodb://user:secret@127.0.0.1:27017/db", "mongodb://user:***@127.0.0.1:27017/db"),
        ("mongodb://user:secret@db.example.org/db", "mongodb://user:***@db.example.org/db"),
        (
            "mongodb://user:p%40ss%3Aw@127.0.0.1:27017/db?authSource=admin",
            "mongodb://user:***@127.0.0.1:27017/db?authSource=admin",
        ),
        (
            "mongodb+srv://user:secret@cluster0.example.net/rhn?retryWrites=true",
            "mongodb+srv://user:***@cluster0.example.net/rhn?retryWrites=true",
        ),
        ("mongodb://:secret@127.0.0.1/db", "mongodb://:***@127.0.0.1/db"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected
    assert "secret" not in redact(url)
    assert "p%40ss" not in redact(url)


def test_redact_multi_host_url() -> None:
    # Replica-set URLs list several hosts; a password must be hidden there too, and
    # redact must not raise (in `rhn train` an exception here aborts the run).
    url = "mongodb://user:secret@10.0.0.1:27017,10.0.0.2:27017/rhn?replicaSet=rs0"
    try:
        redacted = redact(url)
    except ValueError as error:
        pytest.fail(
            f"BUG in rhn_cli.tracking.observers.redact: raises on a multi-host URL ({error}); "
            "`rhn train --mongo` with such a URL and credentials crashes instead of running"
        )
    assert redacted == "mongodb://user:***@10.0.0.1:27017,10.0.0.2:27017/rhn?replicaSet=rs0"


def test_redact_ipv6_host() -> None:
    redacted = redact("mongodb://user:secret@[::1]:27017/rhn")
    assert redacted == "mongodb://user:***@[::1]:27017/rhn", (
        f"BUG in redact: IPv6 brackets dropped, giving the invalid URL {redacted!r}"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://127.0.0.1:27017", DEFAULT_DATABASE),
        ("mongodb://127.0.0.1:27017/", DEFAULT_DATABASE),
        ("mongodb://127.0.0.1:27017/?appName=x", DEFAULT_DATABASE),
        ("mongodb://127.0.0.1:27017/experiments", "experiments"),
        ("mongodb://user:secret@127.0.0.1:27017/experiments?authSource=admin", "experiments"),
        ("mongodb+srv://user:secret@cluster0.example.net/lm", "lm"),
        ("mongodb://10.0.0.1:27017,10.0.0.2:27017/lm?replicaSet=rs0", "lm"),
    ],
)
def test_database_name(url: str, expected: str) -> None:
    assert DEFAULT_DATABASE == "rhn"
    assert database_name(url) == expected


def test_mongo_problem_none_when_server_answers(mongo_url: str) -> None:
    assert mongo_problem(mongo_url + "/rhn_probe", timeout_s=5) is None


def test_mongo_problem_when_nothing_listens(closed_port: int) -> None:
    start = time.monotonic()
    problem = mongo_problem(f"mongodb://{LOOPBACK}:{closed_port}", timeout_s=0.5)
    assert problem is not None and "0.5 s" in problem
    assert time.monotonic() - start < 5


def test_mongo_problem_invalid_url() -> None:
    problem = mongo_problem("http://127.0.0.1:27017/rhn", timeout_s=0.5)
    assert problem is not None and problem.startswith("invalid MongoDB URL")


def test_mongo_observer_uses_database_from_url(tmp_path: Path, mongo_url: str) -> None:
    # MongoClient is lazy: building the observer writes nothing.
    named = mongo_observer(f"{mongo_url}/some_db", tmp_path / "fail")
    default = mongo_observer(mongo_url, tmp_path)
    try:
        assert named.runs.database.name == "some_db"
        assert named.metrics.database.name == "some_db"
        assert named.metrics.name == "metrics"
        assert named.failure_dir == str(tmp_path / "fail")
        assert default.runs.database.name == DEFAULT_DATABASE
    finally:
        named.runs.database.client.close()
        default.runs.database.client.close()
    assert MONGO_TIMEOUT_S <= 5  # "a few seconds"


# --------------------------------------------------------------------------------------
# End to end: rhn train with a MongoDB server that answers
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_records_run_in_mongo_and_file_store(isolated: Path, mongo_url, mongo_client):
    db = mongo_client["rhn_test_db"]
    runs_dir = isolated / "runs"
    args = ["--runs-dir", str(runs_dir), "--mongo", f"{mongo_url}/rhn_test_db"]

    first = _invoke(args)
    run_id = _only_run_id(db)
    run = _assert_mongo_run(db, run_id)
    assert "Warning" not in first.stderr, first.stderr
    last_line = first.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"run {run_id} COMPLETED"), last_line
    assert f"MongoDB {mongo_url}/rhn_test_db" in last_line, last_line

    # The file store also has the run, under MongoDB's id (Sacred hands it on).
    stored = _assert_file_store_completed(runs_dir / str(run_id))
    assert stored["run.json"]["result"] == pytest.approx(run["result"])
    assert stored["config.json"]["seed"] == run["config"]["seed"]
    assert not (runs_dir / "_mongo_failures").exists()

    # A second run takes the next integer id, in both stores.
    _invoke(args)
    ids = sorted(doc["_id"] for doc in db.runs.find({}, {"_id": 1}))
    assert ids == [run_id, run_id + 1]
    _assert_mongo_run(db, run_id + 1)
    _assert_file_store_completed(runs_dir / str(run_id + 1))
    assert db.metrics.count_documents({"run_id": run_id}) == len(run["info"]["metrics"])


@pytest.mark.slow
def test_train_database_defaults_to_rhn(isolated: Path, mongo_url, mongo_client):
    assert DEFAULT_DATABASE not in mongo_client.list_database_names()
    _invoke(["--runs-dir", str(isolated / "runs"), "--mongo", mongo_url])
    db = mongo_client[DEFAULT_DATABASE]
    run_id = _only_run_id(db)
    _assert_mongo_run(db, run_id)
    _assert_file_store_completed(isolated / "runs" / str(run_id))


@pytest.mark.slow
def test_train_mongo_url_from_environment(isolated: Path, mongo_url, mongo_client):
    runs_dir = isolated / "runs"
    # An offline run already holds directory 1: the run takes id 2, free in MongoDB and
    # the file store alike (one id per run), and directory 1 is left as it was.
    offline = runs_dir / "1"
    offline.mkdir(parents=True)
    (offline / "run.json").write_text('{"status": "COMPLETED", "offline": true}')

    result = _invoke(
        ["--runs-dir", str(runs_dir)], env={"RHN_MONGO_URL": f"{mongo_url}/rhn_env_db"}
    )
    db = mongo_client["rhn_env_db"]
    run_id = _only_run_id(db)
    assert run_id == 2
    _assert_mongo_run(db, run_id)
    assert result.stdout.strip().splitlines()[-1].startswith("run 2 COMPLETED")
    assert "MongoDB" in result.stdout.strip().splitlines()[-1]

    assert json.loads((offline / "run.json").read_text()) == {
        "status": "COMPLETED",
        "offline": True,
    }
    _assert_file_store_completed(runs_dir / "2")


# --------------------------------------------------------------------------------------
# End to end: rhn train when MongoDB does not answer
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_unreachable_mongo_still_runs(tmp_path: Path, closed_port: int):
    url = f"mongodb://{LOOPBACK}:{closed_port}/rhn"
    runs_dir = tmp_path / "runs"
    proc, elapsed = _run_subprocess(["--runs-dir", str(runs_dir), "--mongo", url], tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    # Besides the progress lines (stderr, off a terminal), one warning.
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("  epoch ")]
    assert len(lines) == 1, f"expected one warning line on stderr, got:\n{proc.stderr}"
    warning = lines[0]
    assert "MongoDB" in warning and url in warning, warning
    assert "file store" in warning and str(runs_dir) in warning, warning

    _assert_file_store_completed(runs_dir / "1")
    assert not (runs_dir / "_mongo_failures").exists()
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("run 1 COMPLETED") and "MongoDB" not in last_line, last_line
    # The probe gives up after MONGO_TIMEOUT_S (3 s); the tiny run itself takes seconds.
    assert elapsed < 30, f"rhn train took {elapsed:.1f} s with MongoDB unreachable"


@pytest.mark.slow
def test_train_never_leaks_mongo_password(tmp_path: Path, closed_port: int):
    password = "s3cret-Pw-4711"
    url = f"mongodb://user:{password}@{LOOPBACK}:{closed_port}/db"
    runs_dir = tmp_path / "runs"
    proc, _ = _run_subprocess(["--runs-dir", str(runs_dir), "--mongo", url], tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    assert password not in proc.stdout
    assert password not in proc.stderr
    assert f"mongodb://user:***@{LOOPBACK}:{closed_port}/db" in proc.stderr, proc.stderr

    files = [path for path in runs_dir.rglob("*") if path.is_file()]
    assert any(path.name == "run.json" for path in files)
    leaking = [str(path) for path in files if password.encode() in path.read_bytes()]
    assert not leaking, f"the MongoDB password is stored in {leaking}"
