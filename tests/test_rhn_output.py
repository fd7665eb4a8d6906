"""The RHN output layer's hand-written backward (rhn_cli.kernels.output_layer) against
autograd through torch.nn.functional.linear, and the tied embedding's gradient
hand-over against autograd through torch.nn.functional.embedding."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rhn_cli.kernels import native, output_layer, weight_gradient


@pytest.fixture(params=["mkl", "onednn"])
def layer_inputs(request, monkeypatch):
    """x [3, 4, 6], weight [9, 6], bias [9] and a generator, with the output layer's weight
    gradient through MKL or oneDNN."""
    assert native.load() is not None
    onednn = request.param == "onednn"
    monkeypatch.setattr(weight_gradient, "through_onednn", lambda *a: onednn)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen, requires_grad=True)
    weight = torch.randn(9, 6, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    return x, weight, bias, gen


def test_logits_and_gradients_equal_autograd_through_linear(layer_inputs):
    x, weight, bias, gen = layer_inputs
    upstream = torch.randn(3, 4, 9, generator=gen)
    results = []
    for layer in (output_layer.logits, torch.nn.functional.linear):
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
        sequence_loss(output_layer.logits(x, weight, bias), targets), (x, weight, bias)
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
        monkeypatch.setattr(native, "USE_NATIVE", False)
    x = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    weight = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    bias = torch.randn(3, dtype=dtype, requires_grad=True)
    with torch.set_grad_enabled(case != "no-grad"):
        logits = output_layer.logits(x, weight, bias)
    name = type(logits.grad_fn).__name__ if logits.grad_fn else None
    assert name in ((None,) if case == "no-grad" else ("AddmmBackward0",))
    torch.testing.assert_close(logits, torch.nn.functional.linear(x, weight, bias))


def _tied_case(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(9, 6, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(9, generator=gen, dtype=dtype, requires_grad=True)
    tokens = torch.tensor([[0, 3, 3, 8], [5, 0, 2, 3]])  # repeated rows add up
    mix = torch.randn(6, 6, generator=gen, dtype=dtype)
    return weight, bias, tokens, mix


class _NewTensors(TorchDispatchMode):
    """The tensors of ``shape`` that the operations under it return (in-place ones
    included, so a tensor added to in place shows up again)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.made = torch.Size(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for out in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(out, torch.Tensor) and out.shape == self.shape:
                self.made.append((func.__name__, out.data_ptr()))
        return result


def test_tied_weights_get_one_gradient_built_in_the_output_layer_s():
    """The lookup's rows are added into the output layer's dW, which becomes W's
    gradient as it is: the backward makes one [V, H] tensor (no dense lookup gradient,
    no sum, no copy), and W's gradient equals autograd's sum."""
    assert native.load() is not None

    def tied_loss(weight, bias, tokens, mix):
        tied = output_layer.TiedGradient()
        x = output_layer.embedding(tokens, weight, tied)
        return output_layer.logits(torch.tanh(x @ mix), weight, bias, tied).sin().sum()

    # Once unwatched: on a machine that has not met this shape, the backward first times
    # MKL against oneDNN (library_choice), which makes [V, H] products of its own.
    tied_loss(*_tied_case()).backward()
    weight, bias, tokens, mix = _tied_case()
    loss = tied_loss(weight, bias, tokens, mix)
    with _NewTensors(weight.shape) as watched:
        loss.backward()
    ours = weight.grad
    assert {address for _, address in watched.made} == {ours.data_ptr()}
    assert any(name.startswith("index_add_") for name, _ in watched.made)

    plain = weight.detach().clone().requires_grad_(True)
    x = torch.nn.functional.embedding(tokens, plain)
    torch.nn.functional.linear(torch.tanh(x @ mix), plain, bias).sin().sum().backward()
    torch.testing.assert_close(ours, plain.grad, rtol=1e-5, atol=1e-6)


# Other terms of the loss that reach the tied weight in the same backward pass.
EXTRA_TERMS = {
    "zero-times-sum": lambda weight, tokens: 0 * weight.sum(),
    "l2-in-the-loss": lambda weight, tokens: 0.3 * (weight**2).sum(),
    "another-lookup": lambda weight, tokens: (
        torch.nn.functional.embedding(tokens.flip(1), weight).cos().sum()
    ),
    "used-twice-more": lambda weight, tokens: weight.sum() * weight[2].square().sum(),
}


def _tied_and_plain_gradients(extra, dtype, tied_calls=1):
    """W's gradient of sin(logits) + extra(W) through the tied lookup and output layer,
    and through F.embedding and F.linear (autograd's)."""
    weight, bias, tokens, mix = _tied_case(dtype)
    grads = []
    for embedding, logits in (
        (output_layer.embedding, output_layer.logits),
        (torch.nn.functional.embedding, torch.nn.functional.linear),
    ):
        w = weight.detach().clone().requires_grad_(True)
        tied = (output_layer.TiedGradient(),) if embedding is output_layer.embedding else ()
        x = sum(embedding(tokens, w, *tied) for _ in range(tied_calls))
        loss = logits(torch.tanh(x @ mix), w, bias, *tied).sin().sum()
        (loss + extra(w, tokens)).backward()
        grads.append(w.grad)
    return grads


@pytest.mark.parametrize("extra", EXTRA_TERMS.values(), ids=EXTRA_TERMS.keys())
def test_other_loss_terms_on_the_tied_weight_keep_every_row(monkeypatch, extra):
    """An L2 term in the loss, 0 * W.sum(), another lookup of W: autograd sums them with
    the tied pair's gradient, and no row of the lookup's is lost (float64, the hand-written
    layer made to run there: exact to rounding)."""
    monkeypatch.setattr(output_layer, "applies", lambda *tensors: True)
    ours, want = _tied_and_plain_gradients(extra, torch.float64)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra", EXTRA_TERMS.values(), ids=EXTRA_TERMS.keys())
def test_other_loss_terms_keep_every_row_in_float32_as_training_runs(extra):
    assert native.load() is not None
    ours, want = _tied_and_plain_gradients(extra, torch.float32)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_a_tied_gradient_looked_up_twice_falls_back_to_dense_gradients(monkeypatch):
    """Two lookups through one TiedGradient: no hand-over (it is meant for one lookup and
    one output layer), and the gradient is still autograd's."""
    monkeypatch.setattr(output_layer, "applies", lambda *tensors: True)
    no_extra = EXTRA_TERMS["zero-times-sum"]
    ours, want = _tied_and_plain_gradients(no_extra, torch.float64, tied_calls=2)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)


