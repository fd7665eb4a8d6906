"""The dropout masks of some MC-dropout samples only, for the benchmarks that run the
samples of one batch again one after another (``mc_dropout.py``, ``suite.py``)."""

from __future__ import annotations


def select_rows(masks: dict, rows) -> dict:
    """The masks of some samples only (rows of every mask tensor)."""

    def pick(mask):
        return None if mask is None else mask[rows]

    return {
        "x": pick(masks["x"]),
        "i": [pick(m) for m in masks["i"]],
        "h": [pick(m) for m in masks["h"]],
        "o": pick(masks["o"]),
    }
