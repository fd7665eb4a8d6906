"""The local board follows the file store: new runs, running runs' metrics, heartbeat and
status reach its database within seconds, while ``rhn board`` is open.

A :class:`Follower` thread looks at the file store every ``interval_s`` seconds. The look
is cheap: one directory listing and a ``stat`` of each run's five record files
(``run.json``, ``config.json``, ``metrics.json``, ``info.json``, ``cout.txt``, all but the
last written atomically by the run). Only the runs whose records changed since the last
push are read and pushed, through one :class:`~rhn_cli.tracking.sync.SyncSession` kept
open for the board's life, which writes only the metric series that changed. A running
run's records change at each Sacred heartbeat (every 10 s) and epoch end, so the board
lags the file store by at most ``interval_s`` after that.

When the board stops, the follower makes a last pass before the database is stopped, and
the database keeps its data in ``RUNS_DIR/.board-db``: the next ``rhn board`` starts from
it, and the runs' sync state (``mongo.json``) tells it what is already there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rhn_cli.tracking.sync import RECORD_FILES, SyncReport, SyncSession

FOLLOW_INTERVAL_S = 2.0
# Omniboard refreshes its runs table every 30 s unless told otherwise: the local board
# asks for this, once, so that what the follower pushes shows up as quickly.
OMNIBOARD_REFRESH_S = 10


def ask_quick_refresh(db) -> None:
    """Have Omniboard refresh its runs table every ``OMNIBOARD_REFRESH_S`` seconds, unless
    a refresh interval is already set (Omniboard's settings dialog changes it)."""
    settings = db["omniboard.settings"]
    if settings.find_one({"name": "auto_refresh_interval"}) is None:
        settings.insert_one({"name": "auto_refresh_interval", "value": OMNIBOARD_REFRESH_S})


def record_stamps(run_dir: Path) -> tuple:
    """What changes whenever the run records something: its record files' sizes and
    modification times."""
    stamps = []
    for name in RECORD_FILES:
        try:
            stat = os.stat(run_dir / name)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def changed_runs(runs_dir: Path, seen: dict[str, tuple]) -> dict[str, tuple]:
    """The runs of ``runs_dir`` whose records differ from ``seen`` (run id -> stamps),
    with their stamps now."""
    changed = {}
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        return changed
    for entry in entries:
        if entry.name.startswith(("_", ".")) or not entry.is_dir():
            continue
        stamps = record_stamps(Path(entry.path))
        if stamps[0] is not None and seen.get(entry.name) != stamps:
            changed[entry.name] = stamps
    return changed


class Follower:
    """Keeps the board's database in step with the file store: :meth:`first_pass`, then
    :meth:`start` a thread that pushes what changed every ``interval_s``, until :meth:`stop`."""

    def __init__(
        self,
        session: SyncSession,
        *,
        interval_s: float = FOLLOW_INTERVAL_S,
        echo: Callable[[str], Any] = print,
        after_push: Callable[[], Any] | None = None,
    ) -> None:
        self.session, self.interval_s, self.echo = session, interval_s, echo
        self.after_push = after_push
        self.seen: dict[str, tuple] = {}  # run id -> record stamps when last pushed
        self.statuses: dict[str, str] = {}  # run id -> status last pushed
        self.problems: dict[str, str] = {}  # run id -> failure last reported
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="board follower", daemon=True)

    def first_pass(self, echo: Callable[[str], Any]) -> SyncReport:
        """Push every run not already there, one ``echo`` line each (the board's start)."""
        report = self._push(changed_runs(self.session.runs_dir, {}), echo)
        self.statuses.update(report.statuses)
        self.problems.update(report.failed)
        return report

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following, after one last pass (what the runs recorded until now)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.step()

    def step(self) -> SyncReport | None:
        """Push the runs whose records changed since they were last pushed (None: none)."""
        changed = changed_runs(self.session.runs_dir, self.seen)
        if not changed:
            return None
        report = self._push(changed, echo=lambda line: None)
        self._tell(report)
        return report

    def _push(self, changed: dict[str, tuple], echo: Callable[[str], Any]) -> SyncReport:
        report = self.session.sync(echo=echo, only=list(changed))
        failed = dict(report.failed)
        for run_id, stamps in changed.items():
            if run_id not in failed:  # a failed run is tried again at its next change
                self.seen[run_id] = stamps
        if (report.pushed or report.updated) and self.after_push is not None:
            self.after_push()
        return report

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - the board stays up; say why, once
                self.echo(f"the board stopped following the file store: {error}")
                return

    def _tell(self, report: SyncReport) -> None:
        """One line per new run, per status change and per new failure; a running run's
        progress is silent."""
        for run_id, _ in report.pushed + report.updated:
            status = report.statuses.get(run_id, "UNKNOWN")
            before = self.statuses.get(run_id)
            if before is None:
                self.echo(f"new run {run_id} ({status})")
            elif status != before:
                self.echo(f"run {run_id}: {status}")
            self.statuses[run_id] = status
            self.problems.pop(run_id, None)
        for run_id, why in report.failed:
            if self.problems.get(run_id) != why:
                self.echo(f"cannot copy run {run_id} into the board's database: {why}")
                self.problems[run_id] = why
