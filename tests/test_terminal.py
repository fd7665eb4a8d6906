"""What `rhn train` shows: on an 80-column terminal (a real pseudo-terminal), through pipes
(a job log), and how soon."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import selectors
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.conftest import FAST_RUN

# Long enough that the bars redraw with real numbers (they draw at most twice a second);
# MC dropout and the full (B = 1) evaluation at the end, as a user's run has them.
RUN = ["with", *FAST_RUN, "synthetic.train_tokens=400000", "mc_steps=2"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS_LINE = re.compile(r"^  epoch \d+ +\d+%  ppl ", re.MULTILINE)


def _environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("COLUMNS", None)  # the width must come from the terminal itself
    return env


def train_on_a_terminal(cwd: Path, columns: int) -> str:
    """Everything `rhn train` writes to a pseudo-terminal ``columns`` wide (stdout and
    stderr both), as the terminal receives it."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "rhn_cli", "train", *RUN],
        cwd=cwd,
        env=_environment(),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        close_fds=True,
    )
    os.close(terminal)
    received = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    assert process.wait(timeout=120) == 0, received.decode(errors="replace")
    return received.decode(errors="replace")


def screen_lines(received: str) -> list[str]:
    """Each text a line of the terminal shows: redraws (after a carriage return) apart."""
    lines = []
    for line in received.replace("\r\n", "\n").split("\n"):
        lines += [ANSI.sub("", part) for part in line.split("\r")]
    return lines


def test_an_80_column_terminal_shows_bars_with_ppl_and_eta_and_no_line_wider(tmp_path):
    received = train_on_a_terminal(tmp_path, 80)
    lines = screen_lines(received)
    too_wide = [line for line in lines if len(line.rstrip()) > 80]
    assert not too_wide, too_wide
    # A training bar with a bar of some width, the perplexity and the time left.
    bar = re.compile(r"^epoch 1: +\d+%\|.{10,}\| ppl \d+\.\d\d  ETA (epoch )?\d+:\d\d:\d\d")
    assert any(bar.match(line) for line in lines), lines
    # Progress during the per-epoch validation and the final evaluations.
    for desc in ("valid", "full valid", "full test", "MC dropout"):
        assert any(line.startswith(f"{desc}: ") for line in lines), (desc, lines)
    # The epoch summary, split at a field boundary on the terminal...
    summary = next(i for i, line in enumerate(lines) if line.startswith("epoch   1/2"))
    assert re.search(r"valid ppl +[\d.]+ bits [\d.]+$", lines[summary])
    assert lines[summary + 1].startswith("    lr 0.5  (source entropy")
    # ...and one line in the record, without progress.
    recorded = (tmp_path / "runs" / "1" / "cout.txt").read_text()
    (epoch_line,) = [line for line in recorded.splitlines() if line.startswith("epoch   1/2")]
    assert "valid ppl" in epoch_line and "tok/s" in epoch_line
    assert "%|" not in recorded and not PROGRESS_LINE.search(recorded)


def test_a_wide_terminal_keeps_the_learning_rate_and_throughput(tmp_path):
    lines = screen_lines(train_on_a_terminal(tmp_path, 160))
    bar = re.compile(r"^epoch 1: +\d+%\|.+\| \d+/\d+ batch  ppl [\d.]+  lr 0.5  [\d,]+ tok/s  ETA")
    assert any(bar.match(line) for line in lines), lines
    assert any(line.startswith("epoch   1/2") and "tok/s" in line for line in lines)


def test_off_a_terminal_progress_lines_go_to_stderr_not_to_the_record(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rhn_cli", "train", *RUN],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # A job log (stderr) shows the run is alive, rarely: one line for a run this short.
    progress = PROGRESS_LINE.findall(done.stderr)
    assert 1 <= len(progress) <= 2, done.stderr
    assert "\r" not in done.stderr
    recorded = (tmp_path / "runs" / "1" / "cout.txt").read_text()
    assert not PROGRESS_LINE.search(recorded) and not PROGRESS_LINE.search(done.stdout)
    assert recorded.count("epoch   1/2") == 1 and recorded.count("epoch   2/2") == 1
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert "mc_test_perplexity" in info


def test_the_first_line_comes_within_a_second(tmp_path):
    """Time to the first byte on stdout or stderr. Python and the command line take about
    0.4 s here, and torch (which used to come first) about 1.5 s more; 1.5 s leaves room
    for a loaded machine while failing when the first line waits for torch."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "rhn_cli", "train", "with", *FAST_RUN],
        cwd=tmp_path,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            selector.register(process.stderr, selectors.EVENT_READ)
            ready = selector.select(timeout=30)
            waited = time.monotonic() - started
            first = os.read(ready[0][0].fileobj.fileno(), 200).decode() if ready else ""
    finally:
        process.kill()
        process.communicate()
    assert first.startswith("rhn train: training rhn on synthetic"), first
    assert waited < 1.5, f"first output after {waited:.2f}s: {first!r}"
