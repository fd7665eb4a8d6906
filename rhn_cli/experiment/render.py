"""Text for ``rhn print-config``, modelled on Sacred's ``print_config``.

Each value is printed with its one-line doc; values a named config or the command line
changed are marked with ``*`` and the name of their source (and coloured, as Sacred
does, when the output is a terminal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rhn_cli.experiment.resolve import COMMAND_LINE, ResolvedConfig
from rhn_cli.experiment.schema import doc

VALUE_COLUMN = 34


def _short_origin(origin: str) -> str:
    return "command line" if origin == COMMAND_LINE else origin.removeprefix("named config ")


def config_lines(resolved: ResolvedConfig) -> list[tuple[str, bool]]:
    """(line, changed?) for every entry of the resolved config, Sacred-style."""
    lines: list[tuple[str, bool]] = []

    def walk(node: Mapping[str, Any], prefix: str, indent: int) -> None:
        for key in sorted(node):
            path = prefix + key
            value = node[key]
            pad = "  " * indent
            if isinstance(value, Mapping):
                lines.append((f"  {pad}{key}:", False))
                walk(value, path + ".", indent + 1)
                continue
            origin = resolved.origins.get(path)
            text = f"{pad}{key} = {value!r}"
            comment = doc(path)
            if origin:
                comment += f"  <- {_short_origin(origin)}"
            mark = "*" if origin else " "
            lines.append((f"{mark} {text:<{VALUE_COLUMN}} # {comment}".rstrip(), bool(origin)))

    config = dict(resolved.config)
    walk({k: v for k, v in config.items() if k != "seed"}, "", 0)
    if "seed" in config:
        lines.append(
            (
                f"* {'seed = ' + repr(config['seed']):<{VALUE_COLUMN}} # {doc('seed')}"
                f"  <- {_short_origin(resolved.origins.get('seed', COMMAND_LINE))}",
                True,
            )
        )
    else:
        lines.append(
            (
                f"  {'seed = <random>':<{VALUE_COLUMN}} # drawn when the run starts; "
                "fix it with --seed N",
                False,
            )
        )
    return lines


def header(resolved: ResolvedConfig) -> str:
    sources = [n.name for n in resolved.named]
    if resolved.updates:
        sources.append("command line")
    changed = f" (* = changed by {', '.join(sources)})" if sources else " (all defaults)"
    return "Configuration" + changed + ":"
