"""A config key's declaration: default, type, allowed values and one-line doc.

Torch-free on purpose: the config schema (:mod:`rhn_cli.experiment.schema`) reads every
model family's declaration (:mod:`rhn_cli.models`) to validate a config and print it,
and ``rhn --help`` and ``rhn print-config`` must not pay for importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], "str | None"]  # what is allowed, or None when the value is


@dataclass(frozen=True)
class Option:
    """One config key: its default, its type(s), its doc and what values are allowed."""

    default: Any
    kind: type | tuple[type, ...]
    doc: str
    check: Check | None = None


@dataclass(frozen=True)
class FamilyKeys:
    """The config keys a model family reads beyond the general ones (hidden_size,
    num_layers... in the schema), and whether MC dropout can evaluate it.

    ``mc_dropout``: the family draws its dropout masks once per minibatch
    (``draw_masks``), so an MC-dropout evaluation can re-draw them.
    """

    options: Mapping[str, Option] = field(default_factory=dict)
    mc_dropout: bool = False


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"at least {low:g}"


def positive(v: Any) -> str | None:
    return None if v > 0 else "more than 0"


def drop_rate(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "a drop rate in [0, 1)"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(map(repr, choices))
