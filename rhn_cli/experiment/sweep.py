"""Sweeps: one ``with`` line whose updates hold lists of values, run as one run per point.

``rhn sweep with ptb_sota 'depth=[1,2,3]' 'hidden_size=[1275,1180,1110]'`` sweeps
``depth`` and ``hidden_size``: a key is *swept* when its value on the command line is a
list (no config key takes a list). The updates are read with Sacred's own parser, as
``rhn train`` reads them (:func:`rhn_cli.experiment.resolve.parse_with`). Points are
the cartesian product of the lists (the default), or, with ``zip``, the first values
together, then the second ones... (the lists must then be of equal length).

Every point is resolved and validated before anything runs, so one bad value stops the
whole sweep with nothing recorded. Each point then runs as a separate process,
``rhn train --tag SWEEP ... with <named configs> <fixed updates> key=value...``, tagged
with the sweep's name. Running the sweep again finds its points among the recorded
runs by that tag and by their config: a COMPLETED point is skipped, an interrupted one
with a checkpoint is resumed (``rhn train --resume``), any other is run again. That is
how a crashed or interrupted sweep resumes. A MongoDB URL reaches the points in their
environment (RHN_MONGO_URL), never on a command line, where a password would show.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from rhn_cli.experiment.resolve import _flatten, parse_with, resolve
from rhn_cli.experiment.schema import ConfigError
from rhn_cli.tracking.settings import MONGO_OFF, MONGO_URL_ENV

MODES = ("product", "zip")
# Directory of the file store holding one output log per point (``_``: not a run).
SWEEP_LOG_DIR = "_sweeps"
# Statuses of a run that stopped early and can go on from its checkpoint.
RESUMABLE = ("INTERRUPTED", "TIMEOUT", "PROBABLY_DEAD")
CHECKPOINT_FILE = "checkpoint.pt"  # rhn_cli.engine.checkpoint.LAST (which imports torch)
POLL_S = 0.1
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class SweepError(ConfigError):
    """The sweep cannot be expanded as given; the message is one line for the user."""


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the values of the swept keys and the ``with`` tokens."""

    index: int  # 1-based
    total: int
    values: tuple[tuple[str, Any], ...]  # (dotted key, value) per swept key
    tokens: tuple[str, ...]  # named configs, fixed updates, then key=value per swept key
    config: dict = field(compare=False, repr=False)  # resolved and validated (no seed)

    @property
    def label(self) -> str:
        """``depth=1 hidden_size=1275``."""
        return " ".join(f"{key}={value!r}" for key, value in self.values)

    @property
    def title(self) -> str:
        return f"point {self.index}/{self.total} {self.label}"


@dataclass
class Sweep:
    name: str
    mode: str
    keys: list[str]  # the swept keys, dotted, in command-line order
    points: list[Point]
    tokens: list[str]  # the ``with`` tokens as given (without 'with')


def _token(key: str, value: Any) -> str:
    return f"{key}={value!r}"


def _split_tokens(tokens: Sequence[str]) -> tuple[list[str], list[str], dict[str, list]]:
    """(named config tokens, fixed update tokens, {swept key: values}).

    Each token is parsed on its own, so fixed updates stay as the user typed them; a
    token that mixes swept and fixed values (``synthetic={'order': [2, 3]}``) becomes one
    ``key=value`` token per fixed value."""
    named: list[str] = []
    fixed: list[str] = []
    swept: dict[str, list] = {}
    seen: dict[str, str] = {}  # dotted key -> the token that set it
    for token in tokens:
        updates, named_tokens = parse_with([token])
        if named_tokens:
            named.extend(named_tokens)
            continue
        flat = _flatten(updates)
        for key in flat:
            if key in seen and (key in swept or isinstance(flat[key], list)):
                raise SweepError(
                    f"{key} is set twice ({seen[key]!r} and {token!r}); give each swept key once"
                )
            seen[key] = token
        lists = {key: value for key, value in flat.items() if isinstance(value, list)}
        if not lists:
            fixed.append(token)
            continue
        for key, value in flat.items():
            if key not in lists:
                fixed.append(_token(key, value))
        swept.update(lists)
    return named, fixed, swept


