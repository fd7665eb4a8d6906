"""The config keys the char-rnn LSTM family reads (``build()`` in charrnn_lstm.py), beyond
the general ones.

Kept torch-free beside charrnn_lstm.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys
from rhn_cli.models.shared_keys import DROPOUT, INIT_SCALE

KEYS = FamilyKeys({"init_scale": INIT_SCALE, "dropout": DROPOUT})
