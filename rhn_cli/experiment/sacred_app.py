"""Sacred glue: one Sacred experiment per command, its observers, and the run itself.

The config has been resolved and validated (:mod:`rhn_cli.experiment.resolve`) before
anything here runs, so a bad value never creates a run. Sacred then re-resolves the
same named configs and updates, records the run with its observers (the file store,
plus MongoDB when it answers) and calls its main function, which hands the work to the
engine. A resumed run re-opens its own run directory under the same id.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import rhn_cli
from rhn_cli.experiment import provenance
from rhn_cli.experiment.jobs import JOB_META_KEY, SchedulerJob
from rhn_cli.experiment.published import with_published
from rhn_cli.experiment.recording import (
    SacredReporter,
    kernel_facts,
    pin_recorded_decisions,
    recording_the_end,
    start_run,
)
from rhn_cli.experiment.resolve import ResolvedConfig
from rhn_cli.experiment.resume import ResumePlan
from rhn_cli.experiment.schema import defaults, plain
from rhn_cli.tracking import quiet_sacred_import
from rhn_cli.tracking.observers import (
    MONGO_TIMEOUT_S,
    file_store_observer,
    mongo_observer,
    mongo_problem,
    redact,
)
from rhn_cli.tracking.omniboard_view import rounded_result
from rhn_cli.tracking.sanitize import clean

EXPERIMENT_NAME = "rhn"
MONGO_FAILURE_SUBDIR = "_mongo_failures"


@dataclass
class RunOutcome:
    run_id: Any
    status: str
    result: Any
    run_dir: Path | None
    mongo_url: str | None  # redacted; None unless MongoDB recorded the whole run


@dataclass
class RunLabels:
    """What a user attaches to a run: ``name`` (recorded as the experiment name), a
    ``comment``, and ``tags`` (recorded in the run's ``meta.tags`` and, in MongoDB, in
    ``omniboard.tags``, where Omniboard shows them)."""

    name: str | None = None
    comment: str | None = None
    tags: Sequence[str] = ()
    job: SchedulerJob | None = None  # the cluster job running it (recorded; its signals)


@dataclass
class RunFlags:
    """Sacred's flags for a run: ``unobserved`` (-u: record nothing), and the ones Sacred
    applies itself (``sacred_options``: --loglevel, --debug, --pdb, --force), which it
    records in the run's meta.options."""

    unobserved: bool = False
    sacred_options: dict[str, Any] = field(default_factory=dict)


