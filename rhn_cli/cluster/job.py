"""The job on the compute nodes: one ``rhn train`` run, continued across requeues.

submitit runs :class:`TrainJob` in every task of the job (one per rank). The job finds
its run by its Slurm job id (``meta.slurm_job``): the first start creates the run; a
start after a requeue (``scontrol requeue``, a pre-emption, the job's own requeue at the
time-limit warning) continues that same run from its last checkpoint, or from the
beginning when it was killed before its first one. Slurm runs one instance of a job at
a time, so the previous one is known to be gone.

Signals: SIGTERM (``scancel``, ``scontrol requeue``, pre-emption, the time limit) and
the warning signal (USR2, ``warning_seconds`` before the time limit) stop the run after
the current step with a checkpoint, recorded INTERRUPTED. Rank 0 then requeues the job
itself after the warning, a pre-emption or the time limit (``scontrol show job`` says
which), so that neither ends a run that is not finished; ``scontrol requeue`` has
requeued it already, and ``scancel`` ends it.

Several tasks train data-parallel with torch.distributed, set up from the ``SLURM_*``
variables (submitit's TorchDistributedEnvironment).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rhn_cli.experiment.jobs import JOB_META_KEY, SchedulerJob

CHECKPOINT_FILE = "checkpoint.pt"  # rhn_cli.engine.checkpoint.LAST (which imports torch)
WARNING_SIGNAL = signal.SIGUSR2  # rhn_cli.cluster.options.WARNING_SIGNAL


@dataclass(frozen=True)
class TrainRequest:
    """What ``rhn train`` was asked, for the job to do on the cluster."""

    updates: tuple[str, ...]  # the 'with' tokens, file paths made absolute
    runs_dir: str  # absolute
    name: str | None = None
    comment: str | None = None
    tags: tuple[str, ...] = ()
    seed: int | None = None
    deterministic: bool = False
    resume_target: str | None = None  # a stopped run to continue (rhn train --resume)


class TrainJob:
    """The function submitit runs in each task of the job (pickled at submission)."""

    def __init__(self, request: TrainRequest) -> None:
        self.request = request

    def __call__(self) -> dict[str, Any]:
        return run_job(self.request, job_facts())

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this when the warning signal comes before training started (or
        after it ended): the job is requeued as it is, and finds its run again."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainJob(self.request))


@dataclass(frozen=True)
class JobFacts:
    """Where this task is: its job, rank and the job's shape."""

    key: str  # 12345, or 12345_3 for task 3 of an array job
    rank: int
    tasks: int
    restarts: int  # SLURM_RESTART_COUNT: requeues so far
    info: dict  # recorded in the run's info.slurm

    @property
    def scheduler_job(self) -> SchedulerJob:
        return SchedulerJob(self.key, self.info, stop_signals=(WARNING_SIGNAL,))


def job_facts() -> JobFacts:
    """This task's facts, from submitit's view of the Slurm environment; on several
    tasks, torch.distributed's variables (RANK, WORLD_SIZE, MASTER_ADDR...) are set."""
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    info = {
        "job_id": env.raw_job_id,
        "array_job_id": env.array_job_id,
        "array_task_id": env.array_task_id,
        "requeues": restarts,
        "nodes": list(env.hostnames),
        "tasks": env.num_tasks,
        "partition": os.environ.get("SLURM_JOB_PARTITION"),
        "output": str(env.paths.stdout),
    }
    return JobFacts(env.job_id, env.global_rank, env.num_tasks, restarts, info)


def find_job_run(runs_dir: Path, key: str) -> Path | None:
    """The run directory of the run job ``key`` started (its meta.slurm_job), if any."""
    found = []
    for run_json in runs_dir.glob("*/run.json"):
        try:
            meta = json.loads(run_json.read_text()).get("meta") or {}
        except (OSError, ValueError):
            continue
        if meta.get(JOB_META_KEY) == key:
            found.append(run_json.parent)
    return max(found, key=lambda p: (len(p.name), p.name)) if found else None


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def plan_for(request: TrainRequest, facts: JobFacts, say) -> tuple[Any, str | None]:
    """(the ResumePlan to continue, or None for a new run; the COMPLETED run's id when
    there is nothing left to do)."""
    from rhn_cli.experiment.resume import plan_restart, plan_resume

    runs_dir = Path(request.runs_dir)
    run_dir = find_job_run(runs_dir, facts.key)
    if run_dir is None:
        if request.resume_target is None:
            return None, None
        say(f"job {facts.key}: continuing run {request.resume_target}")
        return plan_resume(request.resume_target, runs_dir), None
    if _status(run_dir) == "COMPLETED":
        return None, run_dir.name
    if (run_dir / CHECKPOINT_FILE).is_file():
        say(f"job {facts.key} (restart {facts.restarts}): continuing its run {run_dir.name}")
        return plan_resume(str(run_dir), runs_dir, assume_stopped=True), None
    say(
        f"job {facts.key} (restart {facts.restarts}): its run {run_dir.name} stopped before "
        "its first checkpoint; running it again from the beginning"
    )
    return plan_restart(run_dir), None


