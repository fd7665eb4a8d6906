"""``rhn sweep``: expand one ``with`` line holding lists of values into tagged runs.

Parsing and printing only: expansion, planning (skip, resume or run each point) and
running the points are :mod:`rhn_cli.experiment.sweep`; the closing table is
``rhn runs compare``'s (:func:`rhn_cli.tracking.report.compare_lines`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

from rhn_cli.commands.completion import complete_sweep_names, complete_sweep_updates
from rhn_cli.commands.launch import launcher_options
from rhn_cli.commands.messages import fail as _fail
from rhn_cli.commands.messages import stderr as _stderr
from rhn_cli.commands.options import mongo_option, runs_dir_option

SWEEP_EPILOG = """
\b
Examples:
  rhn sweep with tiny 'hidden_size=[8,16,32]'
  rhn sweep with ptb_sota 'depth=[1,2,3]' 'hidden_size=[1275,1180,1110]' --zip
  rhn sweep with tiny 'depth=[1,2]' 'learning_rate=[0.2,0.5]' --jobs 2 --name lr-depth
  rhn sweep with tiny 'seed=[1,2,3]' --dry-run > jobs.txt   # one command per line
  rhn sweep --launcher slurm --partition gpu with ptb_sota 'depth=[1,2,3]'
  rhn sweep status ptb_sota-depth-2025-06-12     # where each point is

\b
A key is swept when its value is a list (quote it for the shell); other updates
and the named configs apply to every point. Every point is validated before
anything runs. Run the same command again (same --name) to finish a sweep that
crashed or was interrupted: COMPLETED points are skipped, interrupted ones with a
checkpoint are resumed, the others run again. On Linux the points end with the
sweep even when it is killed (kill -9): they checkpoint and record INTERRUPTED.
The points get a MongoDB URL in RHN_MONGO_URL, never on a command line (ps would
show its password). 'rhn runs ls --tag NAME' and 'rhn runs compare --tag NAME'
find the sweep's runs later.
"""


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def _describe_result(outcome) -> str:
    from rhn_cli.tracking.report import format_duration, format_metric

    record = outcome.record
    text = outcome.status
    if record is not None:
        text += f" as run {record.key}"
        if isinstance(record.result, (int, float)) and not isinstance(record.result, bool):
            text += f", best valid ppl {format_metric('ppl', record.result)}"
    elif outcome.returncode is not None:
        text += f" (exit code {outcome.returncode}, no run recorded)"
    return f"{text} ({format_duration(outcome.seconds)})"


def _last_line(path: Path | None) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, AttributeError):
        return ""
    return lines[-1].strip() if lines else ""


class _SweepGroup(click.Group):
    """``rhn sweep status NAME``; anything else is ``rhn sweep run ...`` (so that
    ``rhn sweep with ...`` and ``rhn sweep --help`` read as they always have)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_SweepGroup)
def sweep() -> None:
    """Run a grid of configs ('rhn sweep with ...'), or show where one is
    ('rhn sweep status NAME')."""


