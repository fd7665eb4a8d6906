"""``rhn board``: Omniboard 2.16.1 over MongoDB, installed on demand.

Units: Node.js checks, ports, URLs, the on-demand install (with a fake ``npm`` on PATH),
and the CLI's one-line errors. End to end (marked ``omniboard``; deselect with
``-m 'not omniboard'``): a run trained with ``rhn train --mongo`` into a real
MongoDB-wire server (SecantusDB on 127.0.0.1, the fixture of test_mongo_recording.py) is
served by a real Omniboard 2.16.1 through its HTTP API; and ``rhn board`` with no MongoDB
starts its own local server, copies the file-store runs into it and stops everything on
Ctrl-C. The end-to-end tests skip only when Node.js or npm is not installed.

Omniboard is installed once (about 1-2 minutes, 530 MB) into rhn's cache directory:
``RHN_CACHE_DIR`` if set, else the user cache (``~/.cache/rhn``), shared with ``rhn board``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from rhn_cli.board import launch
from rhn_cli.board import omniboard as omniboard_module
from rhn_cli.board.omniboard import (
    OMNIBOARD_VERSION,
    ensure_omniboard,
    find_node,
    installed_omniboard,
    omniboard_home,
    parse_node_version,
    start_omniboard,
    with_database,
)
from rhn_cli.board.process import BoardError, free_port, port_problem, scrub
from rhn_cli.cli import cli
from tests.conftest import FAST_RUN
from tests.test_mongo_recording import (
    _secantus_command,
    mongo_url,  # noqa: F401  (a fixture)
)

# Where the end-to-end tests find (or install, once) Omniboard: read before the autouse
# fixture changes the environment.
OMNIBOARD_CACHE = omniboard_module.cache_dir()
NODE_MISSING = shutil.which("node") is None or shutil.which("npm") is None
needs_node = pytest.mark.skipif(
    NODE_MISSING,
    reason="Node.js and npm are not installed (shutil.which found no 'node' or 'npm'): "
    "Omniboard is a Node.js app",
)


def _executable(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_bin(tmp_path, monkeypatch) -> Path:
    """A directory that is the whole PATH: only the programs a test puts there exist."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))
    return directory


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{result.output}"
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------
# Node.js
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v20.20.2\n", (20, 20, 2)),
        ("v18.0.0", (18, 0, 0)),
        ("v22.1.0-nightly20240101", (22, 1, 0)),
        ("  v16.20.2  \n", (16, 20, 2)),
    ],
)
def test_parse_node_version(text, expected):
    assert parse_node_version(text) == expected


@pytest.mark.parametrize("text", ["", "node: command not found", "v20", "twenty"])
def test_parse_node_version_unreadable(text):
    with pytest.raises(BoardError, match=r"cannot read the Node.js version .*Node.js >= 18"):
        parse_node_version(text)


def test_node_missing_is_one_clear_error(runner, fake_bin):
    result = runner.invoke(cli, ["board", "--mongo", "mongodb://127.0.0.1:1/x", "--no-browser"])
    assert result.exit_code == 1
    line = _error_line(result)
    assert "Node.js >= 18" in line and "no 'node' on PATH" in line, line
    assert "https://nodejs.org/" in line and "apt-get install nodejs npm" in line, line


def test_node_too_old_is_one_clear_error(runner, fake_bin):
    node = _executable(fake_bin, "node", 'echo "v16.20.2"\n')
    result = runner.invoke(cli, ["board", "--mongo", "mongodb://127.0.0.1:1/x", "--no-browser"])
    assert result.exit_code == 1
    line = _error_line(result)
    assert f"{node} is v16.20.2" in line and "Node.js >= 18" in line, line
    assert "install Node.js 18 or newer" in line, line


def test_node_new_enough(fake_bin):
    node = _executable(fake_bin, "node", 'echo "v18.19.1"\n')
    assert find_node() == str(node)


# --------------------------------------------------------------------------------------
# Installing Omniboard on demand (a fake npm that records its arguments)
# --------------------------------------------------------------------------------------

# PATH holds only the fake programs: the scripts call other tools by their full path.
MKDIR = shutil.which("mkdir") or "/bin/mkdir"
FAKE_NPM = f"""\
echo "$@" >> "$NPM_CALLS"
prefix="$3"
{MKDIR} -p "$prefix/node_modules/omniboard/dist"
echo "// omniboard" > "$prefix/node_modules/omniboard/dist/start.js"
echo "npm warn EBADENGINE Unsupported engine"
"""
FAILING_NPM = f"""\
echo "$@" >> "$NPM_CALLS"
{MKDIR} -p "$3/node_modules/half"
echo "npm error code E404" >&2
echo "npm error 404 Not Found - GET https://registry.npmjs.org/omniboard" >&2
exit 1
"""


