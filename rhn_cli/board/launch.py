"""What ``rhn board`` opens: Omniboard over MongoDB, or over a local copy of the runs.

With no MongoDB configured, :func:`open_board` starts the local MongoDB-compatible server
(:mod:`rhn_cli.board.local_mongo`), copies the file-store runs into it, opens Omniboard
on that, and keeps it in step with the file store while open (:mod:`rhn_cli.board.follow`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rhn_cli.board.follow import Follower, ask_quick_refresh
from rhn_cli.board.local_mongo import (
    LOCAL_DB_DIRNAME,
    LocalMongo,
    remember_port,
    remembered_port,
    secantus_command,
    start_local_mongo,
)
from rhn_cli.board.omniboard import DEFAULT_PORT, Omniboard, prepare_omniboard, start_omniboard
from rhn_cli.board.process import BoardError
from rhn_cli.tracking.omniboard_view import prepare_omniboard_view


@dataclass
class Board:
    """Omniboard, and the local database it reads when no MongoDB is configured."""

    omniboard: Omniboard
    local_db: LocalMongo | None = None
    follower: Follower | None = None  # keeps the local database in step with the runs

    @property
    def url(self) -> str:
        return self.omniboard.url

    def problem(self) -> str | None:
        """None while both servers run, else which one stopped and its last words."""
        for service in (self.omniboard.service, self.local_db and self.local_db.service):
            if service is not None and not service.running():
                code = service.process.returncode
                return f"{service.name} stopped (exit code {code}): {service.tail()}"
        return None

    def stop(self) -> None:
        """Bring the local database up to date with the runs one last time, stop Omniboard,
        then the local database (if any). Safe to call twice."""
        try:
            if self.follower is not None:
                follower, self.follower = self.follower, None
                try:
                    follower.stop()
                finally:
                    follower.session.close()
        finally:
            try:
                self.omniboard.stop()
            finally:
                if self.local_db is not None:
                    self.local_db.stop()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def open_board(
    mongo_url: str | None,
    runs_dir: str | os.PathLike,
    *,
    port: int = DEFAULT_PORT,
    cache: Path | None = None,
    echo: Callable[[str], Any] = print,
) -> Board:
    """Omniboard on ``mongo_url``; with None, on a local SecantusDB server holding a copy
    of the file-store runs in ``runs_dir``, kept in step with them until :meth:`Board.stop`."""
    if mongo_url:
        _prepare_view(mongo_url)
        return Board(start_omniboard(mongo_url, port, cache=cache, echo=echo))

    runs_dir = Path(runs_dir)
    secantus_command()  # fail before installing anything if it is missing
    prepared = prepare_omniboard(port, cache, echo=echo)
    storage = runs_dir / LOCAL_DB_DIRNAME
    echo(f"No MongoDB configured: starting a local one with its data in {storage}")
    remembered = remembered_port(runs_dir)
    try:
        local_db = start_local_mongo(storage, port=remembered)
    except BoardError:
        if remembered is None:
            raise
        local_db = start_local_mongo(storage)  # someone took the port meanwhile
    try:
        remember_port(runs_dir, local_db.url)
        follower = _follow(runs_dir, local_db.url, echo)
        try:
            omniboard = start_omniboard(local_db.url, port, echo=echo, prepared=prepared)
        except BaseException:
            follower.session.close()
            raise
    except BaseException:
        local_db.stop()
        raise
    return Board(omniboard, local_db, follower.start())


def _follow(runs_dir: Path, url: str, echo: Callable[[str], Any]) -> Follower:
    """Copy the file-store runs into the local database, and what follows them from now."""
    from rhn_cli.tracking.sync import SyncError, SyncSession

    try:
        session = SyncSession(runs_dir, url, live=True)
    except SyncError as error:
        raise BoardError(f"cannot copy the runs into the local database: {error}") from None
    try:
        follower = Follower(
            session, echo=echo, after_push=lambda: prepare_omniboard_view(session.db)
        )
        echo(f"Copying the file-store runs in {runs_dir} into it:")
        report = follower.first_pass(_indented(echo))
        if any((report.pushed, report.updated, report.unchanged, report.skipped, report.failed)):
            echo(f"  {report.summary()}")
        else:
            echo(f"  no runs in {runs_dir} yet ('rhn train' records one)")
        ask_quick_refresh(session.db)
    except BaseException:
        session.close()
        raise
    return follower


def _prepare_view(mongo_url: str) -> None:
    """Omniboard's config columns for the runs in ``mongo_url`` (best effort: an
    unreachable MongoDB is Omniboard's to report)."""
    import pymongo
    import pymongo.errors

    from rhn_cli.tracking.observers import database_name, mongo_client_options

    client = pymongo.MongoClient(mongo_url, **mongo_client_options())
    try:
        prepare_omniboard_view(client[database_name(mongo_url)])
    except pymongo.errors.PyMongoError:
        pass
    finally:
        client.close()


def _indented(echo: Callable[[str], Any]) -> Callable[[str], None]:
    def relay(line: str) -> None:
        # Omniboard does not show checkpoints: not copying them is no news here.
        if not line.startswith("checkpoints (*.pt)"):
            echo(f"  {line}")

    return relay
