"""The config keys the Grid LSTM family reads (``build()`` in grid_lstm.py), beyond the
general ones.

Kept torch-free beside grid_lstm.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys, Option
from rhn_cli.models.shared_keys import DROPOUT, INIT_SCALE

KEYS = FamilyKeys(
    {
        "init_scale": INIT_SCALE,
        "dropout": DROPOUT,
        "tie_weights": Option(
            True, bool, "grid_lstm: one depth LSTM shared by every layer (Grid LSTM -tie_weights)"
        ),
    }
)
