"""The reference's final evaluations: full (B = 1) perplexity and MC dropout."""

from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch

from rhn_cli.engine import evaluation
from rhn_cli.engine.evaluation import (
    full_perplexity,
    mc_dropout_perplexity,
    mc_masks,
    token_log_probs,
)
from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = RHNConfig(
        vocab_size=11,
        hidden_size=12,
        depth=3,
        tied=True,
        init_scale=0.3,
        drop_x=0.25,
        drop_i=0.5,
        drop_h=0.25,
        drop_o=0.5,
    )
    return RHNLanguageModel(config).double()


def sample_masks(masks: dict, sample: int) -> dict:
    """The masks of one MC sample: row ``sample`` of every mask tensor."""

    def pick(mask):
        return None if mask is None else mask[[sample]]

    return {
        "x": pick(masks["x"]),
        "i": [pick(m) for m in masks["i"]],
        "h": [pick(m) for m in masks["h"]],
        "o": pick(masks["o"]),
    }


@pytest.fixture
def stream():
    return np.random.default_rng(1).integers(0, 11, 257)


def token_by_token_perplexity(model, tokens):
    """The reference mtest: B = T = 1, one call per token, state carried, no dropout."""
    model.eval()
    state = model.initial_state(1)
    total = 0.0
    with torch.no_grad():
        for k in range(len(tokens) - 1):
            logits, state = model(torch.tensor([[tokens[k]]]), state)
            total -= torch.log_softmax(logits[0, 0], -1)[tokens[k + 1]].item()
    return math.exp(total / (len(tokens) - 1))


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_chunked_full_evaluation_equals_token_by_token(model, stream, chunk):
    expected = token_by_token_perplexity(model, stream)
    assert full_perplexity(model, stream, chunk=chunk) == pytest.approx(expected, rel=1e-12)


def test_full_evaluation_predicts_every_token_after_the_first(model, stream):
    assert token_log_probs(model, stream).shape == (1, len(stream) - 1)


def test_batched_mc_samples_equal_sequential_samples_with_the_same_masks(model, stream):
    torch.manual_seed(5)
    masks = mc_masks(model, 6)
    together = token_log_probs(model, stream, rows=6, masks=masks, chunk=50)
    one_by_one = torch.cat(
        [
            token_log_probs(model, stream, rows=1, masks=sample_masks(masks, r), chunk=13)
            for r in range(6)
        ]
    )
    torch.testing.assert_close(together, one_by_one, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(together[0], together[1])  # different masks, different samples


def test_mc_masks_follow_the_reference_shapes(model):
    masks = mc_masks(model, 4)
    assert masks["x"].shape == (4, 1, 1)  # one scalar per sample: the whole stream
    assert set(masks["x"].flatten().tolist()) <= {0.0, 1 / 0.75}
    assert masks["i"][0].shape == (4, 12) and masks["h"][0].shape == (4, 12)
    assert masks["o"].shape == (4, 12)


def test_mc_perplexity_averages_probabilities_and_rejects_bad_samples(model, stream, monkeypatch):
    # Three fixed samples: probabilities p, q, and a degenerate one (perplexity >= 500).
    n = len(stream) - 1
    p = torch.full((n,), 0.2, dtype=torch.float64)
    q = torch.full((n,), 0.05, dtype=torch.float64)
    bad = torch.full((n,), 1e-4, dtype=torch.float64)
    batches = iter([torch.stack([p, bad]).log(), torch.stack([q]).log()])
    monkeypatch.setattr(evaluation, "token_log_probs", lambda *a, **k: next(batches))
    result = mc_dropout_perplexity(model, stream, samples=2, batch=2)
    assert result.rejected == 1 and result.samples == 2
    # The perplexity of the averaged probabilities, not the mean of the perplexities.
    assert result.perplexity == pytest.approx(1 / 0.125)


def test_mc_perplexity_end_to_end_is_close_to_the_dropout_free_one(model, stream):
    torch.manual_seed(0)
    result = mc_dropout_perplexity(model, stream, samples=40, batch=16, chunk=64)
    plain = full_perplexity(model, stream)
    assert result.samples == 40
    assert 0.5 * plain < result.perplexity < 2.0 * plain


def test_evaluation_never_imports_training():
    """Training imports evaluation (the per-epoch and final numbers), never the reverse,
    not even inside a function: the engine's modules form no import circle."""
    tree = ast.parse(inspect.getsource(evaluation))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert "rhn_cli.engine.train" not in imported, sorted(imported)
