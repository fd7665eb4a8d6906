"""The recurrence of one RHN layer with a hand-written backward pass (RHNLayer's fast path).

The layer's input enters only micro-layer 0, so :class:`~rhn_cli.models.rhn.RHNLayer`
projects it for all time steps in one product, ``projected = (x * m_i) W_x^T`` [B, T, 2H],
before calling :func:`recurrence`. What is left is the recurrence over steps t and
micro-layers i (R^i = [R_H^i; R_T^i] is [2H, H], p^i_t the pre-activations [B, 2H]):

    s^0_t     = s_{t-1}
    p^i_t     = [i == 0] projected_t + (s^i_t * m_h) R^i^T + b^i
    h, g      = tanh(p^i_t[:, :H]), sigmoid(p^i_t[:, H:])
    s^{i+1}_t = s^i_t + (h - s^i_t) * g
    s_t       = s^D_t,  or zoneout(s^D_t, s_{t-1}) when z_states > 0

Backward, with a = dL/ds^{i+1}_t (the only quantity that has to run through the loop):

    dp_H   = a * g * (1 - h^2)
    dp_T   = a * (h - s^i) * g * (1 - g)
    dL/ds^i = a * (1 - g) + (dp @ R^i) * m_h

The weight gradients are sums over the sequence and are left out of the loop:
``dR^i = sum_t dp^i_t^T (s^i_t * m_h)`` and ``db^i = sum_t,b dp^i_t`` are a few large
products per chunk of K time steps (one [2H, K*B] @ [K*B, H] product per micro-layer,
K*B up to ``CHUNK_ROWS`` rows and ``CHUNK_BYTES`` of scratch), and
``dprojected_t = dp^0_t``. With separate H/T masks ([B, 2, H]) the H rows use
m_h[:, 0] and the T rows m_h[:, 1], in dL/ds^i and in dR^i.
Zoneout splits dL/ds_t between s^D_t and s_{t-1}: by the kept draw in training (bool
[B, T, H], saved), by 1 - z and z in eval.

What is kept for the backward: only the gates h and g of each micro-step (2H numbers,
as many as p, which they overwrite in the forward: keeping p instead would save nothing
and cost a tanh and a sigmoid again in the backward), the output sequence (returned
anyway; s^0_t = s_{t-1} is in it) and, for training zoneout, its keep mask (bool). The
backward recomputes the states s^1..s^{D-1} from s_{t-1} and the gates, one step at a
time, by the forward's operations on the same numbers. The autograd loop keeps about
4H per micro-step (s * m_h, h, g, h - s) and this 2H. The backward's scratch space is
dp and s^i for one chunk of K steps, 3H per micro-step: in the native loop as columns
(below), in the Python loop as rows, where dp overwrites the gates (its step no longer
needs them once used) unless the graph is kept for another backward (``retain_graph``)
or layers are recomputed, leaving H. When all the gates (the buffer is still called p
in the code) would exceed ``KEEP_ALL_PREACTIVATIONS_UP_TO`` (256 MB; enwik8_sota's
window holds 768 MB), every third micro-layer's (2, 5, 8, ...) are not kept: the
backward recomputes its p from the reconstructed s^i with the forward's product, and
its gates, one [B, H] x [H, 2H] product more per such micro-step, for a third less
memory; and it hands the memory of each chunk's gates, once done, back to the system.
Recurrent weights up to ``TRANSPOSED_COPY_UP_TO`` get a second copy for the backward's
dp @ R^i products (packed for oneDNN, see below, or else transposed).

No gradient wanted (``torch.no_grad()``, or no input requires grad, e.g. evaluation):
the same loop runs without storing p and without the autograd Function, so nothing is
saved for a backward.

On the CPU (float32, float64) the loop runs in C++: :mod:`rhn_cli.models.rhn_native`
builds ``rhn_native.cpp`` on first use. The same operations in the same order, minus
the interpreter between them, with each micro-step's elementwise work fused into one
vectorised pass split over rows (forward: p += x, the gates, the update and the
masked copy of s for the next product; backward: from the kept gates dp / a, 1 - g and
s^{i+1} for all kept micro-layers of a step at once, then one pass per micro-layer for
dL/ds^i), the weight gradients' operands handed over column-major (dp^T and
(s * m_h)^T, written by the time loop a few steps at a time: the layout in which
oneDNN's dR^i products run fastest), and, in float32, the recurrent products through
oneDNN with the weights packed once per forward and once per backward
(``mkldnn::_reorder_linear_weight``; ptb_sota's [20, 830] x [830, 1660] product takes
0.37 ms against 0.8 ms in ATen's ``addmm``, which goes to MKL, on the 2-core dev CPU).
Its products sum in another order than MKL's, so float32 results differ from the
Python loop's by rounding (~1e-6 relative); float64 goes through ATen's products in
both. The Python loop below is the
native loop's reference and its fallback (no compiler, ``RHN_NATIVE=0``, other devices
and dtypes); the tests hold both to the autograd loop.

Other devices: the Python loop uses only torch operations on the inputs' device and
dtype (no NumPy, no host syncs; a test runs forward and backward on the 'meta' device,
where either would raise), so the same code runs on CUDA, where the products go to cuBLAS and every
elementwise operation is its own kernel: about 7 launches per micro-step forward and 6
backward, so it will be launch-bound for small B x H (the kernels are microseconds).
Fusing them (torch.compile) or capturing a step in a CUDA graph would help there;
neither is done, because no GPU has been available to test them on, and an untested
compiled path is more likely to break a GPU run than to speed it up. Expect the GPU
path to be correct and no faster than the autograd loop's kernels would allow.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.models import library_choice

# Rows (K time steps x B) of each weight-gradient product: the more, the closer the
# products run to full GEMM speed. Their inputs, dp and s^i, are kept for K steps:
# 3 * H * D * K * B numbers (native loop: as columns, plus the rows of a group of
# steps; Python loop: dp in a buffer, or H * D * K * B where dp overwrites p), against
# 2 * H * D * T * B for all of p, at most CHUNK_BYTES: ptb_sota's window is one chunk
# (72 MB), whose ten [1660, 700] x [700, 830] products take ~15% less time than two
# chunks' twenty of half the rows; enwik8_sota's chunks are 2 steps (58 MB).
CHUNK_ROWS = 1024
CHUNK_BYTES = 72 * 2**20
COLUMN_RUN = 64
# Keeping p costs 2H numbers per micro-step: 768 MB for one enwik8_sota window (B=128,
# T=50, H=1500, D=10), four times the weights. Past this size the backward recomputes
# a third of the micro-layers' p (one more [B, H] x [H, 2H] product each) instead.
KEEP_ALL_PREACTIVATIONS_UP_TO = 256 * 2**20
RECOMPUTE_EVERY = 3
# Recurrent weights up to this size get a second copy for the backward's products, packed
# for oneDNN or else transposed (see _backward); for enwik8_sota's 180 MB that copy (and
# the packed forward weights of its recomputed micro-layers) would cost more than the
# memory budget allows: its backward runs ATen's products on the weights as they are.
TRANSPOSED_COPY_UP_TO = 64 * 2**20
# The time loop in C++ (rhn_native.cpp; built on first use, CPU only), with the Python
# loop below as its fallback and reference. False: always the Python loop (and torch's
# paths for the training loss and step, rhn_cli.engine.cross_entropy and .optim).
NATIVE = True
# In the native loop, float32 products through oneDNN with weights prepacked once per
# forward and per backward (mkldnn::_reorder_linear_weight): about twice ATen's (MKL's)
# rate at RHN's skinny shapes on the 2-core dev CPU. False: ATen's addmm/mm.
PACK = True


def recurrence(
    projected: torch.Tensor,
    state: torch.Tensor,
    recurrent_weight: torch.Tensor,
    bias: torch.Tensor,
    state_mask: torch.Tensor | None = None,
    *,
    z_states: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """projected [B, T, 2H], state [B, H] -> (outputs [B, T, H], final state [B, H]).

    ``recurrent_weight`` [D, 2H, H], ``bias`` [D, 2H]; ``state_mask`` is None, [B, H]
    (shared by H and T) or [B, 2, H] (H, then T) and gets no gradient.
    """
    if projected.shape[1] == 0:
        raise ValueError("an RHN layer needs at least one time step")
    if state_mask is not None and state_mask.requires_grad:
        raise ValueError("the state mask gets no gradient here; use the autograd loop")
    inputs = (projected, state, recurrent_weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Recurrence.apply(*inputs, state_mask, z_states, training)
    with torch.no_grad():
        return _forward(*inputs, state_mask, z_states, training)


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, state, recurrent_weight, bias, state_mask, z_states, training):
        B, T, width = projected.shape
        D = recurrent_weight.shape[0]
        recomputed = recomputed_layers(D, T * B * width * projected.element_size())
        pre = _buffer((D - len(recomputed), T, B, width), projected)
        keep = None
        if z_states > 0 and training:
            keep = torch.empty(B, T, width // 2, dtype=torch.bool, device=projected.device)
        outputs, final = _forward(
            projected, state, recurrent_weight, bias, state_mask, z_states, training, pre, keep,
            recomputed,
        )  # fmt: skip
        ctx.save_for_backward(state, recurrent_weight, bias, state_mask, pre, outputs, keep)
        ctx.z_states, ctx.training, ctx.recomputed = z_states, training, recomputed
        return outputs, final

    @staticmethod
    @once_differentiable
    def backward(ctx, d_outputs, d_final):
        state, weight, bias, mask, pre, outputs, keep = ctx.saved_tensors
        need_weights = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        d_projected, d_state, d_weight, d_bias = _backward(
            d_outputs, d_final, state, weight, bias, mask, pre, outputs, keep,
            ctx.z_states, ctx.training, need_weights, ctx.recomputed,
        )  # fmt: skip
        if not _graph_kept():  # the graph, and with it this reference, goes next
            _SPARE_BUFFERS.append(pre)
        return d_projected, d_state, d_weight, d_bias, None, None, None


# Large buffers that a step allocates again and again, for the next use of the same
# shape: p of backward passes that freed their graphs, and the backward's scratch space.
# Their pages are mapped already, where a new buffer costs a page fault per 4 KB on
# first touch (ptb_sota's 46 MB of p: ~11k faults, ~9 ms of a ~0.7 s step on the 2-core
# dev CPU; glibc hands large blocks back to the system when they are freed).
_SPARE_BUFFERS: list[torch.Tensor] = []


def _buffer(shape, like):
    """An uninitialised buffer of ``shape`` like ``like``: a spare one (nothing else holds
    it), else a new one, and the spares of other shapes let go."""
    for index, spare in enumerate(_SPARE_BUFFERS):
        if spare.shape == shape and spare.dtype == like.dtype and spare.device == like.device:
            return _SPARE_BUFFERS.pop(index)
    _SPARE_BUFFERS.clear()
    return like.new_empty(shape)


def recomputed_layers(depth: int, bytes_per_layer: int) -> frozenset[int]:
    """The micro-layers whose p the backward recomputes instead of keeping: none while
    all of p fits in ``KEEP_ALL_PREACTIVATIONS_UP_TO`` bytes, else every
    ``RECOMPUTE_EVERY``-th one (2, 5, 8, ...; never 0, whose input term is not kept)."""
    if depth * bytes_per_layer <= KEEP_ALL_PREACTIVATIONS_UP_TO:
        return frozenset()
    return frozenset(range(RECOMPUTE_EVERY - 1, depth, RECOMPUTE_EVERY))


def _forward(
    projected, state, weight, bias, mask, z_states, training, pre=None, keep=None,
    recomputed=frozenset(),
):  # fmt: skip
    """The plain loop; writes p into ``pre`` [D - len(recomputed), T, B, 2H] and zoneout
    draws into ``keep`` when given (else, and for recomputed layers, p lives in one
    scratch buffer)."""
    native = native_loop(projected, state, weight, bias, mask)
    B, T, _ = projected.shape
    if native is not None:  # the same loop in C++
        return tuple(
            native.forward(
                projected,
                state,
                weight,
                bias,
                mask,
                z_states,
                training,
                pre,
                keep,
                sorted(recomputed),
                _packed(_forward_weights(weight, mask), B),
            )
        )
    D, H = weight.shape[0], weight.shape[2]
    outputs = projected.new_empty(B, T, H)
    layers = list(zip(weight.unbind(0), bias.unbind(0), strict=True))
    scratch = [projected.new_empty(B, 2 * H)] * T
    if pre is None:  # slots[i][t]: where p^i_t goes
        slots = [scratch] * D
    else:
        kept = iter(p_i.unbind(0) for p_i in pre.unbind(0))
        slots = [scratch if i in recomputed else next(kept) for i in range(D)]
    s = state
    for t, x in enumerate(projected.unbind(1)):
        previous = s
        for i, (R, b) in enumerate(layers):
            p = slots[i][t]
            _preactivation(p, s, R, b, mask)
            if i == 0:
                p.add_(x)
            h, g = p[:, :H].tanh_(), p[:, H:].sigmoid_()  # kept for the backward
            s = torch.addcmul(s, h - s, g)  # s + (h - s) * g; the backward redoes this
        if z_states > 0:  # as rhn_cli.models.zoneout, with the draw kept for the backward
            if training:
                keep_old = torch.rand_like(s) < z_states
                if keep is not None:
                    keep[:, t] = keep_old
                s = torch.where(keep_old, previous, s)
            else:
                s = z_states * previous + (1.0 - z_states) * s
        outputs[:, t] = s
    return outputs, s


def native_loop(*tensors):
    """rhn_native's module when ``NATIVE`` is on and it applies (CPU, one float dtype
    throughout) and could be built, else None: the Python loop runs."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if not NATIVE or dtype not in (torch.float32, torch.float64):
        return None
    if any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return None
    from rhn_cli.models import rhn_native

    return rhn_native.load()


