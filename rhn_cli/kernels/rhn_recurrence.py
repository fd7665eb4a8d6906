"""The recurrence of one RHN layer with a hand-written backward pass (RHNLayer's fast path).

The layer's input enters only micro-layer 0, so ``rhn_cli.models.rhn.RHNLayer``
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
memory; and it hands the memory of finished chunks' gates back to the system, as much
as the rest of the step needs (``KEEP_GATES_MAPPED``).
Recurrent weights up to ``TRANSPOSED_COPY_UP_TO`` get a second copy for the backward's
dp @ R^i products (packed for oneDNN, see below, or else transposed).

No gradient wanted (``torch.no_grad()``, or no input requires grad, e.g. evaluation):
the same loop runs without storing p and without the autograd Function, so nothing is
saved for a backward.

On the CPU (float32, float64) the loop runs in C++ (``csrc/rhn_forward.cpp``,
``csrc/rhn_backward.cpp``), which :mod:`rhn_cli.kernels.native` builds on first use. The
same operations in the same order, minus the interpreter between them, with each
micro-step's elementwise work fused into one vectorised pass split over rows (forward:
p += x, the gates, the update and the masked copy of s for the next product; backward:
from the kept gates dp / a, 1 - g and s^{i+1} for all kept micro-layers of a step at
once, then one pass per micro-layer for dL/ds^i), the weight gradients' operands handed
over column-major (dp^T and (s * m_h)^T, written by the time loop a few steps at a time:
the layout in which oneDNN's dR^i products run fastest), and, in float32, the recurrent
products through oneDNN with the weights packed once per forward and once per backward
(:mod:`rhn_cli.kernels.onednn`; ptb_sota's [20, 830] x [830, 1660] product takes 0.37 ms
against 0.8 ms in ATen's ``addmm``, which goes to MKL, on the 2-core dev CPU). Its
products sum in another order than MKL's, so float32 results differ from the Python
loop's by rounding (~1e-6 relative); float64 goes through ATen's products in both. The
Python loop below is the native loop's reference and its fallback (no compiler,
``RHN_NATIVE=0``, other devices and dtypes); the tests hold both to the autograd loop.

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

import math
import weakref
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.kernels import buffers, native, onednn, weight_gradient

# Rows (K time steps x B) of each weight-gradient product: the more, the closer the
# products run to full GEMM speed. Their inputs, dp and s^i, are kept for K steps:
# 3 * H * D * K * B numbers (native loop: as columns, plus the rows of a group of
# steps; Python loop: dp in a buffer, or H * D * K * B where dp overwrites p), against
# 2 * H * D * T * B for all of p, at most CHUNK_BYTES: ptb_sota's window is one chunk
# (70 MB), whose ten [1660, 700] x [700, 830] products take ~15% less time than two
# chunks' twenty of half the rows; enwik8_sota's chunks are 5 steps (640 rows, 127 MB):
# its ten [3000, 640] x [640, 1500] products per chunk take ~0.2 s a step less than
# 2-step chunks' (1.58 to 1.75 s against 1.84 to 2.13 s on the 2-core dev CPU), for
# 42 MB more peak memory (0.57x the baseline's). The chunks set the order in which dR
# sums, so runs recorded before this size (the ``rhn_chunk_bytes`` fact, absent there)
# keep CHUNK_BYTES_BEFORE.
CHUNK_ROWS = 1024
CHUNK_BYTES = CHUNK_BYTES_NOW = 128 * 2**20  # CHUNK_BYTES: what this process uses
CHUNK_BYTES_BEFORE = 72 * 2**20
# The native backward turns a step's rows into columns a group of steps at a time: at
# least this many columns per group.
COLUMN_RUN = 64
# Keeping p costs 2H numbers per micro-step: 768 MB for one enwik8_sota window (B=128,
# T=50, H=1500, D=10), four times the weights. Past this size the backward recomputes
# a third of the micro-layers' p (one more [B, H] x [H, 2H] product each) instead.
KEEP_ALL_PREACTIVATIONS_UP_TO = 256 * 2**20
RECOMPUTE_EVERY = 3
# Recurrent weights up to this size get a second copy for the backward's products, packed
# for oneDNN or else transposed (see _backward_products), and their gradient's memory is
# pooled (buffers.gradient_buffer); for enwik8_sota's 180 MB that copy (and the packed
# forward weights of its recomputed micro-layers) would cost more than the memory budget
# allows: its backward runs ATen's products on the weights as they are.
TRANSPOSED_COPY_UP_TO = 64 * 2**20
# Larger recurrent weights: the backward's products through oneDNN on the weights as
# stored (no packed copy: oneDNN packs panels as it goes). enwik8_sota's [128, 3000] x
# [3000, 1500] product takes 2.8 ms this way against 2.7 ms packed and 7.2 ms in ATen's
# mm (MKL) on the 2-core dev CPU (AMD EPYC, AVX-512), with results equal to the packed
# product's to the bit. False: ATen's products, as runs recorded before this path (the
# ``rhn_large_on_onednn`` fact, absent there) computed them.
LARGE_ON_ONEDNN = True
# A window whose gates are too large to keep whole hands the memory of its finished
# steps' gates back to the system during the backward, so that what the step allocates
# afterwards finds room. All of it while another RHN layer's backward is still to come in
# this pass (that backward's peak would otherwise hold this memory too); else only this
# many numbers per token and unit, room for the layer's input-side gradients that the
# step computes after the recurrence (enwik8_sota: its input projection's dx and weight
# gradient and the input dropout's, about [B, T, 3H]). The rest stays mapped in the pool
# for the next forward, which would otherwise fault it back in page by page: in the dev
# VM (a 2-core EPYC whose freed pages go back to its host) that cost enwik8_sota's step
# about 0.5 s, 0.9 s with other models' steps between, as in make bench; the peak is
# the same. False: all of it, always (the policy before).
KEEP_GATES_MAPPED = True
RELEASED_PER_TOKEN_AND_UNIT = 3
# The layers (their autograd nodes, by id) whose backward has not run yet (see
# KEEP_GATES_MAPPED); a graph dropped without a backward drops its entry with it.
_AWAITING_BACKWARD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class Layer(NamedTuple):
    """One RHN layer's recurrence apart from its input, as the forward and the backward
    (Python or native: csrc/rhn_recurrence.h mirrors these fields) see it."""

    state: torch.Tensor  # s_0 [B, H]
    weight: torch.Tensor  # R [D, 2H, H]
    bias: torch.Tensor  # b [D, 2H]
    mask: torch.Tensor | None  # m_h: None, [B, H] (shared by H and T) or [B, 2, H]
    z_states: float  # state zoneout probability
    training: bool


class Kept(NamedTuple):
    """What the forward keeps for the backward."""

    pre: torch.Tensor  # the kept micro-layers' gates [D - len(recomputed), T, B, 2H]
    keep: torch.Tensor | None  # training zoneout's draws, bool [B, T, H]
    recomputed: tuple[int, ...] = ()  # micro-layers whose p the backward recomputes
    outputs: torch.Tensor | None = None  # the forward's outputs (for the backward)


class BackwardProducts(NamedTuple):
    """The native backward's weights for its products."""

    operands: torch.Tensor  # R [D, 2H, H], or a view of its transposed copy
    packed: list  # dL/ds^i's linear weights packed for oneDNN, or []
    packed_forward: list  # the recomputed micro-layers' forward weights, packed, or []


