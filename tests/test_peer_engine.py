"""The training mechanics of the peer references, each against an independent computation.

Optimisers and clipping are re-derived in NumPy from the reference formulas
(``../shared/spec/peers_zoneout_grid_gru.md``: Blocks' Adam + StepClipping, torch
optim.rmsprop as char-rnn uses it, the WildML tutorial's sgd_step); the batching modes
against re-implementations of the references' data loaders.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rhn_cli.data.batching import (
    PAD_TARGET,
    chunk_batches,
    minibatches,
    sentence_batches,
    sentences,
    stream_split,
)
from rhn_cli.engine.optim import clip_and_step, make_optimizer
from rhn_cli.engine.regularizers import norm_stabilizer, weight_noise


def _params(seed=0):
    rng = np.random.default_rng(seed)
    w = torch.nn.Parameter(torch.tensor(rng.normal(size=(3, 4))))
    b = torch.nn.Parameter(torch.tensor(rng.normal(size=4)))
    return [w, b]


def _grads(step, seed=1):
    rng = np.random.default_rng(seed + step)
    return [rng.normal(size=(3, 4)) * 3, rng.normal(size=4) * 3]


def _run(config, steps=5, clip="none", threshold=1.0):
    params = _params()
    optimizer = make_optimizer({"rmsprop_decay": 0.95, **config}, params)
    for step in range(steps):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = torch.tensor(g)
        clip_and_step(optimizer, params, clip, threshold)
    return [p.detach().numpy() for p in params]


def test_adam_is_blocks_adam_with_the_bias_correction_in_the_learning_rate():
    lr, b1, b2, eps = 2e-3, 0.9, 0.999, 1e-8
    theta = [p.detach().numpy().copy() for p in _params()]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    for step in range(5):
        t = step + 1
        for k, g in enumerate(_grads(step)):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            theta[k] = theta[k] - lr_t * m[k] / (np.sqrt(v[k]) + eps)
    got = _run({"optimizer": "adam", "learning_rate": lr})
    for a, b in zip(got, theta, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_update_norm_clipping_rescales_the_adam_step_not_the_gradient():
    """Blocks CompositeRule([Adam, StepClipping(c)]): the moments see the raw gradient and
    the step is scaled to norm c."""
    lr, b1, b2, eps, c = 0.5, 0.9, 0.999, 1e-8, 0.05
    theta = [p.detach().numpy().copy() for p in _params()]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    for step in range(4):
        t = step + 1
        steps = []
        for k, g in enumerate(_grads(step)):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            steps.append(lr_t * m[k] / (np.sqrt(v[k]) + eps))
        norm = math.sqrt(sum(float((s * s).sum()) for s in steps))
        scale = min(1.0, c / norm)
        assert scale < 1  # the test must exercise the clipping
        theta = [t_ - s * scale for t_, s in zip(theta, steps, strict=True)]
    got = _run({"optimizer": "adam", "learning_rate": lr}, steps=4, clip="update_norm", threshold=c)
    for a, b in zip(got, theta, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_charrnn_rmsprop_with_elementwise_gradient_clamp():
    """optim.rmsprop: m = a m + (1-a) g^2; p -= lr g / (sqrt(m) + 1e-8); grad clamped to +-c."""
    lr, a, c = 2e-3, 0.95, 2.0
    theta = [p.detach().numpy().copy() for p in _params()]
    m = [np.zeros_like(t) for t in theta]
    for step in range(5):
        for k, g in enumerate(_grads(step)):
            g = np.clip(g, -c, c)
            m[k] = a * m[k] + (1 - a) * g * g
            theta[k] = theta[k] - lr * g / (np.sqrt(m[k]) + 1e-8)
    assert np.abs(np.concatenate([g.ravel() for g in _grads(0)])).max() > c
    got = _run({"optimizer": "rmsprop", "learning_rate": lr}, clip="grad_value", threshold=c)
    for x, y in zip(got, theta, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


def test_tutorial_rmsprop_has_eps_inside_the_square_root():
    lr, d = 1e-3, 0.9
    theta = [p.detach().numpy().copy() for p in _params()]
    m = [np.zeros_like(t) for t in theta]
    for step in range(5):
        for k, g in enumerate(_grads(step)):
            m[k] = d * m[k] + (1 - d) * g * g
            theta[k] = theta[k] - lr * g / np.sqrt(m[k] + 1e-6)
    got = _run({"optimizer": "rmsprop_eps_inside", "learning_rate": lr, "rmsprop_decay": d})
    for x, y in zip(got, theta, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


def test_gradient_norm_clipping_and_no_clipping():
    lr, c = 0.1, 1.0
    theta = [p.detach().numpy().copy() for p in _params()]
    for step in range(3):
        grads = _grads(step)
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        theta = [t - lr * g * min(1.0, c / norm) for t, g in zip(theta, grads, strict=True)]
    got = _run({"optimizer": "sgd", "learning_rate": lr}, steps=3, clip="grad_norm", threshold=c)
    for x, y in zip(got, theta, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)
    unclipped = [p.detach().numpy().copy() for p in _params()]
    for step in range(3):
        unclipped = [t - lr * g for t, g in zip(unclipped, _grads(step), strict=True)]
    got = _run({"optimizer": "sgd", "learning_rate": lr}, steps=3, clip="none")
    for x, y in zip(got, unclipped, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


# -- batching -----------------------------------------------------------------------


def test_chunks_as_the_zoneout_stream_after_a_random_offset():
    tokens = np.arange(1000)
    rng = np.random.default_rng(5)
    offset = int(np.random.default_rng(5).integers(0, 10))
    count, batches = chunk_batches(tokens, 4, 9, rng)
    batches = list(batches)
    # floor((n - offset) / 10) - 1 chunks of 10, in batches of 4 with a partial last one.
    chunks = (1000 - offset) // 10 - 1
    assert count == len(batches) == math.ceil(chunks / 4)
    assert [len(b[0]) for b in batches][-1] == chunks - 4 * (count - 1)
    starts = sorted(int(x[0]) for inputs, _ in batches for x in inputs)
    assert starts == [offset + 10 * k for k in range(chunks)]  # every chunk once
    assert starts != [int(x[0]) for inputs, _ in batches for x in inputs]  # shuffled
    for inputs, targets in batches:
        np.testing.assert_array_equal(targets, inputs + 1)
        assert inputs.shape[1] == 9


def test_sentences_start_with_the_end_symbol_and_are_padded():
    eos = 0
    stream = np.array([5, 6, 0, 7, 0, 8, 9, 4, 0, 3])  # the trailing 3 has no end: dropped
    found = sentences(stream, eos)
    assert [s.tolist() for s in found] == [[0, 5, 6, 0], [0, 7, 0], [0, 8, 9, 4, 0]]
    count, batches = sentence_batches(found, 2, None)
    batches = list(batches)
    assert count == 2
    inputs, targets = batches[0]
    np.testing.assert_array_equal(inputs, [[0, 5, 6], [0, 7, 0]])
    np.testing.assert_array_equal(targets, [[5, 6, 0], [7, 0, PAD_TARGET]])


def _charrnn_loader(data, batch_size, seq_length, fractions=(0.95, 0.05)):
    """CharSplitLMMinibatchLoader, transcribed: x/y batches per split."""
    length = len(data) // (batch_size * seq_length) * batch_size * seq_length
    data = data[:length]
    ydata = data.copy()
    ydata[:-1] = data[1:]
    ydata[-1] = data[0]
    x = data.reshape(batch_size, -1)
    y = ydata.reshape(batch_size, -1)
    nbatches = length // (batch_size * seq_length)
    x_batches = np.split(x, nbatches, axis=1)
    y_batches = np.split(y, nbatches, axis=1)
    ntrain = math.floor(nbatches * fractions[0])
    nval = math.floor(nbatches * fractions[1])
    ntest = nbatches - nval - ntrain
    bounds = {
        "train": (0, ntrain),
        "valid": (ntrain, ntrain + nval),
        "test": (nbatches - ntest, nbatches),
    }
    return {
        k: list(zip(x_batches[a:b], y_batches[a:b], strict=True)) for k, (a, b) in bounds.items()
    }


@pytest.mark.parametrize("length", [10_000, 10_437])
def test_stream_split_yields_charrnn_minibatches(length):
    data = np.random.default_rng(0).integers(0, 50, size=length)
    B, T = 5, 7
    expected = _charrnn_loader(data, B, T)
    parts = stream_split(data, B, T)
    for split, batches in expected.items():
        if not batches:
            assert len(parts[split]) == 0
            continue
        got = list(minibatches(parts[split], B, T, split))
        assert len(got) == len(batches)
        for (x, y), (ex, ey) in zip(got, batches, strict=True):
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)


# -- regularisers --------------------------------------------------------------------


def test_norm_stabilizer_matches_its_definition():
    hidden = np.random.default_rng(0).normal(size=(3, 6, 4))
    norms = np.linalg.norm(hidden, axis=-1)
    expected = 50 * np.mean(np.sum((norms[:, 1:] - norms[:, :-1]) ** 2, axis=1)) / 6
    got = norm_stabilizer(torch.tensor(hidden), 50.0).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_weight_noise_perturbs_weight_matrices_only_and_restores_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 2))
    model.register_parameter("initial", torch.nn.Parameter(torch.zeros(3)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.tensor([1, 2, 3])
    with weight_noise(model, 0.5):
        during = {k: v.detach().clone() for k, v in model.named_parameters()}
        model(x).sum().backward()
        noisy_weight = model[1].weight.detach().clone()
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name])  # restored exactly
        changed = not torch.equal(during[name], before[name])
        assert changed == (value.dim() >= 2), name
    # The gradient was taken at the noisy weights: d(sum(W e + b))/d e rows use noisy W.
    expected = noisy_weight.sum(dim=0).expand(3, -1)
    torch.testing.assert_close(model[0].weight.grad[[1, 2, 3]], expected)


# -- zoneout of RHN states -------------------------------------------------------------


def test_rhn_state_zoneout_is_the_expectation_at_eval_and_old_or_new_in_training():
    from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel

    torch.manual_seed(0)
    z = 0.3
    plain = RHNLanguageModel(RHNConfig(vocab_size=7, hidden_size=5, depth=2, tied=False))
    zoned = RHNLanguageModel(
        RHNConfig(vocab_size=7, hidden_size=5, depth=2, tied=False, z_states=z)
    )
    zoned.load_state_dict(plain.state_dict())
    plain.double().eval()
    zoned.double()
    tokens = torch.randint(0, 7, (3, 6))
    state = torch.randn(1, 3, 5, dtype=torch.float64)

    # Eval: s_t = z s_{t-1} + (1 - z) RHN(s_{t-1}, x_t), one step at a time.
    zoned.eval()
    _, _, hidden = zoned(tokens, state, return_hidden=True)
    s = state
    for t in range(6):
        _, new = plain(tokens[:, t : t + 1], s)
        s = z * s + (1 - z) * new
        torch.testing.assert_close(hidden[:, t], s[0], rtol=0, atol=1e-12)

    # Train (no dropout configured): every unit is its old value or the RHN update.
    zoned.train()
    s = torch.randn(1, 400, 5, dtype=torch.float64)
    x = torch.randint(0, 7, (400, 1))
    _, out = zoned(x, s)
    _, new = plain(x, s)
    is_old = torch.isclose(out, s, rtol=0, atol=0)
    is_new = torch.isclose(out, new, rtol=0, atol=0)
    assert bool((is_old | is_new).all())
    kept, total = int(is_old.sum()), is_old.numel()
    assert abs(kept / total - z) < 0.04
