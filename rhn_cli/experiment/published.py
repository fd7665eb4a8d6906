"""The published figures of the papers the shipped named configs reproduce, and the rule
deciding whether a run's config is the paper's (:func:`targets_for_config`).

Only figures from a primary source are here: the RHN README's tables (``../shared/spec``
section 6), the Zoneout README's headline BPC, and Zaremba et al. 2014's Table 1 for the
three LSTMs that ``ptb_lstm_small``/``medium``/``large`` reproduce (2 layers; 200 units,
13 epochs, no dropout; 650 units, 39 epochs, dropout 0.5; 1500 units, 55 epochs, dropout
0.65). Named configs whose figures are unverified (the variational LSTM, the Zoneout
paper's baselines) and those with no absolute figures (the Grid LSTM README's
comparison, the tutorials) have none. Each named config's first comment line states the
same figures; a test keeps the two in step.

Which run value a figure compares to (:mod:`rhn_cli.tracking.report`): ``valid.*`` the
best per-epoch (batched) valid value, which is the reference's Sacred result; ``test.*``
the final non-batched test value (B = T = 1, the reference's ``full_test_perplexity``),
or, where the run has none, the batched test value at the best valid epoch. The RHN
README does not say which valid number it reports (spec section 6.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RHN_README = "Zilly et al. 2017, RHN README (jzilly/RecurrentHighwayNetworks)"
ZONEOUT_README = "Krueger et al. 2016, Zoneout README (teganmaharaj/zoneout)"
ZAREMBA_TABLE = "Zaremba et al. 2014, Table 1"

# Keys that cannot change the figures compared: where and how fast a run computes, when
# it checkpoints, what it checks, and the MC-dropout test added on top. Stopping early
# (max_time, early_stopping, a lower max_max_epoch) keeps the paper's config, stopped
# early: the run is then shown as partial (fewer epochs than the paper's).
NEUTRAL_KEYS = frozenset(
    {"seed", "device", "checkpoint_every", "max_time", "early_stopping", "deterministic"}
    | {"mc_steps", "vocab_size"}
)
EPOCHS_KEY = "max_max_epoch"


@dataclass(frozen=True)
class Published:
    """Figures for a named config, as run with ``overrides`` (usually none)."""

    figures: dict[str, float]  # metric name (valid.ppl, test.ppl, test.bpc) -> value
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _depth_rows() -> dict[str, list[Published]]:
    """The RHN README's PTB depth table (spec 6.1): untied as shipped, tied with tied=True."""
    rows = {  # depth: (valid, test, valid tied, test tied)
        1: (92.4, 89.2, 93.2, 90.6),
        2: (79.0, 76.3, 76.9, 75.1),
        3: (75.0, 72.6, 72.7, 70.6),
        4: (73.3, 70.9, 70.8, 68.6),
        5: (72.0, 69.8, 69.7, 67.7),
        6: (71.9, 69.3, 69.1, 66.6),
        7: (71.7, 68.7, 68.7, 66.4),
        8: (71.2, 68.5, 68.2, 66.1),
        9: (71.3, 68.5, 68.1, 66.0),
        10: (71.3, 68.3, 68.3, 66.0),
    }
    source = f"{RHN_README}, PTB depth table, depth %d%s"
    return {
        f"ptb_depth{depth}": [
            Published({"valid.ppl": valid, "test.ppl": test}, source % (depth, "")),
            Published(
                {"valid.ppl": valid_tied, "test.ppl": test_tied},
                source % (depth, ", weight tying"),
                {"tied": True},
            ),
        ]
        for depth, (valid, test, valid_tied, test_tied) in rows.items()
    }


