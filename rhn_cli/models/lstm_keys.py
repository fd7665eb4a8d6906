"""The config keys the LSTM family reads (``build()`` in lstm.py), beyond the general ones.

Kept torch-free beside lstm.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys
from rhn_cli.models.shared_keys import (
    DROPOUT,
    FORGET_BIAS,
    INIT_SCALE,
    TIED,
    VARIATIONAL_DROPOUTS,
)

KEYS = FamilyKeys(
    {
        "tied": TIED,
        "init_scale": INIT_SCALE,
        **VARIATIONAL_DROPOUTS,
        "dropout": DROPOUT,
        "forget_bias": FORGET_BIAS,
    },
    mc_dropout=True,
)
