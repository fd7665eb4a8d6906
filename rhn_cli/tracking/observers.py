"""Sacred observers for rhn runs: the local file store, and MongoDB when one answers.

The file store always records the run. A MongoDB observer is added only after the
server has answered a ping within a few seconds: Sacred's own observer fails the whole
run when MongoDB is down at start, and rhn must never lose a run to that.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

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


def file_store_observer(runs_dir: str | os.PathLike):
    """A FileStorageObserver under ``runs_dir`` that never clashes with an existing run."""
    with quiet_sacred_import():
        from sacred.observers import FileStorageObserver

    class RunDirectoryObserver(FileStorageObserver):
        # With MongoDB attached, Sacred hands MongoDB's run id to the file store too. A
        # directory of that name may already hold an offline run: take the next free one
        # instead of failing the run.
        def _make_run_dir(self, _id):
            if _id is not None and os.path.exists(os.path.join(self.basedir, str(_id))):
                _id = None
            super()._make_run_dir(_id)

    return RunDirectoryObserver(str(Path(runs_dir)))


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
