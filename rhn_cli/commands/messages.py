"""Printing for ``rhn``'s commands: errors and notes to stderr, styled table lines.

Kept apart from :mod:`rhn_cli.cli` so that command modules can use it without
importing the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

STYLES = {
    "header": {"bold": True},
    "title": {"bold": True},
    "dim": {"dim": True},
    "COMPLETED": {"fg": "green"},
    "FAILED": {"fg": "red"},
    "UNREADABLE": {"fg": "red"},
    "INTERRUPTED": {"fg": "yellow"},
    "TIMEOUT": {"fg": "yellow"},
    "RUNNING": {"fg": "cyan"},
    "QUEUED": {"fg": "cyan"},
    "PROBABLY_DEAD": {"fg": "magenta"},
}


def style(text: str, kind: str) -> str:
    # click.echo drops the colours again when stdout is not a terminal.
    return click.style(text, **STYLES.get(kind, {}))


def stderr(message: str, color: str | None = None) -> None:
    # Always the current sys.stderr: click's err=True caches a wrapper per stream, and
    # Sacred's capture proxy compares equal to the real stream, so the cache would hand
    # back a wrapper of the proxy after Sacred has closed it.
    click.secho(message, fg=color, file=sys.stderr)


def fail(message: str, code: int = 2) -> None:
    """``Error: message`` in red on stderr, and exit with ``code``."""
    stderr(f"Error: {message}", "red")
    sys.exit(code)


def echo_lines(lines: Sequence[str]) -> None:
    click.echo("\n".join(lines))
