"""The RHN output layer's hand-written backward (rhn_cli.models.rhn_output) against
autograd through torch.nn.functional.linear."""

from __future__ import annotations

import pytest
import torch

import rhn_cli.models.rhn_fast as rhn_fast
import rhn_cli.models.rhn_native as rhn_native
from rhn_cli.models import rhn_output


@pytest.fixture(params=["mkl", "onednn"])
def layer_inputs(request, monkeypatch):
    """x [3, 4, 6], weight [9, 6], bias [9] and a generator, with the output layer's weight
    gradient through MKL or oneDNN."""
    assert rhn_native.load() is not None
    onednn = request.param == "onednn"
    monkeypatch.setattr(rhn_fast, "weight_gradients_through_onednn", lambda *a: onednn)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen, requires_grad=True)
    weight = torch.randn(9, 6, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    return x, weight, bias, gen


def test_logits_and_gradients_equal_autograd_through_linear(layer_inputs):
    x, weight, bias, gen = layer_inputs
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


def test_with_the_training_loss_gradients_equal_autograd_s(layer_inputs):
    """As training runs it: the fused cross-entropy hands the layer a column-major
    gradient, which both weight-gradient libraries must take as autograd would."""
    from rhn_cli.engine.objective import sequence_loss

    x, weight, bias, gen = layer_inputs
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


def _tied_case():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(9, 6, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    tokens = torch.tensor([[0, 3, 3, 8], [5, 0, 2, 3]])  # repeated rows add up
    mix = torch.randn(6, 6, generator=gen)
    return weight, bias, tokens, mix


def test_tied_weights_get_one_gradient_built_in_the_output_layer_s(monkeypatch):
    """The lookup's rows are added into the output layer's dW, which becomes W's
    gradient as it is (no dense lookup gradient, no copy), equal to autograd's sum."""
    assert rhn_native.load() is not None
    weight, bias, tokens, mix = _tied_case()
    tied = rhn_output.TiedGradient()
    x = rhn_output.embedding(tokens, weight, tied)
    handed = []
    x.register_hook(lambda grad: handed.append(tied.d_weight.data_ptr()))  # before the lookup's
    rhn_output.logits(torch.tanh(x @ mix), weight, bias, tied).sin().sum().backward()
    ours = weight.grad
    assert handed == [ours.data_ptr()] and tied.d_weight is None

    plain = weight.detach().clone().requires_grad_(True)
    x = torch.nn.functional.embedding(tokens, plain)
    torch.nn.functional.linear(torch.tanh(x @ mix), plain, bias).sin().sum().backward()
    torch.testing.assert_close(ours, plain.grad, rtol=1e-5, atol=1e-6)


def test_a_lookup_in_another_backward_pass_gives_its_own_gradient():
    """dW left by one backward pass (through the output layer only) is not added to in a
    later one that reaches the lookup only: that one gets the dense gradient."""
    assert rhn_native.load() is not None
    weight, bias, tokens, mix = _tied_case()
    tied = rhn_output.TiedGradient()
    x = rhn_output.embedding(tokens, weight, tied)
    hidden = torch.tanh(x @ mix)
    logits = rhn_output.logits(hidden, weight, bias, tied)
    torch.autograd.grad(logits.sum(), [hidden], retain_graph=True)  # the output layer's only
    assert tied.d_weight is not None
    (ours,) = torch.autograd.grad(hidden.square().sum(), [weight])  # the lookup's only
    plain = weight.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(
        torch.tanh(torch.nn.functional.embedding(tokens, plain) @ mix).square().sum(), [plain]
    )
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_a_tied_rhn_model_trains_as_with_autograd_s_embedding_and_linear(monkeypatch):
    from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel

    assert rhn_native.load() is not None
    torch.manual_seed(0)
    model = RHNLanguageModel(RHNConfig(vocab_size=11, hidden_size=8, depth=2, tied=True))
    tokens = torch.randint(0, 11, (3, 5))
    masks = model.train().draw_masks(tokens)
    lookups = []
    real = rhn_output._Lookup.apply
    monkeypatch.setattr(rhn_output._Lookup, "apply", lambda *a: lookups.append(1) or real(*a))
    grads = []
    for fast in (True, False):
        if not fast:  # F.embedding and F.linear, differentiated by autograd
            monkeypatch.setattr(rhn_output, "_applies", lambda *tensors: False)
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens, model.initial_state(3), masks)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1)).backward()
        grads.append([p.grad for p in model.parameters()])
    assert lookups == [1]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