PUBLISHED: dict[str, list[Published]] = {
    "ptb_sota": [
        Published(
            {"valid.ppl": 67.9, "test.ppl": 65.4},
            f"{RHN_README}: Variational RHN + WT, depth 10, 23 M",
        )
    ],
    **_depth_rows(),
    "enwik8_sota": [Published({"test.bpc": 1.27}, f"{RHN_README}: Large RHN, depth 10, 46 M")],
    "enwik8_depth5": [Published({"test.bpc": 1.31}, f"{RHN_README}: RHN, depth 5, 23 M")],
    "text8_sota": [Published({"test.bpc": 1.27}, f"{RHN_README}: Large RHN, depth 10, 45 M")],
    "zoneout_char_ptb": [Published({"test.bpc": 1.27}, f"{ZONEOUT_README}: char-level PTB")],
    "zoneout_text8": [Published({"test.bpc": 1.36}, f"{ZONEOUT_README}: text8")],
    "ptb_lstm_small": [
        Published({"valid.ppl": 120.7, "test.ppl": 114.5}, f"{ZAREMBA_TABLE}: non-regularized LSTM")
    ],
    "ptb_lstm_medium": [
        Published(
            {"valid.ppl": 86.2, "test.ppl": 82.7}, f"{ZAREMBA_TABLE}: medium regularized LSTM"
        )
    ],
    "ptb_lstm_large": [
        Published({"valid.ppl": 82.2, "test.ppl": 78.4}, f"{ZAREMBA_TABLE}: large regularized LSTM")
    ],
}


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    from rhn_cli.experiment.resolve import _flatten

    return _flatten(config)


def reference_config(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The config the shipped named config ``name`` resolves to (defaults, the file, then
    ``overrides``), validated as a run's is."""
    from rhn_cli.experiment.resolve import _merge, load_yaml, shipped_dir
    from rhn_cli.experiment.schema import defaults, validate

    config = defaults()
    _merge(config, load_yaml(shipped_dir() / f"{name}.yaml"))
    _merge(config, overrides)
    return validate(config, {})


def _is_the_papers(config: Mapping[str, Any], reference: Mapping[str, Any]) -> bool:
    """Every key that can change the figures equal; fewer epochs allowed, not more."""
    ours, theirs = _flat(config), _flat(reference)
    for key in (set(ours) | set(theirs)) - NEUTRAL_KEYS - {EPOCHS_KEY}:
        if ours.get(key, KeyError) != theirs.get(key, KeyError):
            return False
    return ours.get(EPOCHS_KEY, 0) <= theirs.get(EPOCHS_KEY, 0)


def targets_for_config(config: Mapping[str, Any], named: Sequence[str]) -> dict[str, Any] | None:
    """``info.published`` for a run of ``config`` given the named configs ``named``, or
    None: the figures of a named config whose own config (as shipped, with the figures'
    overrides) the run's config equals, except for NEUTRAL_KEYS and a lower
    max_max_epoch; the named configs given are tried first, the last first, then the
    others (so ``ptb_sota tied=False depth=8 hidden_size=890`` is ``ptb_depth8``). A
    config derived with any other change (a model key, the data, the optimiser, more
    epochs) is not a paper's and gets none.

    The mapping: the figures by metric name, ``source`` (where they are published),
    ``config`` (the named config) and ``epochs`` (the paper config's max_max_epoch, by
    which a run that trained fewer is shown as partial)."""
    given = [name for name in reversed(list(named)) if name in PUBLISHED]
    for name in [*given, *(name for name in PUBLISHED if name not in given)]:
        for published in PUBLISHED[name]:
            reference = reference_config(name, published.overrides)
            if _is_the_papers(config, reference):
                with_overrides = [name, *(f"{k}={v}" for k, v in published.overrides.items())]
                return {
                    **published.figures,
                    "source": published.source,
                    "config": " ".join(with_overrides),
                    "epochs": reference[EPOCHS_KEY],
                }
    return None


def with_published(
    info: dict | None, config: Mapping[str, Any], named: Sequence[str]
) -> dict | None:
    """A run's starting info, with ``published`` set where its config is a paper's
    (:func:`targets_for_config`) and dropped where it is not (a resumed run's own)."""
    targets = targets_for_config(config, named)
    if targets is None and "published" not in (info or {}):
        return info
    rest = {k: v for k, v in (info or {}).items() if k != "published"}
    return {**rest, "published": targets} if targets is not None else rest
