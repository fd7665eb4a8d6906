"""Named configs and the ``with`` tokens: from the command line to a validated config.

Named configs are YAML files: the shipped ones (``named_configs/`` in the repository,
``rhn_cli.named_configs`` once installed) and any in the directories listed in
``RHN_CONFIG_PATH`` (which take precedence). The first comment line of a file is its
one-line description.

Resolution follows Sacred's order: the defaults, then each named config in the order
given, then the ``key=value`` updates; :func:`resolve` also records where each value
came from so ``rhn print-config`` can mark it and errors can say where to fix it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from rhn_cli.experiment.schema import SCHEMA, ConfigError, defaults, suggest, validate

CONFIG_PATH_ENV = "RHN_CONFIG_PATH"
COMMAND_LINE = "the command line"


@dataclass(frozen=True)
class NamedConfig:
    name: str
    path: Path
    description: str
    shipped: bool

    def load(self) -> dict[str, Any]:
        return load_yaml(self.path)

    def problem(self) -> str | None:
        """Why the file cannot be used as a named config (None: it can)."""
        try:
            self.load()
        except ConfigError as error:
            return str(error)
        return None


def shipped_dir() -> Path:
    return Path(str(files("rhn_cli.named_configs")))


def config_dirs() -> list[tuple[Path, bool]]:
    """(directory, shipped?) in lookup order: RHN_CONFIG_PATH entries, then the shipped ones."""
    extra = [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]
    return [(d, False) for d in extra] + [(shipped_dir(), True)]


def description_of(path: Path) -> str:
    """The first comment line of a YAML file, without the '#' ('' for an unreadable
    file: loading it says what is wrong)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                stripped = line.strip()
                if stripped.startswith("#"):
                    return stripped.lstrip("#").strip()
                if stripped:
                    break
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def discover() -> dict[str, NamedConfig]:
    """Every named config by name; earlier directories shadow later ones."""
    found: dict[str, NamedConfig] = {}
    for directory, shipped in config_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.y*ml")):
            if path.suffix in (".yaml", ".yml") and path.stem not in found:
                found[path.stem] = NamedConfig(path.stem, path, description_of(path), shipped)
    return found


def load_yaml(path: Path) -> dict[str, Any]:
    """The mapping a named config file holds; ConfigError (one line) if it holds none."""
    try:
        data = path.read_bytes()
        content = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"named config {path} is not UTF-8 text (byte {error.start:,} is "
            f"0x{data[error.start]:02x}); expected a UTF-8 YAML file"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"named config {path} is not valid YAML{where}") from error
    except OSError as error:
        raise ConfigError(f"cannot read named config {path}: {error.strerror}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"named config {path} must be a mapping of config keys to values")
    return content


def find_named_config(token: str, available: Mapping[str, NamedConfig]) -> NamedConfig:
    """A named config by name, or a YAML file given by path."""
    path = Path(token)
    if path.is_file():
        return NamedConfig(token, path, description_of(path), shipped=False)
    if token in available:
        return available[token]
    if path.suffix in (".yaml", ".yml") or os.sep in token:
        raise ConfigError(f"named config file {token!r} does not exist")
    if "=" not in token and token.isidentifier():
        hint = suggest(token, list(available))
        raise ConfigError(
            f"unknown named config {token!r}{hint} ('rhn configs' lists the available ones)"
        )
    raise ConfigError(f"cannot read {token!r}: expected key=value or the name of a named config")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _merge(target: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class ResolvedConfig:
    """The validated config, where each changed value came from, and what Sacred needs."""

    config: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> source
    named: list[NamedConfig] = field(default_factory=list)
    updates: dict[str, Any] = field(default_factory=dict)  # nested, as typed
    unchecked: list[str] = field(default_factory=list)  # keys rhn does not know (--force)


def parse_with(tokens: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Sacred's own parser for ``with`` tokens: (nested updates, named config tokens)."""
    from rhn_cli.tracking import quiet_sacred_import

    tokens = list(tokens)
    if tokens and tokens[0] == "with":
        tokens = tokens[1:]
    for token in tokens:
        if token.startswith("=") or token.endswith("="):
            raise ConfigError(f"cannot read {token!r}: expected key=value")
    with quiet_sacred_import():
        from sacred.arg_parser import get_config_updates

    return get_config_updates(tokens)


def _split_unknown(
    config: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys the schema knows, the others), both nested as ``config`` is."""
    known: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in config.items():
        option = schema.get(key)
        if option is None:
            unknown[key] = value
        elif isinstance(option, Mapping) and isinstance(value, Mapping):
            known[key], inner = _split_unknown(value, option)
            if inner:
                unknown[key] = inner
        else:
            known[key] = value
    return known, unknown


def resolve(
    tokens: Iterable[str], extra_updates: Mapping[str, Any] | None = None, force: bool = False
) -> ResolvedConfig:
    """Defaults, then named configs, then updates; validated. Raises ConfigError.

    ``force`` (Sacred's --force): keys rhn does not know are let through unchecked, as
    Sacred lets an added key through, and listed in ``unchecked``; the others are
    checked all the same."""
    updates, named_tokens = parse_with(tokens)
    _merge(updates, extra_updates or {})
    available = discover()
    named = [find_named_config(token, available) for token in named_tokens]

    config = defaults()
    origins: dict[str, str] = {}
    for named_config in named:
        values = named_config.load()
        _merge(config, values)
        origins.update(dict.fromkeys(_flatten(values), f"named config {named_config.name}"))
    _merge(config, updates)
    origins.update(dict.fromkeys(_flatten(updates), COMMAND_LINE))
    unknown: dict[str, Any] = {}
    if force:
        config, unknown = _split_unknown(config)
    validated = validate(config, origins)
    _merge(validated, unknown)
    return ResolvedConfig(validated, origins, named, updates, sorted(_flatten(unknown)))
