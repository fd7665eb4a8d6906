"""The ``rhn`` command line: parsing and printing only.

Everything heavy (Sacred, torch) is imported inside the commands, so ``rhn --help``
answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from rhn_cli import __version__

WITH_HELP = """
Config updates use Sacred's syntax: after the word 'with', give named configs
(see 'rhn configs') or YAML files, and key=value pairs, applied in that order.
Values are Python literals: depth=20, learning_rate=1e-3, tied=False,
dataset="synthetic"; nested keys use dots: synthetic.order=3.
"""


def _stderr(message: str, color: str | None = None) -> None:
    # Always the current sys.stderr: click's err=True caches a wrapper per stream, and
    # Sacred's capture proxy compares equal to the real stream, so the cache would hand
    # back a wrapper of the proxy after Sacred has closed it.
    click.secho(message, fg=color, file=sys.stderr)


def _fail(message: str, code: int = 2) -> None:
    _stderr(f"Error: {message}", "red")
    sys.exit(code)


def _resolve(updates: tuple[str, ...], extra: dict | None = None):
    from rhn_cli.experiment.resolve import resolve
    from rhn_cli.experiment.schema import ConfigError

    try:
        return resolve(updates, extra)
    except ConfigError as error:
        _fail(str(error))


@click.group(name="rhn", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rhn")
def cli() -> None:
    """Train and compare Recurrent Highway Networks and their peers.

    Every training run is a Sacred run, recorded in a local file store (./runs) and,
    given --mongo or RHN_MONGO_URL, in MongoDB for Omniboard.

    \b
    Examples:
      rhn train                          # the built-in quickstart (synthetic data)
      rhn train with depth=3 hidden_size=64
      rhn print-config with depth=5      # what a run would use, changes marked
      rhn configs                        # the named configs
    """


@cli.command(epilog=WITH_HELP)
@click.argument("updates", nargs=-1, metavar="[with] [NAMED_CONFIG|FILE.yaml|KEY=VALUE]...")
@click.option("--name", help="Name of the run (recorded as the experiment name).")
@click.option("--comment", help="A note stored with the run (Omniboard shows it as Notes).")
@click.option("--seed", type=int, help="Random seed (default: drawn at random and recorded).")
@click.option(
    "--runs-dir",
    envvar="RHN_RUNS_DIR",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="File store for run records [env: RHN_RUNS_DIR].",
)
@click.option(
    "--mongo",
    "mongo_url",
    envvar="RHN_MONGO_URL",
    metavar="URL",
    help="Also record in MongoDB, e.g. mongodb://host:27017/rhn [env: RHN_MONGO_URL]. "
    "If it does not answer within 3 s the run goes on, recorded in the file store only.",
)
@click.option("--unobserved", is_flag=True, help="Record nothing (a quick try).")
@click.option(
    "--resume",
    "resume_target",
    metavar="RUN_ID|PATH",
    help="Continue a stopped run (a run id in --runs-dir, its directory, or a checkpoint "
    "file) from its last checkpoint, under the same run id and with its recorded config.",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Only deterministic torch kernels (reproducible GPU runs; sets deterministic=True).",
)
def train(
    updates, name, comment, seed, runs_dir, mongo_url, unobserved, resume_target, deterministic
) -> None:
    """Train a model; per epoch, print and record train/valid perplexity and bits.

    With no arguments it trains the quickstart: a small RHN on the built-in
    synthetic corpus, whose true entropy rate is printed for comparison.

    Checkpoints are written into the run directory at every epoch end, every
    checkpoint_every minutes, and on Ctrl-C or SIGTERM (which stop after the current
    step; press Ctrl-C twice to stop at once). Continue with --resume RUN_ID.
    """
    from rhn_cli.experiment.sacred_app import RunFailed, RunInterrupted, run_training

    def warn(message: str) -> None:
        _stderr(f"Warning: {message}", "yellow")

    plan = None
    if resume_target is not None:
        if seed is not None or deterministic or unobserved:
            _fail(
                f"--resume {resume_target} continues the run with its recorded config; "
                "drop --seed, --deterministic and --unobserved"
            )
        resolved, plan = _plan_resume(resume_target, runs_dir, updates)
    else:
        extra = {"seed": seed} if seed is not None else {}
        if deterministic:
            extra["deterministic"] = True
        resolved = _resolve(updates, extra)

    try:
        outcome = run_training(
            resolved,
            runs_dir=runs_dir,
            mongo_url=mongo_url,
            unobserved=unobserved,
            name=name,
            comment=comment,
            resume=plan,
            warn=warn,
        )
    except RunInterrupted as stop:
        _report_stop(stop)
    except RunFailed as failure:
        where = f" (traceback recorded in {failure.run_dir}/run.json)" if failure.run_dir else ""
        _fail(f"{failure.cause}{where}", code=1)
    result = f"result (best valid ppl) {outcome.result:.4f}"
    if outcome.run_id is None:
        click.echo(f"{outcome.status} (unobserved: not recorded); {result}")
        return
    where = f" in {outcome.run_dir}" if outcome.run_dir else ""
    if outcome.mongo_url:
        where += f" and in MongoDB {outcome.mongo_url}"
    click.echo(f"run {outcome.run_id} {outcome.status}{where}; {result}")


def _plan_resume(target: str, runs_dir: str, updates: tuple[str, ...]):
    from rhn_cli.engine.checkpoint import CheckpointError
    from rhn_cli.experiment.resolve import ResolvedConfig, parse_with
    from rhn_cli.experiment.resume import ResumeError, plan_resume, with_run_control_updates
    from rhn_cli.experiment.schema import ConfigError

    try:
        plan = plan_resume(target, Path(runs_dir))
        overrides, named = parse_with(updates)
        if named:
            raise ResumeError(f"--resume takes no named configs ({', '.join(named)})")
        config = with_run_control_updates(plan, overrides)
    except ConfigError as error:
        _fail(str(error))
    except CheckpointError as error:
        _fail(str(error), code=1)
    return ResolvedConfig(config, updates=config), plan


def _report_stop(stop) -> None:
    """Say where training stopped and how to continue; exit 128+signal (0 for max_time)."""
    import signal

    what = "Stopped" if stop.status == "TIMEOUT" else "Interrupted"
    message = f"{what} ({stop.status})"
    if stop.where:
        message += f": {stop.where}"
    if stop.checkpoint_path:
        message += f"; checkpoint saved in {stop.checkpoint_path}"
    _stderr(message, "yellow")
    if stop.run_dir is not None and (stop.run_dir / "checkpoint.pt").exists():
        runs_dir = stop.run_dir.parent
        option = "" if runs_dir == Path("runs") else f" --runs-dir {runs_dir}"
        _stderr(f"Resume with: rhn train --resume {stop.run_dir.name}{option}")
    if stop.status == "TIMEOUT":
        sys.exit(0)
    sys.exit(128 + (stop.signal_number or signal.SIGINT))


@cli.command("print-config", epilog=WITH_HELP)
@click.argument("updates", nargs=-1, metavar="[with] [NAMED_CONFIG|FILE.yaml|KEY=VALUE]...")
def print_config(updates) -> None:
    """Show the config a run would use, marking what named configs and updates changed."""
    from rhn_cli.experiment.render import config_lines, header

    resolved = _resolve(updates)
    click.echo(header(resolved))
    for line, changed in config_lines(resolved):
        click.secho(line, fg="blue" if changed else None)


@cli.command()
def configs() -> None:
    """List the named configs, each with its one-line description.

    Named configs are YAML files shipped with rhn plus any found in the directories of
    RHN_CONFIG_PATH (separated by ':'), which take precedence.
    """
    from rhn_cli.experiment.resolve import CONFIG_PATH_ENV, discover

    found = discover()
    if not found:
        click.echo("No named configs found.")
        return
    width = max(len(name) for name in found)
    for name in sorted(found):
        named = found[name]
        origin = "" if named.shipped else f"  [{named.path.parent}]"
        click.echo(f"{name:<{width}}  {named.description or '(no description)'}{origin}")
    if not os.environ.get(CONFIG_PATH_ENV):
        click.echo(
            f"\nAdd your own: put NAME.yaml files in a directory listed in {CONFIG_PATH_ENV}."
        )


def main() -> None:
    cli(prog_name="rhn")