def _check_values(swept: dict[str, list]) -> None:
    if not swept:
        raise SweepError(
            "nothing to sweep: give at least one key a list of values, e.g. 'depth=[1,2,3]' "
            "(quoted for the shell); 'rhn train' runs a single config"
        )
    for key, values in swept.items():
        if not values:
            raise SweepError(f"{key}=[]: a swept key needs at least one value")
        shown = [repr(v) for v in values]
        repeated = sorted({s for s in shown if shown.count(s) > 1})
        if repeated:
            raise SweepError(
                f"{key}={values!r} gives {', '.join(repeated)} more than once; "
                "each value makes one point"
            )


def combinations(swept: dict[str, list], mode: str) -> list[tuple[tuple[str, Any], ...]]:
    """The points' (key, value) pairs: the cartesian product of the lists (first key
    slowest), or with ``mode='zip'`` the lists side by side (equal lengths)."""
    if mode not in MODES:
        raise SweepError(f"sweep mode {mode!r}: expected one of {', '.join(MODES)}")
    keys = list(swept)
    if mode == "zip":
        lengths = {key: len(values) for key, values in swept.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{key} has {n}" for key, n in lengths.items())
            raise SweepError(
                f"--zip pairs the values in order, so every swept key needs as many values: "
                f"{shown} (or use --product to cross them)"
            )
        rows = zip(*swept.values(), strict=True)
    else:
        rows = itertools.product(*swept.values())
    return [tuple(zip(keys, row, strict=True)) for row in rows]


def default_name(named: Sequence[str], keys: Sequence[str], today: date | None = None) -> str:
    """``ptb_sota-depth-hidden_size-2025-06-12``: the named configs, the swept keys and
    the date."""
    stems = [Path(token).stem for token in named]
    return "-".join([*stems, *keys, (today or date.today()).isoformat()])


def check_name(name: str) -> str:
    """The sweep's name, which tags its runs: a valid tag."""
    from rhn_cli.tracking.records import check_tag

    checked = check_tag(name)
    if checked is None:
        raise SweepError(f"sweep name {name!r}: expected a non-empty name on one line")
    return checked


def expand(
    tokens: Sequence[str], mode: str = "product", name: str | None = None, today=None
) -> Sweep:
    """The sweep ``tokens`` describe, every point resolved and validated.

    Raises :class:`SweepError` (or :class:`ConfigError` for a bad token) naming the
    first point that is not a valid config."""
    tokens = list(tokens)
    if tokens and tokens[0] == "with":
        tokens = tokens[1:]
    named, fixed, swept = _split_tokens(tokens)
    _check_values(swept)
    rows = combinations(swept, mode)
    points = []
    for index, values in enumerate(rows, start=1):
        point_tokens = (*named, *fixed, *(_token(key, value) for key, value in values))
        label = " ".join(_token(key, value) for key, value in values)
        try:
            config = resolve(point_tokens).config
        except ConfigError as error:
            raise SweepError(f"point {index}/{len(rows)} ({label}): {error}") from None
        points.append(Point(index, len(rows), values, point_tokens, config))
    sweep_name = check_name(name) if name is not None else default_name(named, list(swept))
    return Sweep(sweep_name, mode, list(swept), points, tokens)


# --------------------------------------------------------------------------------------
# What each point needs: skip, resume or run
# --------------------------------------------------------------------------------------


def same_config(recorded: dict, config: dict) -> bool:
    """Whether a recorded run's config is ``config`` (the seed aside)."""
    from rhn_cli.experiment.resume import recorded_config

    try:
        normalized = recorded_config(recorded)
    except ConfigError:  # recorded by an rhn that allowed other values: not this point
        return False
    normalized.pop("seed", None)
    return normalized == {k: v for k, v in config.items() if k != "seed"}


def runs_of(point: Point, records: Sequence, tag: str) -> list:
    """The recorded runs of ``point``: tagged ``tag`` and with its config, oldest first."""
    return [r for r in records if tag in r.tags and same_config(r.config, point.config)]


@dataclass
class Plan:
    """What to do for one point: ``skip`` (done), ``wait`` (running elsewhere),
    ``resume`` (a stopped run with a checkpoint) or ``run`` (a new run)."""

    point: Point
    action: str
    record: Any = None  # the run skipped, waited for or resumed

    @property
    def run_id(self) -> str | None:
        return None if self.record is None else self.record.key


def plan_points(sweep: Sweep, records: Sequence) -> list[Plan]:
    plans = []
    for point in sweep.points:
        found = runs_of(point, records, sweep.name)
        completed = [r for r in found if r.status == "COMPLETED"]
        running = [r for r in found if r.status in ("RUNNING", "QUEUED")]
        resumable = [
            r
            for r in found
            if r.status in RESUMABLE
            and r.source == "file"
            and (Path(r.location) / CHECKPOINT_FILE).is_file()
        ]
        if completed:
            plans.append(Plan(point, "skip", completed[-1]))
        elif running:
            plans.append(Plan(point, "wait", running[-1]))
        elif resumable:
            plans.append(Plan(point, "resume", resumable[-1]))
        else:
            plans.append(Plan(point, "run"))
    return plans


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


def program() -> list[str]:
    """How a user starts rhn: ``rhn`` when the one on PATH is this installation's,
    else ``python -m rhn_cli`` with this Python."""
    found = shutil.which("rhn")
    here = Path(sys.executable).parent
    if found and Path(found).parent.resolve() == here.resolve():
        return ["rhn"]
    return [sys.executable, "-m", "rhn_cli"]


def mongo_is_off(mongo: str | None) -> bool:
    """Whether ``mongo`` (a sweep's MongoDB choice) switches MongoDB off: ``none``."""
    return mongo is not None and mongo.strip().lower() in MONGO_OFF


def mongo_arguments(mongo: str | None) -> list[str]:
    """What a command line says of ``mongo``: ``--mongo none`` when it is off, else
    nothing. A URL never goes on a command line, where every user sees it (``ps``) and
    logs keep it, password included: the points get it in RHN_MONGO_URL
    (:func:`child_environment`)."""
    return ["--mongo", "none"] if mongo_is_off(mongo) else []


def mongo_note(mongo: str | None) -> str | None:
    """How printed commands that leave ``mongo``'s URL out record to it, to follow "each
    command" or "it"; None when there is no URL to tell of."""
    if mongo is None or mongo_is_off(mongo):
        return None
    from rhn_cli.tracking.observers import redact

    return (
        f"records to MongoDB {redact(mongo)} only with {MONGO_URL_ENV} set to that URL "
        "(left out of the command: it may hold a password)"
    )


def train_arguments(plan: Plan, tag: str, runs_dir: str | None, mongo: str | None) -> list[str]:
    """``train`` and its arguments for ``plan`` (after the program name); ``mongo``: the
    sweep's MongoDB URL, ``none`` or None (see :func:`mongo_arguments`)."""
    arguments = ["train", "--tag", tag]
    if runs_dir is not None:
        arguments += ["--runs-dir", runs_dir]
    arguments += mongo_arguments(mongo)
    if plan.action == "resume":
        return [*arguments, "--resume", plan.run_id]
    return [*arguments, "with", *plan.point.tokens]


def shell_line(arguments: Sequence[str]) -> str:
    return shlex.join(arguments)


# --------------------------------------------------------------------------------------
# Running the points
# --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """How a point ended: its run (if one was recorded), status and result."""

    plan: Plan
    status: str  # the run's status, or FAILED / NOT STARTED
    record: Any = None
    returncode: int | None = None
    log: Path | None = None
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        return self.status == "COMPLETED"


@dataclass
class _Child:
    plan: Plan
    process: subprocess.Popen
    log: Path
    handle: Any
    known: set
    started: float
    position: int = 0  # of the log, for streaming


def thread_environment(jobs: int, environ: dict | None = None) -> dict[str, str]:
    """The children's environment: unbuffered output (streamed as it comes) and, with
    several jobs at once, OMP_NUM_THREADS = cores // jobs unless the user set it, so
    the jobs share the cores instead of each taking all of them."""
    env = dict(os.environ if environ is None else environ)
    from rhn_cli.engine.distributed import threads_per_process

    env["PYTHONUNBUFFERED"] = "1"
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = threads_per_process(jobs)
    return env


def child_environment(jobs: int, mongo: str | None, environ: dict | None = None) -> dict[str, str]:
    """:func:`thread_environment`, plus the sweep's MongoDB URL in RHN_MONGO_URL, which
    ``rhn train`` reads when no ``--mongo`` is given: out of the children's command
    lines (see :func:`mongo_arguments`)."""
    env = thread_environment(jobs, environ)
    if mongo is not None and not mongo_is_off(mongo):
        env[MONGO_URL_ENV] = mongo
    return env


def end_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for Popen that makes the child end with this process: on Linux
    the kernel sends it SIGTERM when this process dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG), and ``rhn train`` then checkpoints and records INTERRUPTED.
    None elsewhere (no such call): there a killed sweep leaves its points running.

    The signal comes when the *thread* that forked dies: :class:`Runner` starts its
    children from the thread that waits for them all, so that is never too early."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:  # in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before the line above: no signal comes
            os._exit(128 + signal.SIGTERM)

    return set_parent_death_signal


