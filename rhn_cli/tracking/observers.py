"""Sacred observers for rhn runs: the local file store, and MongoDB when one answers.

The file store always records the run. A MongoDB observer is added only after the
server has answered a ping within a few seconds: Sacred's own observer fails the whole
run when MongoDB is down at start, and rhn must never lose a run to that.

Both observers record only clean values (:mod:`rhn_cli.tracking.sanitize`): config,
meta, info, metric values and the result, so no numpy or torch value can make an
observer fail. rhn's MongoDB observer never fails the run either: at the first error
(MongoDB went away mid-run, a write was refused) it notes why, warns once and stops
writing; the file store keeps the whole run and ``rhn runs sync`` pushes it later. At
the end of a run it tries its final save at most twice (Sacred: up to 10 times, each
after a server-selection timeout and a 1 s pause), so a run whose MongoDB died ends
within a few seconds. It stores each source file in GridFS once (looked up by name and
SHA-256, kept in ``metadata.sha256``), instead of on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rhn_cli.atomic import write_atomically
from rhn_cli.tracking import quiet_sacred_import
from rhn_cli.tracking.sanitize import clean, clean_number

DEFAULT_DATABASE = "rhn"
MONGO_TIMEOUT_S = 3.0
# A write that gets no answer (a hung server) gives up after this long.
MONGO_SOCKET_TIMEOUT_S = 30.0
# Final save of a run (Sacred: 10 attempts on completion, 3 on interruption).
FINAL_SAVE_ATTEMPTS = 2


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to print or record.

    Works on the raw text (no host or port parsing), so multi-host and IPv6 URLs
    come out intact.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hosts}{tail}"


def database_name(url: str) -> str:
    """The database named in a MongoDB URL's path, else ``rhn``."""
    name = urlsplit(url).path.lstrip("/")
    return name or DEFAULT_DATABASE


def database_key(url: str) -> str:
    """A credential-free name of the database ``url`` points to, the same for every
    spelling of it (user, options, host order, default port): ``mongodb://host:27017/db``.
    The file store keys its sync state by it."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return f"{url}/{database_name(url)}"
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    hosts = rest[:end].rpartition("@")[2]
    names = []
    for host in hosts.split(","):
        host = host.strip().lower()
        if scheme == "mongodb" and not re.search(r":\d+$", host):
            host += ":27017"
        names.append(host)
    return f"{scheme}://{','.join(sorted(names))}/{database_name(url)}"


def mongo_client_options(timeout_s: float = MONGO_TIMEOUT_S) -> dict[str, int]:
    """pymongo client options: give up on an absent server within ``timeout_s``, on a
    silent one within MONGO_SOCKET_TIMEOUT_S."""
    return {
        "serverSelectionTimeoutMS": int(timeout_s * 1000),
        "connectTimeoutMS": int(timeout_s * 1000),
        "socketTimeoutMS": int(MONGO_SOCKET_TIMEOUT_S * 1000),
    }


def describe_error(error: BaseException, url: str | None = None) -> str:
    """A one-line account of a pymongo error: no topology dump, no password."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for cut in (" (configured timeouts", ", Timeout:", ", full error:"):
        text = text.split(cut, 1)[0]
    if url:
        password = url_password(url)
        if password:
            text = text.replace(password, "***")
    if len(text) > 160:
        text = text[:157] + "..."
    return text


def url_password(url: str) -> str | None:
    """The password in a URL's user info (``scheme://user:PASSWORD@host``), else None."""
    rest = url.partition("://")[2]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, _ = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1] or None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_file_once(fs, filename: str, data: bytes, **options: Any):
    """The GridFS id of ``data`` stored under ``filename``: an existing file with that
    name and content (``metadata.sha256``) if there is one, else a new upload."""
    digest = sha256_hex(data)
    existing = fs.find_one({"filename": filename, "metadata.sha256": digest})
    if existing is not None:
        return existing._id
    metadata = {**(options.pop("metadata", None) or {}), "sha256": digest}
    return fs.put(data, filename=filename, metadata=metadata, **options)