@pytest.fixture
def npm_calls(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "npm-calls.txt"
    monkeypatch.setenv("NPM_CALLS", str(path))
    return path


def _calls(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_install_once_then_reuse(tmp_path, fake_bin, npm_calls):
    _executable(fake_bin, "npm", FAKE_NPM)
    cache = tmp_path / "cache"
    messages = []
    entry = ensure_omniboard(cache, echo=messages.append)

    home = cache / f"omniboard-{OMNIBOARD_VERSION}"
    assert omniboard_home(cache) == home
    assert entry == home / "node_modules" / "omniboard" / "dist" / "start.js"
    assert entry.is_file()
    assert messages[0] == (
        f"Installing Omniboard {OMNIBOARD_VERSION} into {home} with npm "
        "(one time, about 1-2 minutes)..."
    )
    assert messages[-1] == f"Omniboard {OMNIBOARD_VERSION} installed."
    [call] = _calls(npm_calls)
    assert call[:2] == ["install", "--prefix"]
    assert call[3:] == [f"omniboard@{OMNIBOARD_VERSION}", "--no-audit", "--no-fund"]
    # npm installed into a staging directory that was renamed into place.
    staging = Path(call[2])
    assert staging.parent == cache and staging != home and not staging.exists()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [home.name]

    messages.clear()
    assert ensure_omniboard(cache, echo=messages.append) == entry
    assert messages == [] and len(_calls(npm_calls)) == 1


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RHN_CACHE_DIR", str(tmp_path / "c"))
    assert omniboard_module.cache_dir() == tmp_path / "c"
    assert omniboard_home() == tmp_path / "c" / f"omniboard-{OMNIBOARD_VERSION}"
    monkeypatch.delenv("RHN_CACHE_DIR")
    assert omniboard_module.cache_dir().name == "rhn"


def test_failed_install_leaves_nothing_to_use(tmp_path, fake_bin, npm_calls):
    _executable(fake_bin, "npm", FAILING_NPM)
    cache = tmp_path / "cache"
    with pytest.raises(BoardError) as caught:
        ensure_omniboard(cache, echo=lambda message: None)
    message = str(caught.value)
    assert message.startswith(
        f"npm install omniboard@{OMNIBOARD_VERSION} failed (exit code 1): npm error code E404; "
        "npm error 404 Not Found - GET https://registry.npmjs.org/omniboard; "
    ), message
    log = cache / f"omniboard-{OMNIBOARD_VERSION}-install.log"
    assert f"npm's output is in {log}" in message and "E404" in log.read_text()
    assert installed_omniboard(cache) is None
    assert [p for p in cache.iterdir() if p.is_dir()] == [], "a half install was left behind"


def test_interrupted_install_is_never_used(tmp_path, fake_bin, npm_calls):
    # A staging directory left by an install killed before its rename: complete-looking,
    # but not in place. It is not used, and the next install removes it.
    cache = tmp_path / "cache"
    leftover = cache / f".omniboard-{OMNIBOARD_VERSION}-killed"
    (leftover / "node_modules" / "omniboard" / "dist").mkdir(parents=True)
    (leftover / "node_modules" / "omniboard" / "dist" / "start.js").write_text("// half")
    assert installed_omniboard(cache) is None

    _executable(fake_bin, "npm", FAKE_NPM)
    entry = ensure_omniboard(cache, echo=lambda message: None)
    assert entry.read_text() == "// omniboard\n"
    assert not leftover.exists()
    assert len(_calls(npm_calls)) == 1


def test_npm_missing_is_one_clear_error(tmp_path, fake_bin):
    with pytest.raises(BoardError, match=r"needs npm, and there is no 'npm' on PATH"):
        ensure_omniboard(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------
# Ports, URLs, credentials
# --------------------------------------------------------------------------------------


@pytest.fixture
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_problem(busy_port):
    assert (
        port_problem(busy_port) == f"port {busy_port} on 127.0.0.1 is in use (another Omniboard?)"
    )
    assert port_problem(free_port()) is None


def test_busy_port_is_one_clear_error(runner, busy_port, monkeypatch, tmp_path):
    monkeypatch.setattr(omniboard_module, "find_node", lambda: "node")
    monkeypatch.setenv("RHN_CACHE_DIR", str(tmp_path / "cache"))
    result = runner.invoke(
        cli, ["board", "--mongo", "mongodb://127.0.0.1:1/x", "--port", str(busy_port)]
    )
    assert result.exit_code == 1
    assert _error_line(result) == (
        f"Error: port {busy_port} on 127.0.0.1 is in use (another Omniboard?); "
        "choose another port with --port"
    )
    assert not (tmp_path / "cache").exists(), "nothing is installed for a board that cannot start"


@pytest.mark.parametrize("port", ["0", "65536", "web"])
def test_bad_port_is_a_usage_error(runner, port):
    result = runner.invoke(cli, ["board", "--port", port])
    assert result.exit_code == 2
    assert "Invalid value for '--port'" in result.output


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017/rhn"),
        ("mongodb://127.0.0.1:27017/", "mongodb://127.0.0.1:27017/rhn"),
        ("mongodb://127.0.0.1:27017/lab", "mongodb://127.0.0.1:27017/lab"),
        ("mongodb://u:p@h:1/?authSource=admin", "mongodb://u:p@h:1/rhn?authSource=admin"),
        ("mongodb://u:p@h:1?authSource=admin", "mongodb://u:p@h:1/rhn?authSource=admin"),
        ("mongodb://a:1,b:2/?replicaSet=rs", "mongodb://a:1,b:2/rhn?replicaSet=rs"),
        ("mongodb+srv://u:p@c.example.net/lm", "mongodb+srv://u:p@c.example.net/lm"),
    ],
)
def test_with_database(url, expected):
    # Omniboard would read the database "test" from a URL that names none; rhn records
    # into "rhn" then.
    assert with_database(url) == expected


def test_scrub_hides_the_password():
    url = "mongodb://alice:s3cr%40t@127.0.0.1:27017/rhn"
    text = f"cannot connect to {url}; auth s3cr@t and s3cr%40t failed"
    assert scrub(text, url) == (
        "cannot connect to mongodb://alice:***@127.0.0.1:27017/rhn; auth *** and *** failed"
    )


def test_unreachable_mongo_is_one_clear_error_without_password(runner, monkeypatch, tmp_path):
    monkeypatch.setattr(omniboard_module, "prepare_omniboard", lambda *a, **k: ("node", tmp_path))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        url = f"mongodb://alice:pa55word@127.0.0.1:{port}/lab"
        result = runner.invoke(cli, ["board", "--mongo", url, "--no-browser"])
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(
        f"Error: MongoDB mongodb://alice:***@127.0.0.1:{port}/lab cannot be used"
    )
    assert "pa55word" not in result.output


# --------------------------------------------------------------------------------------
# No MongoDB configured, and no SecantusDB
# --------------------------------------------------------------------------------------


def test_missing_secantusdb_says_install_rhn_board(runner, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "secantus" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("RHN_CACHE_DIR", str(tmp_path / "cache"))
    result = runner.invoke(cli, ["board", "--no-browser"])
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith("Error: no MongoDB is configured, and the local MongoDB-compatible")
    assert "(SecantusDB) is not installed: pip install 'rhn[board]'" in line, line
    assert "--mongo URL" in line and "RHN_MONGO_URL" in line, line
    # Nothing was installed or created for a board that cannot start.
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "runs").exists()


def test_mongo_none_means_the_local_board(runner, monkeypatch, tmp_path):
    # --mongo none (or RHN_MONGO_URL=none) asks for the local board even when a MongoDB
    # is configured in the settings file.
    settings = tmp_path / "settings.yaml"
    settings.write_text("mongo_url: mongodb://127.0.0.1:1/configured\n")
    monkeypatch.setenv("RHN_CONFIG_FILE", str(settings))
    seen = []

    def fake_open_board(url, runs_dir, **kwargs):
        seen.append(url)
        raise BoardError("stop here")

    monkeypatch.setattr(launch, "open_board", fake_open_board)
    assert runner.invoke(cli, ["board", "--mongo", "none"]).exit_code == 1
    assert runner.invoke(cli, ["board"]).exit_code == 1
    assert seen == [None, "mongodb://127.0.0.1:1/configured"]


def test_board_help(runner):
    result = runner.invoke(cli, ["board", "--help"])
    assert result.exit_code == 0
    for option in ("--mongo", "--port", "--runs-dir", "--no-browser"):
        assert option in result.output
    assert "Node.js 18" in result.output and "rhn[board]" in result.output


# --------------------------------------------------------------------------------------
# End to end: a real Omniboard 2.16.1 on a real MongoDB-wire server
# --------------------------------------------------------------------------------------


def _get(url: str, timeout: float = 15):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200, url
        body = response.read().decode("utf-8")
    return json.loads(body) if body[:1] in "[{" else body


def _query(api: str, path: str, **params) -> object:
    return _get(f"{api}/{path}?{urllib.parse.urlencode(params)}" if params else f"{api}/{path}")


def _train(runner, *args: str) -> str:
    result = runner.invoke(cli, ["train", *args, "with", *FAST_RUN])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def _metrics_by_name(documents) -> dict:
    return {doc["name"]: doc for doc in documents}


@pytest.fixture(scope="module")
def omniboard_installed():
    """Omniboard in the persistent cache (installed on first use: 1-2 minutes, once)."""
    if NODE_MISSING:
        pytest.skip("Node.js and npm are not installed")
    return ensure_omniboard(OMNIBOARD_CACHE, echo=lambda message: print(message, flush=True))


@pytest.mark.omniboard
@needs_node
def test_omniboard_serves_a_trained_run_and_its_metrics(
    runner,
    tmp_path,
    mongo_url,  # noqa: F811  (the fixture imported above)
    omniboard_installed,
):
    database = f"{mongo_url}/rhn_board_e2e"
    last = _train(runner, "--mongo", database, "--name", "board-e2e", "--comment", "via rhn")
    assert last.startswith("run 1 COMPLETED"), last
    recorded = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())

    port = free_port()
    omniboard = start_omniboard(database, port, cache=OMNIBOARD_CACHE)
    try:
        assert omniboard.port == port
        assert omniboard.url == f"http://127.0.0.1:{port}/sacred"
        api = omniboard.api

        assert _query(api, "Runs/count") == {"count": 1}
        [run] = _query(api, "Runs")
        assert type(run["_id"]) is int and run["_id"] == 1
        assert run["status"] == "COMPLETED"
        assert run["experiment"]["name"] == "board-e2e"
        assert run["meta"]["comment"] == "via rhn"  # Omniboard's Notes
        assert run["config"]["depth"] == 2 and run["config"]["hidden_size"] == 16
        assert run["config"]["synthetic"]["train_tokens"] == 20000
        assert {link["name"] for link in run["info"]["metrics"]} >= {"valid.ppl", "train.ppl"}

        metrics = _metrics_by_name(_query(api, "Metrics", query=json.dumps({"run_id": 1})))
        assert {"train.ppl", "valid.ppl", "valid.bpc", "lr"} <= set(metrics)
        for name in ("train.ppl", "valid.ppl", "lr"):
            assert metrics[name]["run_id"] == 1
            assert metrics[name]["steps"] == recorded[name]["steps"] == [1, 2]
            assert metrics[name]["values"] == pytest.approx(recorded[name]["values"])

        # A metric column (best valid perplexity): Omniboard joins the metrics through
        # info.metrics, and the column stays blank when the links are wrong.
        request = urllib.request.Request(
            f"{api}/Omniboard.Metric.Columns",
            data=json.dumps(
                {"name": "best_valid_ppl", "metric_name": "valid.ppl", "extrema": "min"}
            ).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            assert response.status in (200, 201)
        [row] = _query(api, "Runs", select="_id,status,best_valid_ppl")
        assert row["best_valid_ppl"] == pytest.approx(min(recorded["valid.ppl"]["values"]))

        page = _get(omniboard.url)
        assert "<title>Omniboard</title>" in page
    finally:
        omniboard.stop()
    assert not omniboard.running()
    assert port_problem(port) is None, "Omniboard still listens after stop()"


def _board_processes(marker: str) -> list[str]:
    """Command lines of running processes that mention ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in command:
            found.append(command)
    return found


@pytest.mark.omniboard
@needs_node
def test_rhn_board_without_mongo_copies_local_runs_and_stops_on_ctrl_c(
    runner, tmp_path, omniboard_installed
):
    _secantus_command()  # skips, as test_mongo_recording does, without SecantusDB
    _train(runner, "--name", "offline-run")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHN_")}
    env.update(
        RHN_CACHE_DIR=str(OMNIBOARD_CACHE),
        RHN_CONFIG_FILE=str(tmp_path / "no-settings.yaml"),
        OMP_NUM_THREADS="1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "rhn_cli", "board", "--no-browser", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    storage = tmp_path / "runs" / ".board-db"
    output = []
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:
            output.append(line)
            if line.startswith("Open ") or time.monotonic() > deadline:
                break
        shown = "".join(output)
        assert f"Open http://127.0.0.1:{port}/sacred   (Ctrl-C to stop)" in shown, shown
        assert "No MongoDB configured: starting a local one with its data in runs/.board-db" in (
            shown
        )
        assert "pushed run 1 -> MongoDB id 1" in shown, shown
        assert "checkpoints" not in shown, shown

        api = f"http://127.0.0.1:{port}/sacred/api/v1"
        [run] = _query(api, "Runs")
        assert run["_id"] == 1 and run["status"] == "COMPLETED"
        assert run["experiment"]["name"] == "offline-run"
        metrics = _metrics_by_name(_query(api, "Metrics", query=json.dumps({"run_id": 1})))
        assert metrics["valid.ppl"]["steps"] == [1, 2]
        assert _board_processes(str(storage)), "no local database process found"

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(output) + rest
    assert "Stopping Omniboard and the local database..." in rest and "Stopped." in rest, rest
    assert port_problem(port) is None, "Omniboard still listens after Ctrl-C"
    assert _board_processes(str(storage)) == [], "the local database outlived rhn board"
    assert storage.is_dir(), "the local database keeps its data under the runs directory"
