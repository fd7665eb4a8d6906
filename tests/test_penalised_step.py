"""rhn_cli.engine.optim.penalised_step: the L2 term, clipping and the optimiser's step
after backward(), against a hand computation and against the generic path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rhn_cli.engine.optim import make_optimizer, penalised_step
from rhn_cli.kernels import native


def _setup(dtype=torch.float64, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(7, 5), (5,), (3, 4, 6)]
    params = [torch.nn.Parameter(torch.tensor(rng.normal(size=s), dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.tensor(rng.normal(size=p.shape) * scale, dtype=dtype)
    return params


@pytest.mark.parametrize("clip", ["grad_norm", "none"])
@pytest.mark.parametrize("scale", [10.0, 0.01], ids=["clipped", "not-clipped"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_sgd_step_is_p_minus_lr_c_times_g_plus_wd_p(clip, scale, weight_decay):
    assert native.load() is not None
    params = _setup(scale=scale)
    before = [p.detach().clone().numpy() for p in params]
    grads = [p.grad.clone().numpy() for p in params]
    optimizer = make_optimizer({"optimizer": "sgd", "learning_rate": 0.7}, params)
    norm, penalty = penalised_step(optimizer, params, clip, 1.5, weight_decay)

    full = [g + weight_decay * p for g, p in zip(grads, before, strict=True)]
    want_norm = math.sqrt(sum(float((g**2).sum()) for g in full))
    c = 1.5 / want_norm if clip == "grad_norm" and want_norm > 1.5 else 1.0
    if clip == "grad_norm" and scale > 1:
        assert c < 1.0  # the clip is active
    if weight_decay == 0 and scale < 1:
        assert c == 1.0  # and here it is not
    assert norm.item() == pytest.approx(want_norm, rel=1e-12)
    assert penalty == pytest.approx(weight_decay * 0.5 * sum((p**2).sum() for p in before))
    for p, old, g in zip(params, before, full, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), old - 0.7 * c * g, rtol=0, atol=1e-12)


def test_the_fused_and_the_generic_path_agree_in_float32(monkeypatch):
    results = []
    for fused in (True, False):
        if not fused:  # the generic path, as without the native kernels
            monkeypatch.setattr(native, "USE_NATIVE", False)
        params = _setup(torch.float32, scale=10.0)
        optimizer = make_optimizer({"optimizer": "sgd", "learning_rate": 0.7}, params)
        norm, penalty = penalised_step(optimizer, params, "grad_norm", 1.5, 0.3)
        results.append((norm.item(), penalty, [p.detach().clone() for p in params]))
    (norm, penalty, params), (want_norm, want_penalty, want) = results
    assert norm == pytest.approx(want_norm, rel=1e-6)
    assert penalty == pytest.approx(want_penalty, rel=1e-6)
    for got, expected in zip(params, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "case", ["fused", "momentum", "adam", "grad_value", "a-missing-gradient", "no-native"]
)
def test_only_plain_sgd_with_every_gradient_takes_the_fused_passes(monkeypatch, case):
    """The fused passes leave p.grad as backward() made it; the generic path adds the
    L2 term into it: which one ran shows there."""
    if case == "no-native":
        monkeypatch.setattr(native, "load", lambda: None)
    params = _setup()
    config = {"optimizer": "adam" if case == "adam" else "sgd", "learning_rate": 0.1}
    optimizer = make_optimizer(config, params)
    if case == "momentum":
        optimizer.param_groups[0]["momentum"] = 0.9
    if case == "a-missing-gradient":
        params[1].grad = None
    grad = params[0].grad.clone()
    clip = "grad_value" if case == "grad_value" else "grad_norm"
    penalised_step(optimizer, params, clip, 1.0, 0.5)
    assert torch.equal(params[0].grad, grad) == (case == "fused")


def test_a_non_finite_gradient_changes_nothing():
    params = _setup()
    params[2].grad[0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in params]
    optimizer = make_optimizer({"optimizer": "sgd", "learning_rate": 0.1}, params)
    norm, _ = penalised_step(optimizer, params, "grad_norm", 1.0, 0.1)
    assert math.isnan(norm.item())
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p.detach(), old)
