"""Where a sweep's points are: ``rhn sweep status NAME``.

Each point's state comes from its Slurm job, as ``squeue`` knows it (pending and why,
running, requeued N times, failed), and from its recorded run (run id, epoch, result).
``squeue`` forgets a job some minutes after it ends (MinJobAge) and is not there off
the cluster: the run records then say all that is known.
"""

from __future__ import annotations

import getpass
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Job states in which Slurm will still run the job (or is running it).
ACTIVE_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
)
_FIELDS = "ArrayJobID:|,ArrayTaskID:|,JobID:|,State:|,Reason:|,RestartCnt:|"


@dataclass(frozen=True)
class JobState:
    """A job as squeue shows it."""

    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT...
    reason: str  # why it is pending (Priority, Resources, BeginTime...), or None
    restarts: int  # times requeued

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def parse_squeue(text: str) -> dict[str, JobState]:
    """{job key: JobState} from ``squeue -O`` lines of :data:`_FIELDS`."""
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        array_id, task_id, job_id, state, reason, restarts = (p.strip() for p in parts[:6])
        key = f"{array_id}_{task_id}" if task_id not in ("", "N/A") else job_id
        count = int(restarts) if restarts.isdigit() else 0
        states[key] = JobState(state.split()[0] if state else "UNKNOWN", reason, count)
    return states


def job_states() -> dict[str, JobState] | None:
    """This user's jobs that Slurm still knows, one line per array task; None when
    squeue is not there or does not answer."""
    command = ["squeue", "--noheader", "--states=all", "--array", "--user", getpass.getuser()]
    try:
        result = subprocess.run(
            [*command, "--Format", _FIELDS], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return parse_squeue(result.stdout)


@dataclass(frozen=True)
class PointStatus:
    """One line of ``rhn sweep status``: the point, its state in a word, the details."""

    title: str
    state: str  # pending, running, completed, failed, interrupted, cancelled, not started
    details: str


def _epoch(record) -> str:
    done = (record.info or {}).get("epoch_nr")
    total = (record.config or {}).get("max_max_epoch")
    if done is None:
        return "epoch 1" + (f"/{total}" if total else "")
    return f"{done}/{total} epochs done" if total else f"{done} epochs done"


def _requeues(job: JobState | None, record) -> int:
    if job is not None:
        return job.restarts
    return int(((record.info or {}).get("slurm") or {}).get("requeues") or 0) if record else 0


def _job_text(job_id: str | None, job: JobState | None, requeues: int) -> str:
    if job_id is None:
        return ""
    text = f"job {job_id}"
    if job is not None and not job.active and job.state != "COMPLETED":
        text += f" {job.state}"
    if requeues:
        text += f", requeued {requeues} time{'s' * (requeues != 1)}"
    return text


def last_line(path: str | None) -> str | None:
    """The last non-empty line of a job's output file (None: no such file)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(handle.tell() - 4096, 0))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except (OSError, TypeError):
        return None
    found = [line.strip() for line in lines if line.strip()]
    return found[-1] if found else None


def point_status(
    point, record, job_id: str | None, job: JobState | None, output: str | None = None
) -> PointStatus:
    """What is known of ``point``: its run ``record`` (None: none yet) and its latest
    job (``job_id``, and ``job`` as squeue shows it; None: unknown to squeue, which
    forgets a job minutes after it ends; ``output``: the job's output file)."""
    from rhn_cli.tracking.report import format_metric

    requeues = _requeues(job, record)
    about_job = _job_text(job_id, job, requeues)
    run = f"run {record.key}" if record is not None else "no run recorded yet"
    if record is not None and record.status == "COMPLETED":
        result = record.result
        best = f", best valid ppl {format_metric('ppl', result)}" if result is not None else ""
        return PointStatus(point.title, "completed", _join(f"as {run}{best}", about_job))
    if job is not None and job.state in ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"):
        why = f" ({job.reason})" if job.reason and job.reason != "None" else ""
        where = f"{run} {record.status} at {_epoch(record)}" if record is not None else run
        return PointStatus(point.title, "pending", _join(f"{about_job}{why}", where))
    if (job is not None and job.active) or (record is not None and record.status == "RUNNING"):
        where = f"as {run}, {_epoch(record)}" if record is not None else run
        return PointStatus(point.title, "running", _join(where, about_job))
    if record is None:
        ended = last_line(output) if job is None and job_id else None
        if ended is not None:  # Slurm has forgotten the job, which recorded no run
            details = f"job {job_id} ended without recording a run; its output ends: {ended}"
            return PointStatus(point.title, "ended", f"{details} ({output})")
        if job is None:
            state = "submitted" if job_id else "not started"
            return PointStatus(point.title, state, about_job or "no job, no run")
        state = "cancelled" if job.state == "CANCELLED" else "failed"
        return PointStatus(point.title, state, _join(about_job, run))
    state = {"FAILED": "failed"}.get(record.status, "interrupted")
    return PointStatus(point.title, state, _join(f"as {run} ({record.status})", about_job))


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def sweep_status(sweep, records: Sequence, jobs: Sequence[dict], states) -> list[PointStatus]:
    """Every point of ``sweep``: its run among ``records`` (its completed one, else its
    latest), its latest job among the submitted ``jobs`` (from the sweep's record) and
    that job's state among ``states`` (squeue's; None: unknown)."""
    from rhn_cli.experiment.sweep import runs_of

    latest_job: dict[int, str] = {}
    outputs: dict[int, str | None] = {}
    for entry in jobs:
        latest_job[int(entry["point"])] = str(entry["job"])
        outputs[int(entry["point"])] = entry.get("output")
    rows = []
    for point in sweep.points:
        found = runs_of(point, records, sweep.name)
        completed = [r for r in found if r.status == "COMPLETED"]
        record: Any = (completed or found)[-1] if found else None
        job_id = latest_job.get(point.index)
        job = (states or {}).get(job_id) if job_id is not None else None
        rows.append(point_status(point, record, job_id, job, outputs.get(point.index)))
    return rows


def queued_points(manifest: dict | None, job_states) -> dict[int, str]:
    """{point index: job id} of the sweep's points whose job Slurm still has queued or
    running (submitting them again would train them twice)."""
    jobs = (manifest or {}).get("jobs") or []
    if not jobs:
        return {}
    states = job_states() or {}
    latest = {int(entry["point"]): str(entry["job"]) for entry in jobs}
    return {index: job for index, job in latest.items() if job in states and states[job].active}
