"""A seeded sparse k-th order Markov source with a known entropy rate.

The built-in ``synthetic`` corpus lets the quickstart train without a download and
gives the user an absolute yardstick: no model can do better on average than the
source's entropy rate

    H = sum_c pi(c) * H(X_next | context = c)     [bits per symbol]

where c runs over the ``alphabet_size ** order`` contexts and pi is the chain's
stationary distribution. Each context allows only ``branching`` next symbols, with
probabilities drawn from a flat Dirichlet, so the chain is far from uniform and the
gap between a unigram model and the true source is large.

Everything is a pure function of the parameters and ``source_seed``: two runs with
different training seeds see exactly the same corpus.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

_MAX_TRIES = 100


@dataclass(frozen=True)
class MarkovSource:
    """Sparse random Markov chain of order ``order`` over ``alphabet_size`` symbols."""

    alphabet_size: int
    order: int
    branching: int
    source_seed: int
    transitions: np.ndarray = field(init=False, repr=False)  # [contexts, alphabet] probabilities
    stationary: np.ndarray = field(init=False, repr=False)  # [contexts]

    def __post_init__(self) -> None:
        if not 1 <= self.branching <= self.alphabet_size:
            raise ValueError(
                f"branching={self.branching} must be between 1 and "
                f"alphabet_size={self.alphabet_size}"
            )
        # In the rare case the chain comes out periodic it has no limiting distribution:
        # redraw from a derived seed, so the result stays a function of source_seed.
        for attempt in range(_MAX_TRIES):
            rng = np.random.default_rng([self.source_seed, attempt])
            transitions = self._draw_transitions(rng)
            stationary = _stationary_distribution(transitions, self._successor_table())
            if stationary is not None:
                object.__setattr__(self, "transitions", transitions)
                object.__setattr__(self, "stationary", stationary)
                return
        raise ValueError(
            f"no ergodic chain found for alphabet_size={self.alphabet_size}, order={self.order}, "
            f"branching={self.branching}; increase branching"
        )

    @property
    def num_contexts(self) -> int:
        return self.alphabet_size**self.order

    def _draw_transitions(self, rng: np.random.Generator) -> np.ndarray:
        # Every context may emit the symbol that follows it on a (randomly relabelled)
        # de Bruijn cycle, which visits all contexts: the chain is always irreducible.
        # The other branching - 1 allowed symbols are random.
        relabel = rng.permutation(self.alphabet_size)
        cycle = [int(relabel[a]) for a in _de_bruijn(self.alphabet_size, self.order)]
        on_cycle = {}
        for i in range(len(cycle)):
            context = 0
            for j in range(self.order):
                context = context * self.alphabet_size + cycle[(i + j) % len(cycle)]
            on_cycle[context] = cycle[(i + self.order) % len(cycle)]
        probs = np.zeros((self.num_contexts, self.alphabet_size))
        for context in range(self.num_contexts):
            others = [a for a in range(self.alphabet_size) if a != on_cycle[context]]
            extra = rng.choice(others, size=self.branching - 1, replace=False).tolist()
            probs[context, [on_cycle[context], *extra]] = rng.dirichlet(np.ones(self.branching))
        return probs

    def _successor_table(self) -> np.ndarray:
        """successor[c, a]: the context after emitting symbol a in context c."""
        contexts = np.arange(self.num_contexts)[:, None]
        symbols = np.arange(self.alphabet_size)[None, :]
        return (contexts * self.alphabet_size + symbols) % self.num_contexts

    def entropy_rate_bits(self) -> float:
        """Exact entropy rate of the source in bits per symbol."""
        p = self.transitions
        with np.errstate(divide="ignore", invalid="ignore"):
            per_context = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
        return float(self.stationary @ per_context)

    def sample(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """A stationary sample path of ``length`` symbols (int64)."""
        cumulative = [list(accumulate(row)) for row in self.transitions.tolist()]
        context = int(rng.choice(self.num_contexts, p=self.stationary))
        uniforms = rng.random(length).tolist()
        out = np.empty(length, dtype=np.int64)
        top = self.alphabet_size - 1
        for i, u in enumerate(uniforms):
            symbol = min(bisect.bisect_right(cumulative[context], u), top)
            # Guard against float round-off landing on a zero-probability symbol.
            while self.transitions[context, symbol] == 0.0:
                symbol -= 1
            out[i] = symbol
            context = (context * self.alphabet_size + symbol) % self.num_contexts
        return out


def _stationary_distribution(transitions: np.ndarray, successor: np.ndarray) -> np.ndarray | None:
    """Stationary distribution over contexts, or None if the chain is not irreducible."""
    n = transitions.shape[0]
    edges = [successor[c, transitions[c] > 0].tolist() for c in range(n)]
    reverse: list[list[int]] = [[] for _ in range(n)]
    for c, targets in enumerate(edges):
        for t in targets:
            reverse[t].append(c)
    if not (_reaches_all(edges) and _reaches_all(reverse)):
        return None
    flow = np.zeros((n, n))
    rows = np.repeat(np.arange(n), transitions.shape[1])
    np.add.at(flow, (rows, successor.ravel()), transitions.ravel())
    pi = np.full(n, 1.0 / n)
    for _ in range(20000):
        nxt = pi @ flow
        if np.abs(nxt - pi).sum() < 1e-13:
            return nxt / nxt.sum()
        pi = nxt
    return None  # periodic: no convergence from the uniform start


def _de_bruijn(k: int, n: int) -> list[int]:
    """The lexicographically least de Bruijn sequence B(k, n) (Fredricksen-Maiorana)."""
    a = [0] * (n + 1)
    sequence: list[int] = []

    def extend(t: int, p: int) -> None:
        if t > n:
            if n % p == 0:
                sequence.extend(a[1 : p + 1])
            return
        a[t] = a[t - p]
        extend(t + 1, p)
        for j in range(a[t - p] + 1, k):
            a[t] = j
            extend(t + 1, t)

    extend(1, 1)
    return sequence


def _reaches_all(edges: list[list[int]]) -> bool:
    seen = {0}
    frontier = [0]
    while frontier:
        node = frontier.pop()
        for t in edges[node]:
            if t not in seen:
                seen.add(t)
                frontier.append(t)
    return len(seen) == len(edges)


def synthetic_splits(
    alphabet_size: int,
    order: int,
    branching: int,
    train_tokens: int,
    valid_tokens: int,
    test_tokens: int,
    source_seed: int,
) -> tuple[MarkovSource, dict[str, np.ndarray]]:
    """The source and independent train/valid/test sample paths drawn from it."""
    source = MarkovSource(alphabet_size, order, branching, source_seed)
    sizes = {"train": train_tokens, "valid": valid_tokens, "test": test_tokens}
    splits = {
        name: source.sample(size, np.random.default_rng([source_seed, 1000 + i]))
        for i, (name, size) in enumerate(sizes.items())
    }
    return source, splits
