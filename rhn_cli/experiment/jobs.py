"""The scheduler job a run is part of (a Slurm job on a cluster), as the run records it.

A run started by a job records the job in its meta (``meta.slurm_job``: the job as
``squeue`` names it, ``12345`` or ``12345_3`` for task 3 of an array), where the job
finds the run again when the scheduler restarts it, and in its info (``info.slurm``:
job id, array index, restart count, nodes, output files), where ``rhn runs`` and
Omniboard show it. The job's warning signal (sent before its time limit) stops the run
as SIGTERM does: after the current step, with a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JOB_META_KEY = "slurm_job"  # meta.slurm_job: the job key
JOB_INFO_KEY = "slurm"  # info.slurm: what the job was


@dataclass(frozen=True)
class SchedulerJob:
    """The job running a run: ``key`` (how ``squeue``/``scontrol`` name it), ``info``
    (recorded in the run's info) and ``stop_signals`` (stop the run like SIGTERM)."""

    key: str
    info: dict[str, Any] = field(default_factory=dict)
    stop_signals: tuple[int, ...] = ()

    def recorded_info(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        """The run's info with this job in it; the jobs that ran it before are kept in
        ``info.slurm.earlier_jobs`` (a run resumed by a new submission)."""
        info = dict(previous or {})
        before = info.get(JOB_INFO_KEY) or {}
        earlier = list(before.get("earlier_jobs") or [])
        if before.get("job") and before["job"] != self.key:
            earlier.append(before["job"])
        info[JOB_INFO_KEY] = {**self.info, "job": self.key, "earlier_jobs": earlier}
        return info
