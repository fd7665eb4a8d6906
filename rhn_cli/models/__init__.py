"""Language models. Import torch; never import tracking, experiment or the CLI.

Every family lives in its own module with a ``build(config, vocab_size)`` function;
:func:`build_model` picks the one named by ``config['model']``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

# config['model'] -> module of rhn_cli.models
FAMILIES = {
    "rhn": "rhn",
    "lstm": "lstm",
    "zoneout_lstm": "zoneout_lstm",
    "grid_lstm": "grid_lstm",
    "charrnn_lstm": "charrnn_lstm",
    "gru": "gru",
}


def build_model(config: Mapping[str, Any], vocab_size: int):
    """The model ``config`` describes, freshly initialised, for ``vocab_size`` symbols."""
    name = config.get("model", "rhn")
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(FAMILIES)})")
    module = importlib.import_module(f"rhn_cli.models.{FAMILIES[name]}")
    return module.build(config, vocab_size)