class CleanRecords:
    """Observer mixin: every value recorded goes through :func:`sanitize.clean` first."""

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        return super().started_event(
            ex_info, command, host_info, start_time, clean(config), clean(meta_info), _id
        )

    def heartbeat_event(self, info, captured_out, beat_time, result):
        return super().heartbeat_event(clean(info), captured_out, beat_time, clean(result))

    def completed_event(self, stop_time, result):
        return super().completed_event(stop_time, clean(result))

    def log_metrics(self, metrics_by_name, info):
        cleaned = {
            str(name): {
                **series,
                "steps": [clean(step) for step in series["steps"]],
                "values": [clean_number(value) for value in series["values"]],
            }
            for name, series in metrics_by_name.items()
        }
        # ``info`` is the run's own dict: MongoDB links new metrics into it.
        return super().log_metrics(cleaned, info)


def mongo_problem(url: str, timeout_s: float = MONGO_TIMEOUT_S) -> str | None:
    """None if the MongoDB server at ``url`` answers a ping in time, else why not."""
    import pymongo
    from pymongo.errors import (
        ConfigurationError,
        InvalidURI,
        OperationFailure,
        PyMongoError,
    )

    try:
        client = pymongo.MongoClient(
            url,
            serverSelectionTimeoutMS=int(timeout_s * 1000),
            connectTimeoutMS=int(timeout_s * 1000),
        )
    except (ConfigurationError, InvalidURI, ValueError) as error:
        return f"invalid MongoDB URL: {error}"
    try:
        client.admin.command("ping")
    except OperationFailure as error:
        reason = (error.details or {}).get("errmsg") or "command failed"
        return f"the server refused the connection ({reason})"
    except PyMongoError:
        return f"no answer within {timeout_s:g} s"
    finally:
        client.close()
    return None


@dataclass
class Continuation:
    """Where a resumed run's record continues: at its checkpoint, whatever the process
    that wrote it recorded after that (it may have been killed at any point)."""

    epochs: int  # epochs completed at the checkpoint
    metrics: list | None  # the checkpoint's metric record, [name, step, value, ISO time]
    output_bytes: int | None  # the length of cout.txt when the checkpoint was written
    note: str  # the line cout.txt gets where the resumed process takes over


def file_store_observer(runs_dir: str | os.PathLike, continuation: Continuation | None = None):
    """A FileStorageObserver under ``runs_dir`` with atomic JSON writes.

    It never clashes with an existing run directory. With a ``continuation`` it instead
    re-opens the directory of the run id Sacred hands it (a resumed run): the original
    start time is kept, the resumption is noted in ``meta.resumed_at``, metrics.json is
    the checkpoint's metric record (older checkpoints: the metrics after its epoch are
    dropped), and cout.txt is cut back to its length at the checkpoint, then appended to.
    So every step is recorded once, whether the run was stopped or killed.
    """
    with quiet_sacred_import():
        from sacred.observers import FileStorageObserver
        from sacred.serializer import flatten

    class RunDirectoryObserver(CleanRecords, FileStorageObserver):
        previous_run: dict | None = None

        def _make_run_dir(self, _id):
            if continuation is not None:
                self.dir = os.path.join(self.basedir, str(_id))
                with open(os.path.join(self.dir, "run.json")) as handle:
                    self.previous_run = json.load(handle)
                _continue_record(Path(self.dir), continuation, self.save_json)
                return
            # With MongoDB attached, Sacred hands MongoDB's run id to the file store too.
            # A directory of that name may already hold an offline run: take the next
            # free one instead of failing the run.
            if _id is not None and os.path.exists(os.path.join(self.basedir, str(_id))):
                _id = None
            super()._make_run_dir(_id)

        def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
            _id = super().started_event(
                ex_info, command, host_info, start_time, config, meta_info, _id
            )
            if self.previous_run is not None:
                previous = self.previous_run
                self.run_entry["start_time"] = previous.get("start_time")
                resumed = previous.get("meta", {}).get("resumed_at", [])
                self.run_entry["meta"]["resumed_at"] = [*resumed, start_time.isoformat()]
                self.save_json(self.run_entry, "run.json")
            return _id

        def save_json(self, obj, filename):
            # Readers (rhn runs, a crash mid-write) must never see half a file.
            text = json.dumps(flatten(obj), sort_keys=True, indent=2)
            write_atomically(Path(self.dir) / filename, text.encode("utf-8"))

    return RunDirectoryObserver(str(Path(runs_dir)))


