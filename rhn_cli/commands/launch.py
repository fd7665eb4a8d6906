"""``--launcher slurm`` for ``rhn train`` and ``rhn sweep``: the options, and printing
what was submitted. Submission itself is :mod:`rhn_cli.cluster.submit`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from rhn_cli.commands.messages import fail as _fail
from rhn_cli.commands.messages import stderr as _stderr

LAUNCHERS = ("local", "slurm")
_SLURM_OPTION_NAMES = (
    "partition",
    "time",
    "cpus_per_task",
    "mem",
    "gpus_per_node",
    "nodes",
    "tasks_per_node",
    "account",
    "qos",
)


def launcher_options(command: Callable) -> Callable:
    """--launcher and the Slurm options (defaults: the settings file's ``slurm:``)."""
    decorators = [
        click.option(
            "--launcher",
            type=click.Choice(LAUNCHERS),
            default="local",
            show_default=True,
            help="Where to run: here, or submitted to Slurm (one job per run; returns at "
            "once with the job ids). Slurm defaults come from 'slurm:' in "
            "~/.config/rhn/config.yaml; see docs/cluster.md.",
        ),
        click.option("--partition", help="[slurm] Partition to submit to."),
        click.option(
            "--time",
            metavar="LIMIT",
            help="[slurm] Time limit of each job (minutes, HH:MM:SS or D-HH:MM:SS; default "
            "1 day). A longer run is checkpointed and requeued before it, and goes on.",
        ),
        click.option("--cpus-per-task", type=int, metavar="N", help="[slurm] CPUs per task."),
        click.option("--mem", metavar="SIZE", help="[slurm] Memory per node (16G, 4000M)."),
        click.option("--gpus-per-node", type=int, metavar="G", help="[slurm] GPUs per node."),
        click.option(
            "--nodes",
            type=int,
            metavar="N",
            help="[slurm] Nodes per job; with --tasks-per-node (or GPUs), one data-parallel "
            "rank per task.",
        ),
        click.option(
            "--tasks-per-node",
            type=int,
            metavar="T",
            help="[slurm] Tasks (ranks) per node; default: --gpus-per-node, else 1.",
        ),
        click.option("--account", help="[slurm] Account to charge."),
        click.option("--qos", help="[slurm] Quality of service."),
        click.option(
            "--slurm-arg",
            "slurm_args",
            multiple=True,
            metavar="KEY=VALUE",
            help="[slurm] Any other sbatch option, e.g. constraint=a100 (repeatable).",
        ),
    ]
    return functools.reduce(lambda wrapped, option: option(wrapped), reversed(decorators), command)


def slurm_given(ctx: click.Context) -> list[str]:
    """The Slurm options given on the command line (to refuse them without --launcher
    slurm)."""
    from click.core import ParameterSource

    names = [*_SLURM_OPTION_NAMES, "slurm_args"]
    return [
        "--" + name.replace("_", "-").replace("slurm-args", "slurm-arg")
        for name in names
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    ]


def slurm_options(params: dict):
    """The SlurmOptions of the command line over the settings file; a bad one exits 2."""
    from rhn_cli.cluster.options import SlurmOptionError, build_options, parse_slurm_args
    from rhn_cli.tracking.settings import SettingsError, config_file, load_settings

    given = {name: params.get(name) for name in _SLURM_OPTION_NAMES}
    try:
        given["slurm_args"] = parse_slurm_args(params.get("slurm_args") or ())
        settings = load_settings()
        options = build_options(given, settings, str(config_file()))
    except (SlurmOptionError, SettingsError) as error:
        _fail(str(error))
    if options.gpus_per_node and params.get("tasks_per_node") is None:
        from dataclasses import replace

        options = replace(options, tasks_per_node=options.gpus_per_node)
    return options


def check_local_options(ctx: click.Context, launcher: str) -> None:
    """Slurm options without --launcher slurm, or local-only ones with it, are a mistake
    worth one line."""
    given = slurm_given(ctx)
    if launcher != "slurm" and given:
        _fail(f"{', '.join(given)} only apply with --launcher slurm")
    local_only = [
        flag
        for flag, name in (("--nproc", "nproc"), ("--unobserved", "unobserved"))
        if launcher == "slurm" and ctx.params.get(name)
    ]
    if local_only:
        _fail(
            f"--launcher slurm: drop {' and '.join(local_only)} (ranks on a cluster: --nodes "
            "and --tasks-per-node; a cluster job is always recorded)"
        )


def absolute_updates(updates: Sequence[str]) -> tuple[str, ...]:
    """The ``with`` tokens, YAML files named by a relative path made absolute: the job
    reads them from the compute node, in whatever directory it starts."""
    tokens = []
    for token in updates:
        if "=" not in token and Path(token).suffix in (".yaml", ".yml") and Path(token).is_file():
            token = str(Path(token).resolve())
        tokens.append(token)
    return tuple(tokens)


def prepare_submission(runs_dir: str, config: dict) -> Path:
    """The runs directory, absolute and created, after the shared-storage checks."""
    from rhn_cli.cluster.submit import SubmissionError, check_storage
    from rhn_cli.data.cache import data_dir

    root = Path(runs_dir).resolve()
    if not root.exists() and root.parent.is_dir():
        root.mkdir()
    try:
        check_storage(root, data_dir(), config.get("dataset") != "synthetic", _warn)
    except SubmissionError as error:
        _fail(str(error))
    return root


def _warn(message: str) -> None:
    _stderr(f"Warning: {message}", "yellow")


def submit_jobs(requests, options, job_name: str, mongo_url: str | None):
    """Submit, or exit 1 with Slurm's reason."""
    from rhn_cli.cluster.submit import SubmissionError, submit

    try:
        return submit(requests, options, job_name, mongo_url)
    except SubmissionError as error:
        _fail(str(error), code=1)


def echo_submitted(submitted, options, runs_dir: Path) -> None:
    """What was submitted and how to follow it."""
    for job in submitted:
        click.echo(f"submitted job {job.job_id}: {job.label}")
        click.echo(f"  output: {job.output}")
    ids = ",".join(sorted({job.job_id.split("_")[0] for job in submitted}))
    click.echo(f"({options.describe()}; requeued before the time limit until each run ends)")
    click.echo(f"Follow with: squeue -j {ids}   and   rhn runs ls --runs-dir {runs_dir}")


def submit_sweep(planned, plans, runs_dir: str, mongo_url: str | None, slurm: dict) -> None:
    """``rhn sweep --launcher slurm``: one job per point still to run (a job array),
    except points whose job Slurm still has queued or running."""
    from datetime import datetime

    from rhn_cli.cluster.job import TrainRequest
    from rhn_cli.cluster.status import job_states, queued_points
    from rhn_cli.engine.distributed import DistributedError, Shard
    from rhn_cli.experiment.sweep import load_manifest, save_manifest

    options = slurm_options(slurm)
    try:
        for point in planned.points:
            Shard(world_size=options.tasks).check_config(point.config)
    except DistributedError as error:
        _fail(f"{options.tasks} tasks: {error}")
    on_disk = next((p.config for p in planned.points if p.config["dataset"] != "synthetic"), None)
    root = prepare_submission(runs_dir, on_disk or planned.points[0].config)
    queued = queued_points(load_manifest(root, planned.name), job_states)
    requests = []
    for plan in plans:
        title = plan.point.title
        if plan.action in ("skip", "wait"):
            state = "already completed" if plan.action == "skip" else "still RUNNING"
            click.echo(f"{title}: {state} as run {plan.run_id}")
        elif plan.point.index in queued:
            click.echo(f"{title}: already queued as job {queued[plan.point.index]}")
        else:
            resume = plan.run_id if plan.action == "resume" else None
            request = TrainRequest(
                updates=absolute_updates(plan.point.tokens),
                runs_dir=str(root),
                tags=(planned.name,),
                resume_target=resume,
            )
            label = f"{title}" + (f" (continues run {resume})" if resume else "")
            requests.append((plan.point, label, request))
    if not requests:
        click.echo(f"sweep {planned.name}: nothing to submit")
        return
    submitted = submit_jobs(
        [(label, r) for _, label, r in requests], options, planned.name, mongo_url
    )
    now = datetime.now().isoformat(timespec="seconds")
    entries = [
        {
            "point": point.index,
            "label": point.label,
            "job": job.job_id,
            "submitted": now,
            "output": job.output,
        }
        for (point, _, _), job in zip(requests, submitted, strict=True)
    ]
    save_manifest(root, planned, entries)
    echo_submitted(submitted, options, root)
    click.echo(f"Where each point is: rhn sweep status {planned.name} --runs-dir {root}")
