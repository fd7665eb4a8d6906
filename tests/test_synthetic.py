"""The synthetic source: deterministic, ergodic, and its entropy rate is the true one."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from rhn_cli.data.synthetic import MarkovSource, synthetic_splits


def empirical_conditional_entropy(tokens: np.ndarray, order: int) -> float:
    """Plug-in estimate of H(X_t | X_{t-order..t-1}) in bits, from counts."""
    contexts = collections.Counter()
    joint = collections.Counter()
    seq = tokens.tolist()
    for i in range(order, len(seq)):
        context = tuple(seq[i - order : i])
        contexts[context] += 1
        joint[context, seq[i]] += 1
    n = sum(joint.values())
    return -sum(c * math.log2(c / contexts[ctx]) for (ctx, _), c in joint.items()) / n


@pytest.mark.parametrize(("alphabet", "order", "branching"), [(12, 2, 3), (6, 1, 2), (4, 3, 2)])
def test_entropy_rate_matches_a_long_sample(alphabet, order, branching):
    source = MarkovSource(alphabet, order, branching, source_seed=5)
    sample = source.sample(300_000, np.random.default_rng(0))
    assert source.entropy_rate_bits() == pytest.approx(
        empirical_conditional_entropy(sample, order), abs=0.01
    )


def test_entropy_rate_by_hand_for_a_first_order_chain():
    source = MarkovSource(3, 1, 2, source_seed=11)
    p = source.transitions
    # Stationary distribution from the eigenvector of P^T for eigenvalue 1.
    values, vectors = np.linalg.eig(p.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    pi /= pi.sum()
    rows = [-sum(q * math.log2(q) for q in row if q > 0) for row in p]
    assert source.entropy_rate_bits() == pytest.approx(float(pi @ rows), rel=1e-9)


def test_each_context_allows_exactly_branching_symbols():
    source = MarkovSource(10, 2, 3, source_seed=1)
    assert ((source.transitions > 0).sum(axis=1) == 3).all()
    assert np.allclose(source.transitions.sum(axis=1), 1.0)


def test_sample_only_uses_allowed_transitions():
    source = MarkovSource(8, 2, 2, source_seed=2)
    tokens = source.sample(20_000, np.random.default_rng(1))
    for a, b, c in zip(tokens[:-2], tokens[1:-1], tokens[2:], strict=True):
        assert source.transitions[a * 8 + b, c] > 0


def test_corpus_is_a_function_of_source_seed_only():
    first = synthetic_splits(12, 2, 3, 5000, 1000, 1000, source_seed=9)[1]
    again = synthetic_splits(12, 2, 3, 5000, 1000, 1000, source_seed=9)[1]
    other = synthetic_splits(12, 2, 3, 5000, 1000, 1000, source_seed=10)[1]
    for split in ("train", "valid", "test"):
        assert np.array_equal(first[split], again[split])
    assert not np.array_equal(first["train"], other["train"])
    assert len(first["train"]) == 5000 and len(first["valid"]) == 1000
    assert not np.array_equal(first["valid"], first["test"])


def test_a_deterministic_source_has_zero_entropy():
    assert MarkovSource(5, 1, 1, source_seed=0).entropy_rate_bits() == pytest.approx(0.0)


def test_branching_larger_than_alphabet_is_refused():
    with pytest.raises(ValueError, match="branching=5"):
        MarkovSource(4, 1, 5, source_seed=0)
