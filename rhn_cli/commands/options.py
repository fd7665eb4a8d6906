"""Click options shared by several ``rhn`` commands (training, ``rhn runs``, ``rhn board``).

Kept apart from :mod:`rhn_cli.cli` so that command modules can use them without
importing the CLI.
"""

from __future__ import annotations

import click

runs_dir_option = click.option(
    "--runs-dir",
    envvar="RHN_RUNS_DIR",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="File store of run records [env: RHN_RUNS_DIR].",
)


def _configured_mongo_url(ctx, param, value: str | None) -> str | None:
    """--mongo, else RHN_MONGO_URL, else mongo_url in the settings file; 'none': off.
    A malformed URL is a usage error (exit 2), whichever of them gave it."""
    from rhn_cli.tracking.settings import MONGO_URL_ENV, SettingsError, resolve_mongo_url

    from_env = ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT
    try:
        return resolve_mongo_url(value, MONGO_URL_ENV if from_env else "--mongo").url
    except SettingsError as error:
        problem = click.ClickException(str(error))
        problem.exit_code = 2
        raise problem from None


# For commands that record runs (train, evaluate).
mongo_option = click.option(
    "--mongo",
    "mongo_url",
    envvar="RHN_MONGO_URL",
    metavar="URL",
    callback=_configured_mongo_url,
    help="Also record in MongoDB, e.g. mongodb://host:27017/rhn [env: RHN_MONGO_URL; else "
    "mongo_url in ~/.config/rhn/config.yaml; 'none': not this time]. If it does not answer "
    "within 3 s the run goes on, in the file store only, marked for 'rhn runs sync'.",
)

# For commands that read recorded runs (rhn runs ls/show/...).
mongo_source_option = click.option(
    "--mongo",
    "mongo_url",
    envvar="RHN_MONGO_URL",
    metavar="URL",
    help="Read the runs from MongoDB instead of the file store, e.g. "
    "mongodb://host:27017/rhn (database from the path, default rhn) [env: RHN_MONGO_URL].",
)