@sweep.command("run", epilog=SWEEP_EPILOG)
@click.argument(
    "updates",
    nargs=-1,
    metavar="[with] [NAMED_CONFIG] KEY=[V1,V2,...]... [KEY=VALUE]...",
    shell_complete=complete_sweep_updates,
)
@click.option(
    "--product",
    "mode",
    flag_value="product",
    default=True,
    help="Every combination of the swept values (the default): 'depth=[1,2]' "
    "'hidden_size=[8,16]' is 4 points.",
)
@click.option(
    "--zip",
    "mode",
    flag_value="zip",
    help="Pair the swept values in order (first with first...): 'depth=[1,2]' "
    "'hidden_size=[8,16]' is 2 points. The lists must be of equal length.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Points run at a time, each a separate process. With more than one, each gets "
    "OMP_NUM_THREADS = CPU cores / JOBS (unless set) and its output goes to a log file "
    "in RUNS_DIR/_sweeps/NAME/; with one, the output is shown as it comes (and logged).",
)
@click.option(
    "-n",
    "--name",
    help="Name of the sweep: every run is tagged with it, and a re-run with the same name "
    "skips the points already completed. Default: the named configs, the swept keys and "
    "today's date (ptb_sota-depth-hidden_size-2025-06-12). (Sacred's -n names a run; here "
    "it names the sweep, which labels each of its runs as a tag: 'rhn runs ls --tag NAME'.)",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the 'rhn train' command of each point still to run, one per line (for a "
    "cluster scheduler), and run nothing. Points already done are noted on stderr. A "
    "MongoDB URL is left out of the commands: they read it from RHN_MONGO_URL.",
)
@runs_dir_option
@mongo_option
@launcher_options
@click.pass_context
def run_sweep(
    ctx, updates, mode, jobs, name, dry_run, runs_dir, mongo_url, launcher, **slurm
) -> None:
    """Run a grid of configs: one tagged 'rhn train' run per point, then compare them.

    Each point runs as its own 'rhn train --tag NAME ... with ...' process, one after
    another or --jobs at a time. A failed point does not stop the others; the sweep
    exits 1 if any point did not complete, naming them. Ctrl-C stops the sweep: the
    running points checkpoint and record INTERRUPTED, and the command to continue is
    printed. At the end the 'rhn runs compare' table of the sweep's runs is printed.

    With --launcher slurm each point still to run is submitted as a Slurm job (one job
    array) and the command returns at once; 'rhn sweep status NAME' follows them.
    'rhn sweep run' is the same command as 'rhn sweep'.

    Sacred's -F (--runs-dir) and -m (--mongo) work as in 'rhn train', and -n is --name;
    'rhn train' flags for one run's own process (-c, -u, -p, -l, -d, -D, -f) are not
    taken: run that point with 'rhn train' (--dry-run prints its command).
    """
    from rhn_cli.commands.launch import check_local_options
    from rhn_cli.experiment.schema import ConfigError
    from rhn_cli.experiment.sweep import SweepError, expand, plan_points, program

    check_local_options(ctx, launcher)
    if launcher == "slurm" and (jobs > 1 or dry_run):
        _fail("--launcher slurm submits every point at once: drop --jobs and --dry-run")
    try:
        planned = expand(updates, mode, name)
    except (SweepError, ConfigError) as error:
        _fail(str(error))
    if name is None:
        _stderr(f"sweep name: {planned.name} (--name {planned.name} continues it another day)")
    records = _load_records(runs_dir)
    plans = plan_points(planned, records)
    if launcher == "slurm":
        from rhn_cli.commands.launch import submit_sweep

        submit_sweep(planned, plans, runs_dir, mongo_url, slurm)
        return

    child_runs_dir = runs_dir if _given(ctx, "runs_dir") else None
    child_mongo = (mongo_url or "none") if _given(ctx, "mongo_url") else None

    if dry_run:
        from rhn_cli.experiment.sweep import mongo_note, shell_line, train_arguments

        note = mongo_note(child_mongo)
        if note and any(plan.action in ("run", "resume") for plan in plans):
            _stderr(f"# each command {note}")
        for plan in plans:
            if plan.action in ("skip", "wait"):
                state = "already completed" if plan.action == "skip" else "still running"
                _stderr(f"# {plan.point.title}: {state} as run {plan.run_id}")
                continue
            arguments = train_arguments(plan, planned.name, child_runs_dir, child_mongo)
            click.echo(shell_line([*program(), *arguments]))
        return

    from rhn_cli.experiment.sweep import save_manifest

    save_manifest(runs_dir, planned)  # for 'rhn sweep status NAME'
    _run_sweep(planned, plans, jobs, runs_dir, child_runs_dir, child_mongo)


def _load_records(runs_dir: str):
    from rhn_cli.tracking.records import FileStore, RunStoreError

    try:
        return FileStore(runs_dir).load()
    except RunStoreError as error:
        _fail(str(error), code=1)


def _continue_command(planned, jobs, child_runs_dir, child_mongo) -> str:
    from rhn_cli.experiment.sweep import mongo_arguments, mongo_note, program, shell_line

    arguments = ["sweep", "--name", planned.name]
    if planned.mode == "zip":
        arguments.append("--zip")
    if jobs > 1:
        arguments += ["--jobs", str(jobs)]
    if child_runs_dir is not None:
        arguments += ["--runs-dir", child_runs_dir]
    arguments += mongo_arguments(child_mongo)
    line = shell_line([*program(), *arguments, "with", *planned.tokens])
    note = mongo_note(child_mongo)
    return f"{line}\n  (it {note})" if note else line


def _run_sweep(planned, plans, jobs, runs_dir, child_runs_dir, child_mongo) -> None:
    from rhn_cli.experiment.sweep import (
        SWEEP_LOG_DIR,
        PointHooks,
        Runner,
        child_environment,
        runs_of,
        train_arguments,
    )

    total = len(plans)
    to_run = [p for p in plans if p.action in ("run", "resume")]
    how = ""
    if len(planned.keys) > 1:
        how = " (every combination)" if planned.mode == "product" else " (paired in order)"
    click.echo(
        f"sweep {planned.name}: {total} point{'s' * (total != 1)} of {', '.join(planned.keys)}"
        f"{how}, {len(to_run)} to run, {jobs} at a time; runs in {runs_dir}"
    )
    for plan in plans:
        if plan.action == "skip":
            click.echo(f"{plan.point.title}: already completed as run {plan.run_id}")
        elif plan.action == "wait":
            click.echo(
                f"{plan.point.title}: still RUNNING as run {plan.run_id} (another sweep?); "
                "not started again"
            )

    def command(plan) -> list[str]:
        # The children must write where this sweep looks for its runs.
        arguments = train_arguments(plan, planned.name, runs_dir, child_mongo)
        return [sys.executable, "-m", "rhn_cli", *arguments]

    def known_ids() -> set:
        root = Path(runs_dir)
        return {entry.name for entry in root.iterdir()} if root.is_dir() else set()

    def find_run(plan, known: set):
        records = _load_records(runs_dir)
        if plan.action == "resume":
            return next((r for r in records if r.key == plan.run_id), None)
        fresh = [r for r in runs_of(plan.point, records, planned.name) if r.key not in known]
        return fresh[-1] if fresh else None

    def on_end(outcome) -> None:
        color = "green" if outcome.done else ("yellow" if outcome.status != "FAILED" else "red")
        message = f"{outcome.plan.point.title}: {_describe_result(outcome)}"
        click.secho(message, fg=color)
        if not outcome.done and jobs > 1:
            last = _last_line(outcome.log)
            if last:
                click.echo(f"  {last}  (output: {outcome.log})")

    runner = Runner(
        PointHooks(command, find_run, known_ids),
        Path(runs_dir) / SWEEP_LOG_DIR / planned.name,
        jobs=jobs,
        echo=click.echo,
        on_end=on_end,
        stream=click.echo,
        env=child_environment(jobs, child_mongo),  # the MongoDB URL: not on command lines
    )
    outcomes = runner.run(to_run)
    _print_comparison(planned, runs_dir)

    missing = [o for o in outcomes if not o.done]
    missing += [_Waiting(p) for p in plans if p.action == "wait"]
    done = total - len(missing)
    if runner.stop_signal is not None:
        _stderr(
            f"Interrupted: {done} of {total} points completed. Continue with:\n  "
            + _continue_command(planned, jobs, child_runs_dir, child_mongo),
            "yellow",
        )
        sys.exit(128 + runner.stop_signal)
    if missing:
        listed = "; ".join(f"{o.plan.point.title} ({o.status})" for o in missing)
        _fail(f"{len(missing)} of {total} points did not complete: {listed}", code=1)
    click.echo(f"sweep {planned.name}: all {total} points completed")


class _Waiting:
    """A point left alone because a run of it is still running."""

    status = "RUNNING"

    def __init__(self, plan) -> None:
        self.plan = plan


def _print_comparison(planned, runs_dir: str) -> None:
    """``rhn runs compare`` of the sweep: each point's run (its completed one if any)."""
    from rhn_cli.commands.messages import echo_lines as _echo_lines
    from rhn_cli.commands.messages import style as _style
    from rhn_cli.experiment.sweep import runs_of
    from rhn_cli.tracking.report import compare_lines

    records = _load_records(runs_dir)
    chosen = []
    for point in planned.points:
        found = runs_of(point, records, planned.name)
        completed = [r for r in found if r.status == "COMPLETED"]
        if completed or found:
            chosen.append((completed or found)[-1])
    if len(chosen) < 2:  # nothing to compare
        return
    click.echo()
    click.echo(_style(f"sweep {planned.name} (rhn runs compare --tag {planned.name}):", "title"))
    _echo_lines(compare_lines(chosen, False, _style))
    click.echo()


@sweep.command("status")
@click.argument("name", shell_complete=complete_sweep_names)
@runs_dir_option
def status(name, runs_dir) -> None:
    """Where each point of sweep NAME is: pending (its Slurm job and why), running (run
    id, epoch), requeued N times, completed (result) or failed.

    From squeue, for the jobs Slurm still knows, and from the run records in RUNS_DIR.
    """
    from rhn_cli.cluster.status import job_states, sweep_status
    from rhn_cli.experiment.schema import ConfigError
    from rhn_cli.experiment.sweep import SweepError, expand, known_sweeps, load_manifest

    manifest = load_manifest(runs_dir, name)
    if manifest is None:
        known = known_sweeps(runs_dir)
        shown = f"known: {', '.join(known)}" if known else "none recorded there yet"
        _fail(f"no sweep {name!r} in {runs_dir} ({shown})")
    try:
        planned = expand(manifest["tokens"], manifest.get("mode", "product"), name)
    except (SweepError, ConfigError, KeyError) as error:
        _fail(f"sweep {name}: its record cannot be read again: {error}", code=1)
    jobs = manifest.get("jobs") or []
    states = job_states() if jobs else None
    rows = sweep_status(planned, _load_records(runs_dir), jobs, states)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
        click.echo(
            f"{row.title}: {click.style(row.state, **_STATE_STYLE.get(row.state, {}))}"
            f"{' ' + row.details if row.details else ''}"
        )
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    click.echo(f"sweep {name}: {len(rows)} points: {summary}")
    if jobs and states is None:
        _stderr("(squeue did not answer: job states are from the run records only)", "yellow")


_STATE_STYLE = {
    "completed": {"fg": "green"},
    "failed": {"fg": "red"},
    "ended": {"fg": "red"},
    "cancelled": {"fg": "red"},
    "running": {"fg": "cyan"},
    "pending": {"fg": "cyan"},
    "interrupted": {"fg": "yellow"},
}
