"""What Omniboard shows first, made readable: the Result column and the config columns.

Omniboard 2.16.1 has no number format: its Result column shows a run's stored ``result``
as it is, so :func:`rounded_result` rounds what a run returns (the metrics keep full
precision). Its runs table makes a column of each top-level config key, and a nested
dict (``synthetic``) one JSON blob; :func:`prepare_omniboard_view` adds Omniboard
"custom columns" (``omniboard.custom.columns``: ``{name, config_path}``) for the nested
keys, so ``synthetic.order`` is a column of its own.

The third part, throughput kept out of the plot, is the engine's: it records
``tokens_per_s`` in the run's info (``info.throughput``), not as a metric, because
Omniboard plots all of a run's metrics on one linear axis by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

CUSTOM_COLUMNS = "omniboard.custom.columns"
# 9.636169145001027 -> 9.636, 65.4012 -> 65.4, 123.456 -> 123.46: four significant
# digits tell runs apart, two decimals at least keep large perplexities comparable.
RESULT_DIGITS = 4
RESULT_MIN_DECIMALS = 2


def rounded_result(value: Any) -> Any:
    """A run's result as Omniboard's Result column should show it: 4 significant digits
    and at least 2 decimals. Anything but a finite, non-zero float is returned as is."""
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    if not math.isfinite(value) or value == 0:
        return value
    magnitude = math.floor(math.log10(abs(value)))
    return round(float(value), max(RESULT_MIN_DECIMALS, RESULT_DIGITS - 1 - magnitude))


def nested_config_paths(config: Mapping[str, Any]) -> Iterable[str]:
    """The dotted paths of the leaves under ``config``'s nested dicts (``synthetic.order``);
    top-level keys, which Omniboard already shows, are left out."""
    for key, value in config.items():
        if _addressable(key) and isinstance(value, Mapping):
            yield from _leaf_paths(value, f"{key}.")


def _leaf_paths(mapping: Mapping[str, Any], prefix: str) -> Iterable[str]:
    for key, value in mapping.items():
        if not _addressable(key):
            continue
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _addressable(key: Any) -> bool:
    """Whether Omniboard's dotted path lookup can reach ``key`` (it splits at dots)."""
    return isinstance(key, str) and bool(key) and "." not in key


def prepare_omniboard_view(db) -> list[str]:
    """Add an Omniboard custom column for each nested config key of the runs in ``db``
    (a pymongo Database) that has no column of that name yet: name ``synthetic.order``,
    config_path ``config.synthetic.order``. Columns already there, a user's included,
    are left as they are. Returns the names added, sorted."""
    wanted: dict[str, None] = {}
    for run in db.runs.find({}, {"config": 1}):
        config = run.get("config")
        if isinstance(config, Mapping):
            wanted.update(dict.fromkeys(nested_config_paths(config)))
    existing = {doc.get("name") for doc in db[CUSTOM_COLUMNS].find({}, {"name": 1})}
    added = sorted(name for name in wanted if name not in existing)
    if added:
        db[CUSTOM_COLUMNS].insert_many(
            [{"name": name, "config_path": f"config.{name}"} for name in added]
        )
    return added
