"""The RHN output layer's hand-written backward (rhn_cli.models.rhn_output) against
autograd through torch.nn.functional.linear."""

from __future__ import annotations

import pytest
import torch

import rhn_cli.models.rhn_fast as rhn_fast
import rhn_cli.models.rhn_native as rhn_native
from rhn_cli.models import rhn_output


@pytest.mark.parametrize("weight_gradient", ["mkl", "onednn"])
def test_logits_and_gradients_equal_autograd_through_linear(monkeypatch, weight_gradient):
    assert rhn_native.load() is not None
    onednn = weight_gradient == "onednn"
    monkeypatch.setattr(rhn_fast, "weight_gradients_through_onednn", lambda *a: onednn)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen, requires_grad=True)
    weight = torch.randn(9, 6, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 4, 9, generator=gen)
    results = []
    for layer in (rhn_output.logits, torch.nn.functional.linear):
        logits = layer(x, weight, bias)
        grads = torch.autograd.grad((logits * upstream).sum(), (x, weight, bias))
        results.append((logits, *grads))
    ours, want = results
    assert type(ours[0].grad_fn).__name__ == "_LogitsBackward"
    for got, expected in zip(ours, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_gradient", ["mkl", "onednn"])
def test_with_the_training_loss_gradients_equal_autograd_s(monkeypatch, weight_gradient):
    """As training runs it: the fused cross-entropy hands the layer a column-major
    gradient, which both weight-gradient libraries must take as autograd would."""
    from rhn_cli.engine.objective import sequence_loss

    assert rhn_native.load() is not None
    onednn = weight_gradient == "onednn"
    monkeypatch.setattr(rhn_fast, "weight_gradients_through_onednn", lambda *a: onednn)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen, requires_grad=True)
    weight = torch.randn(9, 6, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    targets = torch.randint(0, 9, (3, 4), generator=gen)
    ours = torch.autograd.grad(
        sequence_loss(rhn_output.logits(x, weight, bias), targets), (x, weight, bias)
    )
    logits = torch.nn.functional.linear(x, weight, bias)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 9), targets.reshape(-1), reduction="sum"
    )
    want = torch.autograd.grad(total / 3, (x, weight, bias))
    for got, expected in zip(ours, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["float64", "no-grad", "python-loop"])
def test_elsewhere_the_layer_is_plain_linear(monkeypatch, case):
    """float64, evaluation and the Python-loop fallback keep autograd's linear."""
    dtype = torch.float64 if case == "float64" else torch.float32
    if case == "python-loop":
        monkeypatch.setattr(rhn_fast, "NATIVE", False)
    x = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    weight = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    bias = torch.randn(3, dtype=dtype, requires_grad=True)
    with torch.set_grad_enabled(case != "no-grad"):
        logits = rhn_output.logits(x, weight, bias)
    name = type(logits.grad_fn).__name__ if logits.grad_fn else None
    assert name in ((None,) if case == "no-grad" else ("AddmmBackward0",))
    torch.testing.assert_close(logits, torch.nn.functional.linear(x, weight, bias))
