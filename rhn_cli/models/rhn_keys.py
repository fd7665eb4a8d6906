"""The config keys the RHN family reads (``build()`` in rhn.py), beyond the general ones.

Kept torch-free beside rhn.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys, Option, at_least
from rhn_cli.models.shared_keys import INIT_SCALE, TIED, VARIATIONAL_DROPOUTS, Z_STATES

KEYS = FamilyKeys(
    {
        "depth": Option(
            3, int, "recurrence depth D: highway micro-layers per time step", at_least(1)
        ),
        "tied": TIED,
        "init_scale": INIT_SCALE,
        "init_bias": Option(-1.0, float, "initial bias of every transform (T) gate"),
        **VARIATIONAL_DROPOUTS,
        "z_states": Z_STATES,
        "tied_noise": Option(
            True, bool, "one dropout mask for both H and T transforms (TF); False: one each"
        ),
        "init_other_bias": Option(
            None, (int, float), "constant init of the H and output biases (Theano); None: uniform"
        ),
    },
    mc_dropout=True,
)