@dataclass(frozen=True)
class PointHooks:
    """How a :class:`Runner` starts a point and finds the run it recorded: ``command``
    (the point's ``rhn train`` command line), ``find_run`` (its run record, given the
    run ids there were before it started; None if none) and ``known_ids`` (the run ids
    there are now)."""

    command: Callable[[Plan], list[str]]
    find_run: Callable[[Plan, set], Any]
    known_ids: Callable[[], set]


class Runner:
    """Runs the planned points as ``rhn train`` processes, ``jobs`` at a time.

    Every child writes its output to ``log_dir/point-N.log``; with one job at a time the
    log is also streamed through ``echo``. SIGINT/SIGTERM stop the sweep: no new point
    starts, and the signal is passed on to the running children (which checkpoint and
    record INTERRUPTED); a second Ctrl-C passes on a second one (they stop at once).
    The children run in their own process groups so that a Ctrl-C in the terminal
    reaches them once, through the sweep, not twice. On Linux a sweep that dies without
    a word (SIGKILL) takes its children with it: each gets SIGTERM from the kernel
    (:func:`end_with_this_process`), so none trains on as an orphan."""

    def __init__(
        self,
        hooks: PointHooks,
        log_dir: Path,
        jobs: int = 1,
        echo: Callable[[str], None] = print,
        on_end: Callable[[Outcome], None] = lambda outcome: None,
        stream: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = hooks.command
        self.find_run = hooks.find_run
        self.known_ids = hooks.known_ids
        self.log_dir = log_dir
        self.jobs = jobs
        self.echo = echo
        self.on_end = on_end
        self.stream = stream if jobs == 1 else None
        self.env = env if env is not None else thread_environment(jobs)
        self.stop_signal: int | None = None
        self.running: list[_Child] = []
        self.end_with_sweep = end_with_this_process()

    def _signal(self, signal_number, frame) -> None:
        first = self.stop_signal is None
        self.stop_signal = signal_number
        for child in self.running:
            try:
                child.process.send_signal(signal_number)
            except ProcessLookupError:
                pass
        name = signal.Signals(signal_number).name
        if first:
            self.echo(
                f"{name}: stopping the sweep; the running points save a checkpoint and "
                "record INTERRUPTED (Ctrl-C again stops them at once)"
            )

    def run(self, plans: Sequence[Plan]) -> list[Outcome]:
        """Run ``plans`` (those to run or resume) and say how each ended, in order."""
        import threading

        queue = list(plans)
        outcomes: dict[int, Outcome] = {}
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while queue or self.running:
                while queue and self.stop_signal is None and len(self.running) < self.jobs:
                    self._start(queue.pop(0))
                if self.stop_signal is not None:
                    for plan in queue:
                        outcomes[plan.point.index] = Outcome(plan, "NOT STARTED")
                    queue = []
                for child in list(self.running):
                    self._pump(child)
                    if child.process.poll() is not None:
                        self.running.remove(child)
                        outcome = self._finish(child)
                        outcomes[child.plan.point.index] = outcome
                        self.on_end(outcome)
                time.sleep(POLL_S)
        finally:
            for child in self.running:  # only on an error of the sweep itself
                child.process.kill()
                child.handle.close()
            for signal_number, handler in handlers.items():
                signal.signal(signal_number, handler)
        return [outcomes[plan.point.index] for plan in plans]

    def _start(self, plan: Plan) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"point-{plan.point.index}.log"
        known = self.known_ids()
        command = self.command(plan)
        # Appended to: a point run again (resumed, retried) keeps its earlier output.
        handle = open(log, "ab")  # noqa: SIM115 -- closed when the child ends
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"=== {started}: {shlex.join(command)}\n".encode())
        handle.flush()
        position = handle.tell()
        verb = f"resuming run {plan.run_id}" if plan.action == "resume" else "starting"
        where = "" if self.stream else f" (output: {log})"
        self.echo(f"{plan.point.title}: {verb}{where}")
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            # Safe here: the sweep runs one thread and never imports torch.
            preexec_fn=self.end_with_sweep,
        )
        child = _Child(plan, process, log, handle, known, time.monotonic(), position)
        self.running.append(child)

    def _pump(self, child: _Child) -> None:
        if self.stream is None:
            return
        with open(child.log, "rb") as handle:
            handle.seek(child.position)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # whole lines only; the rest comes next time
        if child.process.poll() is not None:
            end = len(data)
        if end:
            text = data[:end].decode("utf-8", errors="replace")
            for line in text.splitlines():
                self.stream(f"  {line}")
            child.position += end

    def _finish(self, child: _Child) -> Outcome:
        self._pump(child)
        child.handle.close()
        returncode = child.process.returncode
        record = self.find_run(child.plan, child.known)
        if record is not None:
            status = record.status
        elif self.stop_signal is not None:  # stopped by the sweep before it recorded a run
            status = "INTERRUPTED"
        else:
            status = "FAILED"
        return Outcome(
            child.plan,
            status,
            record,
            returncode,
            child.log,
            time.monotonic() - child.started,
        )


