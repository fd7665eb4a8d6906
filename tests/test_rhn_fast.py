"""The RHN layer's fast path (hand-written backward, rhn_cli.kernels.rhn_recurrence) against
the straightforward implementations.

Two independent references: rhn's own autograd loop (``RHNLayer.fast = False``: fused
[2H, H] weights, differentiated by autograd) and ``benchmarks/rhn_baseline.py`` (the
reference TF structure: one ``nn.Linear`` per transform on ``[x * m_i, s * m_h]``, input
projected inside the loop), into which the weights are copied. Outputs and gradients
(of every parameter and of the initial state, through a random linear function of the
logits and the final state) must agree to float64 rounding, for recurrence depths 1-3,
one and two layers, B and T of 1 and more, shared or separate H/T masks, no masks
(eval), and state zoneout in training and in eval; finite differences check the
Function itself. The memory claims are checked through what autograd saves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rhn_cli.kernels import (
    buffers,
    library_choice,
    native,
    onednn,
    rhn_recurrence,
    weight_gradient,
)
from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel

_spec = importlib.util.spec_from_file_location(
    "rhn_baseline", Path(__file__).resolve().parents[1] / "benchmarks" / "rhn_baseline.py"
)
baseline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baseline)

TOL = 1e-10


@pytest.fixture(params=["native", "python"])
def loop(request, monkeypatch):
    """The fast path's time loop: the C++ one (kernels/csrc, which must build here) or the
    Python one it falls back to."""
    use_native = request.param == "native"
    monkeypatch.setattr(native, "USE_NATIVE", use_native)
    if use_native:
        assert native.load() is not None, "the native kernels could not be built"
    return request.param


def _model(depth, num_layers=1, tied_noise=True, z_states=0.0, dtype=torch.float64, H=5):
    cfg = RHNConfig(
        vocab_size=7,
        hidden_size=H,
        depth=depth,
        num_layers=num_layers,
        tied=False,
        drop_x=0.2,
        drop_i=0.4,
        drop_h=0.4,
        drop_o=0.3,
        tied_noise=tied_noise,
        z_states=z_states,
    )
    torch.manual_seed(0)
    model = RHNLanguageModel(cfg).to(dtype)
    with torch.no_grad():  # gates away from 0 and 1, so every term matters
        for p in model.parameters():
            p.mul_(10.0)
        for layer in model.layers:
            layer.bias[:, H:].uniform_(-1.0, 1.0)
    return model


def _run(model, tokens, state, masks, seed=0):
    """Logits, final state and the gradients of a random linear loss of both, by name."""
    model.zero_grad(set_to_none=True)
    state = state.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the zoneout draws
    logits, final = model(tokens, state, masks)
    gen = torch.Generator().manual_seed(1)  # the same weights in every dtype
    loss = (logits * torch.randn(logits.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    return logits.detach(), final.detach(), state.grad


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def _set_fast(model, fast):
    for layer in model.layers:
        layer.fast = fast


CASES = [
    pytest.param(depth, layers, B, T, id=f"D{depth}-L{layers}-B{B}-T{T}")
    for depth, layers, B, T in [
        (1, 1, 1, 1),
        (1, 1, 3, 4),
        (2, 1, 1, 4),
        (2, 2, 3, 1),
        (3, 1, 3, 4),
        (3, 2, 2, 5),
    ]
]


@pytest.mark.parametrize("masks_kind", ["shared", "separate", "none"])
@pytest.mark.parametrize("z_states", [0.0, 0.3], ids=["no-zoneout", "zoneout"])
@pytest.mark.parametrize(("depth", "num_layers", "B", "T"), CASES)
@pytest.mark.parametrize("chunk_rows", [256, 2], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-p", "recompute-p"])
def test_fast_equals_autograd_loop_and_baseline(
    monkeypatch, loop, depth, num_layers, B, T, masks_kind, z_states, chunk_rows, recompute
):
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", chunk_rows)  # 2: chunks of 1-2 steps
    if recompute:  # as for large windows: micro-layers 1, 3, ... recomputed in the
        # backward (never 0), and no transposed copy of the recurrent weights
        monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
        monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)
        monkeypatch.setattr(rhn_recurrence, "TRANSPOSED_COPY_UP_TO", 0)
    model = _model(depth, num_layers, tied_noise=masks_kind != "separate", z_states=z_states)
    tokens = torch.randint(0, 7, (B, T))
    state = torch.randn(num_layers, B, 5, dtype=torch.float64)
    if masks_kind == "none":
        model.eval()
        masks = None
    else:
        model.train()
        masks = model.draw_masks(tokens)
        width = 2 if masks_kind == "separate" else 1
        assert masks["h"][0].numel() == B * width * 5

    fast = _run(model, tokens, state, masks)
    fast_grads = _grads(model)
    _set_fast(model, False)
    loop = _run(model, tokens, state, masks)
    loop_grads = _grads(model)
    reference = baseline.from_rhn(model).train(model.training)
    base = _run(reference, tokens, state, masks)
    base_grads = baseline.rhn_layout(reference, grads=True)

    for other, other_grads in ((loop, loop_grads), (base, base_grads)):
        for got, want in zip(fast, other, strict=True):  # logits, final state, d state
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        assert fast_grads.keys() == other_grads.keys()
        for name, grad in fast_grads.items():
            torch.testing.assert_close(grad, other_grads[name], rtol=0, atol=TOL, msg=name)
    if z_states and masks_kind != "none" and B * T > 1:  # training zoneout did zone out
        _set_fast(model, True)
        model.layers[0].z_states = 0.0
        assert not torch.allclose(_run(model, tokens, state, masks)[1], fast[1])


def test_fast_path_is_the_default_and_records_one_node():
    model = _model(2).train()
    tokens = torch.randint(0, 7, (2, 3))
    layer = model.layers[0]
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    outputs, final = layer(x, torch.zeros(2, 5, dtype=torch.float64))
    assert layer.fast
    assert type(outputs.grad_fn).__name__ == "_RecurrenceBackward"
    assert outputs.grad_fn is final.grad_fn
    assert final.data_ptr() != outputs.data_ptr()  # the final state is its own tensor
    logits, _ = model(tokens, model.initial_state(2))
    assert logits.requires_grad


@pytest.mark.parametrize(
    ("masks_kind", "z_states", "recompute"),
    [("shared", 0.0, False), ("separate", 0.0, True), ("separate", 0.3, False)],
)  # fmt: skip
def test_float32_agrees_with_float64_to_rounding(
    monkeypatch, loop, masks_kind, z_states, recompute
):
    """float32 fast path vs the float64 autograd loop on the same weights: ~1e-5 relative,
    no worse than the float32 autograd loop itself. The native loop's float32 products
    go through oneDNN with prepacked weights (another summation order than MKL's).
    With zoneout, in eval (float32 and float64 draws differ)."""
    packs = []
    pack_all = onednn.pack_all
    monkeypatch.setattr(onednn, "pack_all", lambda *a: packs.append(pack_all(*a)) or packs[-1])
    if recompute:
        monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
        monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)
    tied = masks_kind == "shared"
    model64 = _model(3, num_layers=2, H=32, tied_noise=tied, z_states=z_states).train()
    with torch.no_grad():
        for p in model64.parameters():
            p.mul_(0.1)
    tokens = torch.randint(0, 7, (4, 8))
    state = torch.randn(2, 4, 32, dtype=torch.float64)
    masks = model64.draw_masks(tokens)
    if z_states:
        model64.eval()
    _set_fast(model64, False)
    want = _run(model64, tokens, state, masks)
    want_grads = _grads(model64)

    model32 = _model(
        3, num_layers=2, H=32, dtype=torch.float32, tied_noise=tied, z_states=z_states
    ).train()
    model32.load_state_dict(model64.state_dict())
    model32.train(model64.training)
    masks32 = {
        "x": masks["x"].float(),
        "i": [m.float() for m in masks["i"]],
        "h": [m.float() for m in masks["h"]],
        "o": masks["o"].float(),
    }
    errors = {}
    for fast in (True, False):
        _set_fast(model32, fast)
        got = _run(model32, tokens, state.float(), masks32)
        got_grads = _grads(model32)
        pairs = [*zip(got, want, strict=True)]
        pairs += [(got_grads[n], want_grads[n]) for n in want_grads]
        errors[fast] = max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in pairs)
    assert errors[True] < 2e-5
    assert errors[True] < 3 * errors[False] + 1e-7
    used_onednn = any(packs)
    assert used_onednn == (loop == "native" and torch.backends.mkldnn.is_available())


@pytest.mark.parametrize("large", [False, True], ids=["backward-packed", "large-weights"])
@pytest.mark.parametrize("masks_kind", ["shared", "separate"])
@pytest.mark.parametrize("weight_gradients", ["mkl", "onednn"])
def test_native_float32_with_training_zoneout_equals_the_python_loop(
    monkeypatch, large, masks_kind, weight_gradients
):
    """Training zoneout and recomputed p in float32: the native loop (its oneDNN
    products, its zoneout draws) against the Python loop, to float32 rounding; also as
    for large weights, whose backward products are ATen's on the weights, and with the
    weight gradients' products in either library."""
    onednn_library = weight_gradients == "onednn"
    monkeypatch.setattr(  # the Python loop, the reference, keeps MKL's
        weight_gradient, "through_onednn", lambda *a: onednn_library and native.USE_NATIVE
    )
    if large:
        monkeypatch.setattr(rhn_recurrence, "TRANSPOSED_COPY_UP_TO", 0)
    monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
    monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)
    assert native.load() is not None
    tied = masks_kind == "shared"
    model = _model(3, num_layers=2, H=32, dtype=torch.float32, tied_noise=tied, z_states=0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    model.train()
    tokens = torch.randint(0, 7, (4, 8))
    state = torch.randn(2, 4, 32)
    masks = model.draw_masks(tokens)
    runs = {}
    for use_native in (True, False):
        monkeypatch.setattr(native, "USE_NATIVE", use_native)
        runs[use_native] = (*_run(model, tokens, state, masks), *_grads(model).values())
    for got, want in zip(runs[True], runs[False], strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize(
    ("masks_kind", "z_states", "training"),
    [
        ("none", 0.0, True),
        ("shared", 0.0, True),
        ("separate", 0.0, True),
        ("shared", 0.3, True),
        ("separate", 0.3, False),
    ],
)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-p", "recompute-p"])
def test_gradcheck(monkeypatch, loop, masks_kind, z_states, training, recompute):
    """Finite differences of the Function w.r.t. projected inputs, initial state,
    recurrent weights and biases, across chunk boundaries (2 + 1 steps), with every
    micro-layer's p kept or the second one's recomputed."""
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", 3)
    if recompute:  # and, as for large weights, no transposed copy of them
        monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
        monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)
        monkeypatch.setattr(rhn_recurrence, "TRANSPOSED_COPY_UP_TO", 0)
    B, T, H, D = 2, 3, 3, 2
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    inputs = (rand(B, T, 2 * H), rand(B, H), rand(D, 2 * H, H), rand(D, 2 * H))
    mask = None
    if masks_kind != "none":
        shape = (B, H) if masks_kind == "shared" else (B, 2, H)
        mask = torch.bernoulli(torch.full(shape, 0.5, dtype=torch.float64), generator=gen) * 2
        mask.view(-1)[:2] = torch.tensor([0.0, 2.0])

    def fn(*args):
        torch.manual_seed(5)  # the same zoneout draws at every evaluation
        return rhn_recurrence.recurrence(*args, mask, z_states=z_states, training=training)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


class _SavedTensors:
    """Counts what autograd saves for a backward: tensors, and bytes of distinct storages
    other than the ones in ``exclude`` (parameters, inputs)."""

    def __init__(self, exclude=()):
        self.count = 0
        self.storages: dict[int, int] = {}
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)

    def pack(self, tensor):
        self.count += 1
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def nbytes(self):
        return sum(self.storages.values())

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.parametrize("chunk_rows", [256, 2], ids=["one-chunk", "chunks"])
def test_a_kept_graph_gives_the_same_gradients_again(monkeypatch, loop, chunk_rows):
    """A backward that frees the graph writes dp over p; one that keeps it (retain_graph)
    must leave p intact, so a second backward gives the same gradients."""
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", chunk_rows)
    kept = []
    real = buffers.graph_kept
    monkeypatch.setattr(buffers, "graph_kept", lambda: kept.append(real()) or kept[-1])
    model = _model(3).train()
    tokens = torch.randint(0, 7, (3, 4))
    masks = model.draw_masks(tokens)
    state = torch.randn(1, 3, 5, dtype=torch.float64)

    def gradients(retain):
        model.zero_grad(set_to_none=True)
        logits, final = model(tokens, state, masks)
        loss = logits.sin().sum() + final.cos().sum()
        runs = []
        for _ in range(2 if retain else 1):
            runs.append(torch.autograd.grad(loss, list(model.parameters()), retain_graph=retain))
        return runs

    (once,) = gradients(retain=False)
    assert kept and not any(kept)
    kept.clear()
    first, second = gradients(retain=True)
    assert kept and all(kept)
    for a, b, c in zip(once, first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_a_freed_graph_s_preactivations_serve_the_next_forward_and_no_other():
    buffers.forget()
    layer = _model(2).train().layers[0]
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    state = torch.zeros(3, 5, dtype=torch.float64)

    def pre_of(outputs):
        return outputs.grad_fn.saved_tensors[4]

    def spares():
        return [b.data_ptr() for b in buffers.spares()]

    first = layer(x, state)[0]
    alive = layer(x, state)[0]  # its graph is alive: its p is nobody's to take
    assert pre_of(first).data_ptr() != pre_of(alive).data_ptr()
    first_address = pre_of(first).data_ptr()
    first.sum().backward()
    assert first_address in spares()
    freed = spares()  # p, and the backward's scratch where it has p's shape
    reused = layer(x, state)[0]
    address = pre_of(reused).data_ptr()
    assert address in freed
    reused.sum().backward(retain_graph=True)  # kept: p stays with the graph
    assert address not in spares()
    short = layer(x[:, :2], state)[0]  # another shape
    short_address = pre_of(short).data_ptr()
    short.sum().backward()
    assert short_address in spares()
    layer(x, state)
    assert buffers.spares() == ()  # spares of other shapes are let go
    alive.sum().backward()


def test_the_backward_s_scratch_space_serves_the_next_backward(monkeypatch):
    """The scratch space (the states s^i, and dp where it cannot overwrite p) is handed
    on from one backward to the next of the same shape, with the same gradients."""
    buffers.forget()
    allocated = []
    spare = buffers.spare
    monkeypatch.setattr(
        buffers, "spare", lambda shape, like: allocated.append(spare(shape, like)) or allocated[-1]
    )
    inputs, mask = _recurrence_inputs()
    grads = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        outputs, final = rhn_recurrence.recurrence(*inputs, mask, training=True)
        (outputs.sin().sum() + final.sum()).backward()
        grads.append([t.grad for t in inputs])
    first, second = allocated[: len(allocated) // 2], allocated[len(allocated) // 2 :]
    # the same memory, though buffers of one shape may swap roles (p and a scratch)
    assert sorted(b.data_ptr() for b in first) == sorted(b.data_ptr() for b in second)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_dropped_weight_gradient_s_memory_serves_the_next_one_and_a_kept_one_is_kept(
    monkeypatch, loop
):
    """The recurrent weight's .grad, once dropped (zero_grad(set_to_none=True)), lends its
    memory to the next step's; one still held by anybody keeps its values."""
    buffers.forget()
    model = _model(2).train()
    tokens = torch.randint(0, 7, (3, 4))
    masks = model.draw_masks(tokens)
    weight = model.layers[0].recurrent_weight

    def step():
        model.zero_grad(set_to_none=True)
        logits, final = model(tokens, model.initial_state(3), masks)
        (logits.sin().sum() + final.sum()).backward()
        return weight.grad

    first = step()
    address, values = first.data_ptr(), first.clone()
    kept = step()  # `first` is still held here: its memory is not lent out
    assert kept.data_ptr() != address
    torch.testing.assert_close(first, values, rtol=0, atol=0)
    torch.testing.assert_close(kept, values, rtol=0, atol=0)  # the same step again
    del first, kept
    assert step().data_ptr() == address  # the oldest free memory first
    assert step().data_ptr() == address  # dropped by zero_grad: lent again
    torch.testing.assert_close(weight.grad, values, rtol=0, atol=0)


def test_evaluation_saves_nothing_for_a_backward():
    """Under no_grad, or with nothing requiring grad, no graph is built and nothing is
    kept for a backward (in particular not the pre-activations)."""
    model = _model(3, num_layers=2).eval()
    tokens = torch.randint(0, 7, (2, 6))
    with torch.no_grad(), _SavedTensors() as saved:
        logits, final = model(tokens, model.initial_state(2))
    assert saved.count == 0 and logits.grad_fn is None and final.grad_fn is None
    model.requires_grad_(False)
    model.train()  # training mode, dropout and zoneout on, but no gradient wanted
    model.layers[0].z_states = 0.3
    with _SavedTensors() as saved:
        logits, final = model(tokens, model.initial_state(2))
    assert saved.count == 0 and logits.grad_fn is None and final.grad_fn is None


@pytest.mark.parametrize("masks_kind", ["none", "shared", "separate"])
def test_training_saves_a_fixed_number_of_tensors_and_half_the_bytes(masks_kind):
    """The Function saves a fixed number of tensors whatever T and D (the autograd loop
    saves some for every micro-step), holding about half the bytes the loop keeps:
    the pre-activations (2H per micro-step) and the outputs, against s * m_h, h, g and
    h - s."""
    B, H, D = 4, 16, 4
    saved = {}
    for T in (3, 9):
        model = _model(D, H=H, tied_noise=masks_kind != "separate").train()
        layer = model.layers[0]
        mask = None
        if masks_kind != "none":
            mask = model.draw_masks(torch.zeros(B, T, dtype=torch.long))["h"][0]
        x = torch.randn(B, T, layer.input_weight.shape[1], dtype=torch.float64).requires_grad_()
        state = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
        projected = x @ layer.input_weight.t()  # the layer's own projection, unmasked
        exclude = (*layer.parameters(), projected, state, x)
        for fast in (True, False):
            layer.fast = fast
            with _SavedTensors(exclude) as counter:
                layer(x, state, None, mask)
            saved[fast, T] = counter
    assert saved[True, 3].count == saved[True, 9].count
    assert saved[False, 9].count > saved[False, 3].count
    for T in (3, 9):
        unit = 8 * B * H * D * T  # one float64 number per unit, micro-step, step, row
        assert saved[True, T].nbytes <= 2.5 * unit
        assert saved[True, T].nbytes <= 0.6 * saved[False, T].nbytes


def test_state_mask_that_needs_a_gradient_goes_through_the_loop():
    model = _model(2).train()
    layer = model.layers[0]
    mask = torch.full((2, 5), 1.0, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    outputs, _ = layer(x, torch.zeros(2, 5, dtype=torch.float64), None, mask)
    outputs.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no gradient"):
        rhn_recurrence.recurrence(
            x @ layer.input_weight.t(), torch.zeros(2, 5), layer.recurrent_weight, layer.bias, mask
        )


def test_large_windows_recompute_a_third_of_the_preactivations(monkeypatch):
    """Past KEEP_ALL_PREACTIVATIONS_UP_TO bytes of p, micro-layers 2, 5, 8... are not
    kept (enwik8_sota's window: 768 MB of p otherwise); the gradients do not change."""
    assert rhn_recurrence.recomputed_layers(10, 10 * 2**20) == frozenset()
    assert rhn_recurrence.recomputed_layers(10, 77 * 2**20) == {2, 5, 8}  # enwik8_sota
    B, T, H, D = 3, 4, 5, 6
    model = _model(D, H=H).train()
    tokens = torch.randint(0, 7, (B, T))
    state = torch.randn(1, B, H, dtype=torch.float64)
    masks = model.draw_masks(tokens)

    def saved_bytes():
        with _SavedTensors(model.parameters()) as saved:
            model(tokens, state, masks)
        return saved.nbytes

    kept = _run(model, tokens, state, masks), _grads(model)
    all_kept = saved_bytes()
    monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
    recomputed = _run(model, tokens, state, masks), _grads(model)
    assert all_kept - saved_bytes() == 2 * T * B * 2 * H * 8  # layers 2 and 5 not kept
    for got, want in zip(recomputed[0], kept[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    for name, grad in recomputed[1].items():
        torch.testing.assert_close(grad, kept[1][name], rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-p", "recompute-p"])
def test_fast_path_keeps_to_the_inputs_device(monkeypatch, recompute):
    """Forward and backward on the 'meta' device (shapes only, no data): a CPU tensor
    mixed in, or a read of a value on the host (.item(), NumPy), would raise here, as
    it would slow down or break a GPU run. (No GPU is available to test on.)"""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: False)  # meta has none
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", 2)
    if recompute:
        monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
    for tied_noise, z_states in ((True, 0.0), (False, 0.3)):
        with torch.device("meta"):
            model = _model(4, tied_noise=tied_noise, z_states=z_states, dtype=torch.float32)
            tokens = torch.zeros(3, 5, dtype=torch.long)
            model.train()
            logits, final = model(tokens, model.initial_state(3))
            (logits.sum() + final.sum()).backward()
            assert logits.device.type == "meta"
            assert all(p.grad.device.type == "meta" for p in model.parameters())
            model.eval()
            with torch.no_grad():
                assert model(tokens, model.initial_state(3))[0].device.type == "meta"


def _recurrence_inputs(D=3, B=2, T=4, H=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)

    mask = torch.bernoulli(torch.full((B, 2, H), 0.5, dtype=dtype), generator=gen) * 2
    return (rand(B, T, 2 * H), rand(B, H), rand(D, 2 * H, H), rand(D, 2 * H)), mask


def _both_loops(monkeypatch, inputs, mask, after_native=None):
    """{native: (outputs, gradients of the inputs)} for the native and the Python loop,
    training, on a nonlinear loss; ``after_native`` sees the native run's saved p after
    its backward (before the Python run's forward may reuse its memory)."""
    runs = {}
    for use_native in (True, False):
        monkeypatch.setattr(native, "USE_NATIVE", use_native)
        for t in inputs:
            t.grad = None
        outputs, final = rhn_recurrence.recurrence(*inputs, mask, training=True)
        pre = outputs.grad_fn.saved_tensors[4]
        (outputs.sin().sum() + final.sum()).backward()
        if use_native and after_native is not None:
            after_native(pre)
        runs[use_native] = (outputs.detach(), *(t.grad for t in inputs))
    return runs


def _assert_the_same_to_float32_rounding(runs):
    for got, want in zip(runs[True], runs[False], strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


class _TorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_native_loop_runs_the_whole_recurrence(monkeypatch):
    """With the native loop on, neither the forward nor the backward runs a loop over the
    steps in Python: the torch calls made from Python do not grow with T (fewer extra calls
    than extra steps: buffer reuse varies; with recomputed p, zoneout and separate
    masks), where the Python loop's grow by dozens a step."""
    assert native.load() is not None
    monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)

    def torch_calls(T):
        inputs, mask = _recurrence_inputs(T=T)
        with _TorchCalls() as calls:
            outputs, final = rhn_recurrence.recurrence(*inputs, mask, z_states=0.2, training=True)
            (outputs.sum() + final.sum()).backward()
        assert all(t.grad is not None for t in inputs)
        return calls.count

    assert torch_calls(12) - torch_calls(4) < 8
    monkeypatch.setattr(native, "USE_NATIVE", False)
    assert torch_calls(12) - torch_calls(4) > 8 * 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 16), (2, 32, 48), (3, 37, 50), (1, 5)])
def test_native_transpose_equals_torch_s(dtype, shape):
    """The native transpose (AVX-512 tiles in float32 on such CPUs, whole and partial,
    streaming stores where the rows are whole cache lines) moves every number."""
    kernels = native.load()
    assert kernels is not None
    source = torch.randn(shape, dtype=dtype)
    out = torch.full((*shape[:-2], shape[-1], shape[-2]), float("nan"), dtype=dtype)
    kernels.transpose_into(out, source)
    torch.testing.assert_close(out, source.transpose(-1, -2), rtol=0, atol=0)


@pytest.mark.parametrize("masks_kind", ["shared", "separate", "none"])
@pytest.mark.parametrize(
    ("B", "T", "H", "column_run", "chunk_rows"),
    [(4, 13, 20, 16, 32), (3, 7, 17, 64, 1024)],
    ids=["groups-of-4-two-chunks", "one-group-partial-tiles"],
)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-p", "recompute-p"])
def test_native_weight_gradients_from_columns_equal_the_python_loop_s(
    monkeypatch, masks_kind, B, T, H, column_run, chunk_rows, recompute
):
    """The native backward hands dp and s * m_h to the weight gradients as columns,
    written a group of steps at a time into rows padded with zeros to whole cache lines,
    the rows of dp in p's place, or in a buffer for recomputed layers (1 and 3 of 5):
    with groups that do not divide a chunk, chunks of unequal lengths, partial tiles and
    scratch buffers that start out as NaN (so that every number used must be written),
    the gradients are the Python loop's (float32 rounding)."""
    assert native.load() is not None
    monkeypatch.setattr(rhn_recurrence, "COLUMN_RUN", column_run)
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", chunk_rows)
    if recompute:
        monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
        monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)
    spare = buffers.spare
    monkeypatch.setattr(buffers, "spare", lambda *a: spare(*a).fill_(float("nan")))
    inputs, mask = _recurrence_inputs(D=5, B=B, T=T, H=H, dtype=torch.float32)
    with torch.no_grad():  # a contracting recurrence: no rounding blown up over T steps
        inputs[2].div_(H**0.5)
    mask = {"shared": mask[:, 0], "separate": mask, "none": None}[masks_kind]
    _assert_the_same_to_float32_rounding(_both_loops(monkeypatch, inputs, mask))


def _released_steps(pre):
    """The time steps of ``pre`` [D', T, B, 2H] whose gates read mostly as zeros (their
    whole pages went back to the system; a page across two chunks stays)."""
    return {t for t in range(pre.shape[1]) if (pre[:, t] == 0).float().mean() > 0.5}


def _large_window(monkeypatch, released):
    """A window too large to keep all of p (every 2nd micro-layer recomputed), chunks of 2
    steps (32 KB of p each at B=4, H=512), the native release calls' bytes in ``released``."""
    kernels = native.load()
    assert kernels is not None
    buffers.forget()
    # (earlier tests' graphs that something still holds would count as layers to come)
    monkeypatch.setattr(rhn_recurrence, "_AWAITING_BACKWARD", weakref.WeakValueDictionary())
    monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
    monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", 8)
    release = kernels.release
    monkeypatch.setattr(kernels, "release", lambda t: released.append(release(t)) or released[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_DONTNEED) is Linux's")
@pytest.mark.parametrize("keep_mapped", [True, False])
def test_a_large_window_gives_back_the_memory_of_finished_steps_p_the_step_needs(
    monkeypatch, keep_mapped
):
    """Where p is too large to keep whole (recomputed layers), the native backward hands
    the pages of finished chunks' p back to the system (they read as zeros after): the
    first chunks', room for [B, T, H] numbers here, the rest staying mapped for the next
    forward; all of them with KEEP_GATES_MAPPED off. The gradients are the Python loop's."""
    released = []
    _large_window(monkeypatch, released)
    monkeypatch.setattr(rhn_recurrence, "KEEP_GATES_MAPPED", keep_mapped)
    monkeypatch.setattr(rhn_recurrence, "RELEASED_PER_TOKEN_AND_UNIT", 1)
    T = 24
    inputs, mask = _recurrence_inputs(D=3, B=4, T=T, H=512, dtype=torch.float32)
    with torch.no_grad():
        inputs[2].div_(512**0.5)

    def given_back(pre):  # a release call per kept layer (2) and chunk of 2 steps
        chunks = len(released) // 2
        assert _released_steps(pre) == set(range(T - 2 * chunks, T))
        if not keep_mapped:
            assert chunks == T // 2
            return
        wanted, last_chunk = T * 4 * 512 * 4, sum(released[-2:])  # [B, T, H] numbers
        assert sum(released) - last_chunk < wanted <= sum(released) < 0.5 * pre.nbytes

    runs = _both_loops(monkeypatch, inputs, mask[:, 0], after_native=given_back)
    _assert_the_same_to_float32_rounding(runs)


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_DONTNEED) is Linux's")
def test_a_layer_whose_backward_comes_before_another_s_gives_all_its_p_back(monkeypatch):
    """Two large windows in one backward pass (two RHN layers): the one whose backward runs
    first, while the other's is still to come, hands all its p back (else the second
    backward's peak would hold it too); the last keeps most of its p mapped."""
    released = []
    _large_window(monkeypatch, released)
    monkeypatch.setattr(rhn_recurrence, "RELEASED_PER_TOKEN_AND_UNIT", 1)
    T = 24
    inputs, mask = _recurrence_inputs(D=3, B=4, T=T, H=512, dtype=torch.float32)
    with torch.no_grad():
        inputs[2].div_(512**0.5)
    lower, _ = rhn_recurrence.recurrence(*inputs, mask[:, 0], training=True)
    upper, _ = rhn_recurrence.recurrence(
        lower.repeat(1, 1, 2), *inputs[1:], mask[:, 0], training=True
    )
    pres = [outputs.grad_fn.saved_tensors[4] for outputs in (upper, lower)]
    upper.sin().sum().backward()
    first, last = (_released_steps(pre) for pre in pres)  # upper's backward runs first
    assert first == set(range(T))
    assert 0 < len(last) < T // 2 and last == set(range(T - len(last), T))


def test_enwik8_sota_sums_its_weight_gradients_in_chunks_of_5_steps_older_runs_in_2():
    """The backward's chunks at enwik8_sota's window (B=128, T=50, H=1500, D=10, three
    micro-layers recomputed): 5 steps (640 rows) within CHUNK_BYTES, 2 steps within a
    run's recorded before the size changed; ptb_sota's window stays one chunk."""
    B, T, H, D, staged, size = 128, 50, 1500, 10, 3, 4
    row_bytes, step_bytes = (staged * 2 * H + D * H) * B * size, 3 * H * D * B * size

    def steps_per_chunk(chunk_bytes, B=B, T=T, row_bytes=row_bytes, step_bytes=step_bytes):
        rhn_recurrence.CHUNK_BYTES = chunk_bytes
        return rhn_recurrence._native_chunking(T, B, row_bytes, step_bytes)[1]

    assert rhn_recurrence.CHUNK_BYTES == 128 * 2**20
    assert steps_per_chunk(rhn_recurrence.CHUNK_BYTES) == 5
    assert steps_per_chunk(rhn_recurrence.CHUNK_BYTES_BEFORE) == 2
    ptb = {"B": 20, "T": 35, "row_bytes": 0, "step_bytes": 3 * 830 * 10 * 20 * size}
    for chunk_bytes in (rhn_recurrence.CHUNK_BYTES, rhn_recurrence.CHUNK_BYTES_BEFORE):
        assert steps_per_chunk(chunk_bytes, **ptb) == 35


@pytest.mark.parametrize(
    ("kernels", "chunk_bytes"),
    [
        ({"native_loop": True, "rhn_chunk_bytes": 128 * 2**20}, 128 * 2**20),
        ({"native_loop": True, "rhn_chunk_bytes": 96 * 2**20}, 96 * 2**20),
        ({"native_loop": True, "rhn_large_on_onednn": True}, 72 * 2**20),  # recorded before
        ({"native_loop": True, "rhn_chunk_bytes": "128"}, 72 * 2**20),  # not a size
        (None, 72 * 2**20),  # recorded before rhn kept any kernel facts
    ],
)
def test_a_run_keeps_the_backward_chunks_it_recorded(pin_as_recorded, kernels, chunk_bytes):
    """The chunks set the order in which dR sums (float32 rounding): a new run records
    their size, a resumed one computes with the size it recorded, or the size before."""
    from rhn_cli.experiment import recording

    assert recording.kernel_facts()["rhn_chunk_bytes"] == 128 * 2**20  # a new run's
    pin_as_recorded(kernels)
    assert rhn_recurrence.CHUNK_BYTES == chunk_bytes
    assert recording.kernel_facts()["rhn_chunk_bytes"] == chunk_bytes


def test_the_chunk_size_changes_the_weight_gradients_only_by_rounding():
    """Fewer, larger chunks sum dR in another order: the same gradients to float32
    rounding, not to the bit (hence the recorded fact)."""
    assert native.load() is not None
    inputs, mask = _recurrence_inputs(D=3, B=4, T=12, H=256, dtype=torch.float32)
    with torch.no_grad():
        inputs[2].div_(256**0.5)

    def weight_gradient(chunk_bytes):
        rhn_recurrence.CHUNK_BYTES = chunk_bytes
        inputs[2].grad = None
        outputs, final = rhn_recurrence.recurrence(*inputs, mask[:, 0], training=True)
        (outputs.sin().sum() + final.sum()).backward()
        return inputs[2].grad.clone()

    one_chunk = weight_gradient(rhn_recurrence.CHUNK_BYTES)  # the whole window
    step_bytes = 3 * 256 * 3 * 4 * 4  # 3H numbers per micro-layer and row, 4 rows a step
    in_steps = weight_gradient(3 * step_bytes)  # chunks of 1 or 2 steps
    assert not torch.equal(one_chunk, in_steps)
    _assert_the_same_to_float32_rounding({True: in_steps, False: one_chunk})


@pytest.mark.skipif(sys.platform != "linux", reason="the build directory follows XDG_CACHE_HOME")
def test_a_native_build_failure_falls_back_to_the_python_loop(monkeypatch, tmp_path, caplog):
    """A machine whose compiler is missing (a build directory of its own, so the build
    runs): one warning, and the Python loop's results."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=native.__name__):
            assert native.load() is None
            assert native.load() is None  # tried once per process, said once
        (record,) = [r for r in caplog.records if r.name == native.__name__]
        message = record.getMessage()
        assert "could not be built" in message and "Python loop" in message
        assert list((tmp_path / "rhn" / "extensions").iterdir())  # the build was tried there
        inputs, mask = _recurrence_inputs()
        outputs, final = rhn_recurrence.recurrence(*inputs, mask, training=True)
        monkeypatch.setattr(native, "USE_NATIVE", False)
        want = rhn_recurrence.recurrence(*inputs, mask, training=True)
        torch.testing.assert_close(outputs, want[0], rtol=0, atol=0)
    finally:
        native.load.cache_clear()


def test_rhn_native_0_skips_the_build(monkeypatch, tmp_path):
    monkeypatch.setenv("RHN_NATIVE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load() is None
        assert not (tmp_path / "rhn").exists()  # no build directory: no build started
    finally:
        native.load.cache_clear()


def test_a_change_to_any_native_source_builds_afresh(tmp_path):
    """The build's name hashes every file of csrc/, compiled or included: a stale binary
    is never loaded for changed sources."""
    csrc = Path(native.__file__).with_name("csrc")
    assert {p.name for p in (*native.SOURCES, *native.HEADERS)} == {p.name for p in csrc.iterdir()}
    files = []
    for source in (*native.SOURCES, *native.HEADERS):
        files.append(tmp_path / source.name)
        files[-1].write_bytes(source.read_bytes())
    flags, version = ["-O3"], torch.__version__
    names = {native.build_name("AVX2", flags, version, files)}
    for path in files:
        path.write_bytes(path.read_bytes() + b"\n")
        names.add(native.build_name("AVX2", flags, version, files))
    names.add(native.build_name("AVX2", ["-O2"], version, files))
    names.add(native.build_name("AVX2", flags, "9.9.9", files))
    names.add(native.build_name("AVX512", flags, version, files))
    assert len(names) == len(files) + 4
    assert native.build_name("AVX2", flags, version, files) in names  # deterministic


@pytest.fixture
def fresh_decisions(tmp_path, monkeypatch):
    """An empty MKL/oneDNN decision cache (RHN_CACHE_DIR: the native loop's build stays in
    the user cache) and a process that has decided nothing yet."""
    monkeypatch.setenv("RHN_CACHE_DIR", str(tmp_path / "cache"))
    library_choice.forget_decisions()
    yield tmp_path / "cache" / library_choice.CACHE_FILE
    library_choice.forget_decisions()  # none of this cache's decisions outlive the test


def test_the_weight_gradients_library_is_timed_once_per_machine_and_shape(
    monkeypatch, fresh_decisions
):
    """MKL or oneDNN for the weight-gradient products: decided by timing both once per
    shape in the native loop's float32 setting (never for float64), kept on disk, and read
    from there by a later process instead of timed again."""
    ways = []
    product = weight_gradient.product
    monkeypatch.setattr(
        weight_gradient,
        "product",
        lambda out, left, right, accumulate, onednn_library=False: (
            ways.append(onednn_library) or product(out, left, right, accumulate, onednn_library)
        ),
    )
    lefts, rights = torch.randn(2, 12, 8), torch.randn(2, 12, 4)
    held = (lefts.clone(), rights.clone())
    choice = weight_gradient.through_onednn(lefts, rights)
    rounds = weight_gradient.DECISION_ROUNDS
    onednn_here = torch.backends.mkldnn.is_available()
    assert ways == ([False, False, True, True] * rounds if onednn_here else [])
    assert weight_gradient.through_onednn(lefts, rights) == choice
    library_choice.forget_decisions()  # as in a new process
    assert weight_gradient.through_onednn(lefts, rights) == choice
    assert len(ways) in (0, 4 * rounds)  # the later calls only looked the choice up
    if onednn_here:
        library = "onednn" if choice else "mkl"
        cached = json.loads(fresh_decisions.read_text())
        assert cached == {library_choice.setup(): {"weight_gradient 8x12 12x4 float32": library}}
        assert library_choice.library_decisions() == {"weight_gradient 8x12 12x4 float32": library}
    torch.testing.assert_close((lefts, rights), held, rtol=0, atol=0)
    left, right, out = lefts[0], rights[0], torch.empty(8, 4)
    for onednn_library in (False, True):
        assert product(out, left, right, False, onednn_library) is out
        torch.testing.assert_close(out, left.t() @ right)
        assert product(out, left, right, True, onednn_library) is out
        torch.testing.assert_close(out, 2 * left.t() @ right)
        new = product(None, left, right, False, onednn_library)
        torch.testing.assert_close(new, left.t() @ right)
    assert not weight_gradient.through_onednn([left.double()], [right.double()])
    assert "float64" not in str(library_choice.library_decisions())  # no choice made there


def test_timing_a_new_shape_of_a_later_chunk_leaves_the_sums_so_far_alone(
    monkeypatch, fresh_decisions
):
    """Chunks of unequal lengths (steps [2, 5) and [0, 2) at B = 16: 48 and 32 rows)
    meet the library decision for the second shape with the first chunk's sums already
    in the gradient: deciding writes none of them."""
    assert native.load() is not None
    monkeypatch.setattr(rhn_recurrence, "CHUNK_ROWS", 48)
    inputs, mask = _recurrence_inputs(D=2, B=16, T=5, H=8, dtype=torch.float32)
    _assert_the_same_to_float32_rounding(_both_loops(monkeypatch, inputs, mask[:, 0]))
    shapes = 2 if onednn.applies(torch.float32) else 0  # both shapes were timed
    assert len(library_choice.library_decisions()) == shapes


@pytest.mark.parametrize("switch", ["no-operators", "turned-off"])
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from flags()
def test_without_onednn_the_native_loop_uses_aten_products(monkeypatch, switch):
    """A torch build without the oneDNN operators, or a user who turned oneDNN off: no
    packing, ATen's products in the native loop, the same results as the Python loop."""
    if switch == "no-operators":
        monkeypatch.setattr(onednn, "operators_available", lambda: False)
    packs = []
    pack_all = onednn.pack_all
    monkeypatch.setattr(onednn, "pack_all", lambda *a: packs.append(pack_all(*a)) or packs[-1])
    inputs, mask = _recurrence_inputs(dtype=torch.float32)
    with torch.backends.mkldnn.flags(enabled=switch != "turned-off"):
        runs = _both_loops(monkeypatch, inputs, mask)
    assert packs and not any(packs)
    _assert_the_same_to_float32_rounding(runs)


def test_a_killed_build_s_lock_does_not_hang_the_next_one(tmp_path, caplog):
    """torch's builder waits for its lock file without end; a lock older than any build
    (left by a killed one) is removed, a fresh one (a build under way) is left alone."""
    lock = tmp_path / "lock"
    lock.touch()
    native.remove_stale_lock(lock)
    assert lock.exists()
    old = time.time() - native.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger=native.__name__):
        native.remove_stale_lock(lock)
    assert not lock.exists()
    assert "did not finish" in caplog.text
    native.remove_stale_lock(lock)  # no lock: nothing to do