def test_a_tied_gradient_ties_one_weight():
    weight, bias, tokens, mix = _tied_case()
    tied = output_layer.TiedGradient()
    x = output_layer.embedding(tokens, weight, tied)
    with pytest.raises(ValueError, match="ties one weight"):
        output_layer.logits(x, weight.detach().clone().requires_grad_(True), bias, tied)


def test_a_lookup_in_another_backward_pass_gives_its_own_gradient():
    """dW left by one backward pass (through the output layer only) is not added to in a
    later one that reaches the lookup only: that one gets the dense gradient."""
    assert native.load() is not None
    weight, bias, tokens, mix = _tied_case()
    tied = output_layer.TiedGradient()
    x = output_layer.embedding(tokens, weight, tied)
    hidden = torch.tanh(x @ mix)
    logits = output_layer.logits(hidden, weight, bias, tied)
    torch.autograd.grad(logits.sum(), [hidden], retain_graph=True)  # the output layer's only
    (ours,) = torch.autograd.grad(hidden.square().sum(), [weight])  # the lookup's only
    plain = weight.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(
        torch.tanh(torch.nn.functional.embedding(tokens, plain) @ mix).square().sum(), [plain]
    )
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def _node_names(tensor):
    """The names of the autograd nodes behind ``tensor``."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("extra_term", [False, True], ids=["loss", "loss-plus-l2-term"])
def test_a_tied_rhn_model_trains_as_with_autograd_s_embedding_and_linear(monkeypatch, extra_term):
    from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel

    assert native.load() is not None
    torch.manual_seed(0)
    model = RHNLanguageModel(RHNConfig(vocab_size=11, hidden_size=8, depth=2, tied=True))
    tokens = torch.randint(0, 11, (3, 5))
    masks = model.train().draw_masks(tokens)
    grads = []
    for fast in (True, False):
        if not fast:  # F.embedding and F.linear, differentiated by autograd
            monkeypatch.setattr(output_layer, "applies", lambda *tensors: False)
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens, model.initial_state(3), masks)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
        if extra_term:
            loss = loss + 1e-2 * model.embedding.weight.square().sum()
        assert ("_LookupBackward" in _node_names(logits)) == fast
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
