"""The user's rhn settings file, and where a command's MongoDB URL comes from.

The settings file is YAML, by default ``config.yaml`` in the user config directory
(``platformdirs.user_config_dir("rhn")``: ``$XDG_CONFIG_HOME/rhn/config.yaml``, else
``~/.config/rhn/config.yaml`` on Linux); ``RHN_CONFIG_FILE`` names another file. Known
key (other keys are left to other tools and ignored)::

    mongo_url: mongodb://user:password@db.example.org:27017/rhn

A command's MongoDB URL is, in order: ``--mongo URL``, the ``RHN_MONGO_URL``
environment variable, then ``mongo_url`` in the settings file. ``--mongo none`` (or an
empty ``--mongo ''``, or ``RHN_MONGO_URL=none``) switches MongoDB off for one command
even when one is configured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE_ENV = "RHN_CONFIG_FILE"
MONGO_URL_ENV = "RHN_MONGO_URL"
MONGO_URL_KEY = "mongo_url"
# Values of --mongo / RHN_MONGO_URL that mean "no MongoDB for this command".
MONGO_OFF = ("", "none", "off")
MONGO_URL_FORMS = (
    "mongodb://[USER:PASSWORD@]HOST[:PORT][/DATABASE] or mongodb+srv://[USER:PASSWORD@]HOST"
    "[/DATABASE]"
)


class SettingsError(Exception):
    """The settings file exists but cannot be used; the message names the file."""


@dataclass(frozen=True)
class MongoSetting:
    url: str | None  # None: no MongoDB for this command
    source: str  # where it came from, for messages: "--mongo", "RHN_MONGO_URL", a path


def config_file() -> Path:
    """The settings file rhn reads (it need not exist)."""
    override = os.environ.get(CONFIG_FILE_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("rhn")) / "config.yaml"


def load_settings(path: Path | None = None) -> dict[str, Any]:
    """The settings in ``path`` (default :func:`config_file`); {} when there is no file."""
    path = config_file() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"cannot read the rhn settings file {path}: {error}") from None
    import yaml

    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise SettingsError(
            f"the rhn settings file {path} is not valid YAML{at}: {problem}"
        ) from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise SettingsError(
            f"the rhn settings file {path} must be a YAML mapping such as "
            f"'{MONGO_URL_KEY}: mongodb://host:27017/rhn', not a {type(settings).__name__}"
        )
    url = settings.get(MONGO_URL_KEY)
    if url is not None and (not isinstance(url, str) or not url.strip()):
        raise SettingsError(
            f"the rhn settings file {path}: {MONGO_URL_KEY} must be a MongoDB URL such as "
            f"mongodb://host:27017/rhn, got {url!r}"
        )
    return settings


def resolve_mongo_url(given: str | None, given_by: str = "--mongo") -> MongoSetting:
    """The MongoDB URL for a command, from ``--mongo`` (``given``, which click may already
    have filled from ``RHN_MONGO_URL``: ``given_by`` says so), the environment, or the
    settings file. A URL that is not of a MongoDB URL's form is a SettingsError."""
    if given is not None:
        source = given_by
    else:
        given = os.environ.get(MONGO_URL_ENV)
        source = MONGO_URL_ENV
    if given is not None:
        given = given.strip()
        if given.lower() in MONGO_OFF:
            return MongoSetting(None, source)
        return MongoSetting(_checked_url(given, source), source)
    path = config_file()
    url = load_settings(path).get(MONGO_URL_KEY)
    if not url:
        return MongoSetting(None, str(path))
    return MongoSetting(_checked_url(url.strip(), f"{MONGO_URL_KEY} in {path}"), str(path))


def _checked_url(url: str, source: str) -> str:
    """``url`` if it has the shape of a MongoDB URL, else SettingsError naming it (its
    password hidden): a URL that can never connect must not mark runs for sync to it."""
    problem = mongo_url_problem(url)
    if problem is not None:
        from rhn_cli.tracking.observers import redact

        raise SettingsError(f"{source} {redact(url)!r}: {problem}; expected {MONGO_URL_FORMS}")
    return url


def mongo_url_problem(url: str) -> str | None:
    """What is wrong with the form of a MongoDB URL (None: nothing). Only the form: no
    name is resolved and no server is asked."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in ("mongodb", "mongodb+srv"):
        return f"the scheme is {scheme + '://' if separator else 'missing'}, not mongodb://"
    end = min((i for i in (rest.find(c) for c in "/?") if i >= 0), default=len(rest))
    hosts = rest[:end].rpartition("@")[2]
    if not hosts:
        return "it names no host"
    for host in hosts.split(","):
        name, port = _split_port(host)
        if not name:
            return f"host {host!r} has no name"
        if port is None:
            continue
        if scheme.lower() == "mongodb+srv":
            return "a mongodb+srv:// URL takes no port (DNS gives it)"
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            return f"port {port!r} is not a number in 1..65535"
    return None


def _split_port(host: str) -> tuple[str, str | None]:
    """('name', 'port' or None) of 'name:port', '[ipv6]:port' or a bare name."""
    if host.startswith("["):
        name, bracket, tail = host.partition("]")
        if not bracket:
            return "", None
        return name + bracket, tail[1:] if tail.startswith(":") else (tail or None)
    name, colon, port = host.rpartition(":")
    return (name, port) if colon else (host, None)


def how_to_configure_mongo() -> str:
    """One sentence telling a user the three ways to give rhn a MongoDB URL."""
    return (
        f"pass --mongo URL, set {MONGO_URL_ENV}, or add '{MONGO_URL_KEY}: URL' to {config_file()}"
    )
