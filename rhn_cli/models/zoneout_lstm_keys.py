"""The config keys the Zoneout LSTM family reads (``build()`` in zoneout_lstm.py), beyond
the general ones.

Kept torch-free beside zoneout_lstm.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys, Option, drop_rate
from rhn_cli.models.shared_keys import FORGET_BIAS, Z_STATES

KEYS = FamilyKeys(
    {
        "z_cells": Option(
            0.0,
            float,
            "zoneout probability of LSTM cells (keep the old value; zoneout_lstm)",
            drop_rate,
        ),
        "z_states": Z_STATES,
        "drop_igates": Option(
            0.0,
            float,
            "zoneout_lstm input-gate dropout rate, not rescaled (the reference's "
            "drop_prob_igates is the keep rate 1 - drop_igates)",
            drop_rate,
        ),
        "forget_bias": FORGET_BIAS,
    }
)