class Workspace(NamedTuple):
    """The native backward's gradients in and out and its scratch space."""

    d_outputs: torch.Tensor  # [B, T, H]
    d_projected: torch.Tensor  # [B, T, 2H], written step by step
    dps: torch.Tensor  # dp rows [D (or the recomputed layers), G, B, 2H]
    states: torch.Tensor  # s^i rows [D, G, B, H]
    carry: torch.Tensor  # [D, B, H]
    dp_columns: torch.Tensor | None  # dp^T [D, 2H, N] of the chunk (weight gradients)
    state_columns: torch.Tensor | None  # (s * m_h)^T [D, H, N]
    dp_over_p: bool  # a kept layer's dp goes where its gates were


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
        layer = Layer(state, recurrent_weight, bias, state_mask, z_states, training)
        return _forward(projected, layer)


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, state, recurrent_weight, bias, state_mask, z_states, training):
        B, T, width = projected.shape
        D = recurrent_weight.shape[0]
        recomputed = recomputed_layers(D, T * B * width * projected.element_size())
        pre = buffers.spare((D - len(recomputed), T, B, width), projected)
        keep = None
        if z_states > 0 and training:
            keep = torch.empty(B, T, width // 2, dtype=torch.bool, device=projected.device)
        layer = Layer(state, recurrent_weight, bias, state_mask, z_states, training)
        outputs, final = _forward(projected, layer, Kept(pre, keep, tuple(sorted(recomputed))))
        _AWAITING_BACKWARD[id(ctx)] = ctx
        ctx.save_for_backward(state, recurrent_weight, bias, state_mask, pre, outputs, keep)
        ctx.z_states, ctx.training, ctx.recomputed = z_states, training, recomputed
        return outputs, final

    @staticmethod
    @once_differentiable
    def backward(ctx, d_outputs, d_final):
        state, weight, bias, mask, pre, outputs, keep = ctx.saved_tensors
        _AWAITING_BACKWARD.pop(id(ctx), None)
        layer = Layer(state, weight, bias, mask, ctx.z_states, ctx.training)
        kept = Kept(pre, keep, tuple(sorted(ctx.recomputed)), outputs)
        need_weights = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        loop = native.kernels_for(pre, state, weight, bias, mask)
        if loop is not None:
            gradients = _native_backward(loop, d_outputs, d_final, layer, kept, need_weights)
        else:
            gradients = _python_backward(d_outputs, d_final, layer, kept, need_weights)
        if not buffers.graph_kept():  # the graph, and with it this reference, goes next
            buffers.give_back(pre)
        return *gradients, None, None, None


def recomputed_layers(depth: int, bytes_per_layer: int) -> frozenset[int]:
    """The micro-layers whose p the backward recomputes instead of keeping: none while
    all of p fits in ``KEEP_ALL_PREACTIVATIONS_UP_TO`` bytes, else every
    ``RECOMPUTE_EVERY``-th one (2, 5, 8, ...; never 0, whose input term is not kept)."""
    if depth * bytes_per_layer <= KEEP_ALL_PREACTIVATIONS_UP_TO:
        return frozenset()
    return frozenset(range(RECOMPUTE_EVERY - 1, depth, RECOMPUTE_EVERY))


def _forward(projected, layer, kept=None):
    """The plain loop, in C++ where the native kernels apply; writes p into ``kept.pre``
    [D - len(recomputed), T, B, 2H] and zoneout draws into ``kept.keep`` when given
    (else, and for recomputed layers, p lives in one scratch buffer)."""
    loop = native.kernels_for(projected, layer.state, layer.weight, layer.bias, layer.mask)
    if loop is None:
        return _python_forward(projected, layer, kept)
    packed = onednn.pack_all(_forward_weights(layer.weight, layer.mask), projected.shape[0])
    return tuple(loop.rhn_forward(projected, layer, kept, packed))


def _python_forward(projected, layer, kept):
    weight, mask, z_states = layer.weight, layer.mask, layer.z_states
    B, T, _ = projected.shape
    D, H = weight.shape[0], weight.shape[2]
    outputs = projected.new_empty(B, T, H)
    layers = list(zip(weight.unbind(0), layer.bias.unbind(0), strict=True))
    scratch = [projected.new_empty(B, 2 * H)] * T
    if kept is None:  # slots[i][t]: where p^i_t goes
        slots = [scratch] * D
    else:
        kept_layers = iter(p_i.unbind(0) for p_i in kept.pre.unbind(0))
        slots = [scratch if i in kept.recomputed else next(kept_layers) for i in range(D)]
    s = layer.state
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
            if layer.training:
                keep_old = torch.rand_like(s) < z_states
                if kept is not None and kept.keep is not None:
                    kept.keep[:, t] = keep_old
                s = torch.where(keep_old, previous, s)
            else:
                s = z_states * previous + (1.0 - z_states) * s
        outputs[:, t] = s
    return outputs, s


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


class _StepScratch(NamedTuple):
    """The Python backward's per-step scratch: h - s (then dp_T / a) and 1 - g, [D, B, H]
    each; dL/ds^i's operands (D - 1 down to 0, with R^i as [2H, H]); whether dp overwrites
    the kept gates; dL/d outputs."""

    diff: torch.Tensor
    carry: torch.Tensor
    down: list
    in_place: bool
    d_outputs: torch.Tensor


def _python_backward(d_outputs, d_final, layer, kept, weights):
    """The backward's Python loop (the native loop's reference), chunk by chunk: per
    chunk of K steps, dp (first the gates; in p's place or a buffer) and the states s^i,
    for the weight gradients."""
    pre, weight = kept.pre, layer.weight
    _, T, B, width = pre.shape
    D, H = weight.shape[0], width // 2
    # dp can overwrite the kept gates, which no one needs once their step has read them,
    # unless a recomputed layer has none to overwrite or the graph is kept for another
    # backward (retain_graph, as gradcheck does).
    in_place = not kept.recomputed and not buffers.graph_kept()
    K = _chunk_steps(T, B, (1 if in_place else 3) * H * D * B * pre.element_size())
    dps = None if in_place else buffers.spare((D, K, B, width), pre)
    states = buffers.spare((D, K, B, H), pre)
    scratch = [states] if in_place else [states, dps]
    operands = _python_backward_operands(weight, scratch)
    down = list(zip(range(D - 1, -1, -1), operands.unbind(0)[::-1], strict=True))
    work = _StepScratch(pre.new_empty(D, B, H), pre.new_empty(D, B, H), down, in_place, d_outputs)
    d_projected = pre.new_empty(B, T, width)
    d_weight = d_bias = None
    ds = d_final + d_outputs[:, T - 1]  # dL/ds_t, always a fresh tensor
    for end in range(T, 0, -K):
        start = max(0, end - K)
        if in_place:
            dps = pre[:, start:end]
        for t in reversed(range(start, end)):
            rows = dps[:, t - start], states[:, t - start]
            ds = _python_step_backward(t, ds, *rows, layer, kept, work)
        n = end - start
        d_projected[:, start:end] = dps[0, :n].transpose(0, 1)
        if weights:
            d_weight, d_bias = _accumulate_weight_gradients(
                d_weight,
                d_bias,
                dps[:, :n].reshape(D, n * B, width),
                states[:, :n].reshape(D, n * B, H),
                layer.mask,
            )
    buffers.give_back(*scratch)  # nothing returned is a view of them
    return d_projected, ds, d_weight, d_bias


def _python_backward_operands(weight, scratch):
    """R^i for dL/ds^i's dp @ R^i. Small weights get a transposed copy for it, making it
    dp @ (R^i^T)^T, the operand layout of the forward's (s * m_h) R^i^T, which MKL runs
    ~25% faster at RHN's skinny shapes (ptb_sota: 0.63 vs 0.83 ms per product on the
    2-core dev CPU); it goes into a reused buffer (ptb_sota: 55 MB), added to
    ``scratch``."""
    if weight.numel() * weight.element_size() > TRANSPOSED_COPY_UP_TO:
        return weight
    D, width, H = weight.shape
    transposed = buffers.spare((D, H, width), weight)  # R^i^T
    scratch.append(transposed.copy_(weight.transpose(1, 2)))
    return transposed.transpose(1, 2)


def _python_step_backward(t, ds, dp, S, layer, kept, work):
    """Step t of the Python backward, from ds = dL/ds_t: the step's dp [D, B, 2H] and
    states S [D, B, H] filled in (for the weight gradients); returns dL/ds_{t-1}."""
    H, z = layer.weight.shape[2], layer.z_states
    h, g = dp[..., :H], dp[..., H:]
    S[0] = layer.state if t == 0 else kept.outputs[:, t - 1]
    if not kept.recomputed and not work.in_place:  # the forward's gates (in place: there)
        dp.copy_(kept.pre[:, t])
    _python_reconstruct(t, dp, S, layer, kept, work.diff)
    # dp = a * [g (1 - h^2) | (h - s) g (1 - g)], dL/ds^i = a (1 - g) + ...
    carry, diff = work.carry, work.diff
    torch.neg(g, out=carry).add_(1.0)
    diff.mul_(g).mul_(carry)
    h.mul_(h).neg_().add_(1.0).mul_(g)
    g.copy_(diff)
    if z > 0:  # split dL/ds_t between the new state s^D_t and the kept s_{t-1}
        if layer.training:
            zoned = torch.where(kept.keep[:, t], ds, 0.0)
            ds = torch.where(kept.keep[:, t], 0.0, ds)
        else:
            zoned, ds = z * ds, (1.0 - z) * ds
    B = ds.shape[0]
    for i, R in work.down:
        dp[i].view(B, 2, H).mul_(ds.unsqueeze(1))
        ds = _state_gradient(carry[i].mul_(ds), dp[i], R, layer.mask)
    if z > 0:
        ds.add_(zoned)
    if t > 0:
        ds.add_(work.d_outputs[:, t - 1])
    return ds


def _python_reconstruct(t, dp, S, layer, kept, diff):
    """The states s^i of step t, exactly as the forward made them, into S, and h - s^i
    into ``diff``; the gates of recomputed layers computed again into dp (from
    p^i = b^i + (s^i * m_h) R^i^T), the kept layers' copied there where dp is not p."""
    recomputed, D = kept.recomputed, layer.weight.shape[0]
    H = layer.weight.shape[2]
    h, g = dp[..., :H], dp[..., H:]
    kept_index = 0
    for i in range(D):
        if recomputed and i in recomputed:
            _preactivation(dp[i], S[i], layer.weight[i], layer.bias[i], layer.mask)
            h[i].tanh_()
            g[i].sigmoid_()
        elif recomputed:
            dp[i].copy_(kept.pre[kept_index, t])
        kept_index += i not in recomputed
        torch.sub(h[i], S[i], out=diff[i])
        if i + 1 < D:
            torch.addcmul(S[i], diff[i], g[i], out=S[i + 1])


def _native_backward(loop, d_outputs, d_final, layer, kept, weights):
    """The backward's time loop in C++, chunk by chunk. Each step's dp^i and s^i need
    only last the step as rows (for dp^i R^i and the gates; dp in p's place where it
    can); for the weight gradients the kernel also writes them column-major, dp^T
    [D, 2H, N] and (s * m_h)^T [D, H, N] for the chunk's N = K B rows: the operand
    layout in which oneDNN runs dR^i = dp^i^T (s^i * m_h) fastest, without transposed
    copies (ptb_sota: ~95 against ~115 ms for MKL on the rows on the 2-core dev CPU)."""
    pre, recomputed, mask = kept.pre, kept.recomputed, layer.mask
    _, T, B, width = pre.shape
    D, H = layer.weight.shape[0], width // 2
    # A kept layer's dp overwrites its p, unless the graph is kept for another backward
    # (retain_graph, as gradcheck does); dps then holds the recomputed layers' only.
    dp_over_p = not buffers.graph_kept()
    staged = len(recomputed) if dp_over_p else D
    size = pre.element_size()  # a step's rows of dp and s, and its scratch for a chunk:
    G, K = _native_chunking(T, B, (staged * width + D * H) * B * size, 3 * H * D * B * size)
    dps, states = buffers.spare((staged, G, B, width), pre), buffers.spare((D, G, B, H), pre)
    scratch = [dps, states]
    columns = None
    if weights:  # column rows padded to whole cache lines, with zeros
        columns = buffers.spare((D * 3 * H * _padded(K * B),), pre)
        scratch.append(columns)
    carry = pre.new_empty(D, B, H)
    d_projected = pre.new_empty(B, T, width)
    products = _backward_products(loop, layer, recomputed, B, scratch)
    work = Workspace(d_outputs, d_projected, dps, states, carry, None, None, dp_over_p)
    d_weight = d_bias = None
    ds = d_final + d_outputs[:, T - 1]  # dL/ds_t, always a fresh tensor
    # A window too large to keep all of p: its done steps' p (and dp) go back to the
    # system, as much as _to_release says.
    to_release = _to_release(pre, H) if recomputed and dp_over_p else 0
    for end in range(T, 0, -K):
        start = max(0, end - K)
        if weights:
            work = _chunk_columns(work, columns, (end - start) * B)
        ds = loop.rhn_backward(layer, kept, products, work, start, end, ds)
        for kept_layer in pre.unbind(0) if to_release > 0 else ():
            to_release -= loop.release(kept_layer[start:end])
        if weights:
            N = (end - start) * B
            d_weight, d_bias = _accumulate_column_gradients(d_weight, d_bias, work, mask, N)
    buffers.give_back(*scratch)  # nothing returned is a view of them
    return d_projected, ds, d_weight, d_bias


def _to_release(pre, H):
    """Bytes of the finished steps' gates ``pre`` [D', T, B, 2H] that the backward hands
    back to the system (``KEEP_GATES_MAPPED``): all while another layer's backward is to
    come, else room for [B, T, ``RELEASED_PER_TOKEN_AND_UNIT`` * H] numbers."""
    if not KEEP_GATES_MAPPED or len(_AWAITING_BACKWARD) > 0:
        return pre.nbytes
    _, T, B, _ = pre.shape
    return min(pre.nbytes, T * B * RELEASED_PER_TOKEN_AND_UNIT * H * pre.element_size())


def _native_chunking(T, B, row_bytes, step_bytes):
    """(G, K): the steps per group of rows turned into columns, at least ``COLUMN_RUN``
    columns and a multiple of 16 (whole cache lines of float32 from aligned offsets), and
    the steps per chunk (``row_bytes``: a step's dp and s rows, kept for a group;
    ``step_bytes``: a step's scratch for the chunk)."""
    aligned = 16 // math.gcd(B, 16)
    G = min(T, aligned * -(-COLUMN_RUN // (aligned * B)))
    K = _chunk_steps(T, B, step_bytes, reserved=G * row_bytes)
    return min(G, K), K


def _backward_products(loop, layer, recomputed, B, scratch):
    """The native backward's weights. dL/ds^i needs dp @ R^i = dp (R^i^T)^T. Small weights
    get a second copy for it, transposed (into a reused buffer, added to ``scratch``: a new
    one would cost its page faults every step, ptb_sota: 55 MB) and packed for oneDNN in
    float32, making it the forward's kind of product. Larger ones (no memory for a copy)
    go to oneDNN on the weights as they are, R^i^T as a view, where ``LARGE_ON_ONEDNN``
    (else to ATen's products): the same numbers as packed weights, at nearly their
    speed. The recomputed micro-layers' forward products go to oneDNN too."""
    weight, mask = layer.weight, layer.mask
    operands = weight
    if weight.numel() * weight.element_size() > TRANSPOSED_COPY_UP_TO:
        if not (LARGE_ON_ONEDNN and onednn.applies(weight.dtype)):
            return BackwardProducts(weight, [], [])
        as_stored = _forward_weights(weight, mask, sorted(recomputed))
        return BackwardProducts(weight, _backward_weights(weight.transpose(1, 2), mask), as_stored)
    D, width, H = weight.shape
    transposed = buffers.spare((D, H, width), weight)  # R^i^T
    loop.transpose_into(transposed, weight)
    scratch.append(transposed)
    packed = onednn.pack_all(_backward_weights(transposed, mask), B)
    if not packed:
        operands = transposed.transpose(1, 2)
    recomputing = _forward_weights(weight, mask, sorted(recomputed)) if packed else []
    return BackwardProducts(operands, packed, onednn.pack_all(recomputing, B))


def _chunk_columns(work, columns, N):
    """``work`` with a chunk's column buffers in ``columns``, N columns each, padded with
    zeros to whole cache lines (the padding adds nothing to the products)."""
    D, _, H = work.carry.shape
    padded = _padded(N)
    dp_columns = columns[: D * 2 * H * padded].view(D, 2 * H, padded)
    state_columns = columns[D * 2 * H * padded : D * 3 * H * padded].view(D, H, padded)
    dp_columns[..., N:] = 0.0
    state_columns[..., N:] = 0.0
    return work._replace(dp_columns=dp_columns, state_columns=state_columns)


def _accumulate_column_gradients(d_weight, d_bias, work, mask, N):
    """The weight gradients' sums over a chunk's N rows, from its column buffers (the
    shared mask is in them already; a separate one is applied to rows b of N a step)."""
    shared = mask is not None and mask.dim() == 2
    used = work.dp_columns.shape[2] if mask is None or shared else N
    return _accumulate_weight_gradients(
        d_weight,
        d_bias,
        work.dp_columns[..., :used].transpose(1, 2),
        work.state_columns[..., :used].transpose(1, 2),
        None if shared else mask,
    )


def _padded(columns):
    """``columns`` rounded up to whole 64-byte cache lines of float32."""
    return -(-columns // 16) * 16


def _chunk_steps(T, B, per_step, reserved=0):
    """K, the time steps per chunk of the backward: up to ``CHUNK_ROWS`` rows and
    ``CHUNK_BYTES`` of scratch (``per_step`` bytes a step, plus ``reserved``), in
    chunks of even lengths."""
    K = max(1, min(T, -(-CHUNK_ROWS // B), (CHUNK_BYTES - reserved) // per_step))
    return -(-T // -(-T // K))  # the same number of chunks, of even lengths


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
            d_weight = _weight_gradient_memory((D, width, H), dp)
        onednn_library = weight_gradient.through_onednn(dp, inputs)
        for i in range(D):
            weight_gradient.product(d_weight[i], dp[i], inputs[i], not first, onednn_library)
        return d_weight, d_bias
    if d_weight is None:
        d_weight = _weight_gradient_memory((D, width, H), dp).zero_()
    B = mask.shape[0]
    for half, m in ((slice(0, H), mask[:, 0]), (slice(H, width), mask[:, 1])):
        inputs = (states.view(D, -1, B, H) * m).reshape(D, N, H)
        for i in range(D):
            d_weight[i, half].addmm_(dp[i, :, half].t(), inputs[i])
    return d_weight, d_bias


def _weight_gradient_memory(shape, like):
    """Memory for the recurrent weight's gradient, which becomes its .grad: that of an
    earlier gradient that a trainer dropped (buffers.gradient_buffer), for weights up to
    ``TRANSPOSED_COPY_UP_TO`` (that memory stays held between steps), else new."""
    if math.prod(shape) * like.element_size() > TRANSPOSED_COPY_UP_TO:
        return like.new_empty(shape)
    return buffers.gradient_buffer(shape, like)
