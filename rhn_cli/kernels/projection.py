"""The RHN layer's input projection, ``(x * m_i) W_x^T`` for all steps at once, through
oneDNN with a hand-written backward (RHNLayer's fast path in training); its
:func:`linear` also runs the Gal LSTM layers' input projection
(:func:`rhn_cli.kernels.lstm_recurrence.input_projection`, under that module's switch).

    y = x W^T,    dx = dy W,    dW = dy^T x

MKL, which autograd's ``mm`` calls, runs these products at under half oneDNN's speed on
the AVX-512 EPYC dev CPU (ptb_sota's [700, 830] x [830, 1660]: 11 against 5 ms each);
dW goes through the library the machine's recorded decision names for its shape, as the
recurrence's weight gradients do (:mod:`rhn_cli.kernels.weight_gradient`). oneDNN takes W
as stored (no packed copy; its results are a packed copy's). Used where :func:`applies`
(a gradient wanted, CPU with the native kernels, float32 through oneDNN, and
:data:`rhn_cli.kernels.onednn.DENSE_PRODUCTS`); elsewhere the products are ATen's,
differentiated by autograd. They round otherwise, so a run records the switch
(``kernels.rhn_dense_onednn``) and a resumed one keeps it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.kernels import native, onednn, weight_gradient


def applies(*tensors) -> bool:
    """Whether the oneDNN projection runs for these tensors (see the module docstring)."""
    wanted = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        wanted
        and onednn.DENSE_PRODUCTS
        and onednn.applies(tensors[0].dtype)
        and native.kernels_for(*tensors) is not None
    )


def project(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """inputs [..., in] @ weight [out, in]^T -> [..., out]."""
    if not applies(inputs, weight):
        return inputs @ weight.t()
    return linear(inputs, weight)


def linear(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """inputs [..., in] @ weight [out, in]^T (+ bias [out]) through oneDNN, forward and
    backward, for float32 CPU tensors whose caller has decided that oneDNN applies (this
    module's :func:`project`, the Gal LSTM layers' input projection). ``weight`` may be a
    view (W^T of a [in, out] parameter): oneDNN reads it as stored."""
    return _Linear.apply(inputs, weight, bias)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, bias):
        rows = inputs.reshape(-1, inputs.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.shape = inputs.shape
        return onednn.linear(rows, weight, bias).view(*inputs.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, d_projected):
        rows, weight = ctx.saved_tensors
        d_rows = d_projected.reshape(-1, weight.shape[0])  # a copy where d is time-major
        d_inputs = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_inputs = onednn.linear(d_rows, weight.t()).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            on_onednn = weight_gradient.through_onednn([d_rows], [rows])
            d_weight = weight_gradient.product(None, d_rows, rows, False, on_onednn)
        if ctx.needs_input_grad[2]:
            d_bias = d_rows.sum(0)
        return d_inputs, d_weight, d_bias