# --------------------------------------------------------------------------------------
# The sweep's own record: RUNS_DIR/_sweeps/NAME/sweep.json
# --------------------------------------------------------------------------------------

MANIFEST_FILE = "sweep.json"


def manifest_path(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / SWEEP_LOG_DIR / name / MANIFEST_FILE


def load_manifest(runs_dir: str | Path, name: str) -> dict | None:
    """The sweep's record (its ``with`` line, mode and submitted jobs); None if none."""
    import json

    try:
        manifest = json.loads(manifest_path(runs_dir, name).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def save_manifest(runs_dir: str | Path, sweep: Sweep, jobs: Sequence[dict] = ()) -> Path:
    """Record the sweep's ``with`` line and mode (``rhn sweep status`` expands it again),
    adding ``jobs`` ({point, label, job, submitted}) to the jobs submitted before."""
    import json

    from rhn_cli.atomic import write_atomically

    path = manifest_path(runs_dir, sweep.name)
    previous = load_manifest(runs_dir, sweep.name) or {}
    manifest = {
        "sweep": sweep.name,
        "mode": sweep.mode,
        "tokens": list(sweep.tokens),
        "jobs": [*(previous.get("jobs") or []), *jobs],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(manifest, indent=2).encode("utf-8"))
    return path


def known_sweeps(runs_dir: str | Path) -> list[str]:
    """The names of the sweeps recorded in ``runs_dir``."""
    root = Path(runs_dir) / SWEEP_LOG_DIR
    return sorted(p.parent.name for p in root.glob(f"*/{MANIFEST_FILE}"))