def run_job(request: TrainRequest, facts: JobFacts) -> dict[str, Any]:
    """Train (or continue) the job's run; requeue the job at the time-limit warning.
    Raises when the run cannot start or fails, so that Slurm marks the job FAILED."""
    from rhn_cli.experiment.preflight import preflight_training
    from rhn_cli.experiment.resolve import ResolvedConfig, parse_with, resolve
    from rhn_cli.experiment.resume import with_run_control_updates
    from rhn_cli.experiment.sacred_app import RunInterrupted, RunLabels, run_training
    from rhn_cli.tracking.settings import resolve_mongo_url

    main = facts.rank == 0
    say = print if main else (lambda message: None)
    plan, completed = plan_for(request, facts, say)
    if completed is not None:
        say(f"job {facts.key}: its run {completed} is already COMPLETED; nothing to do")
        return {"run_id": completed, "status": "COMPLETED"}
    if plan is not None:
        config = plan.config
        if request.resume_target is not None:  # e.g. more epochs: 'max_max_epoch=40'
            config = with_run_control_updates(plan, parse_with(request.updates)[0])
        resolved = ResolvedConfig(config, updates=config)
    else:
        extra: dict[str, Any] = {"seed": request.seed} if request.seed is not None else {}
        if request.deterministic:
            extra["deterministic"] = True
        resolved = resolve(request.updates, extra)
    corpus = preflight_training(resolved.config, resuming=plan is not None, echo=say)
    labels = RunLabels(request.name, request.comment, request.tags, facts.scheduler_job)
    mongo_url = resolve_mongo_url(None).url
    try:
        outcome = run_training(
            resolved,
            runs_dir=request.runs_dir,
            mongo_url=mongo_url,
            labels=labels,
            resume=plan,
            warn=say,
            corpus=corpus,
        )
    except RunInterrupted as stop:
        if plan is not None and main:
            _update_mongo(request.runs_dir, plan.run_id, mongo_url, say)
        return _after_stop(stop, facts, say)
    if plan is not None and main:
        _update_mongo(request.runs_dir, plan.run_id, mongo_url, say)
    say(f"run {outcome.run_id} {outcome.status}; result (best valid ppl) {outcome.result:g}")
    return {"run_id": str(outcome.run_id), "status": outcome.status, "result": outcome.result}


def _update_mongo(runs_dir: str, run_id: str, mongo_url: str | None, say) -> None:
    """A continued run is recorded in the file store; bring MongoDB's copy (Omniboard's)
    up to date as 'rhn runs sync' would, so that it follows the run across requeues."""
    if not mongo_url:
        return
    from rhn_cli.tracking.sync import SyncError, sync_runs

    try:
        sync_runs(runs_dir, mongo_url, echo=say, only=[run_id])
    except SyncError as error:
        say(f"MongoDB not updated ({error}); 'rhn runs sync' will do it")


def _after_stop(stop, facts: JobFacts, say) -> dict[str, Any]:
    """The run stopped early with a checkpoint. Rank 0 requeues the job (which then
    continues the run) at the time-limit warning, and at the SIGTERM of a pre-emption
    (a job that ends within its grace time would otherwise count as COMPLETED) or of
    the time limit itself. At any other SIGTERM Slurm decides: ``scontrol requeue`` has
    requeued the job already, ``scancel`` ends it."""
    run_id = stop.run_dir.name if stop.run_dir is not None else None
    say(f"run {run_id} {stop.status}: {stop.where}")
    if stop.status != "INTERRUPTED" or facts.rank != 0 or stop.signal_number == signal.SIGINT:
        return {"run_id": run_id, "status": stop.status}
    why = "time limit near" if stop.signal_number != signal.SIGTERM else why_ended(facts.key)
    if why is None:
        return {"run_id": run_id, "status": stop.status}
    say(f"{why}: requeueing job {facts.key}; it continues run {run_id}")
    requeue(facts.key)
    return {"run_id": run_id, "status": "REQUEUED"}


def job_fields(key: str) -> dict[str, str]:
    """``scontrol show job KEY`` as {field: value}; {} when it does not answer."""
    try:
        result = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", key],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = (item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return dict(pairs) if result.returncode == 0 else {}


def why_ended(key: str) -> str | None:
    """Why Slurm is ending job ``key`` (it sent SIGTERM), when that calls for a requeue:
    'pre-empted' (its PreemptTime is set) or 'time limit reached' (the warning came too
    late, or not at all); None for ``scancel`` and ``scontrol requeue``."""
    fields = job_fields(key)
    if fields.get("PreemptTime", "None") not in ("None", "Unknown", ""):
        return "pre-empted"
    if fields.get("Reason") == "TimeLimit":
        return "time limit reached"
    return None


def requeue(key: str) -> None:
    """``scontrol requeue KEY``: the job goes back to the queue and starts again."""
    subprocess.run(["scontrol", "requeue", key], check=True, timeout=60)
