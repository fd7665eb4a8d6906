"""Config keys that several model families read, declared once so they agree.

A family lists the ones it reads in its own declaration (``<family>_keys.py``); the
schema checks that no two families declare one key differently.
"""

from __future__ import annotations

from rhn_cli.models.option import Option, at_least, drop_rate

TIED = Option(False, bool, "tie the output weights to the embedding")
INIT_SCALE = Option(0.1, float, "weights start uniform in +-init_scale", at_least(0))
DROP_X = Option(0.0, float, "embedding dropout (whole word vectors, per word type)", drop_rate)
DROP_I = Option(0.0, float, "dropout on each RHN layer's input", drop_rate)
DROP_H = Option(0.0, float, "dropout on the recurrent state (not the carry path)", drop_rate)
DROP_O = Option(0.0, float, "dropout on the last layer's output", drop_rate)
DROPOUT = Option(
    0.0,
    float,
    "standard dropout on non-recurrent connections, a fresh mask per step (lstm, "
    "grid_lstm, charrnn_lstm)",
    drop_rate,
)
Z_STATES = Option(
    0.0,
    float,
    "zoneout probability of hidden states (zoneout_lstm, gru, rhn). The Zoneout scripts' "
    "drop_prob_* are update probabilities 1 - z",
    drop_rate,
)
FORGET_BIAS = Option(
    None,
    (int, float),
    "added to the forget gate pre-activation (lstm, zoneout_lstm); None: the "
    "reference's (lstm 0, zoneout_lstm 1)",
)
# The variational dropouts of the reference RHN code, which the lstm family shares.
VARIATIONAL_DROPOUTS = {"drop_x": DROP_X, "drop_i": DROP_I, "drop_h": DROP_H, "drop_o": DROP_O}
