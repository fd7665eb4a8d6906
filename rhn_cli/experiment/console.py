"""What a training run shows on the console, apart from what it records.

Sacred records a run's stdout (cout.txt, MongoDB's captured_out) by teeing ``sys.stdout``.
Progress therefore never goes there: bars go to the real stderr when it is a terminal,
plain progress lines to the real stderr otherwise (a job log still shows them). A message
wider than the terminal is shown wrapped at field boundaries while the record keeps it as
one line, so that cout.txt does not depend on the width of the terminal a run started in.
"""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
from typing import TextIO

CONTINUATION = "    "
# Fields of a message are separated by two or more spaces before a word or a parenthesis
# ("valid ppl   4.553" is one field: numbers are padded to align from epoch to epoch).
_FIELD_BREAK = re.compile(r" {2,}(?=[A-Za-z(])")


def progress_streams(speaks: bool) -> tuple[TextIO | None, TextIO | None]:
    """(terminal for bars, log for plain lines) of a process; ``speaks``: it is the one
    process of a job that shows progress."""
    stream = sys.__stderr__
    if not speaks or stream is None:
        return None, None
    return (stream, None) if stream.isatty() else (None, stream)


def terminal_width(stream: TextIO | None) -> int | None:
    """Columns of ``stream`` when it is a terminal, else None."""
    try:
        if stream is None or not stream.isatty():
            return None
        return shutil.get_terminal_size((0, 0)).columns or None
    except (OSError, ValueError):
        return None


def wrap_fields(message: str, width: int) -> str:
    """``message`` in lines of at most ``width`` columns, broken between its fields where
    possible, continuation lines indented."""
    lines: list[str] = []
    current = ""
    for field in _FIELD_BREAK.split(message):
        candidate = f"{current}  {field}" if current else field
        if len(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = CONTINUATION + field
    lines.append(current)
    wrapped: list[str] = []
    for line in lines:  # a field wider than the terminal: at word boundaries
        if len(line) <= width:
            wrapped.append(line)
        else:
            wrapped += textwrap.wrap(line, width, subsequent_indent=CONTINUATION)
    return "\n".join(wrapped)


def fitted_echo(message: str) -> None:
    """Print ``message``: as one line into the run's record, wrapped on a narrow terminal."""
    stdout = sys.stdout
    width = terminal_width(sys.__stdout__)
    terminal = getattr(stdout, "__wrapped__", None)  # Sacred's tee: the console behind it
    record = getattr(stdout, "_self_out", None)  # and the record
    if width is None or len(message) <= width or terminal is None or record is None:
        print(message)
        return
    terminal.write(wrap_fields(message, width) + "\n")
    terminal.flush()
    record.write(message + "\n")
