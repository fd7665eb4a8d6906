"""Omniboard over MongoDB: installed on demand, started and stopped by ``rhn board``.

Omniboard (npm ``omniboard``, pinned to 2.16.1) is a Node.js web app that shows the Sacred
runs of one MongoDB database. It is installed once with npm into rhn's cache directory
(``RHN_CACHE_DIR``, else the platform's user cache, e.g. ``~/.cache/rhn``): into a
temporary directory first, renamed into place only when npm succeeded, so an interrupted
install is never used.

With no MongoDB configured, :func:`open_board` starts a local MongoDB-compatible server
(SecantusDB, the ``rhn[board]`` extra) with its data in ``<runs-dir>/.board-db``, copies
the file-store runs into it (:func:`rhn_cli.tracking.sync.sync_runs`) and opens Omniboard
on that. Both servers listen on 127.0.0.1 only: Omniboard has no authentication, and a
recorded config is nobody else's business (reach a remote one with ``ssh -L``).

Omniboard takes its MongoDB URL from the ``MONGO_URI`` environment variable rather than
``--mu`` on its command line (which any user can read with ``ps``); everything it prints
is scrubbed of the URL's password before it is shown.

See /work/shared/spec/sacred_ecosystem.md §5.1 (Omniboard) and §7 (SecantusDB).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rhn_cli.tracking.observers import database_name, mongo_problem, redact

OMNIBOARD_VERSION = "2.16.1"
MIN_NODE_VERSION = (18, 0, 0)
DEFAULT_PORT = 9000
LOOPBACK = "127.0.0.1"
CACHE_DIR_ENV = "RHN_CACHE_DIR"
LOCAL_DB_DIRNAME = ".board-db"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

NODE_HELP = (
    "install Node.js 18 or newer (https://nodejs.org/, or your package manager, "
    "e.g. 'apt-get install nodejs npm')"
)
BOARD_EXTRA_HELP = "pip install 'rhn[board]'"

# Run Omniboard with every listening socket on 127.0.0.1 (it calls app.listen(port), which
# would listen on all interfaces); then start it as its own `omniboard` script does.
_LAUNCHER = """\
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const port = args[0];
  const isPort = typeof port === 'number' || (typeof port === 'string' && /^[0-9]+$/.test(port));
  if (isPort && typeof args[1] !== 'string') args.splice(1, 0, %(host)s);
  return listen.apply(this, args);
};
require(%(entry)s);
"""
_LISTENING = re.compile(r"Omniboard is listening on port (\d+)")
_CONNECTED = re.compile(r"Connection to .* established successfully")


class BoardError(Exception):
    """Why Omniboard cannot be opened: one line for the user."""


# --------------------------------------------------------------------------------------
# Node.js and the Omniboard install
# --------------------------------------------------------------------------------------


def parse_node_version(text: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` from ``node --version`` output such as ``v20.20.2``."""
    match = re.fullmatch(r"\s*v?(\d+)\.(\d+)\.(\d+)\S*\s*", text)
    if match is None:
        raise BoardError(
            f"cannot read the Node.js version from 'node --version' (it printed "
            f"{text.strip()!r}); rhn board needs Node.js >= 18: {NODE_HELP}"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def find_node() -> str:
    """Path of a ``node`` of version 18 or newer, else :class:`BoardError`."""
    node = shutil.which("node")
    if node is None:
        raise BoardError(
            f"rhn board runs Omniboard on Node.js >= 18, and there is no 'node' on PATH: "
            f"{NODE_HELP}"
        )
    try:
        answer = subprocess.run(
            [node, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise BoardError(f"cannot run '{node} --version' ({error}): {NODE_HELP}") from error
    version = parse_node_version(answer.stdout)
    if version < MIN_NODE_VERSION:
        shown = ".".join(map(str, version))
        raise BoardError(
            f"rhn board runs Omniboard on Node.js >= 18, and {node} is v{shown}: {NODE_HELP}"
        )
    return node


def find_npm() -> str:
    """Path of ``npm`` (needed once, to install Omniboard), else :class:`BoardError`."""
    npm = shutil.which("npm")
    if npm is None:
        raise BoardError(
            f"installing Omniboard {OMNIBOARD_VERSION} needs npm, and there is no 'npm' on "
            "PATH: install npm (it comes with Node.js; e.g. 'apt-get install npm')"
        )
    return npm


def cache_dir() -> Path:
    """rhn's cache directory: ``RHN_CACHE_DIR``, else the platform's user cache."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("rhn"))


def omniboard_home(cache: Path | None = None) -> Path:
    """Where Omniboard is installed: ``<cache>/omniboard-2.16.1``."""
    return (cache or cache_dir()) / f"omniboard-{OMNIBOARD_VERSION}"


def _entry_point(home: Path) -> Path:
    return home / "node_modules" / "omniboard" / "dist" / "start.js"


def installed_omniboard(cache: Path | None = None) -> Path | None:
    """Omniboard's start script if a complete install is in the cache, else None."""
    entry = _entry_point(omniboard_home(cache))
    return entry if entry.is_file() else None


def ensure_omniboard(cache: Path | None = None, *, echo: Callable[[str], Any] = print) -> Path:
    """Omniboard's start script, installing Omniboard into the cache first if needed.

    npm installs into a fresh temporary directory next to the final one, which is renamed
    into place only once npm has succeeded; a lock keeps two installs from racing.
    """
    entry = installed_omniboard(cache)
    if entry is not None:
        return entry
    npm = find_npm()
    cache = cache or cache_dir()
    home = omniboard_home(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BoardError(f"cannot create the cache directory {cache}: {error}") from error
    from filelock import FileLock

    with FileLock(str(cache / f"omniboard-{OMNIBOARD_VERSION}.lock")):
        entry = installed_omniboard(cache)
        if entry is not None:  # another rhn installed it while we waited
            return entry
        # Left over from an interrupted install (nobody else holds the lock).
        for leftover in cache.glob(f".omniboard-{OMNIBOARD_VERSION}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if home.exists():  # incomplete, e.g. damaged by hand
            shutil.rmtree(home)
        echo(
            f"Installing Omniboard {OMNIBOARD_VERSION} into {home} with npm "
            "(one time, about 1-2 minutes)..."
        )
        staging = Path(tempfile.mkdtemp(prefix=f".omniboard-{OMNIBOARD_VERSION}-", dir=cache))
        log = cache / f"omniboard-{OMNIBOARD_VERSION}-install.log"
        try:
            _npm_install(npm, staging, log)
            if not _entry_point(staging).is_file():
                raise BoardError(
                    f"npm installed omniboard@{OMNIBOARD_VERSION} without "
                    f"node_modules/omniboard/dist/start.js; npm's output is in {log}"
                )
            staging.rename(home)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    echo(f"Omniboard {OMNIBOARD_VERSION} installed.")
    return _entry_point(home)


def _npm_install(npm: str, prefix: Path, log: Path) -> None:
    command = [
        npm,
        "install",
        "--prefix",
        str(prefix),
        f"omniboard@{OMNIBOARD_VERSION}",
        "--no-audit",
        "--no-fund",
    ]
    try:
        with open(log, "wb") as output:
            finished = subprocess.run(
                command, cwd=prefix, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
    except OSError as error:
        raise BoardError(f"cannot run npm ({error})") from error
    if finished.returncode != 0:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        errors = [
            line
            for line in lines
            if re.match(r"npm (error|ERR!)", line) and "complete log" not in line
        ]
        said = "; ".join(errors[:2]) or next((line for line in reversed(lines) if line), "")
        raise BoardError(
            f"npm install omniboard@{OMNIBOARD_VERSION} failed (exit code "
            f"{finished.returncode}): {said or 'no output'}; npm's output is in {log} "
            "(the first start installs Omniboard from the npm registry)"
        )


# --------------------------------------------------------------------------------------
# Ports, URLs, secrets
# --------------------------------------------------------------------------------------


def port_problem(port: int, host: str = LOOPBACK) -> str | None:
    """None if a server can listen on ``host:port`` now, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Node.js does
        try:
            sock.bind((host, port))
        except PermissionError:
            return f"port {port} on {host} needs more privileges (ports below 1024 usually do)"
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another Omniboard?)"
            return f"cannot listen on {host}:{port} ({error.strerror or error})"
    return None


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def with_database(url: str) -> str:
    """``url`` naming its database explicitly (rhn's default ``rhn`` when it names none).

    Omniboard, unlike rhn, would fall back to the database ``test``.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    hosts, tail = rest[:end], rest[end:]
    if tail.startswith("/"):
        tail = tail[1:]
    path_end = min((i for i in (tail.find(c) for c in "?#") if i >= 0), default=len(tail))
    if tail[:path_end]:
        return url
    return f"{scheme}://{hosts}/{database_name(url)}{tail[path_end:]}"


def _password(url: str) -> str | None:
    _, separator, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, _ = rest[:end].rpartition("@")
    if not separator or not at or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1] or None


def scrub(text: str, url: str) -> str:
    """``text`` with the URL and its password (also percent-decoded) replaced."""
    text = text.replace(url, redact(url))
    password = _password(url)
    if password:
        from urllib.parse import unquote

        for secret in {password, unquote(password)}:
            if len(secret) >= 3:  # replacing a 1-2 character password would garble text
                text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


class _Service:
    """A child process whose combined output is read line by line (kept: the last 200).

    It runs in its own process group, so a Ctrl-C in the terminal reaches only rhn, which
    then stops it in order (Omniboard before the database it reads).
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        watch: Callable[[str], None] | None = None,
        secret_url: str | None = None,
    ):
        self.name = name
        self.lines: deque[str] = deque(maxlen=200)
        self.changed = threading.Condition()
        self._watch = watch
        self._secret_url = secret_url
        try:
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as error:
            raise BoardError(f"cannot start {name} ({error})") from error
        self._reader = threading.Thread(target=self._read, name=f"{name} output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            if self._secret_url:
                line = scrub(line, self._secret_url)
            with self.changed:
                self.lines.append(line)
                if self._watch is not None:
                    self._watch(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``ready()`` (checked after each line); False if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    return ready()
                self.changed.wait(min(left, 0.2))
        return True

    def tail(self, count: int = 5) -> str:
        with self.changed:
            lines = [line for line in self.lines if line.strip()][-count:]
        return " | ".join(line.strip() for line in lines) or "no output"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the servers shut down cleanly on it), SIGKILL if that takes too long."""
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)


@dataclass
class LocalMongo:
    """A SecantusDB server on 127.0.0.1 holding the board's copy of the file-store runs."""

    service: _Service
    url: str  # mongodb://127.0.0.1:PORT/rhn
    storage_path: Path

    def stop(self) -> None:
        self.service.stop()


@dataclass
class Omniboard:
    """A running Omniboard; ``url`` is the page to open."""

    service: _Service
    port: int
    mongo_url: str = field(repr=False)  # may hold credentials: print redact(mongo_url)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/sacred"

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def running(self) -> bool:
        return self.service.running()

    def stop(self) -> None:
        self.service.stop()


@dataclass
class Board:
    """Omniboard, and the local database it reads when no MongoDB is configured."""

    omniboard: Omniboard
    local_db: LocalMongo | None = None
    sync_report: Any = None

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
        """Stop Omniboard, then the local database (if any). Safe to call twice."""
        try:
            self.omniboard.stop()
        finally:
            if self.local_db is not None:
                self.local_db.stop()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --------------------------------------------------------------------------------------
# Starting things
# --------------------------------------------------------------------------------------


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
    service = _Service(
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


def prepare_omniboard(
    port: int, cache: Path | None = None, *, echo: Callable[[str], Any] = print
) -> tuple[str, Path]:
    """Check Node.js and the port, install Omniboard if needed: ``(node, start script)``."""
    node = find_node()
    problem = port_problem(port)
    if problem is not None:
        raise BoardError(f"{problem}; choose another port with --port")
    return node, ensure_omniboard(cache, echo=echo)


def start_omniboard(
    mongo_url: str,
    port: int = DEFAULT_PORT,
    *,
    cache: Path | None = None,
    echo: Callable[[str], Any] = print,
    timeout_s: float = START_TIMEOUT_S,
    prepared: tuple[str, Path] | None = None,
) -> Omniboard:
    """Start Omniboard on ``mongo_url`` (its database, else ``rhn``), listening on
    127.0.0.1:``port``; return once it listens and has connected to MongoDB."""
    node, entry = prepared or prepare_omniboard(port, cache, echo=echo)
    uri = with_database(mongo_url)
    problem = mongo_problem(uri)
    if problem is not None:
        raise BoardError(f"MongoDB {redact(uri)} cannot be used: {problem}")

    env = {key: value for key, value in os.environ.items() if key != "OMNIBOARD_CONFIG"}
    env.update(MONGO_URI=uri, PORT=str(port))
    launcher = _LAUNCHER % {"host": json.dumps(LOOPBACK), "entry": json.dumps(str(entry))}
    state: dict[str, Any] = {"port": None, "connected": False}

    def watch(line: str) -> None:
        listening = _LISTENING.search(line)
        if listening:
            state["port"] = int(listening.group(1))
        if _CONNECTED.search(line):
            state["connected"] = True

    service = _Service(
        f"Omniboard {OMNIBOARD_VERSION}", [node, "-e", launcher], env, watch, secret_url=uri
    )
    try:
        ready = service.wait_for(
            lambda: state["port"] is not None and state["connected"], timeout_s
        )
    except BaseException:  # Ctrl-C while it starts
        service.stop()
        raise
    if not ready:
        service.stop()
        if service.process.returncode not in (None, 0) and not service.running():
            why = f"exited with code {service.process.returncode}"
        else:
            why = f"did not start within {timeout_s:g} s"
        raise BoardError(
            f"Omniboard {OMNIBOARD_VERSION} on MongoDB {redact(uri)} {why}: {service.tail()}"
        )
    return Omniboard(service, state["port"], uri)


def open_board(
    mongo_url: str | None,
    runs_dir: str | os.PathLike,
    *,
    port: int = DEFAULT_PORT,
    cache: Path | None = None,
    echo: Callable[[str], Any] = print,
) -> Board:
    """Omniboard on ``mongo_url``; with None, on a local SecantusDB server holding a copy
    of the file-store runs in ``runs_dir`` (synced into it first)."""
    if mongo_url:
        return Board(start_omniboard(mongo_url, port, cache=cache, echo=echo))

    runs_dir = Path(runs_dir)
    secantus_command()  # fail before installing anything if it is missing
    prepared = prepare_omniboard(port, cache, echo=echo)
    storage = runs_dir / LOCAL_DB_DIRNAME
    echo(f"No MongoDB configured: starting a local one with its data in {storage}")
    remembered = _local_db_port(runs_dir)
    try:
        local_db = start_local_mongo(storage, port=remembered)
    except BoardError:
        if remembered is None:
            raise
        local_db = start_local_mongo(storage)  # someone took the port meanwhile
    try:
        from rhn_cli.tracking.sync import SyncError, sync_runs

        _remember_local_db_port(runs_dir, local_db.url)
        echo(f"Copying the file-store runs in {runs_dir} into it:")
        try:
            report = sync_runs(runs_dir, local_db.url, echo=_indented(echo))
        except SyncError as error:
            raise BoardError(f"cannot copy the runs into the local database: {error}") from None
        found = (report.pushed, report.updated, report.unchanged, report.skipped, report.failed)
        if any(found):
            echo(f"  {report.summary()}")
        else:
            echo(f"  no runs in {runs_dir} yet ('rhn train' records one)")
        omniboard = start_omniboard(local_db.url, port, echo=echo, prepared=prepared)
    except BaseException:
        local_db.stop()
        raise
    return Board(omniboard, local_db, report)


def _indented(echo: Callable[[str], Any]) -> Callable[[str], None]:
    def relay(line: str) -> None:
        # Omniboard does not show checkpoints: not copying them is no news here.
        if not line.startswith("checkpoints (*.pt)"):
            echo(f"  {line}")

    return relay


# The local database listens on the same port each time when it can: the file store
# remembers what each database has of a run under the database's URL, port included, so a
# new port would make every run look new to it.
LOCAL_DB_STATE = ".board-db.json"


def _local_db_port(runs_dir: Path) -> int | None:
    try:
        port = json.loads((runs_dir / LOCAL_DB_STATE).read_text())["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(port, int) or not 1024 <= port <= 65535 or port_problem(port):
        return None
    return port


def _remember_local_db_port(runs_dir: Path, url: str) -> None:
    from rhn_cli.atomic import write_atomically

    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    text = json.dumps({"port": port, "url": url}, indent=2) + "\n"
    try:
        write_atomically(runs_dir / LOCAL_DB_STATE, text.encode("utf-8"))
    except OSError:
        pass  # only a speed-up for the next start
