"""Progress of a long pass (a training epoch, an evaluation): a bar on a terminal, else a
plain line now and then on a log stream.

On a terminal the text after the bar is picked, each time the bar is drawn, as the
richest of a pass's layouts that leaves the bar room at the terminal's current width: at
80 columns perplexity and the time left, on wide terminals everything. Off a terminal
(pipes, Slurm job logs) a line goes to the log stream at most once per tenth of a pass
and once per :data:`PLAIN_LINE_SECONDS` (whichever is rarer; the process's very first
line after the first tenth), so that a log shows the run is alive and its ETA without
filling up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TextIO

from tqdm import tqdm

PLAIN_LINE_FRACTION = 0.1
PLAIN_LINE_SECONDS = 30.0
MIN_BAR_WIDTH = 10

# A pass's layouts, richest first, given the seconds it has left (None: unknown yet).
Layouts = Callable[[float | None], Sequence[str]]


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def eta(seconds: float | None) -> str:
    return "ETA ?" if seconds is None else f"ETA {clock(seconds)}"


@dataclass
class ProgressOutput:
    """Where progress goes: bars on ``terminal`` (a tty), else plain lines on ``log``
    (neither: nowhere). One per process: the pace of plain lines is the process's."""

    terminal: TextIO | None = None
    log: TextIO | None = None
    last_line: float | None = None  # time.monotonic() of the last plain line

    def start(
        self, total: int, desc: str, unit: str, layouts: Layouts, initial: int = 0
    ) -> Progress:
        return Progress(self, total, desc, unit, layouts, initial)

    def line_due(self) -> bool:
        now = time.monotonic()
        if self.last_line is not None and now - self.last_line < PLAIN_LINE_SECONDS:
            return False
        self.last_line = now
        return True


SILENT = ProgressOutput()


class FittedBar(tqdm):
    """A tqdm bar whose text after the bar fits the terminal's width whenever it is drawn
    (the terminal may be resized while a run trains)."""

    def __init__(self, *args, tail: Callable[[int | None], str], **kwargs) -> None:
        self.tail = tail
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self):
        fields = super().format_dict
        head = f"{fields['prefix']}: 100%|" if fields["prefix"] else "100%|"
        ncols = fields["ncols"]
        room = None if not ncols else ncols - len(head) - MIN_BAR_WIDTH - 2
        text = self.tail(room).replace("{", "{{").replace("}", "}}")
        fields["bar_format"] = "{desc}: {percentage:3.0f}%|{bar}| " + text
        return fields


class Progress:
    """One pass: ``update()`` after each unit of work; a context manager."""

    def __init__(
        self,
        output: ProgressOutput,
        total: int,
        desc: str,
        unit: str,
        layouts: Layouts,
        initial: int = 0,
    ) -> None:
        self.output, self.total, self.desc, self.unit = output, total, desc, unit
        self.layouts = layouts
        self.n = self.first = initial
        self.started = time.monotonic()
        self.next_mark = self._mark_after(initial)
        self.bar = None
        if output.terminal is not None:
            self.bar = FittedBar(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                leave=False,
                file=output.terminal,
                dynamic_ncols=True,
                mininterval=0.5,
                tail=self._tail,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def seconds_left(self) -> float | None:
        """From the mean pace of this pass so far."""
        done = self.n - self.first
        if done <= 0:
            return None
        return (time.monotonic() - self.started) / done * (self.total - self.n)

    def extend(self, more: int) -> None:
        """``more`` units of work found to do (the pass takes longer than planned)."""
        self.total += more
        if self.bar is not None:
            self.bar.total += more

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.output.log is not None and self.next_mark <= self.n < self.total:
            self.next_mark = self._mark_after(self.n)
            if self.output.line_due():
                percent = 100 * self.n / max(self.total, 1)
                line = f"  {self.desc} {percent:3.0f}%  {self.layouts(self.seconds_left())[0]}"
                self.output.log.write(line + "\n")
                self.output.log.flush()

    def _mark_after(self, n: int) -> int:
        """The first count past ``n`` that starts a new tenth of the pass."""
        step = PLAIN_LINE_FRACTION * self.total
        return int((int(n / step) + 1) * step) if step > 0 else self.total

    def _tail(self, room: int | None) -> str:
        """The richest layout that fits ``room`` columns (None: any): the count
        ``n/total unit`` and the first layout, else the first layout that fits alone."""
        layouts = self.layouts(self.seconds_left())
        candidates = [f"{self.n}/{self.total} {self.unit}  {layouts[0]}", *layouts]
        if room is None:
            return candidates[0]
        return next((text for text in candidates if len(text) <= room), layouts[-1])
