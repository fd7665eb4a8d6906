"""The summed softmax cross-entropy behind ``sequence_loss`` (rhn_cli.engine.cross_entropy)
against ``torch.nn.functional.cross_entropy``, an independent implementation: the same
loss and the same gradient, whichever way it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rhn_cli.engine.cross_entropy import IGNORE_INDEX, summed_cross_entropy
from rhn_cli.engine.objective import sequence_loss
from rhn_cli.kernels import native


@pytest.fixture(params=["native", "fallback"])
def kernels(request, monkeypatch):
    use_native = request.param == "native"
    monkeypatch.setattr(native, "USE_NATIVE", use_native)
    if use_native:
        assert native.load() is not None, "the native kernels could not be built"
    return request.param


def _both(logits, targets, scale=0.7):
    """(loss, gradient) of scale * the summed loss, ours and F.cross_entropy's."""
    results = []
    for loss_of in (
        summed_cross_entropy,
        lambda x, t: F.cross_entropy(x, t, reduction="sum", ignore_index=IGNORE_INDEX),
    ):
        x = logits.detach().clone().requires_grad_(True)
        loss = loss_of(x, targets)
        (gradient,) = torch.autograd.grad(loss * scale, x)
        results.append((loss.detach(), gradient))
    return results


# Odd sizes: rows not a multiple of the kernel's 16-row tiles, classes not a multiple of
# its 256-class tiles or of the vector width.
@pytest.mark.parametrize(("N", "V"), [(1, 2), (7, 3), (37, 1003), (64, 256)])
def test_loss_and_gradient_equal_torch_s_in_float64(kernels, N, V):
    torch.manual_seed(0)
    logits = torch.randn(N, V, dtype=torch.float64) * 4
    targets = torch.randint(0, V, (N,))
    targets[0] = V - 1
    if N > 2:
        targets[1] = 0
        targets[2] = IGNORE_INDEX  # padding counts in neither
    (loss, gradient), (want_loss, want_gradient) = _both(logits, targets)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(gradient, want_gradient, rtol=0, atol=1e-14)
    if N > 2:
        assert gradient[2].abs().max() == 0


# (64, 256): gradient rows of whole cache lines, written with streaming stores.
@pytest.mark.parametrize(("N", "V"), [(700, 1000), (64, 256)])
def test_float32_agrees_with_float64_to_rounding(kernels, N, V):
    torch.manual_seed(0)
    logits = torch.randn(N, V) * 5
    targets = torch.randint(0, V, (N,))
    (loss, gradient), _ = _both(logits, targets)
    (want_loss, want_gradient), _ = _both(logits.double(), targets)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(gradient.double(), want_gradient, rtol=0, atol=1e-6)


def test_the_native_gradient_is_column_major_for_the_output_product(kernels):
    """What saves the output layer's dlogits^T copy: the gradient arrives as the
    transposed view of a contiguous [V, N] tensor."""
    logits = torch.randn(5, 9, requires_grad=True)
    (gradient,) = torch.autograd.grad(summed_cross_entropy(logits, torch.arange(5)), logits)
    assert gradient.t().is_contiguous() == (kernels == "native")


def test_without_a_gradient_it_is_torch_s_loss(monkeypatch):
    monkeypatch.setattr(native, "load", lambda: pytest.fail("no kernels without grad"))
    logits = torch.randn(4, 6)
    targets = torch.tensor([0, 5, IGNORE_INDEX, 2])
    with torch.no_grad():
        loss = summed_cross_entropy(logits.requires_grad_(True), targets)
    assert loss == F.cross_entropy(logits, targets, reduction="sum")


def test_a_target_out_of_range_is_an_error_naming_it(kernels):
    logits = torch.randn(3, 4, requires_grad=True)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        summed_cross_entropy(logits, torch.tensor([0, 4, 1]))


def test_non_finite_logits_give_a_non_finite_loss(kernels):
    """The trainer stops on a non-finite cost: the loss must not hide a NaN."""
    logits = torch.randn(3, 4)
    logits[1, 2] = float("nan")
    loss = summed_cross_entropy(logits.requires_grad_(True), torch.tensor([0, 1, 2]))
    assert torch.isnan(loss)


def test_sequence_loss_gives_a_weight_before_it_autograd_s_gradient(kernels):
    """logits [B, T, V] from a product with a weight: the gradient reaches the weight as
    through F.cross_entropy, for both reductions (float64; the RHN output layer's own
    float32 backward is tested in test_rhn_output)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    weight = torch.randn(11, 6, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 4))
    targets[1, 2] = IGNORE_INDEX
    for reduction in ("sum_over_steps", "mean"):
        got, want = [], []
        for loss_of, out in ((sequence_loss, got), (None, want)):
            w = weight.clone().requires_grad_(True)
            logits = x @ w.t()
            if loss_of is None:
                rows, wanted = logits.reshape(-1, 11), targets.reshape(-1)
                total = F.cross_entropy(rows, wanted, reduction="sum")
                loss = total / ((targets != IGNORE_INDEX).sum() if reduction == "mean" else 3)
            else:
                loss = loss_of(logits, targets, reduction)
            loss.backward()
            out += [loss.detach(), w.grad]
        torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-14)
