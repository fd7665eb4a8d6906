"""Push file-store runs into MongoDB, as Sacred's MongoObserver would have recorded them.

Runs recorded offline, or while MongoDB was down or went away mid-run, or resumed
after their MongoDB record was written, live complete only in the file store.
:func:`sync_runs` pushes each such run into a MongoDB database: the run document
(integer ``_id``, datetimes, ``experiment.sources`` in GridFS, ``info.metrics`` links),
one ``metrics`` document per metric, and the run directory's extra files as GridFS
artifacts (checkpoints, ``*.pt``, only when asked: they can be large). A run MongoDB
already has is updated in place, under the same id.

**Sync state.** Each run directory remembers what each database has of it in
``mongo.json`` (written atomically)::

    {"databases": {"mongodb://db.example.org:27017/rhn": {
        "id": 7,                          # the run's MongoDB _id (null: none yet)
        "synced": "2026-01-02T03:04:05Z",  # when it was recorded (UTC)
        "complete": true,                 # MongoDB has the whole run
        "signature": "<sha256>",          # of the run's records when pushed
        "artifacts": {"checkpoint.pt": "31337:1767322800000000000"},  # size:mtime_ns
        "reason": "..."}}}                # why not complete (only when it is not)

keyed by :func:`~rhn_cli.tracking.observers.database_key` (no credentials). A live run
writes it at its end: complete when MongoDB recorded all of it, ``complete: false``
when MongoDB was unreachable at start or failed mid-run (the run is *marked for sync*).
A run is unchanged, and skipped, when its entry is complete, its records (``run.json``,
``config.json``, ``metrics.json``, ``info.json``, ``cout.txt``) still hash to the
signature, its artifacts still have the recorded size and mtime, and MongoDB still holds
a run of that id with the same start time and host. A run without an entry that
MongoDB already holds (same start time and host; e.g. recorded live before rhn kept
sync state) is updated under its existing id rather than pushed twice.

Sources are stored in GridFS once, under Sacred's file name (``base_dir/relpath``)
with their SHA-256 in ``metadata.sha256``, and shared by every run and sync. Artifacts
are stored under ``artifact://runs/<id>/<name>`` like Sacred's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import mimetypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rhn_cli.atomic import write_atomically
from rhn_cli.tracking.observers import (
    MONGO_TIMEOUT_S,
    database_key,
    database_name,
    describe_error,
    mongo_client_options,
    mongo_problem,
    redact,
    store_file_once,
)
from rhn_cli.tracking.sanitize import clean, clean_number

STATE_FILE = "mongo.json"
RECORD_FILES = ("run.json", "config.json", "metrics.json", "info.json", "cout.txt")
CHECKPOINT_SUFFIX = ".pt"
MONGO_FORMAT = "MongoObserver-0.7.0"  # what Sacred 0.8.7's MongoObserver writes
RUNS_COLLECTION = "runs"
# A RUNNING run with a heartbeat this recent is still being recorded: left alone.
RUNNING_GRACE_S = 120.0
# MongoDB documents are limited to 16 MB; keep at most this much captured output.
MAX_CAPTURED_OUT_CHARS = 4_000_000


class SyncError(Exception):
    """The sync cannot start (MongoDB unreachable, no runs directory); nothing pushed."""


@dataclass
class SyncReport:
    """What a sync did (or, with ``dry_run``, would do), per file-store run id."""

    database: str  # the database, without credentials
    pushed: list[tuple[str, int | None]] = field(default_factory=list)  # (run, MongoDB id)
    updated: list[tuple[str, int]] = field(default_factory=list)
    unchanged: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run, why)
    checkpoints_left: list[tuple[str, str]] = field(default_factory=list)  # (run, file)
    statuses: dict[str, str] = field(default_factory=dict)  # run -> status read
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would push" if self.dry_run else "pushed"
        update = "would update" if self.dry_run else "updated"
        parts = [
            f"{len(self.pushed)} {verb}",
            f"{len(self.updated)} {update}",
            f"{len(self.unchanged)} unchanged",
        ]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return f"{', '.join(parts)} ({self.database})"


# --------------------------------------------------------------------------------------
# Sync state
# --------------------------------------------------------------------------------------


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _iso_now() -> str:
    return _utc_now().isoformat(timespec="seconds") + "Z"


def read_sync_state(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The sync state of a run directory: database key -> entry ({} if none)."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    databases = state.get("databases") if isinstance(state, dict) else None
    if not isinstance(databases, dict):
        return {}
    return {key: entry for key, entry in databases.items() if isinstance(entry, dict)}


def write_sync_entry(run_dir: str | os.PathLike, key: str, entry: dict[str, Any]) -> None:
    """Set the sync state of ``run_dir`` for database ``key`` (others are kept).

    Under a lock: the run itself, ``rhn runs sync`` and a live board may each write
    their database's entry at the same moment, and none may drop another's."""
    from filelock import FileLock

    run_dir = Path(run_dir)
    with FileLock(run_dir / f".{STATE_FILE}.lock", timeout=30):
        databases = read_sync_state(run_dir)
        databases[key] = entry
        text = json.dumps({"databases": databases}, indent=2, sort_keys=True) + "\n"
        write_atomically(run_dir / STATE_FILE, text.encode("utf-8"))


def records_signature(run_dir: str | os.PathLike) -> str:
    """SHA-256 over the run's record files (names, sizes and contents)."""
    digest = hashlib.sha256()
    for name in RECORD_FILES:
        try:
            data = (Path(run_dir) / name).read_bytes()
        except FileNotFoundError:
            continue
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _stamp(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def record_live_run(
    run_dir: str | os.PathLike,
    mongo_url: str,
    mongo_id: int | None,
    complete: bool,
    reason: str | None = None,
) -> None:
    """Note at the end of a live run what MongoDB at ``mongo_url`` has of it: all of it
    (``complete``; a sync leaves it alone while the file store is unchanged), or not
    (marked for sync, with ``reason``)."""
    run_dir = Path(run_dir)
    entry: dict[str, Any] = {"id": mongo_id, "synced": _iso_now(), "complete": bool(complete)}
    if complete:
        entry["signature"] = records_signature(run_dir)
        run = _load_json(run_dir / "run.json", {}) or {}
        names = [str(name) for name in run.get("artifacts") or []]
        entry["artifacts"] = {name: _stamp(run_dir / name) for name in names}
    else:
        entry["reason"] = reason or "MongoDB did not record the whole run"
    write_sync_entry(run_dir, database_key(mongo_url), entry)


# --------------------------------------------------------------------------------------
# Reading a file-store run
# --------------------------------------------------------------------------------------


def _load_json(path: Path, default: Any = None) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except ValueError as error:
        raise _RunProblem(f"{path.name} is not valid JSON ({error})") from None


class _RunProblem(Exception):
    """This run cannot be pushed as it is (bad or missing records)."""


def _datetime(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    return value


def _bson_time(value: datetime.datetime) -> datetime.datetime:
    """``value`` as BSON stores it (milliseconds, truncated)."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _run_dirs(runs_dir: Path) -> list[Path]:
    def order(path: Path):
        return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)

    found = [
        path
        for path in runs_dir.iterdir()
        if path.is_dir() and not path.name.startswith(("_", ".")) and (path / "run.json").is_file()
    ]
    return sorted(found, key=order)


def _artifact_names(run_dir: Path, run: dict) -> list[str]:
    """The run's artifacts: those Sacred recorded plus the other files in its directory."""
    names = [str(name) for name in run.get("artifacts") or []]
    for path in sorted(run_dir.iterdir()):
        name = path.name
        if (
            path.is_file()
            and not name.startswith(".")
            and name not in RECORD_FILES
            and name != STATE_FILE
            and name not in names
        ):
            names.append(name)
    return [name for name in names if (run_dir / name).is_file()]


@dataclass
class _LocalRun:
    run_id: str
    run_dir: Path
    run: dict
    start_time: datetime.datetime
    signature: str
    artifacts: list[str]  # selected for this sync
    checkpoints: list[str]  # left out (no --with-checkpoints)

    @property
    def hostname(self) -> Any:
        return (self.run.get("host") or {}).get("hostname")

    @property
    def status(self) -> str:
        return str(self.run.get("status") or "UNKNOWN")


def _read_local(run_dir: Path, with_checkpoints: bool) -> _LocalRun:
    run = _load_json(run_dir / "run.json")
    if not isinstance(run, dict):
        raise _RunProblem("run.json does not hold a run record")
    start = _datetime(run.get("start_time"))
    if start is None:
        raise _RunProblem("run.json has no valid start_time")
    names = _artifact_names(run_dir, run)
    checkpoints = [n for n in names if n.endswith(CHECKPOINT_SUFFIX)]
    selected = names if with_checkpoints else [n for n in names if n not in checkpoints]
    return _LocalRun(
        run_id=run_dir.name,
        run_dir=run_dir,
        run=run,
        start_time=start,
        signature=records_signature(run_dir),
        artifacts=selected,
        checkpoints=[] if with_checkpoints else checkpoints,
    )


# --------------------------------------------------------------------------------------
# Sync
# --------------------------------------------------------------------------------------


def sync_runs(
    runs_dir: str | os.PathLike,
    mongo_url: str,
    *,
    echo: Callable[[str], None] = print,
    dry_run: bool = False,
    with_checkpoints: bool = False,
    timeout_s: float = MONGO_TIMEOUT_S,
    only: Sequence[str] | None = None,
) -> SyncReport:
    """Push the runs in the file store ``runs_dir`` (``only``: those run ids) that
    MongoDB at ``mongo_url`` lacks or has an outdated copy of; one ``echo`` line per run
    pushed, updated, skipped or failed. Raises :class:`SyncError` when it cannot start."""
    with SyncSession(runs_dir, mongo_url, timeout_s=timeout_s) as session:
        report = session.sync(
            echo=echo, dry_run=dry_run, with_checkpoints=with_checkpoints, only=only
        )
    if report.checkpoints_left:
        runs = sorted({run for run, _ in report.checkpoints_left}, key=_id_order)
        echo(
            f"checkpoints (*.pt) of {len(runs)} run(s) not pushed: "
            "use --with-checkpoints to push them too"
        )
    return report


class SyncSession:
    """One connection from a file store to a MongoDB database, for one sync or many.

    ``live``: the database is a copy that nothing else records into (the local board's),
    so RUNNING runs are pushed whatever their heartbeat says, and a run directory still
    being created is left for the next sync rather than reported failed. Metric series
    already pushed unchanged in this session are not written again.
    """

    def __init__(
        self,
        runs_dir: str | os.PathLike,
        mongo_url: str,
        *,
        timeout_s: float = MONGO_TIMEOUT_S,
        live: bool = False,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        if not self.runs_dir.is_dir():
            raise SyncError(f"no runs directory {self.runs_dir}")
        problem = mongo_problem(mongo_url, timeout_s)
        if problem is not None:
            raise SyncError(f"MongoDB at {redact(mongo_url)}: {problem}; nothing was pushed")
        import gridfs
        import pymongo

        self.url, self.key, self.live = mongo_url, database_key(mongo_url), live
        self.client = pymongo.MongoClient(mongo_url, **mongo_client_options(timeout_s))
        self.db = self.client[database_name(mongo_url)]
        self.target = _Target(self.db[RUNS_COLLECTION], self.db["metrics"], gridfs.GridFS(self.db))
        if live:
            self.target.series_pushed = {}

    def sync(
        self,
        *,
        echo: Callable[[str], None] = print,
        dry_run: bool = False,
        with_checkpoints: bool = False,
        only: Sequence[str] | None = None,
    ) -> SyncReport:
        """One pass over the file store (``only``: those run ids); see :func:`sync_runs`."""
        import pymongo.errors

        report = SyncReport(database=redact(self.key), dry_run=dry_run)
        every_run = _run_dirs(self.runs_dir)
        self.target.local_ids = frozenset(int(d.name) for d in every_run if d.name.isdigit())
        run_dirs = [d for d in every_run if only is None or d.name in only]
        pass_ = _Pass(self.runs_dir, self.key, report, echo, dry_run, with_checkpoints, self.live)
        for index, run_dir in enumerate(run_dirs):
            try:
                _sync_one(run_dir, self.target, pass_)
            except pymongo.errors.ConnectionFailure as error:
                reason = f"MongoDB stopped answering ({describe_error(error, self.url)})"
                for left in run_dirs[index:]:
                    report.failed.append((left.name, reason))
                echo(
                    f"failed: {reason}; runs {', '.join(d.name for d in run_dirs[index:])} "
                    "were not pushed"
                )
                break
        return report

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _id_order(run_id: str):
    return (0, int(run_id), "") if run_id.isdigit() else (1, 0, run_id)


@dataclass
class _Target:
    runs: Any
    metrics: Any
    fs: Any
    local_ids: frozenset = frozenset()  # the file store's run ids, kept for their own runs
    # Live sessions: (run id, metric name) -> digest of the series last written.
    series_pushed: dict | None = None


@dataclass
class _Pass:
    """What one sync pass is asked to do, and where it reports."""

    runs_dir: Path
    key: str  # the database's key in the runs' sync state
    report: SyncReport
    echo: Callable[[str], None]
    dry_run: bool
    with_checkpoints: bool
    live: bool


def _sync_one(run_dir: Path, target: _Target, pass_: _Pass) -> None:
    import pymongo.errors

    report, echo, key = pass_.report, pass_.echo, pass_.key
    name = run_dir.name
    try:
        local = _read_local(run_dir, pass_.with_checkpoints)
    except (_RunProblem, OSError) as error:
        report.failed.append((name, str(error)))
        echo(f"failed run {name}: {error}")
        return
    report.statuses[name] = local.status
    if local.status == "RUNNING" and not pass_.live:
        last = _datetime(local.run.get("heartbeat")) or local.start_time
        age = (_utc_now() - last).total_seconds()
        if age < RUNNING_GRACE_S:
            why = f"still running (last heartbeat {age:.0f} s ago)"
            report.skipped.append((name, why))
            echo(f"skipped run {name}: {why}")
            return
    entry = read_sync_state(run_dir).get(key) or {}
    existing, mongo_id = _find_existing(target.runs, local, entry.get("id"))
    if existing is None and mongo_id is None and name.isdigit():
        mongo_id = int(name)  # one id for the run where MongoDB has not given it away
    if existing is not None and _unchanged(local, entry):
        report.unchanged.append((name, existing["_id"]))
        return
    report.checkpoints_left.extend((name, c) for c in local.checkpoints)
    if pass_.dry_run:
        if existing is not None:
            report.updated.append((name, existing["_id"]))
            echo(f"would update run {name} (MongoDB id {existing['_id']}, {local.status})")
        else:
            report.pushed.append((name, mongo_id))
            echo(f"would push run {name} ({local.status})")
        return
    try:
        pushed = _push(local, pass_.runs_dir, target, existing, mongo_id, entry)
    except (_RunProblem, OSError, pymongo.errors.OperationFailure) as error:
        reason = describe_error(error) if not isinstance(error, _RunProblem) else str(error)
        report.failed.append((name, reason))
        echo(f"failed run {name}: {reason}")
        return
    except pymongo.errors.InvalidDocument as error:  # e.g. over MongoDB's 16 MB limit
        report.failed.append((name, describe_error(error)))
        echo(f"failed run {name}: {describe_error(error)}")
        return
    write_sync_entry(run_dir, key, pushed.entry)
    what = (
        f"{local.status}, {pushed.metrics} metrics, {pushed.sources} sources, "
        f"{pushed.artifacts} artifacts"
    )
    if existing is not None:
        report.updated.append((name, pushed.mongo_id))
        echo(f"updated run {name} -> MongoDB id {pushed.mongo_id} ({what})")
    else:
        report.pushed.append((name, pushed.mongo_id))
        echo(f"pushed run {name} -> MongoDB id {pushed.mongo_id} ({what})")


def _same_run(doc: dict | None, local: _LocalRun) -> bool:
    if doc is None:
        return False
    start = doc.get("start_time")
    if not isinstance(start, datetime.datetime):
        return False
    if start.tzinfo is not None:
        start = start.astimezone(datetime.UTC).replace(tzinfo=None)
    host = (doc.get("host") or {}).get("hostname")
    return _bson_time(start) == _bson_time(local.start_time) and host == local.hostname


def _find_existing(runs, local: _LocalRun, known_id: Any) -> tuple[dict | None, int | None]:
    """(MongoDB's copy of this run or None, the id to push it under or None for new)."""
    projection = {"_id": 1, "start_time": 1, "host.hostname": 1}
    if isinstance(known_id, int) and not isinstance(known_id, bool):
        doc = runs.find_one({"_id": known_id}, projection)
        if _same_run(doc, local):
            return doc, known_id
        if doc is None:  # deleted there: push it again under its old id
            return None, known_id
    query = {"start_time": _bson_time(local.start_time), "host.hostname": local.hostname}
    for doc in runs.find(query, projection).limit(5):
        if isinstance(doc["_id"], int) and _same_run(doc, local):
            return doc, doc["_id"]
    return None, None


def _unchanged(local: _LocalRun, entry: dict) -> bool:
    if not entry.get("complete") or entry.get("signature") != local.signature:
        return False
    pushed = entry.get("artifacts") or {}
    return all(
        pushed.get(name) is not None and pushed.get(name) == _stamp(local.run_dir / name)
        for name in local.artifacts
    )


@dataclass
class _Pushed:
    mongo_id: int
    metrics: int
    sources: int
    artifacts: int
    entry: dict


def _next_id(runs) -> int:
    import pymongo

    last = list(
        runs.find({"_id": {"$type": "number"}}, {"_id": 1}).sort("_id", pymongo.DESCENDING).limit(1)
    )
    return int(last[0]["_id"]) + 1 if last else 1


def _insert_run(runs, doc: dict, wanted: int | None, avoid: frozenset = frozenset()) -> int:
    """Insert ``doc`` under ``wanted`` if free, else the next integer id free in MongoDB
    and not in ``avoid`` (the ids of the file store's other runs, which want their own)."""
    import pymongo.errors

    for _ in range(100):
        _id = wanted
        if _id is None:
            _id = _next_id(runs)
            while _id in avoid:
                _id += 1
        try:
            runs.insert_one({**doc, "_id": _id})
            return _id
        except pymongo.errors.DuplicateKeyError:
            wanted = None  # taken meanwhile
    raise _RunProblem("could not find a free run id in MongoDB")


def _push(
    local: _LocalRun,
    runs_dir: Path,
    target: _Target,
    existing: dict | None,
    mongo_id: int | None,
    entry: dict,
) -> _Pushed:
    run, run_dir = local.run, local.run_dir
    config = clean(_load_json(run_dir / "config.json", {}) or {})
    info = clean(_load_json(run_dir / "info.json", {}) or {})
    if not isinstance(info, dict):
        info = {"info": info}
    info.pop("metrics", None)  # links of a live recording; rebuilt below
    metrics = _load_json(run_dir / "metrics.json", {}) or {}
    if not isinstance(metrics, dict):
        raise _RunProblem("metrics.json does not map metric names to series")
    captured = _captured_out(run_dir / "cout.txt")
    experiment = clean(dict(run.get("experiment") or {}))
    sources = _push_sources(experiment, runs_dir, target.fs)
    experiment["sources"] = sources

    doc: dict[str, Any] = {
        "experiment": experiment,
        "format": MONGO_FORMAT,
        "command": run.get("command"),
        "host": clean(run.get("host") or {}),
        "start_time": local.start_time,
        "config": config,
        "meta": clean(run.get("meta") or {}),
        "status": local.status,
        "resources": _resources(run, runs_dir),
        "artifacts": [],
        "captured_out": captured,
        "info": {**info, "metrics": []},
        "heartbeat": _datetime(run.get("heartbeat")),
        "result": clean(run.get("result")),
    }
    stop = _datetime(run.get("stop_time"))
    if stop is not None:
        doc["stop_time"] = stop
    if run.get("fail_trace") is not None:
        doc["fail_trace"] = clean(run.get("fail_trace"))

    previous = None
    if existing is not None:
        previous = target.runs.find_one({"_id": existing["_id"]}) or {}
        if "omniboard" in previous:  # tags and notes a user added in Omniboard
            doc["omniboard"] = previous["omniboard"]
        _id = existing["_id"]
    meta = doc["meta"] if isinstance(doc["meta"], dict) else {}
    if "omniboard" not in doc and meta.get("tags"):  # rhn train --tag
        doc["omniboard"] = {"tags": list(meta["tags"])}
    if existing is None:
        # Insert first, as Sacred does: metrics and artifacts need the run's id.
        _id = _insert_run(target.runs, doc, mongo_id, target.local_ids)

    links = _push_metrics(_id, metrics, target.metrics, target.series_pushed)
    artifacts, stamps = _push_artifacts(_id, local, previous, entry, target)
    doc["info"]["metrics"] = links
    doc["artifacts"] = artifacts
    target.runs.replace_one({"_id": _id}, {**doc, "_id": _id}, upsert=True)
    state = {
        "id": _id,
        "synced": _iso_now(),
        "complete": True,
        "signature": local.signature,
        "artifacts": stamps,
    }
    return _Pushed(_id, len(links), len(sources), len(artifacts), state)


def _captured_out(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    if len(text) > MAX_CAPTURED_OUT_CHARS:
        dropped = len(text) - MAX_CAPTURED_OUT_CHARS
        text = f"[rhn sync: first {dropped} characters left out]\n" + text[-MAX_CAPTURED_OUT_CHARS:]
    return text


def _push_sources(experiment: dict, runs_dir: Path, fs) -> list[list]:
    base_dir = str(experiment.get("base_dir") or "")
    sources = []
    for item in experiment.get("sources") or []:
        if not isinstance(item, list) or len(item) != 2:
            continue
        relpath, stored = str(item[0]), str(item[1])
        try:
            data = (runs_dir / stored).read_bytes()
        except OSError:
            raise _RunProblem(
                f"source {relpath} is missing from the file store ({stored})"
            ) from None
        filename = os.path.join(base_dir, relpath) if base_dir else relpath
        sources.append([relpath, store_file_once(fs, filename, data)])
    return sources


def _resources(run: dict, runs_dir: Path) -> list[list]:
    resources = []
    for item in run.get("resources") or []:
        if isinstance(item, list) and len(item) == 2:
            filename, stored = str(item[0]), str(item[1])
            try:
                md5 = hashlib.md5((runs_dir / stored).read_bytes()).hexdigest()
            except OSError:
                md5 = None
            resources.append([filename, md5])
    return resources


def _push_metrics(run_id: int, metrics: dict, collection, pushed: dict | None = None) -> list[dict]:
    """Write one metrics document per series (reusing existing ones); the links.
    ``pushed`` (live sessions): digests of the series written before, not written again
    while unchanged."""
    existing: dict[str, list] = {}
    for doc in collection.find({"run_id": run_id}, {"_id": 1, "name": 1}):
        existing.setdefault(doc.get("name"), []).append(doc["_id"])
    links = []
    for name, series in metrics.items():
        if not isinstance(series, dict):
            raise _RunProblem(f"metrics.json: {name} is not a series")
        doc = {
            "run_id": run_id,
            "name": str(name),
            "steps": [clean(step) for step in series.get("steps") or []],
            "values": [clean_number(value) for value in series.get("values") or []],
            "timestamps": [_datetime(t) for t in series.get("timestamps") or []],
        }
        ids = existing.pop(str(name), [])
        if pushed is not None:
            digest = _series_digest(doc)
            if len(ids) == 1 and pushed.get((run_id, str(name))) == digest:
                links.append({"name": str(name), "id": str(ids[0])})
                continue
            pushed[(run_id, str(name))] = digest
        if ids:
            collection.replace_one({"_id": ids[0]}, doc)
            if len(ids) > 1:
                collection.delete_many({"_id": {"$in": ids[1:]}})
            metric_id = ids[0]
        else:
            metric_id = collection.insert_one(doc).inserted_id
        links.append({"name": str(name), "id": str(metric_id)})
    stale = [i for ids in existing.values() for i in ids]
    if stale:
        collection.delete_many({"_id": {"$in": stale}})
    return links


def _series_digest(doc: dict) -> str:
    text = json.dumps([doc["steps"], doc["values"], [str(t) for t in doc["timestamps"]]])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _store_path_once(fs, filename: str, path: Path, content_type: str | None):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    found = fs.find_one({"filename": filename, "metadata.sha256": sha})
    if found is not None:
        return found._id
    with open(path, "rb") as handle:
        return fs.put(
            handle, filename=filename, metadata={"sha256": sha}, content_type=content_type
        )


def _push_artifacts(
    run_id: int, local: _LocalRun, previous: dict | None, entry: dict, target: _Target
) -> tuple[list[dict], dict[str, str | None]]:
    """Upload the selected artifacts; keep earlier-pushed ones whose files are unchanged
    (checkpoints pushed by an earlier --with-checkpoints); delete the rest."""
    before = {
        str(a.get("name")): a.get("file_id")
        for a in (previous or {}).get("artifacts") or []
        if isinstance(a, dict)
    }
    stamps_before = entry.get("artifacts") or {}
    artifacts, stamps, keep = [], {}, set()
    for name in local.artifacts:
        path = local.run_dir / name
        filename = f"artifact://{RUNS_COLLECTION}/{run_id}/{name}"
        content_type, _ = mimetypes.guess_type(name)
        file_id = _store_path_once(target.fs, filename, path, content_type)
        artifacts.append({"name": name, "file_id": file_id})
        stamps[name] = _stamp(path)
        keep.add(file_id)
    for name, file_id in before.items():
        if name in stamps or file_id is None:
            continue
        stamp = _stamp(local.run_dir / name)
        if stamp is not None and stamps_before.get(name) == stamp:
            artifacts.append({"name": name, "file_id": file_id})
            stamps[name] = stamp
            keep.add(file_id)
    prefix = f"artifact://{RUNS_COLLECTION}/{run_id}/"
    for file_id in before.values():
        if file_id is not None and file_id not in keep:
            stale = target.fs.find_one({"_id": file_id})
            if stale is not None and str(stale.filename or "").startswith(prefix):
                target.fs.delete(file_id)
    return artifacts, stamps