def _continue_record(run_dir: Path, continuation: Continuation, save_json) -> None:
    """metrics.json and cout.txt as they were at the checkpoint, cout.txt noting where
    the resumed process takes over."""
    if continuation.metrics is None:
        _drop_metrics_after(run_dir, continuation.epochs, save_json)
    else:
        metrics: dict[str, dict[str, list]] = {}
        for name, step, value, stamp in continuation.metrics:
            series = metrics.setdefault(name, {"steps": [], "values": [], "timestamps": []})
            series["steps"].append(step)
            series["values"].append(clean_number(value))
            series["timestamps"].append(stamp)
        save_json(metrics, "metrics.json")
    cout = run_dir / "cout.txt"
    text = cout.read_bytes() if cout.exists() else b""
    if continuation.output_bytes is not None:
        text = text[: continuation.output_bytes]
    if text and not text.endswith(b"\n"):
        text += b"\n"
    write_atomically(cout, text + continuation.note.encode("utf-8") + b"\n")


def _drop_metrics_after(run_dir: Path, epoch: int, save_json) -> None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return
    metrics = json.loads(path.read_text())
    for series in metrics.values():
        keep = [i for i, step in enumerate(series["steps"]) if step <= epoch]
        for key in ("steps", "values", "timestamps"):
            series[key] = [series[key][i] for i in keep]
    save_json(metrics, "metrics.json")


