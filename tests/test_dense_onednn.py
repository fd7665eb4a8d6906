"""The RHN's input projection (rhn_cli.kernels.projection) and its output layer's forward
and input gradient (rhn_cli.kernels.output_layer) through oneDNN: autograd's ATen products
to float32 rounding, taken only where they apply, and kept off for runs recorded
before them."""

from __future__ import annotations

import pytest
import torch

from rhn_cli.experiment import recording
from rhn_cli.kernels import native, onednn, output_layer, projection, weight_gradient

pytestmark = pytest.mark.skipif(
    not onednn.applies(torch.float32), reason="this torch build has no oneDNN products"
)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(params=["mkl", "onednn"])
def weight_gradients(request, monkeypatch):
    """The weight gradient through either library (the machine's decision, both tried)."""
    assert native.load() is not None
    monkeypatch.setattr(weight_gradient, "through_onednn", lambda *a: request.param == "onednn")


def test_the_projection_is_autograd_s_product_to_rounding(monkeypatch, weight_gradients):
    # K = 512: large enough that oneDNN and MKL sum in different orders
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(4, 5, 512, generator=generator, requires_grad=True)
    weight = torch.randn(384, 512, generator=generator, requires_grad=True)
    upstream = torch.randn(5, 4, 384, generator=generator).transpose(0, 1)  # time-major
    results = {}
    for dense in (True, False):
        monkeypatch.setattr(onednn, "DENSE_PRODUCTS", dense)
        projected = projection.project(inputs, weight)
        assert (type(projected.grad_fn).__name__ == "_LinearBackward") is dense
        grads = torch.autograd.grad((projected * upstream).sum(), (inputs, weight))
        results[dense] = (projected, *grads)
    assert not torch.equal(results[True][0], results[False][0])  # oneDNN's product was taken
    for got, want in zip(results[True], results[False], strict=True):
        assert _relative(got, want) < 1e-5


def test_without_a_gradient_or_in_float64_the_projection_is_aten_s():
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(2, 3, 8, generator=generator)
    weight = torch.randn(6, 8, generator=generator, requires_grad=True)
    with torch.no_grad():
        assert projection.project(inputs, weight).grad_fn is None
    as_float64 = projection.project(inputs.double(), weight.detach().double().requires_grad_())
    assert type(as_float64.grad_fn).__name__ != "_LinearBackward"


def test_the_output_layer_s_forward_and_input_gradient_round_only(monkeypatch, weight_gradients):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 512, generator=generator, requires_grad=True)
    weight = torch.randn(300, 512, generator=generator, requires_grad=True)
    bias = torch.randn(300, generator=generator, requires_grad=True)
    upstream = torch.randn(3, 4, 300, generator=generator)
    results = {}
    for dense in (True, False):
        monkeypatch.setattr(onednn, "DENSE_PRODUCTS", dense)
        logits = output_layer.logits(x, weight, bias)
        grads = torch.autograd.grad((logits * upstream).sum(), (x, weight, bias))
        results[dense] = (logits, *grads)
    assert not torch.equal(results[True][0], results[False][0])
    assert not torch.equal(results[True][1], results[False][1])
    for got, want in zip(results[True], results[False], strict=True):
        assert _relative(got, want) < 1e-5


@pytest.mark.parametrize(
    ("kernels", "dense"),
    [
        ({"native_loop": True, "rhn_dense_onednn": True}, True),
        ({"native_loop": True, "rhn_dense_onednn": False}, False),
        ({"native_loop": True, "rhn_large_on_onednn": True}, False),  # recorded before
        (None, False),  # recorded before rhn kept any kernel facts
    ],
)
def test_a_run_keeps_the_products_it_recorded(pin_as_recorded, kernels, dense):
    assert recording.kernel_facts()["rhn_dense_onednn"] is True  # a new run's
    pin_as_recorded(kernels)
    assert onednn.DENSE_PRODUCTS is dense
    assert recording.kernel_facts()["rhn_dense_onednn"] is dense
