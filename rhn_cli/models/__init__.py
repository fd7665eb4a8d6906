"""Language models. Import torch; never import tracking, experiment or the CLI.

Every family lives in its own module with a ``build(config, vocab_size)`` function;
:func:`build_model` picks the one named by ``config['model']``. The config keys a
family's ``build()`` reads beyond the general ones are declared beside it, in
``<module>_keys.py`` (``KEYS``, a :class:`~rhn_cli.models.option.FamilyKeys`): torch-free,
so the config schema reads them without importing torch. Adding a family takes its two
modules and one line in :data:`FAMILIES`; this package's ``__init__`` stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rhn_cli.models.option import FamilyKeys

# config['model'] -> module of rhn_cli.models (its keys: <module>_keys)
FAMILIES = {
    "rhn": "rhn",
    "lstm": "lstm",
    "zoneout_lstm": "zoneout_lstm",
    "grid_lstm": "grid_lstm",
    "charrnn_lstm": "charrnn_lstm",
    "gru": "gru",
}


def family_keys(name: str) -> FamilyKeys:
    """The config keys family ``name`` declares (without importing torch)."""
    return importlib.import_module(f"rhn_cli.models.{FAMILIES[name]}_keys").KEYS


def build_model(config: Mapping[str, Any], vocab_size: int):
    """The model ``config`` describes, freshly initialised, for ``vocab_size`` symbols."""
    name = config.get("model", "rhn")
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(FAMILIES)})")
    module = importlib.import_module(f"rhn_cli.models.{FAMILIES[name]}")
    return module.build(config, vocab_size)
