"""The corpus a model trains on: three integer token streams and their vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Corpus:
    """Train/valid/test token ids in ``range(vocab_size)``.

    ``level`` is ``"char"`` or ``"word"``; ``entropy_rate_bits`` is the true entropy
    rate when the corpus comes from a known source (the synthetic one), else None.
    """

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: list[str]
    level: str = "char"
    entropy_rate_bits: float | None = None
    description: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]