class RunFailed(Exception):
    """Training raised; Sacred has recorded the run as FAILED (with the traceback)."""

    def __init__(self, cause: BaseException, run_dir: Path | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.run_dir = run_dir


class RunInterrupted(Exception):
    """Training stopped early (a signal, Ctrl-C, max_time); Sacred has recorded it."""

    def __init__(
        self,
        run_dir: Path | None,
        status: str = "INTERRUPTED",
        signal_number: int | None = None,
        checkpoint_path: Path | None = None,
        where: str = "",
    ) -> None:
        super().__init__(status)
        self.run_dir = run_dir
        self.status = status
        self.signal_number = signal_number
        self.checkpoint_path = checkpoint_path
        self.where = where


def _main_function(
    progress: TextIO | None, stop, resume: ResumePlan | None, shard=None, corpus=None
):
    """Sacred's main function: train on the resolved config, return best valid perplexity
    (rounded for Omniboard's Result column: :func:`rounded_result`; the metrics keep it whole).

    ``progress``: the terminal for progress bars (None: plain progress lines on the real
    stderr, from the process that speaks).
    ``shard``: this process's part of a data-parallel job (None: a single process).
    ``corpus``: the corpus the pre-flight checks loaded (None: load it here)."""

    def main(_config, _run, _seed):
        import torch

        from rhn_cli.data.registry import load_corpus
        from rhn_cli.engine.distributed import SINGLE
        from rhn_cli.engine.train import RunContext, configure_determinism, train
        from rhn_cli.experiment.console import fitted_echo, progress_streams

        # rhn validated the config before Sacred saw it (Sacred resolves the same one):
        # a plain, type-widened copy of Sacred's read-only config, not a second check.
        config = plain(_config)
        configure_determinism(config["deterministic"])
        torch.manual_seed(_seed)
        run_dir = next((Path(o.dir) for o in _run.observers if getattr(o, "dir", None)), None)
        if run_dir is None:
            print("unobserved run: nothing will be recorded, no checkpoints written")
        else:
            verb = "resuming in" if resume is not None else "recording to"
            print(f"run {_run._id}: {verb} {run_dir}")
        data = corpus if corpus is not None else load_corpus(config, progress=progress)
        if data.description:  # the vocabulary convention and sources, with the run
            _run.info["dataset"] = clean(data.description)
        if shard is not None:
            _run.info["world_size"] = shard.world_size
        speaks = shard is None or shard.is_main
        context = RunContext(
            echo=fitted_echo,
            progress=progress,
            progress_log=progress_streams(speaks)[1] if progress is None else None,
            run_dir=run_dir,
            resume_from=resume.state if resume is not None else None,
            stop=stop,
            shard=shard or SINGLE,
        )
        summary = train(config, data, SacredReporter(_run), context)
        return rounded_result(summary.best_valid_ppl)

    return main


def _evaluate_function(splits: tuple[str, ...], evaluated_run: str | None, corpus=None):
    """Sacred's ``evaluate`` command: the reference evaluate / evaluate_mc (on ``corpus``,
    as the pre-flight checks loaded it; None: load it here)."""

    def evaluate(_config, _run, _seed):
        import torch

        from rhn_cli.data.registry import load_corpus
        from rhn_cli.engine.evaluation import evaluate_saved_model
        from rhn_cli.engine.progress import ProgressOutput
        from rhn_cli.experiment.console import progress_streams

        config = plain(_config)  # validated before Sacred saw it, as in main
        torch.manual_seed(_seed)
        if evaluated_run is not None:
            _run.info["evaluated_run"] = evaluated_run
        _run.info["checkpoint"] = config["load_model"]
        print(f"evaluating {config['load_model']} on {', '.join(splits)}")
        data = corpus if corpus is not None else load_corpus(config)
        progress = ProgressOutput(*progress_streams(True))
        results = evaluate_saved_model(
            config, data, SacredReporter(_run), splits, progress=progress
        )
        _run.info["kernels"] = kernel_facts()
        return rounded_result(results[f"full_{splits[-1]}.ppl"])

    return evaluate


def _terminal() -> TextIO | None:
    """The real stderr when it is a terminal: progress bars go there, bypassing Sacred's
    capture, so redraws never reach the recorded output."""
    from rhn_cli.experiment.console import progress_streams

    return progress_streams(True)[0]


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _logger() -> logging.Logger:
    logger = logging.getLogger("rhn")
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("rhn: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    # Sacred's INFO lines ("Running command 'main'"...) only repeat what rhn prints.
    logger.setLevel(logging.WARNING)
    return logger


def build_experiment(
    resolved: ResolvedConfig,
    observers: list,
    *,
    stop=None,
    resume: ResumePlan | None = None,
    evaluation: tuple[tuple[str, ...], str | None, Any] | None = None,
    shard=None,
    corpus=None,
) -> Any:
    """A Sacred Experiment with rhn's defaults, the named configs used, and ``observers``."""
    with quiet_sacred_import():
        from sacred import Experiment
        from sacred.utils import apply_backspaces_and_linefeeds

    experiment = Experiment(
        EXPERIMENT_NAME,
        base_dir=str(Path(rhn_cli.__file__).parent),
        save_git_info=False,
    )
    experiment.logger = _logger()
    provenance.record_in(experiment)  # the code, libraries and machine facts of the run
    experiment.add_config(defaults())
    for named in resolved.named:
        if named.name.isidentifier():
            experiment.add_named_config(named.name, str(named.path))
    # Progress bars redraw with carriage returns; record only the final state of a line.
    experiment.captured_out_filter = apply_backspaces_and_linefeeds
    # Progress bars from rank 0 only: the others' would draw over them.
    progress = _terminal() if shard is None or shard.is_main else None
    experiment.main(recording_the_end(_main_function(progress, stop, resume, shard, corpus), stop))
    if evaluation is not None:
        experiment.command(_evaluate_function(*evaluation))
    experiment.observers.extend(observers)
    return experiment


def _named_config_arguments(resolved: ResolvedConfig) -> list[str]:
    return [n.name if n.name.isidentifier() else str(n.path) for n in resolved.named]


def make_observers(
    runs_dir: Path, mongo_url: str | None, warn: Callable[[str], None]
) -> tuple[list, str | None]:
    """The file store, plus MongoDB if it answers; returns (observers, redacted Mongo URL).

    MongoDB's observer comes first (highest priority), so its integer id is the run id.
    When MongoDB does not answer, the run is recorded in the file store only and marked
    for sync (:func:`finish_mongo_recording`)."""
    observers = [file_store_observer(runs_dir)]
    if not mongo_url:
        return observers, None
    problem = mongo_problem(mongo_url)
    if problem is not None:
        warn(
            f"MongoDB at {redact(mongo_url)}: {problem}; recording this run to the file "
            f"store {runs_dir} only, marked for 'rhn runs sync'"
        )
        return observers, None
    # The run takes an id free in MongoDB and the file store alike: one id, not two.
    mongo = mongo_observer(mongo_url, runs_dir / MONGO_FAILURE_SUBDIR, warn, runs_dir=runs_dir)
    observers.insert(0, mongo)
    return observers, redact(mongo_url)


def finish_mongo_recording(
    experiment, observers: list, run_dir: Path | None, mongo_url: str | None
) -> bool:
    """After a run: note in its run directory what MongoDB has of it (see
    :mod:`rhn_cli.tracking.sync`); True when MongoDB recorded all of it.

    A run MongoDB missed (down at start, lost mid-run, a failed write) is marked for
    sync. Waits for Sacred's last heartbeat first: when MongoDB is hanging it can outlive
    the run's end by a few seconds, and the file store is only complete after it."""
    if not mongo_url:
        return False
    run = getattr(experiment, "current_run", None)
    heartbeat = getattr(run, "_heartbeat", None)
    if heartbeat is not None and heartbeat.is_alive():
        heartbeat.join(timeout=3 * MONGO_TIMEOUT_S + 5)
    mongo = next((o for o in observers if hasattr(o, "lost")), None)
    complete = mongo is not None and mongo.complete
    if mongo is not None and run is not None and mongo in getattr(run, "_failed_observers", []):
        complete = False
    if run_dir is None or not (run_dir / "run.json").is_file():
        return complete
    from rhn_cli.tracking.sync import record_live_run

    if mongo is None:
        reason = "MongoDB did not answer at the start of the run"
    else:
        reason = mongo.lost or "MongoDB did not confirm the end of the run"
    try:
        record_live_run(run_dir, mongo_url, mongo.run_id if mongo else None, complete, reason)
    except Exception:  # noqa: BLE001 -- never fail a finished run over its sync note
        # Without a note, 'rhn runs sync' still finds the run in MongoDB by its start
        # time and host, and brings it up to date.
        return False
    return complete


@contextlib.contextmanager
def graceful_stop(
    stop, warn: Callable[[str], None], hard_second: bool = True, more: Sequence[int] = ()
) -> Iterator[None]:
    """SIGINT/SIGTERM (and the signals ``more``: a scheduler's time-limit warning) ask
    training to stop after the current step (checkpointed); a second SIGINT stops at
    once, unless ``hard_second`` is False (under torchrun, whose agent passes the user's
    Ctrl-C on as a second SIGINT, and kills workers that take longer than its shutdown
    grace period)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signal_number, frame):
        if stop.finishing:  # the run is being recorded: let it finish
            return
        if stop.requested:
            if signal_number == signal.SIGINT and hard_second:
                stop.finishing = True
                raise KeyboardInterrupt
            return
        stop.request(signal_number)
        again = " (Ctrl-C again to stop at once)" if hard_second else ""
        warn(
            f"{signal.Signals(signal_number).name}: stopping after the current step and "
            f"saving a checkpoint{again}"
        )

    handled = dict.fromkeys((signal.SIGINT, signal.SIGTERM, *more))
    previous = {s: signal.signal(s, handle) for s in handled}
    try:
        yield
    finally:
        for signal_number, handler in previous.items():
            signal.signal(signal_number, handler)


def _join_job(resolved: ResolvedConfig) -> tuple[Any, ResolvedConfig]:
    """(this process's Shard, the config with the job's seed) in a process torchrun
    started; (None, ``resolved``) otherwise.

    Joining waits for every rank, so no rank starts its run (and rank 0 marks a resumed
    run RUNNING) before every rank has read the checkpoint. Rank 0's seed, given or
    drawn, is the seed of every rank: one experiment, however many processes."""
    from rhn_cli.engine import distributed

    if not distributed.launched():
        return None, resolved
    try:
        shard = distributed.init_from_env(str(resolved.config.get("device", "auto")))
        shard.check_config(resolved.config)
        seed = resolved.config.get("seed")
        if seed is None and shard.is_main:
            with quiet_sacred_import():
                from sacred.randomness import get_seed
            seed = get_seed()
        seed = shard.broadcast_int(seed)
    except distributed.DistributedError as error:
        raise RunFailed(error, None) from error
    atexit.register(distributed.shutdown, shard)
    return shard, replace(resolved, updates={**resolved.updates, "seed": seed})


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """Standard output to nowhere when ``quiet`` (the ranks other than 0)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _observed_dir(observers: list) -> Path | None:
    """The run directory of the file store among ``observers`` (None: none, or not yet)."""
    return next((Path(o.dir) for o in observers if getattr(o, "dir", None)), None)


@contextlib.contextmanager
def _recorded_ends(observers: list) -> Iterator[None]:
    """A run that did not complete, as :class:`RunInterrupted` (stopped early: a signal,
    Ctrl-C, max_time) or :class:`RunFailed`, once Sacred has recorded how it ended."""
    from rhn_cli.engine.train import TrainingStopped

    try:
        yield
    except TrainingStopped as stopped:
        raise RunInterrupted(
            _observed_dir(observers),
            stopped.STATUS,
            stopped.signal,
            stopped.checkpoint_path,
            str(stopped),
        ) from None
    except KeyboardInterrupt:
        raise RunInterrupted(_observed_dir(observers), signal_number=signal.SIGINT) from None
    except Exception as error:
        raise RunFailed(error, _observed_dir(observers)) from error


def _training_observers(
    runs_dir: Path,
    mongo_url: str | None,
    *,
    quiet: bool,
    unobserved: bool,
    resume: ResumePlan | None,
    warn: Callable[[str], None],
) -> tuple[list, str | None, str | None]:
    """(observers, the redacted MongoDB URL when MongoDB records the run, the MongoDB URL
    to note the run's sync state against) of a training run; ``quiet``: a rank other
    than 0, which records nothing."""
    if quiet:
        return [], None, None
    if resume is not None:
        if mongo_url:
            warn(
                "a resumed run is recorded in the file store only; MongoDB keeps its earlier "
                "record until 'rhn runs sync' updates it"
            )
        # Nothing to note for MongoDB: the sync state shows the run changed.
        return [file_store_observer(resume.runs_dir, resume.continuation())], None, None
    if unobserved:
        return [], None, mongo_url
    observers, mongo = make_observers(runs_dir, mongo_url, warn)
    return observers, mongo, mongo_url


def _training_options(labels: RunLabels, resume: ResumePlan | None) -> dict[str, Any]:
    """Sacred's command-line options for the run."""
    options: dict[str, Any] = {"--capture": "sys"}
    if resume is not None:
        options["--id"] = resume.run_id
    if labels.name:
        options["--name"] = labels.name
    if labels.comment:
        options["--comment"] = labels.comment
    return options


def _training_tags(labels: RunLabels, resume: ResumePlan | None) -> list[str]:
    """The run's tags, each once: a resumed run keeps its own, and adds the new ones."""
    tags = list(labels.tags)
    if resume is not None:
        from rhn_cli.tracking.records import load_run_dir

        tags = [*load_run_dir(resume.run_dir).tags, *tags]
    return list(dict.fromkeys(tags))


def _training_info(labels: RunLabels, resume: ResumePlan | None) -> dict | None:
    """The info a run starts with: a resumed run's own, plus the job running it."""
    info = resume.recorded_info() if resume is not None else None
    return labels.job.recorded_info(info) if labels.job is not None else info


def _training_meta(labels: RunLabels, resume: ResumePlan | None) -> dict | None:
    """The run's meta: its tags, and the job running it (by which the job finds the run
    again when the scheduler restarts it)."""
    meta: dict[str, Any] = {}
    tags = _training_tags(labels, resume)
    if tags:
        meta["tags"] = tags
    if labels.job is not None:
        meta[JOB_META_KEY] = labels.job.key
    return meta or None


def _sacred_flags(sacred_options: dict[str, Any] | None, quiet: bool) -> dict[str, Any]:
    """Sacred's flags for the run; a rank other than 0 keeps its log at ERROR."""
    options = dict(sacred_options or {})
    if quiet:
        options.pop("--loglevel", None)
    return options


def _with_unchecked_keys(info: dict | None, unchecked_keys: Sequence[str]) -> dict | None:
    """The run's info, plus the config keys --force let through (so the record says so)."""
    if not unchecked_keys:
        return info
    return {**(info or {}), "unchecked_config_keys": list(unchecked_keys)}


def run_training(
    resolved: ResolvedConfig,
    *,
    runs_dir: str | Path,
    mongo_url: str | None = None,
    flags: RunFlags | None = None,
    labels: RunLabels | None = None,
    resume: ResumePlan | None = None,
    warn: Callable[[str], None] = _warn,
    corpus=None,
) -> RunOutcome:
    """Run ``main`` as a Sacred run. Exceptions from training propagate after Sacred
    has recorded the run as FAILED or INTERRUPTED.

    ``labels``: the run's name, comment and tags (:class:`RunLabels`); a resumed run
    keeps its own tags. ``corpus``: the one :mod:`rhn_cli.experiment.preflight` loaded
    (None: load it). ``flags``: Sacred's flags (:class:`RunFlags`); the config keys
    --force let through (``resolved.unchecked``) are recorded in the run's info."""
    from rhn_cli.engine.train import StopRequest

    labels, flags = labels or RunLabels(), flags or RunFlags()
    unobserved = flags.unobserved
    shard, resolved = _join_job(resolved)
    quiet = shard is not None and not shard.is_main  # rank 0 alone records and speaks
    observers, mongo, mongo_url = _training_observers(
        Path(runs_dir), mongo_url, quiet=quiet, unobserved=unobserved, resume=resume, warn=warn
    )
    if resume is not None:  # it computes on, every rank, with the kernels its run recorded
        pin_recorded_decisions(resume.run_dir)
    stop = StopRequest()
    experiment = build_experiment(
        resolved, observers, stop=stop, resume=resume, shard=shard, corpus=corpus
    )
    if unobserved or quiet:  # Sacred would warn that no observers were added; that is the point
        experiment.logger.setLevel(logging.ERROR)
    options = {**_training_options(labels, resume), **_sacred_flags(flags.sacred_options, quiet)}
    more_signals = labels.job.stop_signals if labels.job is not None else ()
    with _recorded_ends(observers):
        with graceful_stop(stop, warn, shard is None, more_signals), _silenced(quiet):
            try:
                run = start_run(
                    experiment,
                    config_updates=resolved.updates,
                    named_configs=_named_config_arguments(resolved),
                    info=with_published(
                        _with_unchecked_keys(_training_info(labels, resume), resolved.unchecked),
                        resolved.config,
                        [named.name for named in resolved.named],
                    ),
                    meta_info=_training_meta(labels, resume),
                    options=options,
                )
            finally:
                run_dir = _observed_dir(observers)
                in_mongo = finish_mongo_recording(experiment, observers, run_dir, mongo_url)
    outcome_mongo = mongo if in_mongo else None
    return RunOutcome(run._id, run.status, run.result, _observed_dir(observers), outcome_mongo)


def run_evaluation(
    resolved: ResolvedConfig,
    splits: tuple[str, ...],
    evaluated_run: str | None,
    *,
    runs_dir: str | Path,
    mongo_url: str | None = None,
    warn: Callable[[str], None] = _warn,
    corpus=None,
) -> RunOutcome:
    """Evaluate ``resolved.config['load_model']`` as a run of its own (command 'evaluate');
    ``corpus``: the one the pre-flight checks loaded (None: load it)."""
    runs_dir = Path(runs_dir)
    pin_recorded_decisions(Path(resolved.config["load_model"]).parent)
    observers, mongo = make_observers(runs_dir, mongo_url, warn)
    experiment = build_experiment(resolved, observers, evaluation=(splits, evaluated_run, corpus))
    comment = f"evaluation of run {evaluated_run}" if evaluated_run else None
    options: dict[str, Any] = {"--capture": "sys", "--comment": comment}
    with _recorded_ends(observers):
        try:
            run = start_run(
                experiment,
                "evaluate",
                config_updates=resolved.updates,
                named_configs=[],
                options=options,
            )
        finally:
            run_dir = _observed_dir(observers)
            in_mongo = finish_mongo_recording(experiment, observers, run_dir, mongo_url)
    outcome_mongo = mongo if in_mongo else None
    return RunOutcome(run._id, run.status, run.result, _observed_dir(observers), outcome_mongo)
