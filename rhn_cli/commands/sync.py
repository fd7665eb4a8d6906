"""``rhn runs sync``: push the file store's runs into MongoDB (parsing and printing only;
the work is :func:`rhn_cli.tracking.sync.sync_runs`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rhn_cli.commands.options import runs_dir_option


def _usage_error(message: str) -> click.ClickException:
    error = click.ClickException(message)
    error.exit_code = 2
    return error


@click.command()
@click.option(
    "--mongo",
    "mongo_url",
    envvar="RHN_MONGO_URL",
    metavar="URL",
    help="MongoDB to push to, e.g. mongodb://host:27017/rhn (database from the path, "
    "default rhn) [env: RHN_MONGO_URL; else mongo_url in ~/.config/rhn/config.yaml].",
)
@runs_dir_option
@click.option("--dry-run", is_flag=True, help="Only list what would be pushed or updated.")
@click.option(
    "--with-checkpoints",
    is_flag=True,
    help="Also push model checkpoints (*.pt files of a run), which can be large.",
)
def sync(mongo_url, runs_dir, dry_run, with_checkpoints) -> None:
    """Push the runs of the file store that MongoDB does not have, or has an outdated
    copy of, so Omniboard shows them.

    This covers runs recorded offline, while MongoDB was down or went away mid-run,
    and runs resumed since MongoDB recorded them. Each is pushed as Sacred's
    MongoObserver records a run: an integer run id, its metrics (linked from
    info.metrics), sources (stored once, shared by all runs) and the other files in
    its run directory as artifacts -- except checkpoints (*.pt), unless
    --with-checkpoints. A run MongoDB has is updated under the same id. Each run
    directory remembers what MongoDB has of it (mongo.json), so a second sync pushes
    nothing.

    Exit status: 0 when every run is in MongoDB, 1 when a run failed to push or
    MongoDB does not answer, 2 for usage errors.

    \b
    Examples:
      rhn runs sync --mongo mongodb://db.lab:27017/rhn
      rhn runs sync --dry-run            # MongoDB from RHN_MONGO_URL or config.yaml
    """
    from rhn_cli.tracking.observers import redact
    from rhn_cli.tracking.settings import SettingsError, how_to_configure_mongo, resolve_mongo_url
    from rhn_cli.tracking.sync import SyncError, sync_runs

    try:
        setting = resolve_mongo_url(mongo_url)
    except SettingsError as error:
        raise _usage_error(str(error)) from None
    if setting.url is None:
        if setting.source in ("--mongo", "RHN_MONGO_URL"):
            raise _usage_error(
                f"MongoDB is switched off ({setting.source} none): nothing to sync to"
            )
        raise _usage_error(f"no MongoDB to sync to: {how_to_configure_mongo()}")
    runs_path = Path(runs_dir)
    if not runs_path.is_dir():
        raise _usage_error(f"no runs directory {runs_dir} (--runs-dir, RHN_RUNS_DIR)")

    action = "checking what to push from" if dry_run else "pushing runs from"
    click.echo(f"{action} {runs_dir} to MongoDB {redact(setting.url)}")
    try:
        report = sync_runs(
            runs_path,
            setting.url,
            echo=click.echo,
            dry_run=dry_run,
            with_checkpoints=with_checkpoints,
        )
    except SyncError as error:
        raise click.ClickException(str(error)) from None
    click.echo(report.summary())
    if report.failed:
        runs = "; ".join(f"run {run}: {why}" for run, why in report.failed)
        click.secho(
            f"Error: {len(report.failed)} run(s) not pushed ({runs})", fg="red", file=sys.stderr
        )
        sys.exit(1)