def onednn_pack(weight, rows):
    """A linear weight [out, in] packed for oneDNN's products with ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def onednn_linear(x, packed, bias=None):
    """x W^T (+ bias) through oneDNN, for W packed by :func:`onednn_pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed(weights, rows):
    """``weights`` (linear weights [out, in]) prepacked for oneDNN's products with
    ``rows`` rows, when ``PACK`` is on and they are float32; else [] (ATen's products)."""
    if not weights or not onednn_applies(weights[0].dtype):
        return []
    return [onednn_pack(w.contiguous(), rows) for w in weights]


def onednn_applies(dtype) -> bool:
    """oneDNN's products for the native loop: ``PACK`` on, float32, and a torch build
    with oneDNN (and the two operators used) that the user has not turned off."""
    if not PACK or dtype != torch.float32:
        return False
    return _onednn_operators() and torch.backends.mkldnn.enabled


@functools.cache
def _onednn_operators() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    names = ("_reorder_linear_weight", "_linear_pointwise")  # not in every build
    return all(hasattr(torch.ops.mkldnn, name) for name in names)


def _forward_weights(weight, mask, layers=None):
    """The forward's linear weights: R^i, or R^i_H and R^i_T with separate masks."""
    H = weight.shape[2]
    separate = mask is not None and mask.dim() == 3
    chosen = range(weight.shape[0]) if layers is None else layers
    return [
        part
        for i in chosen
        for part in ((weight[i, :H], weight[i, H:]) if separate else (weight[i],))
    ]


def _backward_weights(transposed, mask):
    """dL/ds^i's linear weights, from ``transposed`` [D, H, 2H] holding R^i^T: R^i^T
    [H, 2H], or R^i_H^T and R^i_T^T [H, H]."""
    if mask is None or mask.dim() == 2:
        return list(transposed.unbind(0))
    H = transposed.shape[1]
    return [half for Rt in transposed.unbind(0) for half in (Rt[:, :H], Rt[:, H:])]


def _preactivation(out, s, weight, bias, mask):
    """out = b + (s * m_h) R^T for one micro-layer, with no, shared or separate masks."""
    if mask is None:
        torch.addmm(bias, s, weight.t(), out=out)
    elif mask.dim() == 2:
        torch.addmm(bias, s * mask, weight.t(), out=out)
    else:
        H = s.shape[1]
        torch.addmm(bias[:H], s * mask[:, 0], weight[:H].t(), out=out[:, :H])
        torch.addmm(bias[H:], s * mask[:, 1], weight[H:].t(), out=out[:, H:])


def _backward(
    d_outputs, d_final, state, weight, bias, mask, pre, outputs, keep, z, training, weights,
    recomputed,
):  # fmt: skip
    _, T, B, width = pre.shape
    D, H = weight.shape[0], width // 2
    native = native_loop(pre, state, weight, bias, mask)
    if native is not None:
        return _native_backward(
            native, d_outputs, d_final, state, weight, bias, mask, pre, outputs, keep, z,
            training, weights, recomputed,
        )  # fmt: skip
    # dp can overwrite the kept gates, which no one needs once their step has read them,
    # unless a recomputed layer has none to overwrite or the graph is kept for another
    # backward (retain_graph, as gradcheck does).
    in_place = not recomputed and not _graph_kept()
    per_step = (1 if in_place else 3) * H * D * B * pre.element_size()
    K = _chunk_steps(T, B, per_step)
    # Per chunk of K steps: dp (first the gates; in p's place or a buffer) and the states
    # s^i, for the weight gradients; per step: h - s (then dp_T / a) and 1 - g.
    dps = None if in_place else _buffer((D, K, B, width), pre)
    states = _buffer((D, K, B, H), pre)
    scratch = [states] if in_place else [states, dps]
    carry = pre.new_empty(D, B, H)
    diff = pre.new_empty(D, B, H)
    d_projected = pre.new_empty(B, T, width)
    d_weight = d_bias = None
    # dL/ds^i needs dp @ R^i. Small weights get a transposed copy for it, making it
    # dp @ (R^i^T)^T, the operand layout of the forward's (s * m_h) R^i^T, which MKL
    # runs ~25% faster at RHN's skinny shapes (ptb_sota: 0.63 vs 0.83 ms per product
    # on the 2-core dev CPU); it goes into a reused buffer (ptb_sota: 55 MB).
    operands = weight
    if weight.numel() * weight.element_size() <= TRANSPOSED_COPY_UP_TO:
        transposed = _buffer((D, H, width), weight)  # R^i^T
        scratch.append(transposed.copy_(weight.transpose(1, 2)))
        operands = transposed.transpose(1, 2)
    down = list(zip(range(D - 1, -1, -1), operands.unbind(0)[::-1], strict=True))
    ds = d_final + d_outputs[:, T - 1]  # dL/ds_t, always a fresh tensor
    for end in range(T, 0, -K):
        start = max(0, end - K)
        if in_place:
            dps = pre[:, start:end]
        for t in reversed(range(start, end)):
            dp, S = dps[:, t - start], states[:, t - start]  # [D, B, 2H], [D, B, H]
            h, g = dp[..., :H], dp[..., H:]
            S[0] = state if t == 0 else outputs[:, t - 1]
            if not recomputed and not in_place:  # the forward's gates (in place: there)
                dp.copy_(pre[:, t])
            kept = 0
            for i in range(D):  # the states s^i, exactly as the forward made them
                if recomputed and i in recomputed:  # p^i = b^i + (s^i * m_h) R^i^T again
                    _preactivation(dp[i], S[i], weight[i], bias[i], mask)
                    h[i].tanh_()
                    g[i].sigmoid_()
                elif recomputed:
                    dp[i].copy_(pre[kept, t])
                kept += i not in recomputed
                torch.sub(h[i], S[i], out=diff[i])
                if i + 1 < D:
                    torch.addcmul(S[i], diff[i], g[i], out=S[i + 1])
            # dp = a * [g (1 - h^2) | (h - s) g (1 - g)], dL/ds^i = a (1 - g) + ...
            torch.neg(g, out=carry).add_(1.0)
            diff.mul_(g).mul_(carry)
            h.mul_(h).neg_().add_(1.0).mul_(g)
            g.copy_(diff)
            if z > 0:  # split dL/ds_t between the new state s^D_t and the kept s_{t-1}
                if training:
                    kept = torch.where(keep[:, t], ds, 0.0)
                    ds = torch.where(keep[:, t], 0.0, ds)
                else:
                    kept, ds = z * ds, (1.0 - z) * ds
            for i, R in down:
                dp[i].view(B, 2, H).mul_(ds.unsqueeze(1))
                ds = _state_gradient(carry[i].mul_(ds), dp[i], R, mask)
            if z > 0:
                ds.add_(kept)
            if t > 0:
                ds.add_(d_outputs[:, t - 1])
        n = end - start
        d_projected[:, start:end] = dps[0, :n].transpose(0, 1)
        if weights:
            d_weight, d_bias = _accumulate_weight_gradients(
                d_weight,
                d_bias,
                dps[:, :n].reshape(D, n * B, width),
                states[:, :n].reshape(D, n * B, H),
                mask,
            )
    _SPARE_BUFFERS.extend(scratch)  # nothing returned is a view of them
    return d_projected, ds, d_weight, d_bias


def _native_backward(
    native, d_outputs, d_final, state, weight, bias, mask, pre, outputs, keep, z, training,
    weights, recomputed,
):  # fmt: skip
    """The backward's time loop in C++, chunk by chunk. Each step's dp^i and s^i need
    only last the step as rows (for dp^i R^i and the gates; dp in p's place where it
    can); for the weight gradients the kernel also writes them column-major, dp^T
    [D, 2H, N] and (s * m_h)^T [D, H, N] for the chunk's N = K B rows: the operand
    layout in which oneDNN runs dR^i = dp^i^T (s^i * m_h) fastest, without transposed
    copies (ptb_sota: ~95 against ~115 ms for MKL on the rows on the 2-core dev CPU)."""
    _, T, B, width = pre.shape
    D, H = weight.shape[0], width // 2
    # A kept layer's dp overwrites its p, unless the graph is kept for another backward
    # (retain_graph, as gradcheck does); dps then holds the recomputed layers' only.
    dp_over_p = not _graph_kept()
    staged = len(recomputed) if dp_over_p else D
    # Steps per group of rows turned into columns: at least COLUMN_RUN columns, a
    # multiple of 16 (whole cache lines of float32 from aligned offsets).
    aligned = 16 // math.gcd(B, 16)
    G = min(T, aligned * -(-COLUMN_RUN // (aligned * B)))
    row_bytes = (staged * width + D * H) * B * pre.element_size()  # a step's dp and s rows
    K = _chunk_steps(T, B, 3 * H * D * B * pre.element_size(), reserved=G * row_bytes)
    G = min(G, K)
    dps, states = _buffer((staged, G, B, width), pre), _buffer((D, G, B, H), pre)
    scratch = [dps, states]
    columns = dp_columns = state_columns = None
    if weights:  # column rows padded to whole cache lines, with zeros
        columns = _buffer((D * 3 * H * _padded(K * B),), pre)
        scratch.append(columns)
    carry = pre.new_empty(D, B, H)
    d_projected = pre.new_empty(B, T, width)
    d_weight = d_bias = None
    # dL/ds^i needs dp @ R^i = dp (R^i^T)^T. Small weights get a second copy for it,
    # transposed (into a reused buffer: a new one would cost its page faults every step,
    # ptb_sota: 55 MB) and packed for oneDNN in float32, making it the forward's kind of
    # product; larger ones go to ATen's products on the weights as they are.
    operands, packed = weight, []
    if weight.numel() * weight.element_size() <= TRANSPOSED_COPY_UP_TO:
        transposed = _buffer((D, H, width), weight)  # R^i^T
        native.transpose_into(transposed, weight)
        scratch.append(transposed)
        packed = _packed(_backward_weights(transposed, mask), B)
        if not packed:
            operands = transposed.transpose(1, 2)
    # The recomputed micro-layers' forward products, in the packed form too.
    recomputing = _forward_weights(weight, mask, sorted(recomputed)) if packed else []
    packed_forward = _packed(recomputing, B)
    shared = mask is not None and mask.dim() == 2
    ds = d_final + d_outputs[:, T - 1]  # dL/ds_t, always a fresh tensor
    for end in range(T, 0, -K):
        start = max(0, end - K)
        N, padded = (end - start) * B, _padded((end - start) * B)
        if weights:  # this chunk's column buffers, N columns each
            dp_columns = columns[: D * width * padded].view(D, width, padded)
            state_columns = columns[D * width * padded : D * 3 * H * padded].view(D, H, padded)
            dp_columns[..., N:] = 0.0  # the padding adds nothing to the products
            state_columns[..., N:] = 0.0
        ds = native.backward(
            start, end, ds, d_outputs, state, operands, weight, bias, mask, pre, outputs,
            keep, z, training, sorted(recomputed), dps, states, carry, packed, packed_forward,
            dp_columns, state_columns, d_projected, dp_over_p,
        )  # fmt: skip
        if recomputed and dp_over_p:  # a window too large to keep all of p: its done
            for kept in pre.unbind(0):  # steps' p (and dp) go back to the system now
                native.release(kept[start:end])
        if weights:  # the shared mask is in the columns already
            used = padded if mask is None or shared else N  # rows b of N a step each
            d_weight, d_bias = _accumulate_weight_gradients(
                d_weight,
                d_bias,
                dp_columns[..., :used].transpose(1, 2),
                state_columns[..., :used].transpose(1, 2),
                None if shared else mask,
            )
    _SPARE_BUFFERS.extend(scratch)  # nothing returned is a view of them
    return d_projected, ds, d_weight, d_bias


def _padded(columns):
    """``columns`` rounded up to whole 64-byte cache lines of float32."""
    return -(-columns // 16) * 16


def _chunk_steps(T, B, per_step, reserved=0):
    """K, the time steps per chunk of the backward: up to ``CHUNK_ROWS`` rows and
    ``CHUNK_BYTES`` of scratch (``per_step`` bytes a step, plus ``reserved``), in
    chunks of even lengths."""
    K = max(1, min(T, -(-CHUNK_ROWS // B), (CHUNK_BYTES - reserved) // per_step))
    return -(-T // -(-T // K))  # the same number of chunks, of even lengths


# The recurrent weight's gradient becomes its .grad, which a trainer drops before the
# next backward (zero_grad(set_to_none=True)): its memory then serves the next gradient
# of the same size, instead of a new block that costs a page fault per 4 KB (ptb_sota:
# 55 MB, ~13k faults, ~10 ms a step on the 2-core dev CPU). Only for weights up to
# TRANSPOSED_COPY_UP_TO, as that memory stays held between steps; a few per size (one
# per RHN layer).
_GRADIENT_STORAGES: dict[tuple, list[torch.UntypedStorage]] = {}
GRADIENT_STORAGES_PER_SIZE = 4


def _gradient_buffer(shape, like):
    """An uninitialised tensor of ``shape`` like ``like``, in the memory of an earlier
    gradient that nothing uses any more (no tensor, no view of it left), else new."""
    nbytes = math.prod(shape) * like.element_size()
    if nbytes > TRANSPOSED_COPY_UP_TO:
        return like.new_empty(shape)
    storages = _GRADIENT_STORAGES.setdefault((nbytes, like.dtype, like.device), [])
    for storage in storages:
        if torch._C._storage_Use_Count(storage._cdata) == 1:  # only this list holds it
            return like.new_empty(0).set_(storage, 0, shape)
    fresh = like.new_empty(shape)
    storages.append(fresh.untyped_storage())
    del storages[:-GRADIENT_STORAGES_PER_SIZE]  # the oldest, still in use elsewhere, go
    return fresh


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph for another (``retain_graph``);
    True where this torch cannot say."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


def _state_gradient(carry, dp, weight, mask):
    """carry + (dp @ R) * m_h, as a new tensor (``carry`` is scratch space)."""
    if mask is None:
        return torch.addmm(carry, dp, weight)
    if mask.dim() == 2:
        return torch.addcmul(carry, dp @ weight, mask)
    H = carry.shape[1]
    ds = torch.addcmul(carry, dp[:, :H] @ weight[:H], mask[:, 0])
    return ds.addcmul_(dp[:, H:] @ weight[H:], mask[:, 1])


def _accumulate_weight_gradients(d_weight, d_bias, dp, states, mask):
    """d_weight[i] += dp[i]^T (s^i * m_h) and d_bias[i] += sum dp[i] over a chunk's N rows,
    dp [D, N, 2H] and states [D, N, H] (row-major, or views of column-major buffers;
    ``mask`` None where the states carry it already). None: the first chunk starts the
    sums. One product per micro-layer: MKL runs D of them faster than one batched
    product (130 vs 155 ms for ptb_sota's window)."""
    D, N, width = dp.shape
    H = width // 2
    d_bias = dp.sum(1) if d_bias is None else d_bias.add_(dp.sum(1))
    if mask is None or mask.dim() == 2:
        inputs = states
        if mask is not None:  # rows (t, b) of each chunk step: b's mask
            inputs = states.view(D, -1, mask.shape[0], H).mul_(mask).view(D, N, H)
        first = d_weight is None  # written by the first chunk's products, not zeroed first
        if first:
            d_weight = _gradient_buffer((D, width, H), dp)
        onednn = weight_gradients_through_onednn(dp, inputs)
        for i in range(D):
            weight_gradient(d_weight[i], dp[i], inputs[i], not first, onednn)
        return d_weight, d_bias
    if d_weight is None:
        d_weight = _gradient_buffer((D, width, H), dp).zero_()
    B = mask.shape[0]
    for half, m in ((slice(0, H), mask[:, 0]), (slice(H, width), mask[:, 1])):
        inputs = (states.view(D, -1, B, H) * m).reshape(D, N, H)
        for i in range(D):
            d_weight[i, half].addmm_(dp[i, :, half].t(), inputs[i])
    return d_weight, d_bias


def weight_gradient(out, left, right, accumulate, onednn=False):
    """out = left^T right, or out += left^T right, returning ``out``; with ``out`` None, a
    new tensor left^T right. ATen's (MKL's) product, or oneDNN's on ``left`` transposed
    (a copy unless it is column-major) with ``right`` packed in the call."""
    if not onednn:
        if out is None:
            return torch.mm(left.t(), right)
        if accumulate:
            return out.addmm_(left.t(), right)
        return torch.mm(left.t(), right, out=out)
    product = onednn_linear(left.t().contiguous(), onednn_pack(right.t(), left.shape[1]))
    if out is None:
        return product
    return out.add_(product) if accumulate else out.copy_(product)


DECISION_ROUNDS = 2


def weight_gradients_through_onednn(lefts, rights) -> bool:
    """Whether weight-gradient products left^T right of this shape go through oneDNN: only
    in the native loop's setting (float32, CPU, oneDNN on), and there as
    :mod:`~rhn_cli.models.library_choice` decides for the product (pinned by a resumed run,
    else cached on disk for this machine and setup, else timed once by
    :func:`timed_weight_gradient_library` and cached), never by a timing of this process
    alone: MKL and oneDNN round differently, and a run's numbers must not depend on which
    happened to be faster at the moment."""
    left, right = lefts[0], rights[0]
    if native_loop(left, right) is None or not onednn_applies(left.dtype):
        return False
    dtype = str(left.dtype).removeprefix("torch.")
    product = (
        f"weight_gradient {left.shape[1]}x{left.shape[0]} {right.shape[0]}x{right.shape[1]} {dtype}"
    )
    timing = functools.partial(timed_weight_gradient_library, lefts, rights)
    return library_choice.decide(product, timing) == "onednn"


def timed_weight_gradient_library(lefts, rights) -> str:
    """'onednn' or 'mkl', whichever runs the products left^T right faster here (neither wins
    everywhere; on the 2-core dev CPU oneDNN does at the RHN's column-major operands, by ~25%
    for ptb_sota's ten [1660, 704] x [704, 830] products, while a single such product timed
    again and again, from the caches, comes out even). Times all the given operand pairs
    (the D micro-layers' distinct operands: as cold in the caches as in a step, where a pair
    timed again would run from them) each way, ``DECISION_ROUNDS`` times, interleaved; the
    fastest round counts (the first oneDNN call builds its kernel). Into new tensors:
    nothing the caller holds is written."""
    seconds = {False: [], True: []}
    for onednn in (False, True) * DECISION_ROUNDS:
        started = time.perf_counter()
        for left, right in zip(lefts, rights, strict=True):
            weight_gradient(None, left, right, False, onednn)
        seconds[onednn].append(time.perf_counter() - started)
    return "onednn" if min(seconds[True]) < min(seconds[False]) else "mkl"
