"""Every dataset rhn knows, by the name used in ``dataset=...``.

Each entry turns the run's config into a :class:`Corpus`. Loaders import their
heavy dependencies lazily so that listing the registry stays instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rhn_cli.data.corpus import Corpus


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    summary: str
    load: Callable[[Mapping[str, Any]], Corpus]


def _load_synthetic(config: Mapping[str, Any]) -> Corpus:
    from rhn_cli.data.synthetic import synthetic_splits

    params = config["synthetic"]
    source, splits = synthetic_splits(
        alphabet_size=params["alphabet_size"],
        order=params["order"],
        branching=params["branching"],
        train_tokens=params["train_tokens"],
        valid_tokens=params["valid_tokens"],
        test_tokens=params["test_tokens"],
        source_seed=params["source_seed"],
    )
    return Corpus(
        name="synthetic",
        vocab=[f"s{i}" for i in range(params["alphabet_size"])],
        level="char",
        entropy_rate_bits=source.entropy_rate_bits(),
        description={"source": "sparse Markov chain", **dict(params)},
        **splits,
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "synthetic",
            "built-in seeded Markov source with a known entropy rate (no download)",
            _load_synthetic,
        ),
    ]
}


def load_corpus(config: Mapping[str, Any]) -> Corpus:
    """The corpus named by ``config['dataset']``."""
    return DATASETS[config["dataset"]].load(config)