@pytest.mark.parametrize("masks_kind", ["none", "shared", "separate"])
def test_large_weights_backward_products_run_on_onednn_as_packed_ones_do(monkeypatch, masks_kind):
    """Recurrent weights too large for a packed copy (past ``TRANSPOSED_COPY_UP_TO``): the
    backward's dp R^i products and the recomputed micro-layers' forward products go to
    oneDNN on the weights as stored, and give the packed copies' numbers to the bit; with
    ``LARGE_ON_ONEDNN`` off (a run recorded before this path, pinned) they are ATen's,
    which round otherwise."""
    if not onednn.applies(torch.float32):
        pytest.skip("this torch build has no oneDNN products")
    assert native.load() is not None, "the native kernels could not be built"
    monkeypatch.setattr(native, "USE_NATIVE", True)
    monkeypatch.setattr(rhn_recurrence, "KEEP_ALL_PREACTIVATIONS_UP_TO", 0)
    monkeypatch.setattr(rhn_recurrence, "RECOMPUTE_EVERY", 2)  # micro-layer 1 recomputed
    inputs, mask = _recurrence_inputs(D=3, B=8, T=4, H=320, dtype=torch.float32)
    mask = {"none": None, "shared": mask[:, 0], "separate": mask}[masks_kind]

    def gradients(large: bool, on_onednn: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(rhn_recurrence, "TRANSPOSED_COPY_UP_TO", 0 if large else 2**40)
        monkeypatch.setattr(rhn_recurrence, "LARGE_ON_ONEDNN", on_onednn)
        for t in inputs:
            t.grad = None
        outputs, final = rhn_recurrence.recurrence(*inputs, mask, training=True)
        (outputs.sin().sum() + final.sum()).backward()
        return [t.grad.clone() for t in inputs]

    packed = gradients(large=False, on_onednn=True)
    as_stored = gradients(large=True, on_onednn=True)
    aten = gradients(large=True, on_onednn=False)
    assert all(torch.equal(got, want) for got, want in zip(as_stored, packed, strict=True))
    assert not all(torch.equal(got, want) for got, want in zip(aten, packed, strict=True))
    _assert_the_same_to_float32_rounding({True: aten, False: packed})


@pytest.mark.parametrize(
    ("kernels", "on_onednn"),
    [
        ({"native_loop": True, "rhn_large_on_onednn": True}, True),
        ({"native_loop": True, "rhn_large_on_onednn": False}, False),
        ({"native_loop": True, "gru_recurrence": True}, False),  # recorded before the path
        (None, False),  # recorded before rhn kept any kernel facts
    ],
)
def test_a_run_keeps_the_large_weights_products_it_recorded(pin_as_recorded, kernels, on_onednn):
    from rhn_cli.experiment import recording

    assert recording.kernel_facts()["rhn_large_on_onednn"] is True  # a new run's
    pin_as_recorded(kernels)
    assert rhn_recurrence.LARGE_ON_ONEDNN is on_onednn
    assert recording.kernel_facts()["rhn_large_on_onednn"] is on_onednn
