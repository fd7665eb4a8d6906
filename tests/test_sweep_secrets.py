"""``rhn sweep`` never shows a MongoDB password: not on its points' command lines
(``ps``), not in their logs, printed commands or run records. The points get the URL
in RHN_MONGO_URL."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from tests.sweep_processes import (
    QUICK,
    children_of,
    read_proc,
    start_sweep,
    sweep_environment,
)
from tests.test_mongo_recording import LOOPBACK, closed_port  # noqa: F401  (a fixture)

PASSWORD = "s3cret-Pw-4711"


def _url(port: int) -> str:
    return f"mongodb://alice:{PASSWORD}@{LOOPBACK}:{port}/db"


@pytest.mark.parametrize("via", ["env", "option"])
def test_dry_run_commands_leave_the_mongo_url_out(runner, monkeypatch, via):
    url = _url(27017)
    args = ["sweep", "--dry-run", "--name", "s", "with", "tiny", "depth=[1,2]"]
    if via == "env":
        monkeypatch.setenv("RHN_MONGO_URL", url)
    else:
        args[1:1] = ["--mongo", url]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 2
    for command in commands:
        assert "--mongo" not in command
        assert command[command.index("train") :][:3] == ["train", "--tag", "s"]
    assert result.stderr.splitlines() == [
        f"# each command records to MongoDB mongodb://alice:***@{LOOPBACK}:27017/db only "
        "with RHN_MONGO_URL set to that URL (left out of the command: it may hold a password)"
    ]


def _watch(sweep, log: Path) -> dict[int, tuple[bytes, bytes]]:
    """The argv and environment of each 'rhn train' child of ``sweep`` while it runs;
    Ctrl-C to the sweep once its point trains, to see the command that continues it."""
    seen: dict[int, tuple[bytes, bytes]] = {}  # child pid -> (argv, environment)
    interrupted = False
    deadline = time.monotonic() + 60
    while sweep.poll() is None and time.monotonic() < deadline:
        for pid in children_of(sweep.pid):
            argv, environ = read_proc(pid, "cmdline"), read_proc(pid, "environ")
            if b"train" in argv.split(b"\0"):  # exec'd: 'rhn train', not the fork
                seen[pid] = (argv, environ)
        if not interrupted and seen and log.is_file() and "epoch   1/" in log.read_text():
            sweep.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(0.05)
    return seen


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_points_get_the_mongo_url_in_their_environment_not_their_argv(
    tmp_path,
    closed_port,  # noqa: F811
):
    """A real sweep with a password URL (MongoDB not answering: the point records to the
    file store only): the running child's argv, the point log, the sweep's output (the
    command that continues it included) and every file of the run are read for the
    password."""
    url = _url(closed_port)
    runs = tmp_path / "runs"
    out = tmp_path / "sweep.out"
    args = ["--name", "secret", "--runs-dir", str(runs), "with", *QUICK]
    args += ["max_max_epoch=40", "hidden_size=[8]"]
    sweep = start_sweep(args, out, sweep_environment(RHN_MONGO_URL=url))
    log = runs / "_sweeps" / "secret" / "point-1.log"
    try:
        seen = _watch(sweep, log)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        sweep.wait(timeout=30)
    text = out.read_text()
    assert seen, f"no 'rhn train' child of the sweep was seen running:\n{text}"
    for argv, environ in seen.values():
        assert PASSWORD.encode() not in argv, argv.replace(b"\0", b" ")
        assert b"--mongo" not in argv.split(b"\0")
        assert f"RHN_MONGO_URL={url}".encode() in environ.split(b"\0")

    assert sweep.returncode == 130, text
    assert PASSWORD not in text
    redacted = f"mongodb://alice:***@{LOOPBACK}:{closed_port}/db"
    assert f"Continue with:\n  {sys.executable} -m rhn_cli sweep --name secret" in text
    assert f"(it records to MongoDB {redacted} only with RHN_MONGO_URL set" in text
    assert PASSWORD not in log.read_text()
    # The child got the URL (from its environment): it says MongoDB does not answer.
    assert f"MongoDB at {redacted}:" in log.read_text()
    assert json.loads((runs / "1" / "run.json").read_text())["status"] == "INTERRUPTED"
    files = [path for path in runs.rglob("*") if path.is_file()]
    assert {"run.json", "config.json", "cout.txt", "info.json"} <= {p.name for p in files}
    leaking = [str(path) for path in files if PASSWORD.encode() in path.read_bytes()]
    assert not leaking, f"the MongoDB password is stored in {leaking}"
