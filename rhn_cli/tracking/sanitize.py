"""Make any value safe to record: BSON-encodable for MongoDB and JSON-encodable for the
file store, with the same result in both.

One value BSON cannot encode (a 0-d numpy array, a torch tensor) makes Sacred's
MongoObserver fail and silently stop recording the rest of the run, and numpy values in
config/info end up as jsonpickle ``{"py/object": ...}`` dicts that Omniboard cannot sort
or filter. rhn therefore passes every value it records -- config, meta, info, metrics
and the result -- through :func:`clean` first. The rules, applied recursively:

* ``None``, ``bool``, ``str`` and finite ``int``/``float`` are kept as they are
  (integers beyond 64 bits, which BSON cannot hold, become floats).
* **Non-finite floats (NaN, +inf, -inf) become None**, everywhere: JSON has no
  spelling for them, and a diverged run's ``NaN`` perplexity reads as "no value".
* numpy scalars and 0-d arrays, and torch 0-d tensors, become the Python
  ``int``/``float``/``bool`` they hold; other arrays and tensors become (nested) lists
  of those (cleaned in turn, so a NaN inside an array becomes None too).
* dicts (and other mappings) become dicts with ``str`` keys; lists, tuples, sets and
  other sequences become lists (sets sorted where their items allow).
* ``datetime``/``date`` become ISO-8601 strings, ``bytes`` are decoded as UTF-8
  (invalid bytes replaced), ``pathlib`` paths and anything else become ``str(value)``.

Neither numpy nor torch is imported here: a value is recognised by the module of its
type, so cleaning stays cheap for commands that never load them.
"""

from __future__ import annotations

import datetime
import math
import numbers
from collections.abc import Mapping
from typing import Any

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def clean(value: Any) -> Any:
    """``value`` as plain, finite, BSON- and JSON-encodable Python data (rules above)."""
    return _clean(value, set())


def clean_number(value: Any) -> int | float | bool | None:
    """A metric value as a Python number (None when it is not finite or not a number)."""
    cleaned = clean(value)
    if cleaned is None or isinstance(cleaned, (bool, int, float)):
        return cleaned
    return None


def _clean_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(value: Any, active: set[int]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):
        return _clean_float(value)
    if isinstance(value, int):
        return int(value) if _INT64_MIN <= value <= _INT64_MAX else _clean_float(value)
    kind = type(value).__module__.split(".", 1)[0]
    if kind == "numpy":
        return _clean_numpy(value, active)
    if kind == "torch" and hasattr(value, "detach"):
        return _clean_tensor(value, active)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, numbers.Integral):
        return _clean(int(value), active)
    if isinstance(value, numbers.Real):
        return _clean_float(float(value))
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        marker = id(value)
        if marker in active:  # a container holding itself
            return "<recursive reference>"
        active.add(marker)
        try:
            if isinstance(value, Mapping):
                return {str(key): _clean(item, active) for key, item in value.items()}
            if isinstance(value, (set, frozenset)):
                items = [_clean(item, active) for item in value]
                try:
                    return sorted(items)
                except TypeError:
                    return items
            return [_clean(item, active) for item in value]
        finally:
            active.discard(marker)
    return str(value)


def _clean_numpy(value: Any, active: set[int]) -> Any:
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        # .tolist() turns a numpy scalar or 0-d array into a Python scalar and an array
        # into nested lists of Python scalars (object arrays keep their objects).
        try:
            plain = value.tolist()
        except (TypeError, ValueError):
            return str(value)
        return _clean(plain, active)
    return str(value)


def _clean_tensor(value: Any, active: set[int]) -> Any:
    try:
        tensor = value.detach().cpu()
        plain = tensor.item() if tensor.numel() == 1 and tensor.dim() == 0 else tensor.tolist()
    except (RuntimeError, TypeError, ValueError):
        return str(value)
    return _clean(plain, active)
