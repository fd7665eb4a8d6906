"""Sacred observers for rhn runs: the local file store, and MongoDB when one answers.

The file store always records the run. A MongoDB observer is added only after the
server has answered a ping within a few seconds: Sacred's own observer fails the whole
run when MongoDB is down at start, and rhn must never lose a run to that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from rhn_cli.atomic import write_atomically
from rhn_cli.tracking import quiet_sacred_import

DEFAULT_DATABASE = "rhn"
MONGO_TIMEOUT_S = 3.0


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


def file_store_observer(runs_dir: str | os.PathLike, continue_after_epoch: int | None = None):
    """A FileStorageObserver under ``runs_dir`` with atomic JSON writes.

    It never clashes with an existing run directory. With ``continue_after_epoch`` it
    instead re-opens the directory of the run id Sacred hands it (a resumed run): the
    original start time is kept, the resumption is noted in ``meta.resumed_at``, and
    metrics after that epoch (logged but not checkpointed) are dropped so no step is
    recorded twice. ``cout.txt`` and ``metrics.json`` are appended to.
    """
    with quiet_sacred_import():
        from sacred.observers import FileStorageObserver
        from sacred.serializer import flatten

    class RunDirectoryObserver(FileStorageObserver):
        previous_run: dict | None = None

        def _make_run_dir(self, _id):
            if continue_after_epoch is not None:
                self.dir = os.path.join(self.basedir, str(_id))
                with open(os.path.join(self.dir, "run.json")) as handle:
                    self.previous_run = json.load(handle)
                _drop_metrics_after(Path(self.dir), continue_after_epoch, self.save_json)
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


def mongo_observer(url: str, failure_dir: str | os.PathLike):
    """Sacred's MongoObserver on ``url``; run ids are integers, as Omniboard needs."""
    with quiet_sacred_import():
        from sacred.observers import MongoObserver

    return MongoObserver(
        url=url,
        db_name=database_name(url),
        failure_dir=str(failure_dir),
        serverSelectionTimeoutMS=int(MONGO_TIMEOUT_S * 1000),
    )
