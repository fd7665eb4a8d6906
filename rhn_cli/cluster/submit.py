"""Submitting ``rhn train`` runs to Slurm with submitit: one job per run (a job array
for a sweep), requeueable, warned before its time limit. Returns at once with the job
ids; the jobs run :class:`rhn_cli.cluster.job.TrainJob` on the compute nodes.

The jobs inherit the submitting environment (sbatch's default): the MongoDB URL reaches
them in RHN_MONGO_URL, never on a command line or in a file; the data directory in
RHN_DATA_DIR, made absolute. Their output files go into the runs directory,
``RUNS_DIR/_slurm/JOB_ID/`` (one file per task), recorded in the run's info.slurm.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rhn_cli.cluster.job import TrainJob, TrainRequest
from rhn_cli.cluster.options import SlurmOptions

JOBS_DIR = "_slurm"  # RUNS_DIR/_slurm/JOB_ID: the jobs' output files (``_``: not a run)
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # paths compute nodes do not share


class SubmissionError(RuntimeError):
    """Slurm refused the job (sbatch's message), or is not there."""


@dataclass(frozen=True)
class Submitted:
    """One submitted job: its id (``12345`` or ``12345_3``), what it runs, its output."""

    job_id: str
    label: str
    output: str


def node_local(path: Path) -> bool:
    """Whether ``path`` is on storage a compute node has its own copy of (/tmp...)."""
    resolved = path.resolve()
    roots = [*NODE_LOCAL, os.environ.get("TMPDIR") or "/tmp", tempfile.gettempdir()]
    return any(resolved == Path(r) or Path(r) in resolved.parents for r in roots)


def check_storage(runs_dir: Path, data_dir: Path, needs_data: bool, warn: Callable) -> None:
    """The runs (and, for a dataset on disk, data) directories must exist: the jobs read
    and write them from the compute nodes. Warns when one is node-local."""
    if not runs_dir.is_dir():
        raise SubmissionError(
            f"--runs-dir {runs_dir}: no such directory; create it on storage the compute "
            "nodes share (the jobs record their runs there)"
        )
    checked = [("runs directory", runs_dir)]
    if needs_data:
        if not data_dir.is_dir():
            raise SubmissionError(
                f"data directory {data_dir} (RHN_DATA_DIR) does not exist; fetch the data "
                "first ('rhn data fetch NAME') on storage the compute nodes share"
            )
        checked.append(("data directory", data_dir))
    for what, path in checked:
        if node_local(path):
            warn(
                f"the {what} {path} is node-local storage: compute nodes other than this "
                "one will not see it (use a shared file system)"
            )


def executor_parameters(options: SlurmOptions, job_name: str) -> dict:
    """submitit's SlurmExecutor parameters for ``options``."""
    parameters = {
        "job_name": job_name,
        "partition": options.partition,
        "time": options.time_minutes,
        "nodes": options.nodes,
        "ntasks_per_node": options.tasks_per_node,
        "cpus_per_task": options.cpus_per_task,
        "mem": options.mem,
        "gpus_per_node": options.gpus_per_node,
        "account": options.account,
        "qos": options.qos,
        "signal_delay_s": options.warning_seconds,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True, **options.slurm_args},
    }
    return {key: value for key, value in parameters.items() if value is not None}


@contextlib.contextmanager
def job_environment(mongo: str | None, data_dir: Path) -> Iterator[None]:
    """The environment sbatch passes on to the jobs, set while submitting: the MongoDB
    choice (a URL, or 'none') and the data directory, absolute."""
    from rhn_cli.tracking.settings import MONGO_URL_ENV

    values = {MONGO_URL_ENV: mongo or "none", "RHN_DATA_DIR": str(data_dir.resolve())}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def submit(
    requests: Sequence[tuple[str, TrainRequest]],
    options: SlurmOptions,
    job_name: str,
    mongo: str | None,
) -> list[Submitted]:
    """Submit one job per (label, request): a job array when there are several.
    ``mongo``: the MongoDB URL the runs record to (None: none)."""
    import shutil

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SubmissionError(
            "Slurm did not accept the job: sbatch is not installed here (submit from a "
            "Slurm login node)"
        )
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from rhn_cli.data.cache import data_dir

    runs_dir = Path(requests[0][1].runs_dir)
    folder = runs_dir / JOBS_DIR / "%j"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=10**6, python=sys.executable)
    executor.update_parameters(**executor_parameters(options, job_name))
    complaints = io.StringIO()  # submitit prints sbatch's errors: said once, below
    before = _entries(runs_dir / JOBS_DIR)
    try:
        with job_environment(mongo, data_dir()), contextlib.redirect_stderr(complaints):
            if len(requests) == 1:
                jobs = [executor.submit(TrainJob(requests[0][1]))]
            else:
                with executor.batch():
                    jobs = [executor.submit(TrainJob(request)) for _, request in requests]
    except (OSError, FailedJobError, FailedSubmissionError) as error:
        _remove_new(runs_dir / JOBS_DIR, before)  # a refused job leaves nothing behind
        raise SubmissionError(_sbatch_message(error)) from None
    return [
        Submitted(job.job_id, label, str(job.paths.stdout).replace("%t", "0"))
        for job, (label, _) in zip(jobs, requests, strict=True)
    ]


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _remove_new(folder: Path, before: set[str]) -> None:
    """Remove what submitit wrote into ``folder`` (and the folder, if it was new) for a
    submission Slurm refused."""
    import shutil

    for name in _entries(folder) - before:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if not before and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _sbatch_message(error: Exception) -> str:
    """sbatch's own complaint, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(error).__name__
    return f"Slurm did not accept the job: {detail}"
