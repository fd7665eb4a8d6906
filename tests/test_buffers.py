"""rhn_cli.kernels.buffers: the kernels' memory pools and their questions to the autograd
engine, through torch's private calls; where this torch lacks one (removed here), the
safe answer: nothing saved is overwritten, no gradient is handed over, no memory is lent
that someone may still hold."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from rhn_cli.kernels import buffers, native, output_layer, rhn_recurrence


class _Probe(torch.autograd.Function):
    """Identity whose backward records what buffers says there."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _Probe.seen.append((buffers.graph_kept(), buffers.backward_pass()))
        return grad


def _probed_backwards(retain):
    _Probe.seen = []
    x = torch.randn(3, requires_grad=True)
    y = _Probe.apply(_Probe.apply(x))  # two nodes of one pass
    y.sum().backward(retain_graph=retain)
    if retain:
        y.sum().backward()
    return _Probe.seen


def test_the_engine_says_whether_the_graph_is_kept_and_which_pass_runs():
    (kept_1, pass_1), (kept_2, pass_2) = _probed_backwards(retain=False)
    assert not kept_1 and not kept_2 and pass_1 == pass_2 is not None
    first, second, third, fourth = _probed_backwards(retain=True)
    assert first[0] and second[0] and not third[0] and not fourth[0]
    assert first[1] == second[1] != third[1] == fourth[1]


def _recurrence_gradients(inputs, mask):
    for t in inputs:
        t.grad = None
    outputs, final = rhn_recurrence.recurrence(*inputs, mask, z_states=0.3, training=True)
    pre = outputs.grad_fn.saved_tensors[4]
    before = pre.clone()
    torch.manual_seed(0)
    (outputs.sin().sum() + final.sum()).backward()
    return [t.grad for t in inputs], pre, before


@pytest.mark.parametrize("loop", ["native", "python"])
def test_without_the_keep_graph_query_the_saved_gates_are_left_intact(monkeypatch, loop):
    """Unable to tell whether the graph is kept, the backward treats it as kept: it
    writes nothing over the saved gates and hands none back, with the same gradients."""
    monkeypatch.setattr(native, "USE_NATIVE", loop == "native")
    gen = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)
        for shape in ((2, 4, 10), (2, 5), (3, 10, 5), (3, 10))
    ]
    mask = torch.bernoulli(torch.full((2, 5), 0.5, dtype=torch.float64), generator=gen) * 2
    torch.manual_seed(2)
    want, pre, before = _recurrence_gradients(inputs, mask)
    assert not torch.equal(pre, before)  # with the query: dp was written over the gates
    monkeypatch.delattr(torch._C._autograd, "_get_current_graph_task_keep_graph")
    assert buffers.graph_kept()
    buffers.forget()
    torch.manual_seed(2)
    got, pre, before = _recurrence_gradients(inputs, mask)
    assert torch.equal(pre, before)
    assert pre.data_ptr() not in [b.data_ptr() for b in buffers.spares()]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_without_the_pass_id_the_tied_lookup_gives_its_own_gradient(monkeypatch):
    """Unable to tell backward passes apart, the tied lookup never adds into the output
    layer's dW: not even into one left by an earlier pass (the output layer's only)."""
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    assert buffers.backward_pass() is None
    monkeypatch.setattr(output_layer, "applies", lambda *tensors: True)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[0, 3, 3, 8], [5, 0, 2, 3]])
    mix = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    tied = output_layer.TiedGradient()
    hidden = torch.tanh(output_layer.embedding(tokens, weight, tied) @ mix)
    logits = output_layer.logits(hidden, weight, bias, tied)
    torch.autograd.grad(logits.sum(), [hidden], retain_graph=True)  # the output layer's only
    (ours,) = torch.autograd.grad(hidden.square().sum(), [weight])  # the lookup's only
    plain = weight.detach().clone().requires_grad_(True)
    hidden = torch.tanh(torch.nn.functional.embedding(tokens, plain) @ mix)
    (want,) = torch.autograd.grad(hidden.square().sum(), [plain])
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)


def test_a_dropped_gradient_s_memory_is_lent_again_and_a_held_one_is_not():
    buffers.forget()
    like = torch.empty(0)
    first = buffers.gradient_buffer((6, 5), like)
    held = buffers.gradient_buffer((6, 5), like)
    assert held.data_ptr() != first.data_ptr()  # `first` is still held
    address = first.data_ptr()
    del first
    assert buffers.gradient_buffer((6, 5), like).data_ptr() == address
    assert buffers.gradient_buffer((6, 4), like).data_ptr() != held.data_ptr()


def test_without_the_storage_use_count_no_gradient_memory_is_kept(monkeypatch):
    """Unable to tell whether anyone still holds an earlier gradient, the pool keeps
    none: every gradient is new memory, freed when its tensor goes."""
    buffers.forget()
    like = torch.empty(0)
    pooled = weakref.ref(buffers.gradient_buffer((6, 5), like).untyped_storage())
    gc.collect()
    assert pooled() is not None  # with the use count: kept for the next gradient
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    buffers.forget()
    gradient = buffers.gradient_buffer((6, 5), like)
    gradient.fill_(1.0)
    unpooled = weakref.ref(gradient.untyped_storage())
    del gradient
    gc.collect()
    assert unpooled() is None


def test_spares_are_handed_out_once_by_shape_and_let_go_on_a_miss():
    buffers.forget()
    like = torch.empty(0, dtype=torch.float64)
    a, b = torch.empty(2, 3, dtype=torch.float64), torch.empty(4, dtype=torch.float64)
    buffers.give_back(a, b)
    assert buffers.spares() == (a, b)
    assert buffers.spare((4,), like) is b and buffers.spares() == (a,)
    assert buffers.spare((4,), like) is not a  # none of that shape left: a new one ...
    assert buffers.spares() == ()  # ... and the spares of other shapes let go
    buffers.give_back(a)
    assert buffers.spare((2, 3), torch.empty(0)) is not a  # another dtype
