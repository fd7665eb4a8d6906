"""The child processes of ``rhn board`` and what they share: ports, secrets, errors.

Both servers (Omniboard and the local MongoDB-compatible one) listen on 127.0.0.1 only:
Omniboard has no authentication, and a recorded config is nobody else's business (reach
a remote one with ``ssh -L``). What they print is kept line by line, scrubbed of the
MongoDB URL's password, for the one-line errors when one of them stops.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from rhn_cli.tracking.observers import redact, url_password

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class BoardError(Exception):
    """Why Omniboard cannot be opened: one line for the user."""


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


def scrub(text: str, url: str) -> str:
    """``text`` with the URL and its password (also percent-decoded) replaced."""
    text = text.replace(url, redact(url))
    password = url_password(url)
    if password:
        from urllib.parse import unquote

        for secret in {password, unquote(password)}:
            if len(secret) >= 3:  # replacing a 1-2 character password would garble text
                text = text.replace(secret, "***")
    return text


class Service:
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
