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


def resolve_mongo_url(given: str | None) -> MongoSetting:
    """The MongoDB URL for a command, from ``--mongo`` (``given``, which click may already
    have filled from ``RHN_MONGO_URL``), the environment, or the settings file."""
    if given is not None:
        source = "--mongo"
    else:
        given = os.environ.get(MONGO_URL_ENV)
        source = MONGO_URL_ENV
    if given is not None:
        given = given.strip()
        if given.lower() in MONGO_OFF:
            return MongoSetting(None, source)
        return MongoSetting(given, source)
    path = config_file()
    url = load_settings(path).get(MONGO_URL_KEY)
    return MongoSetting(url.strip() if url else None, str(path))


def how_to_configure_mongo() -> str:
    """One sentence telling a user the three ways to give rhn a MongoDB URL."""
    return (
        f"pass --mongo URL, set {MONGO_URL_ENV}, or add '{MONGO_URL_KEY}: URL' to {config_file()}"
    )
