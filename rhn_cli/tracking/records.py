"""Recorded runs as one record type, read from the file store or from MongoDB.

The file store is Sacred's FileStorageObserver layout (``runs/<id>/run.json``,
``config.json``, ``metrics.json``, ``info.json``, shared ``runs/_sources``); MongoDB is
what Sacred's MongoObserver writes (collections ``runs`` and ``metrics``, GridFS for
artifacts). Both become :class:`RunRecord` objects, so listing, filtering, sorting and
removing runs works the same on either. A run directory that cannot be read is listed
as ``UNREADABLE`` (with the reason) instead of breaking every command.

Times are kept as Sacred records them: naive datetimes in UTC.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rhn_cli.tracking.observers import MONGO_TIMEOUT_S, database_name, mongo_problem, redact

# Omniboard shows a RUNNING run as PROBABLY_DEAD after two minutes without a heartbeat.
PROBABLY_DEAD_AFTER_S = 120.0
SACRED_STATUSES = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED", "TIMEOUT")
STATUSES = (*SACRED_STATUSES, "PROBABLY_DEAD", "UNREADABLE")
# Files of a run directory that make up the record itself (not artifacts).
RECORD_FILES = ("run.json", "config.json", "metrics.json", "info.json", "cout.txt", "mongo.json")
MONGO_SYNC_FILE = "mongo.json"
# Config keys that differ between any two runs and say nothing about the model.
NOISE_KEYS = ("seed",)
# The info key of per-epoch series the engine keeps out of the metrics, so that Omniboard
# does not plot them beside the perplexities (tokens_per_s). The value has metrics.json's
# shape; rhn reads each series as a metric, as it was recorded before.
INFO_SERIES_KEY = "throughput"


class RunStoreError(Exception):
    """The runs cannot be read or changed (MongoDB down, a run still running...)."""


class RunSelectionError(RunStoreError):
    """A run id (or range) on the command line names no recorded run."""


class QueryError(ValueError):
    """A malformed --where condition or --sort key."""


@dataclass
class Artifact:
    name: str
    size: int | None = None  # bytes; None when unknown
    recorded: bool = True  # a Sacred artifact, rather than another file of the run dir


@dataclass
class RunRecord:
    """One recorded run, from the file store or from MongoDB."""

    id: str | int  # the directory name (file store) or the integer _id (MongoDB)
    name: str
    status: str  # Sacred's, or PROBABLY_DEAD / UNREADABLE
    source: str  # "file" or "mongo"
    location: str  # the run directory, or "MongoDB <redacted URL> (database <name>)"
    start_time: datetime | None = None  # naive UTC, as Sacred records it
    stop_time: datetime | None = None
    heartbeat: datetime | None = None
    duration: float | None = None  # seconds
    config: dict = field(default_factory=dict)
    result: Any = None
    host: dict = field(default_factory=dict)
    command: str | None = None
    comment: str | None = None
    named_configs: list = field(default_factory=list)
    tags: list = field(default_factory=list)  # meta.tags; MongoDB: omniboard.tags (Omniboard's)
    resumed_at: list = field(default_factory=list)  # datetimes (UTC) of each resumption
    metrics: dict = field(default_factory=dict)  # name -> (steps, values)
    info: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)  # Artifact
    fail_trace: list = field(default_factory=list)  # lines
    mongo: dict | None = None  # runs/<id>/mongo.json (MongoDB sync state), file store only
    problem: str | None = None  # why (part of) the record could not be read

    @property
    def key(self) -> str:
        """The id as typed on the command line."""
        return str(self.id)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def parse_time(value: Any) -> datetime | None:
    """A Sacred time (ISO string or datetime) as a naive UTC datetime, or None."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value
    if isinstance(value, str) and value:
        try:
            return parse_time(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def _unpickle(value: Any) -> Any:
    """Undo jsonpickle's wrapping of numpy scalars (``{"py/object": "numpy.float64",
    "value": 1.5}``) that Sacred applies to config and info values."""
    if isinstance(value, dict):
        if "py/object" in value and "value" in value:
            return _unpickle(value["value"])
        return {k: _unpickle(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpickle(v) for v in value]
    return value


def _status(status: str, start: datetime | None, heartbeat: datetime | None, now) -> str:
    if status == "RUNNING":
        last = heartbeat or start
        if last is None or (now - last).total_seconds() > PROBABLY_DEAD_AFTER_S:
            return "PROBABLY_DEAD"
    return status or "UNREADABLE"


def _duration(record: RunRecord, now: datetime) -> float | None:
    if record.start_time is None:
        return None
    end = record.stop_time
    if end is None:
        end = now if record.status == "RUNNING" else record.heartbeat
    if end is None:
        return None
    return max(0.0, (end - record.start_time).total_seconds())


def _name(run: dict) -> str:
    options = (run.get("meta") or {}).get("options") or {}
    name = options.get("--name") or (run.get("experiment") or {}).get("name")
    return str(name) if name else "-"


def _fill_from_run(record: RunRecord, run: dict, now: datetime) -> None:
    """Fill ``record`` from a run document (run.json or MongoDB's runs document)."""
    meta = run.get("meta") or {}
    options = meta.get("options") or {}
    record.name = _name(run)
    record.start_time = parse_time(run.get("start_time"))
    record.stop_time = parse_time(run.get("stop_time"))
    record.heartbeat = parse_time(run.get("heartbeat"))
    record.status = _status(str(run.get("status") or ""), record.start_time, record.heartbeat, now)
    record.result = _unpickle(run.get("result"))
    record.host = run.get("host") or {}
    record.command = run.get("command") or meta.get("command")
    record.comment = meta.get("comment") or options.get("--comment")
    record.named_configs = list(meta.get("named_configs") or [])
    record.tags = _tags(meta.get("tags"))
    record.resumed_at = [t for t in map(parse_time, meta.get("resumed_at") or []) if t]
    trace = run.get("fail_trace") or []
    record.fail_trace = "".join(trace).splitlines() if isinstance(trace, list) else [str(trace)]
    record.duration = _duration(record, now)


def _tags(value: Any) -> list[str]:
    return [str(tag) for tag in value] if isinstance(value, list) else []


def check_tag(text: str) -> str | None:
    """``text`` stripped, if it can be a run tag (a sweep's name is one); None if it is
    empty or spans lines."""
    text = text.strip()
    if not text or any(c in text for c in "\n\r\t"):
        return None
    return text


def _series(steps: Any, values: Any) -> tuple[list, list]:
    steps, values = list(steps or []), list(values or [])
    n = min(len(steps), len(values))
    return steps[:n], [_unpickle(v) for v in values[:n]]


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"{path.name} is not valid JSON ({error})"


def load_run_dir(run_dir: Path, now: datetime | None = None) -> RunRecord:
    """The run recorded in ``run_dir``; status UNREADABLE (with ``problem``) if its
    run.json or config.json is missing or damaged."""
    now = now or _utcnow()
    record = RunRecord(run_dir.name, "-", "UNREADABLE", "file", str(run_dir))
    run, problem = _read_json(run_dir / "run.json")
    if problem is None and not isinstance(run, dict):
        problem = "run.json does not hold a run record"
    if problem is not None:
        record.problem = problem
        record.artifacts = _directory_files(run_dir, [])
        return record
    _fill_from_run(record, run, now)
    problems = []
    config, problem = _read_json(run_dir / "config.json")
    if isinstance(config, dict):
        record.config = _unpickle(config)
    elif (run_dir / "config.json").exists():  # damaged; missing is a run just starting
        record.status = "UNREADABLE"
        record.problem = problem or "config.json does not hold a config"
    else:
        problems.append(problem)
    metrics, problem = _read_json(run_dir / "metrics.json")
    if isinstance(metrics, dict):
        for name, series in metrics.items():
            if isinstance(series, dict):
                record.metrics[name] = _series(series.get("steps"), series.get("values"))
    elif (run_dir / "metrics.json").exists():
        problems.append(problem or "metrics.json does not hold metrics")
    info, problem = _read_json(run_dir / "info.json")
    if isinstance(info, dict):
        record.info = _unpickle(info)
    elif (run_dir / "info.json").exists():
        problems.append(problem or "info.json does not hold an object")
    sync, problem = _read_json(run_dir / MONGO_SYNC_FILE)
    if sync is not None:
        record.mongo = sync if isinstance(sync, dict) else {"value": sync}
    elif (run_dir / MONGO_SYNC_FILE).exists():
        problems.append(problem)
    if problems and record.problem is None:
        record.problem = "; ".join(problems)
    add_info_series(record)
    record.artifacts = _directory_files(run_dir, run.get("artifacts") or [])
    return record


def add_info_series(record: RunRecord) -> None:
    """The series of ``info.throughput`` as metrics. A run recorded before they moved
    there and continued since also has the older epochs as a metric; the info's series
    holds them all (the engine carries them over), so it replaces that metric."""
    kept_apart = record.info.get(INFO_SERIES_KEY) if isinstance(record.info, dict) else None
    if not isinstance(kept_apart, dict):
        return
    for name, points in kept_apart.items():
        if isinstance(points, dict) and points.get("steps"):
            record.metrics[str(name)] = _series(points.get("steps"), points.get("values"))


def _directory_files(run_dir: Path, recorded: list) -> list[Artifact]:
    """Sacred's artifacts first, then the other files of the run directory (checkpoints)."""
    names = [a.get("name") if isinstance(a, dict) else str(a) for a in recorded]
    artifacts = []
    for name in names:
        path = run_dir / name
        artifacts.append(Artifact(name, path.stat().st_size if path.is_file() else None))
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        entries = []
    for path in entries:
        if path.name in names or path.name in RECORD_FILES or path.name.startswith("."):
            continue
        if path.is_file():
            artifacts.append(Artifact(path.name, path.stat().st_size, recorded=False))
    return artifacts


def id_order(record: RunRecord) -> tuple:
    """Numeric ids in numeric order, then other names alphabetically."""
    key = record.key
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def load_file_store(runs_dir: str | os.PathLike, now: datetime | None = None) -> list[RunRecord]:
    """Every run under ``runs_dir``, by id; ``_sources`` and other ``_``/``.`` directories
    are not runs. A missing directory holds no runs."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    now = now or _utcnow()
    records = [
        load_run_dir(entry, now)
        for entry in root.iterdir()
        if entry.is_dir() and not entry.name.startswith(("_", "."))
    ]
    return sorted(records, key=id_order)


def _mongo_client(url: str):
    import pymongo

    problem = mongo_problem(url)
    if problem is not None:
        raise RunStoreError(f"MongoDB at {redact(url)}: {problem}")
    timeout = int(MONGO_TIMEOUT_S * 1000)
    return pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout, connectTimeoutMS=timeout)


def _plain(value: Any) -> Any:
    """A MongoDB value as plain JSON-able Python (ObjectIds as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, datetime)):
        return value
    return str(value)


def _record_from_document(doc: dict, location: str, now: datetime) -> RunRecord:
    record = RunRecord(doc.get("_id"), "-", "UNREADABLE", "mongo", location)
    _fill_from_run(record, doc, now)
    record.config = _unpickle(_plain(doc.get("config") or {}))
    record.info = _unpickle(_plain(doc.get("info") or {}))
    omniboard = doc.get("omniboard")
    if isinstance(omniboard, dict) and "tags" in omniboard:  # as edited in Omniboard
        record.tags = _tags(omniboard["tags"])
    record.host = _plain(record.host)
    return record


def load_mongo(url: str, now: datetime | None = None) -> list[RunRecord]:
    """Every run in the MongoDB database named by ``url`` (default ``rhn``), by id."""
    from pymongo.errors import PyMongoError

    now = now or _utcnow()
    client = _mongo_client(url)
    location = f"MongoDB {redact(url)} (database {database_name(url)})"
    try:
        db = client[database_name(url)]
        docs = list(db.runs.find({}, {"captured_out": 0}))
        records = {doc.get("_id"): _record_from_document(doc, location, now) for doc in docs}
        for doc in db.metrics.find({}, {"timestamps": 0}):
            record = records.get(doc.get("run_id"))
            if record is not None and doc.get("name"):
                record.metrics[str(doc["name"])] = _series(doc.get("steps"), doc.get("values"))
        for record in records.values():
            add_info_series(record)
        file_ids = {}
        for doc in docs:
            for artifact in doc.get("artifacts") or []:
                if isinstance(artifact, dict) and artifact.get("file_id") is not None:
                    file_ids[artifact["file_id"]] = None
        if file_ids:
            for entry in db["fs.files"].find({"_id": {"$in": list(file_ids)}}, {"length": 1}):
                file_ids[entry["_id"]] = entry.get("length")
        for doc in docs:
            record = records[doc.get("_id")]
            for artifact in doc.get("artifacts") or []:
                if isinstance(artifact, dict):
                    size = file_ids.get(artifact.get("file_id"))
                    record.artifacts.append(Artifact(str(artifact.get("name")), size))
    except PyMongoError as error:
        raise RunStoreError(f"{location}: {error}") from error
    finally:
        client.close()
    return sorted(records.values(), key=id_order)


# --------------------------------------------------------------------------------------
# Stores: where runs are read from and removed
# --------------------------------------------------------------------------------------


class FileStore:
    """The local file store (``--runs-dir``)."""

    def __init__(self, runs_dir: str | os.PathLike) -> None:
        self.runs_dir = Path(runs_dir)
        self.label = str(runs_dir)

    def load(self, now: datetime | None = None) -> list[RunRecord]:
        return load_file_store(self.runs_dir, now)

    def remove(self, records: Sequence[RunRecord]) -> None:
        """Delete the run directories. Each is first renamed out of sight, so an
        interrupted removal never leaves half a run listed."""
        for record in records:
            path = Path(record.location)
            hidden = path.with_name(f".{path.name}.removing-{uuid.uuid4().hex[:8]}")
            os.replace(path, hidden)
            shutil.rmtree(hidden)


class MongoStore:
    """The runs of a MongoDB database (``--mongo URL``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.label = f"MongoDB {redact(url)} (database {database_name(url)})"

    def load(self, now: datetime | None = None) -> list[RunRecord]:
        return load_mongo(self.url, now)

    def remove(self, records: Sequence[RunRecord]) -> None:
        """Delete each run document, its metrics documents and its artifact files
        (sources are shared between runs and stay)."""
        import gridfs
        from pymongo.errors import PyMongoError

        client = _mongo_client(self.url)
        try:
            db = client[database_name(self.url)]
            files = gridfs.GridFS(db)
            for record in records:
                doc = db.runs.find_one({"_id": record.id}, {"artifacts": 1}) or {}
                for artifact in doc.get("artifacts") or []:
                    if isinstance(artifact, dict) and artifact.get("file_id") is not None:
                        files.delete(artifact["file_id"])
                db.metrics.delete_many({"run_id": record.id})
                db.runs.delete_one({"_id": record.id})
        except PyMongoError as error:
            raise RunStoreError(f"{self.label}: {error}") from error
        finally:
            client.close()


def open_store(runs_dir: str | os.PathLike, mongo_url: str | None) -> FileStore | MongoStore:
    """MongoDB when a URL is given, else the file store."""
    return MongoStore(mongo_url) if mongo_url else FileStore(runs_dir)


def removal_problem(record: RunRecord, now: datetime | None = None) -> str | None:
    """Why ``record`` must not be removed now (a run still alive), else None."""
    if record.status != "RUNNING":
        return None
    now = now or _utcnow()
    last = record.heartbeat or record.start_time
    ago = f"{(now - last).total_seconds():.0f} s ago" if last else "recently"
    return (
        f"run {record.key} is RUNNING (last heartbeat {ago}); stop it first, or wait until "
        f"it has been silent for {PROBABLY_DEAD_AFTER_S:.0f} s (then it is PROBABLY_DEAD)"
    )


# --------------------------------------------------------------------------------------
# Selecting runs by id
# --------------------------------------------------------------------------------------


def describe_ids(records: Sequence[RunRecord], most: int = 8) -> str:
    """``1-5, 7, 9-12`` for the ids of ``records``."""
    numbers = sorted(int(r.key) for r in records if r.key.isdigit())
    others = sorted(r.key for r in records if not r.key.isdigit())
    pieces: list[str] = []
    start = previous = None
    for number in [*numbers, None]:
        if start is not None and (number is None or number != previous + 1):
            pieces.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if number is not None and start is None:
            start = number
        previous = number
    pieces.extend(others)
    if len(pieces) > most:
        pieces = [*pieces[: most - 1], "…", pieces[-1]]
    return ", ".join(pieces)


def _no_run(token: str, records: Sequence[RunRecord], label: str) -> RunSelectionError:
    held = f"ids: {describe_ids(records)}" if records else "it holds no runs"
    return RunSelectionError(f"no run '{token}' in {label} ({held})")


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def select_runs(records: Sequence[RunRecord], tokens: Iterable[str], label: str) -> list[RunRecord]:
    """The runs named by ``tokens`` (ids, ranges ``3-7``, comma lists ``1,4,9``), in the
    order given, each once. A range takes the runs it covers (it must cover one); a
    reversed range (``7-3``) is an error, not read as ``3-7``."""
    by_key = {r.key: r for r in records}
    chosen: dict[str, RunRecord] = {}
    for token in tokens:
        for piece in (p.strip() for p in str(token).split(",")):
            if not piece:
                continue
            match = _RANGE.match(piece)
            if piece in by_key:
                chosen.setdefault(piece, by_key[piece])
            elif match:
                low, high = int(match[1]), int(match[2])
                if low > high:
                    raise RunSelectionError(
                        f"run range '{piece}': expected LOW-HIGH with LOW <= HIGH ({high}-{low})"
                    )
                covered = [r for r in records if r.key.isdigit() and low <= int(r.key) <= high]
                if not covered:
                    raise _no_run(piece, records, label)
                for record in covered:
                    chosen.setdefault(record.key, record)
            else:
                raise _no_run(piece, records, label)
    return list(chosen.values())


# --------------------------------------------------------------------------------------
# Config and metric values, filtering and sorting
# --------------------------------------------------------------------------------------


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config as dotted keys: ``{"synthetic.order": 2, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def differing_keys(records: Sequence[RunRecord], ignore: Iterable[str] = NOISE_KEYS) -> list[str]:
    """Sorted config keys whose values are not the same in every readable run."""
    configs = [flatten_config(r.config) for r in records if r.config]
    if len(configs) < 2:
        return []
    ignored = set(ignore)
    keys = sorted(set().union(*configs) - ignored)
    missing = object()
    return [
        key
        for key in keys
        if len({_hashable(c.get(key, missing)) for c in configs}) > 1
        or any(key not in c for c in configs)
    ]


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, bool):  # True == 1, but they are different config values
        return ("bool", value)
    return value


def _numbers(values: Iterable[Any]) -> list[float]:
    out = []
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                out.append(float(value))
    return out


def best_is_max(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (accuracies, throughput)."""
    lowered = metric.lower()
    return "acc" in lowered or "tokens_per_s" in lowered


def best_point(record: RunRecord, metric: str) -> tuple[Any, float] | None:
    """(step, value) of the best point of ``metric`` (min, or max for accuracies)."""
    steps, values = record.metrics.get(metric, ([], []))
    points = [
        (step, float(value))
        for step, value in zip(steps, values, strict=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]
    if not points:
        return None
    choose = max if best_is_max(metric) else min
    return choose(points, key=lambda point: point[1])


def last_value(record: RunRecord, metric: str) -> float | None:
    values = _numbers(record.metrics.get(metric, ([], []))[1])
    return values[-1] if values else None


def value_at(record: RunRecord, metric: str, step: Any) -> float | None:
    steps, values = record.metrics.get(metric, ([], []))
    found = [v for s, v in zip(steps, values, strict=False) if s == step]
    numbers = _numbers(found)
    return numbers[-1] if numbers else None


def metric_names(records: Iterable[RunRecord]) -> list[str]:
    return sorted(set().union(*(r.metrics for r in records)))


_WHERE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(!=|>=|<=|==|=|>|<)(.*)$", re.DOTALL)
WHERE_FORMS = "KEY=VALUE, KEY!=VALUE, KEY>VALUE, KEY<VALUE, KEY>=VALUE or KEY<=VALUE"


def parse_literal(text: str) -> Any:
    """A command-line value as a Python literal where it is one (``10``, ``True``,
    ``1e-3``, ``"x"``, ``None``), else the text itself (``lstm``)."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


@dataclass(frozen=True)
class Condition:
    """One --where condition on a config key (or, failing that, a metric's best)."""

    key: str
    op: str
    value: Any
    text: str

    def lookup(self, record: RunRecord) -> tuple[bool, Any]:
        config = flatten_config(record.config)
        if self.key in config:
            return True, config[self.key]
        if self.key in record.config:  # a whole nested dict
            return True, record.config[self.key]
        point = best_point(record, self.key)
        if point is not None:
            return True, point[1]
        return False, None

    def matches(self, record: RunRecord) -> bool:
        found, actual = self.lookup(record)
        if self.op in ("=", "=="):
            return found and _equal(actual, self.value)
        if self.op == "!=":
            return not (found and _equal(actual, self.value))
        if not found or not _number(actual) or not _number(self.value):
            return False
        return {
            ">": actual > self.value,
            "<": actual < self.value,
            ">=": actual >= self.value,
            "<=": actual <= self.value,
        }[self.op]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _equal(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, bool) or isinstance(wanted, bool):
        return type(actual) is type(wanted) and actual == wanted
    if _number(actual) and _number(wanted):
        return actual == wanted
    if isinstance(actual, str) and not isinstance(wanted, str):
        return actual == str(wanted)
    return actual == wanted


def parse_where(text: str) -> Condition:
    """``depth=10``, ``model!=lstm``, ``dropout>0.1``, ``synthetic.order=2``."""
    match = _WHERE.match(text)
    if not match or not match[3].strip():
        raise QueryError(
            f"--where {text!r}: expected {WHERE_FORMS}, e.g. depth=10, model=lstm, tied=True"
        )
    key, op, value = match[1], match[2], parse_literal(match[3])
    if op in ("<", ">", "<=", ">=") and not _number(value):
        raise QueryError(
            f"--where {text!r}: {op} compares numbers; {match[3].strip()!r} is not one"
        )
    return Condition(key, op, value, text)


def check_keys(conditions: Sequence[Condition], records: Sequence[RunRecord]) -> None:
    """A --where key that no run has is a typo: say so, with the closest keys."""
    readable = [r for r in records if r.config]
    if not readable:
        return
    known = set(metric_names(readable))
    for record in readable:
        known.update(flatten_config(record.config))
        known.update(record.config)
    for condition in conditions:
        if condition.key not in known:
            close = difflib.get_close_matches(condition.key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise QueryError(
                f"--where {condition.text!r}: no run has a config key or metric "
                f"'{condition.key}'{hint}"
            )


def parse_statuses(values: Iterable[str]) -> set[str]:
    """--status values (any case) as upper-case statuses; unknown ones are an error."""
    statuses = set()
    for value in values:
        for piece in (p.strip() for p in value.split(",")):
            if piece.upper() not in STATUSES:
                raise QueryError(
                    f"--status {piece!r} is not a run status; one of: {', '.join(STATUSES)}"
                )
            statuses.add(piece.upper())
    return statuses


def filter_runs(
    records: Iterable[RunRecord],
    conditions: Sequence[Condition] = (),
    statuses: set[str] | None = None,
    name_pattern: str | None = None,
    tags: Sequence[str] = (),
) -> list[RunRecord]:
    """Runs matching every condition, any of ``statuses``, the name glob and every tag."""
    kept = []
    for record in records:
        if statuses and record.status not in statuses:
            continue
        if any(tag not in record.tags for tag in tags):
            continue
        if name_pattern and not fnmatch.fnmatchcase(record.name.lower(), name_pattern.lower()):
            continue
        if all(condition.matches(record) for condition in conditions):
            kept.append(record)
    return kept


RECORD_SORT_KEYS = ("id", "name", "status", "start", "duration")
# Record fields listed with the interesting end first, as `ls -t` and `ls -S` do.
NEWEST_OR_LONGEST_FIRST = ("start", "duration")
ValueOf = Callable[[RunRecord], Any]


def sort_descending(name: str, is_metric: bool) -> bool:
    """The natural direction of a sort key: metrics best first (lowest ppl, bpc, loss;
    highest throughput, accuracy), start newest first, duration longest first; id,
    name, status and config values ascending."""
    if is_metric:
        return best_is_max(name)
    return name in NEWEST_OR_LONGEST_FIRST


def _sort_values(
    records: Sequence[RunRecord], name: str, columns: Mapping[str, ValueOf]
) -> tuple[list[Any], bool] | None:
    """(each run's value for ``name``, whether it is a metric); None for an unknown key."""
    fields = {"name": "name", "status": "status", "start": "start_time", "duration": "duration"}
    if name in fields:
        return [getattr(r, fields[name]) for r in records], False
    if name in columns:  # a column as `ls` shows it (test.ppl at the best valid epoch)
        values = [columns[name](r) for r in records]
        if any(v is not None for v in values):
            return values, True
    if name in metric_names(records):
        points = [best_point(r, name) for r in records]
        return [p[1] if p else None for p in points], True
    configs = [flatten_config(r.config) for r in records]
    if any(name in config for config in configs):
        return [config.get(name) for config in configs], False
    return None


def _unknown_sort_key(key: str, records: Sequence[RunRecord], columns: Iterable[str]):
    known = set(RECORD_SORT_KEYS) | set(metric_names(records)) | set(columns)
    known = known.union(*(flatten_config(r.config) for r in records))
    close = difflib.get_close_matches(key.removeprefix("-"), sorted(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return QueryError(
        f"--sort {key!r}: not a metric, config key or one of {', '.join(RECORD_SORT_KEYS)}{hint}"
    )


def sort_runs(
    records: Sequence[RunRecord],
    key: str,
    reverse: bool = False,
    columns: Mapping[str, ValueOf] | None = None,
) -> list[RunRecord]:
    """Runs ordered by ``key`` in its natural direction (:func:`sort_descending`), the
    other way with ``reverse`` or a leading ``-``; runs without a value go last either
    way, ties stay in id order. ``columns`` gives values to use instead of a metric's
    best (what a table shows under that name)."""
    reverse = reverse or key.startswith("-")
    name = key.removeprefix("-")
    records = sorted(records, key=id_order)
    if name == "id":
        return records[::-1] if reverse else records
    found = _sort_values(records, name, columns or {})
    if found is None:
        raise _unknown_sort_key(key, records, columns or {})
    values, is_metric = found
    descending = sort_descending(name, is_metric) != reverse
    present = [i for i, v in enumerate(values) if v is not None]
    absent = [i for i, v in enumerate(values) if v is None]
    try:
        present.sort(key=lambda i: values[i], reverse=descending)
    except TypeError:  # mixed types (a config key holding numbers and strings)
        present.sort(key=lambda i: (type(values[i]).__name__, str(values[i])), reverse=descending)
    return [records[i] for i in present + absent]


# --------------------------------------------------------------------------------------
# Machine-readable form
# --------------------------------------------------------------------------------------


def iso(time: datetime | None) -> str | None:
    """A naive UTC time as ISO 8601 with its offset."""
    return None if time is None else time.replace(tzinfo=UTC).isoformat()


def json_clean(value: Any) -> Any:
    """``value`` as strict JSON: non-finite floats become None, times ISO strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return iso(parse_time(value))
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def record_to_dict(record: RunRecord, with_series: bool = True) -> dict:
    """Every field of ``record`` as plain JSON (ISO times, metric series as lists)."""
    data = {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "source": record.source,
        "location": record.location,
        "start_time": iso(record.start_time),
        "stop_time": iso(record.stop_time),
        "heartbeat": iso(record.heartbeat),
        "duration_s": record.duration,
        "command": record.command,
        "comment": record.comment,
        "named_configs": record.named_configs,
        "tags": record.tags,
        "resumed_at": [iso(t) for t in record.resumed_at],
        "host": record.host,
        "config": record.config,
        "result": record.result,
        "info": record.info,
        "artifacts": [
            {"name": a.name, "size": a.size, "recorded": a.recorded} for a in record.artifacts
        ],
        "fail_trace": record.fail_trace,
        "mongo": record.mongo,
        "problem": record.problem,
    }
    if with_series:
        data["metrics"] = {
            name: {"steps": list(steps), "values": list(values)}
            for name, (steps, values) in sorted(record.metrics.items())
        }
    return json_clean(data)
