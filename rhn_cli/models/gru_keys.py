"""The config keys the GRU family reads (``build()`` in gru.py), beyond the general ones.

Kept torch-free beside gru.py so that validating a config never imports torch.
"""

from __future__ import annotations

from rhn_cli.models.option import FamilyKeys, Option, one_of
from rhn_cli.models.shared_keys import Z_STATES

GRU_VARIANTS = ("tutorial", "standard")

KEYS = FamilyKeys(
    {
        "gru_variant": Option(
            "tutorial",
            str,
            "gru: tutorial (hard-sigmoid gates, reset before the matmul, WildML) or standard "
            "(torch.nn.GRU)",
            one_of(*GRU_VARIANTS),
        ),
        "z_states": Z_STATES,
    }
)
