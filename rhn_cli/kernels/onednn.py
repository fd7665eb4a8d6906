"""oneDNN's products on prepacked weights, as the RHN recurrence's native loop and the
output layer use them in float32.

A linear weight [out, in] is packed once (``mkldnn::_reorder_linear_weight``) for products
with a given number of rows, then multiplied many times (``mkldnn::_linear_pointwise``):
ptb_sota's [20, 830] x [830, 1660] product takes 0.37 ms this way against 0.8 ms in ATen's
``addmm``, which goes to MKL, on the 2-core dev CPU. Its products sum in another order
than MKL's, so float32 results differ from ATen's by rounding (~1e-6 relative); float64
never comes here.
"""

from __future__ import annotations

import functools

import torch

# False: ATen's products everywhere (no packing), as without oneDNN.
PACK = True
# False: the RHN model's input projection and its output layer's forward and dx products
# are ATen's (MKL), as runs recorded before they went to oneDNN computed them
# (rhn_cli.kernels.projection, rhn_cli.kernels.output_layer).
DENSE_PRODUCTS = True


def applies(dtype) -> bool:
    """Whether oneDNN's products run for ``dtype``: ``PACK`` on, float32, and a torch build
    with oneDNN (and the two operators used) that the user has not turned off."""
    if not PACK or dtype != torch.float32:
        return False
    return operators_available() and torch.backends.mkldnn.enabled


@functools.cache
def operators_available() -> bool:
    """Whether this torch build has oneDNN and the two operators used (not every one does)."""
    if not torch.backends.mkldnn.is_available():
        return False
    names = ("_reorder_linear_weight", "_linear_pointwise")
    return all(hasattr(torch.ops.mkldnn, name) for name in names)


def pack(weight, rows):
    """A linear weight [out, in] packed for oneDNN's products with ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def linear(x, packed, bias=None):
    """x W^T (+ bias) through oneDNN, for W packed by :func:`pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_all(weights, rows):
    """``weights`` (linear weights [out, in]) packed for products with ``rows`` rows where
    oneDNN applies to them; else [] (the caller then runs ATen's products)."""
    if not weights or not applies(weights[0].dtype):
        return []
    return [pack(w.contiguous(), rows) for w in weights]
