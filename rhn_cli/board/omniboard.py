"""Omniboard: installed on demand with npm, started over one MongoDB database.

Omniboard (npm ``omniboard``, pinned to 2.16.1) is a Node.js web app that shows the Sacred
runs of one MongoDB database. It is installed once with npm into rhn's cache directory
(``RHN_CACHE_DIR``, else the platform's user cache, e.g. ``~/.cache/rhn``): into a
temporary directory first, renamed into place only when npm succeeded, so an interrupted
install is never used.

Omniboard takes its MongoDB URL from the ``MONGO_URI`` environment variable rather than
``--mu`` on its command line (which any user can read with ``ps``); everything it prints
is scrubbed of the URL's password before it is shown.

See /work/shared/spec/sacred_ecosystem.md §5.1 (Omniboard).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rhn_cli.board.process import (
    LOOPBACK,
    START_TIMEOUT_S,
    BoardError,
    Service,
    port_problem,
)
from rhn_cli.tracking.observers import database_name, mongo_problem, redact

OMNIBOARD_VERSION = "2.16.1"
MIN_NODE_VERSION = (18, 0, 0)
DEFAULT_PORT = 9000
CACHE_DIR_ENV = "RHN_CACHE_DIR"

NODE_HELP = (
    "install Node.js 18 or newer (https://nodejs.org/, or your package manager, "
    "e.g. 'apt-get install nodejs npm')"
)

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


@dataclass
class Omniboard:
    """A running Omniboard; ``url`` is the page to open."""

    service: Service
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

    service = Service(
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
