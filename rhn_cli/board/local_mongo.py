"""The local MongoDB-compatible server ``rhn board`` reads when no MongoDB is configured.

SecantusDB (the ``rhn[board]`` extra) runs on 127.0.0.1 with its data in
``<runs-dir>/.board-db``; :func:`rhn_cli.board.launch.open_board` copies the file-store
runs into it. See /work/shared/spec/sacred_ecosystem.md §7 (SecantusDB).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rhn_cli.board.process import (
    LOOPBACK,
    START_TIMEOUT_S,
    BoardError,
    Service,
    free_port,
    port_problem,
)
from rhn_cli.tracking.observers import mongo_problem

LOCAL_DB_DIRNAME = ".board-db"
BOARD_EXTRA_HELP = "pip install 'rhn[board]'"

# The local database listens on the same port each time when it can: the file store
# remembers what each database has of a run under the database's URL, port included, so a
# new port would make every run look new to it.
LOCAL_DB_STATE = ".board-db.json"


@dataclass
class LocalMongo:
    """A SecantusDB server on 127.0.0.1 holding the board's copy of the file-store runs."""

    service: Service
    url: str  # mongodb://127.0.0.1:PORT/rhn
    storage_path: Path

    def stop(self) -> None:
        self.service.stop()


def secantus_command() -> list[str]:
    """How to start SecantusDB, else :class:`BoardError` saying to install ``rhn[board]``."""
    script = Path(sys.executable).parent / "secantusd-py"
    if script.is_file():
        return [str(script)]
    if importlib.util.find_spec("secantus") is not None:
        return [sys.executable, "-m", "secantus"]
    from rhn_cli.tracking.settings import how_to_configure_mongo

    raise BoardError(
        "no MongoDB is configured, and the local MongoDB-compatible server rhn board "
        f"starts instead (SecantusDB) is not installed: {BOARD_EXTRA_HELP} (or "
        f"{how_to_configure_mongo()})"
    )


def start_local_mongo(
    storage_path: Path, *, port: int | None = None, timeout_s: float = START_TIMEOUT_S
) -> LocalMongo:
    """Start SecantusDB on 127.0.0.1 with its data in ``storage_path``; wait for a ping."""
    command = secantus_command()
    storage_path = Path(storage_path)
    try:
        storage_path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BoardError(f"cannot create {storage_path} for the local database: {error}") from error
    absolute = storage_path.resolve()
    port = port or free_port()
    url = f"mongodb://{LOOPBACK}:{port}/rhn"
    service = Service(
        "the local MongoDB server (SecantusDB)",
        [*command, "--host", LOOPBACK, "--port", str(port), "--storage-path", str(absolute)],
    )
    deadline = time.monotonic() + timeout_s
    try:
        while mongo_problem(url, timeout_s=0.5) is not None:
            if not service.running():
                raise BoardError(
                    f"the local MongoDB server (SecantusDB) on {storage_path} exited with "
                    f"code {service.process.returncode} before answering: {service.tail()}"
                )
            if time.monotonic() > deadline:
                raise BoardError(
                    f"the local MongoDB server (SecantusDB) did not answer on {url} within "
                    f"{timeout_s:g} s: {service.tail()}"
                )
            time.sleep(0.2)
    except BaseException:
        service.stop()
        raise
    return LocalMongo(service, url, storage_path)


def remembered_port(runs_dir: Path) -> int | None:
    """The port the local database of ``runs_dir`` had last time, if it is free now."""
    try:
        port = json.loads((runs_dir / LOCAL_DB_STATE).read_text())["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(port, int) or not 1024 <= port <= 65535 or port_problem(port):
        return None
    return port


def remember_port(runs_dir: Path, url: str) -> None:
    """Note the local database's port for :func:`remembered_port` (best effort)."""
    from rhn_cli.atomic import write_atomically

    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    text = json.dumps({"port": port, "url": url}, indent=2) + "\n"
    try:
        write_atomically(runs_dir / LOCAL_DB_STATE, text.encode("utf-8"))
    except OSError:
        pass  # only a speed-up for the next start
