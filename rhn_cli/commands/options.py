"""Click options shared by several ``rhn`` commands (training, ``rhn runs``, ``rhn board``).

Kept apart from :mod:`rhn_cli.cli` so that command modules can use them without
importing the CLI.
"""

from __future__ import annotations

import re

import click

from rhn_cli.tracking.settings import MONGO_OFF

runs_dir_option = click.option(
    "-F",
    "--runs-dir",
    "--file_storage",
    "runs_dir",
    envvar="RHN_RUNS_DIR",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="File store of run records [env: RHN_RUNS_DIR]; -F/--file_storage: Sacred's name.",
)


def _configured_mongo_url(ctx, param, value: str | None) -> str | None:
    """--mongo, else RHN_MONGO_URL, else mongo_url in the settings file; 'none': off.
    A malformed URL is a usage error (exit 2), whichever of them gave it."""
    from rhn_cli.tracking.settings import MONGO_URL_ENV, SettingsError, resolve_mongo_url

    from_env = ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT
    try:
        if value is not None and not from_env:
            value = url_of_sacred_form(value)
        return resolve_mongo_url(value, MONGO_URL_ENV if from_env else "--mongo").url
    except (SettingsError, ValueError) as error:
        problem = click.ClickException(str(error))
        problem.exit_code = 2
        raise problem from None


# Sacred's -m/--mongo_db forms (sacred.observers.mongo.get_pattern): a database name, and
# a host and port before it; Sacred's ".collection", ":run_id" and "!priority" after it
# are matched only to say that rhn does not take them.
_NAME = r"[_A-Za-z][0-9A-Za-z#%&'()+\-;=@\[\]^_{}]{0,63}"
_LABEL = r"[0-9A-Za-z](?:[0-9A-Za-z-]{0,61}[0-9A-Za-z])?"
_HOST_PORT = rf"(?P<host>{_LABEL}(?:\.{_LABEL})*):(?P<port>\d{{1,5}})"
_SACRED_MONGO = (
    re.compile(rf"^{_HOST_PORT}$"),  # HOST:PORT, database rhn
    re.compile(
        rf"^(?:{_HOST_PORT}:)?(?P<db>{_NAME})(?P<rest>(?:\.{_NAME}(?::\d{{1,12}})?)?(?:!-?\d+)?)$"
    ),
)


def url_of_sacred_form(value: str) -> str:
    """``value`` as a MongoDB URL: a URL (or 'none') as it is; Sacred's
    ``[HOST:PORT:]DB_NAME`` or ``HOST:PORT`` as ``mongodb://HOST:PORT/DB_NAME`` (localhost
    and 27017 by default, rhn's database rhn without a name). ValueError for the rest."""
    text = value.strip()
    if "://" in text or text.lower() in MONGO_OFF:
        return value
    match = next(filter(None, (pattern.match(text) for pattern in _SACRED_MONGO)), None)
    if match is None:
        raise ValueError(
            f"--mongo {value!r}: expected a mongodb:// URL or Sacred's [HOST:PORT:]DB_NAME"
        )
    groups = match.groupdict()
    if groups.get("rest"):
        raise ValueError(
            f"--mongo {value!r}: rhn records into the database's own runs and metrics "
            "collections (Omniboard reads those): drop the collection, run id or priority"
        )
    from urllib.parse import quote

    database = quote(groups["db"], safe="") if groups.get("db") else ""
    return f"mongodb://{groups['host'] or 'localhost'}:{groups['port'] or 27017}/{database}"


# For commands that record runs (train, evaluate).
mongo_option = click.option(
    "-m",
    "--mongo",
    "--mongo_db",
    "mongo_url",
    envvar="RHN_MONGO_URL",
    metavar="URL",
    callback=_configured_mongo_url,
    help="Also record in MongoDB, e.g. mongodb://host:27017/rhn, or Sacred's "
    "[HOST:PORT:]DB_NAME (-m/--mongo_db: Sacred's names) [env: RHN_MONGO_URL; else "
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