class GuardedMongoRecords:
    """Mixin for Sacred's MongoObserver (rhn's, :func:`mongo_observer`): a failure never
    fails the run. At its first error it notes why in ``lost``, warns once and stops
    writing; ``complete`` says whether MongoDB has the whole run. Tags go where
    Omniboard shows them, and each source file is stored in GridFS once."""

    url: str
    warn: Callable[[str], None] | None
    lost: str | None = None
    finished: bool = False
    # Whether a run id is free in the file store beside MongoDB (None: no file store):
    # a new run then takes an id free in both, so that it has one id, not two.
    id_is_free: Callable[[int], bool] | None = None

    def __repr__(self) -> str:
        return f"MongoObserver({redact(self.url)})"

    @property
    def run_id(self) -> int | None:
        return (self.run_entry or {}).get("_id")

    @property
    def complete(self) -> bool:
        return self.lost is None and self.finished

    def _guarded(self, what: str, call: Callable[[], Any]) -> Any:
        with self._lock:
            if self.lost is not None:
                return None
            try:
                return call()
            except Exception as error:  # noqa: BLE001 -- no error may end the run
                self.lost = f"{what}: {describe_error(error, self.url)}"
                if self.warn is not None:
                    self.warn(
                        f"MongoDB at {redact(self.url)} stopped recording this run "
                        f"({self.lost}); training goes on, the file store keeps the "
                        "whole run, and it is marked for 'rhn runs sync'"
                    )
                return None

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        run_id = self._guarded(
            "start",
            lambda: super(GuardedMongoRecords, self).started_event(
                ex_info, command, host_info, start_time, config, meta_info, _id
            ),
        )
        if self.lost is not None:  # no run in MongoDB: the file store picks the id
            self.run_entry = None
        return run_id

    def heartbeat_event(self, info, captured_out, beat_time, result):
        self._guarded(
            "heartbeat",
            lambda: super(GuardedMongoRecords, self).heartbeat_event(
                info, captured_out, beat_time, result
            ),
        )

    def log_metrics(self, metrics_by_name, info):
        self._guarded(
            "metrics",
            lambda: super(GuardedMongoRecords, self).log_metrics(metrics_by_name, info),
        )

    def completed_event(self, stop_time, result):
        self._guarded(
            "final save",
            lambda: super(GuardedMongoRecords, self).completed_event(stop_time, result),
        )

    def interrupted_event(self, interrupt_time, status):
        self._guarded(
            "final save",
            lambda: super(GuardedMongoRecords, self).interrupted_event(interrupt_time, status),
        )

    def failed_event(self, fail_time, fail_trace):
        self._guarded(
            "final save",
            lambda: super(GuardedMongoRecords, self).failed_event(fail_time, fail_trace),
        )

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        self._guarded(
            "artifact",
            lambda: super(GuardedMongoRecords, self).artifact_event(
                name, filename, metadata, content_type
            ),
        )

    def resource_event(self, filename):
        self._guarded("resource", lambda: super(GuardedMongoRecords, self).resource_event(filename))

    def insert(self):
        # Omniboard shows (and edits) the tags in omniboard.tags. They go in with the
        # new document only: later saves ($set of run_entry) leave a user's edits be.
        tags = (self.run_entry.get("meta") or {}).get("tags")
        if tags:
            self.run_entry["omniboard"] = {"tags": list(tags)}
        try:
            if self.run_entry.get("_id") is None and self.id_is_free is not None:
                return self._insert_with_an_id_free_in_both()
            return super().insert()
        finally:
            self.run_entry.pop("omniboard", None)

    def _insert_with_an_id_free_in_both(self) -> None:
        """Insert the new run under the lowest id above MongoDB's highest that the file
        store has not used either (runs recorded while MongoDB was away hold some): the
        run directory then carries MongoDB's id. A run started at the same moment may
        take the id first; then the next one is tried."""
        import pymongo
        import pymongo.errors

        while True:
            highest = self.runs.find({}, {"_id": 1}).sort("_id", pymongo.DESCENDING).limit(1)
            candidate = next(iter(highest), {"_id": 0})["_id"] + 1
            while not self.id_is_free(candidate):
                candidate += 1
            self.run_entry["_id"] = candidate
            try:
                self.runs.insert_one(self.run_entry)
                return
            except pymongo.errors.DuplicateKeyError:
                self.run_entry["_id"] = None

    def save(self):
        # Sacred ignores a lost connection here ("wait for the next save"), but the
        # metrics pushed meanwhile would be lost for good: treat it as the failure
        # it is, so the run is marked for sync.
        self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry})

    def final_save(self, attempts):
        import pymongo.errors

        attempts = max(1, min(attempts, FINAL_SAVE_ATTEMPTS))
        for attempt in range(attempts):
            try:
                self.runs.update_one(
                    {"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True
                )
                self.finished = True
                return
            except pymongo.errors.AutoReconnect:
                if attempt == attempts - 1:
                    raise
                time.sleep(1)

    def save_sources(self, ex_info):
        base_dir = ex_info["base_dir"]
        sources = []
        for source_name, _md5 in ex_info["sources"]:
            path = os.path.join(base_dir, source_name)
            with open(path, "rb") as handle:
                sources.append([source_name, store_file_once(self.fs, path, handle.read())])
        return sources


def mongo_observer(
    url: str,
    failure_dir: str | os.PathLike,
    warn: Callable[[str], None] | None = None,
    timeout_s: float = MONGO_TIMEOUT_S,
    runs_dir: str | os.PathLike | None = None,
):
    """rhn's MongoObserver on ``url`` (database from the URL, default ``rhn``).

    Run ids are integers, as Omniboard needs (give it the highest priority so its id is
    the run id). It records clean values, stores sources once, and never fails the run:
    after its first error it stops writing and says so once through ``warn``. Afterwards
    ``lost`` holds the reason (None if it never failed), ``complete`` says whether
    MongoDB has the whole run, and ``run_id`` is the id MongoDB gave the run.
    ``failure_dir`` is kept for Sacred's API; rhn never writes pickles there (the file
    store has the run). ``runs_dir``: the file store recording the run beside MongoDB;
    a new run takes an id free in both, so that its directory has MongoDB's id.
    """
    with quiet_sacred_import():
        from sacred.observers import MongoObserver

    class RhnMongoObserver(GuardedMongoRecords, CleanRecords, MongoObserver):
        pass

    observer = RhnMongoObserver(
        url=url,
        db_name=database_name(url),
        failure_dir=str(failure_dir),
        **mongo_client_options(timeout_s),
    )
    observer.url, observer.warn = url, warn
    observer.lost, observer.finished = None, False
    if runs_dir is not None:
        root = Path(runs_dir)
        observer.id_is_free = lambda run_id: not (root / str(run_id)).exists()
    observer._lock = threading.RLock()
    return observer
