"""The recurrence of one tutorial GRU layer (:mod:`rhn_cli.models.gru`) with a hand-written
backward pass.

The layer projects its input for all time steps in one product, ``projected`` [B, T, 3H]
(U x + b, blocks z, r, c), before calling :func:`recurrence`. What is left, per step t,
with W [3, H, H] the recurrent weights and hs(y) = clip(y, 0, 1):

    y_t  = 0.2 (projected_t[z, r] + s_{t-1} [W_0; W_1]^T) + 0.5       [B, 2H]
    z, r = hs(y_t)
    c_t  = tanh(projected_t[c] + (s_{t-1} * r) W_2^T)
    s_t  = (1 - z) * c_t + z * s_{t-1}

Backward, with g = dL/ds_t (the only quantity that runs through the loop) and hs' = 0.2
where 0 <= y <= 1 (as torch.clamp's gradient), else 0:

    dp_c = g * (1 - z) * (1 - c^2)          dq = dp_c W_2       (q = s_{t-1} * r)
    dp_z = g * (s_{t-1} - c) * hs'(y_z)     dp_r = dq * s_{t-1} * hs'(y_r)
    dL/ds_{t-1} = g * z + dq * r + [dp_z, dp_r] [W_0; W_1]

Why: at B = 1 (one sentence per update) the autograd loop's step is a dozen tiny
operations whose bookkeeping costs more than their arithmetic, and every step's backward
adds two weight-gradient outer products into dW. Here the forward runs without autograd,
keeping y, the gates and c; the backward computes the factors that do not depend on g for
all steps at once, so each step is a few operations, and the weight gradients are two
products over all steps after the loop: dW_{0,1} = sum_t [dp_z, dp_r]^T s_{t-1},
dW_2 = sum_t dp_c^T (s_{t-1} * r). dL/dprojected is [dp_z, dp_r, dp_c].

Float32 results differ from the autograd loop's by rounding (the sums run in another
order), so a run records which path computed it (:mod:`rhn_cli.experiment.recording`);
float64 results agree within 1e-12 (tests/test_gru_recurrence.py). ``USE_RECURRENCE =
False`` makes the tutorial GRU run its autograd loop, the reference and the fallback
(and the only path with zoneout). Without gradients the same loop runs and keeps nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

# Off: the tutorial GRU runs its autograd loop (the reference), as runs recorded before
# this recurrence did; recording.pin_recorded_decisions sets it as a run recorded.
USE_RECURRENCE = True


class Kept(NamedTuple):
    """What the forward keeps for the backward, time-major."""

    pre: torch.Tensor  # y = 0.2 a + 0.5 before the clip [T, B, 2H]
    gates: torch.Tensor  # z, r [T, B, 2H]
    candidates: torch.Tensor  # c [T, B, H]


def recurrence(
    projected: torch.Tensor, state: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """projected [B, T, 3H], state [B, H], weight [3, H, H] -> (outputs [B, T, H], final
    state [B, H])."""
    if projected.shape[1] == 0:
        raise ValueError("a GRU layer needs at least one time step")
    inputs = (projected, state, weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Recurrence.apply(*inputs)
    with torch.no_grad():
        return _forward(projected, state, weight, None)


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, state, weight):
        B, T, width = projected.shape
        H = width // 3
        kept = Kept(
            projected.new_empty(T, B, 2 * H),
            projected.new_empty(T, B, 2 * H),
            projected.new_empty(T, B, H),
        )
        outputs, final = _forward(projected, state, weight, kept)
        ctx.save_for_backward(state, weight, outputs, *kept)
        return outputs, final

    @staticmethod
    @once_differentiable
    def backward(ctx, d_outputs, d_final):
        state, weight, outputs, *saved = ctx.saved_tensors
        kept = Kept(*saved)
        previous = torch.cat((state.unsqueeze(1), outputs[:, :-1]), dim=1).transpose(0, 1)
        d_pre, d_state = _backward(d_outputs, d_final, weight, previous, kept)
        d_weight = None
        if ctx.needs_input_grad[2]:
            d_weight = _weight_gradient(d_pre, previous, kept)
        return d_pre.transpose(0, 1), d_state, d_weight


def _forward(projected, state, weight, kept):
    B, T, width = projected.shape
    H = width // 3
    gates_weight = weight[:2].reshape(2 * H, H).t()
    candidate_weight = weight[2].t()
    outputs = projected.new_empty(B, T, H)
    # Every step's views made at once, and 0.2 a + 0.5's input half for all steps: at B = 1
    # each operation's overhead is most of its cost.
    gate_inputs = (projected[..., : 2 * H] * 0.2 + 0.5).unbind(1)
    candidate_inputs = projected[..., 2 * H :].unbind(1)
    out = outputs.unbind(1)
    pre, gates, candidates = (x.unbind(0) for x in kept) if kept else ([None] * T,) * 3
    s = state
    for t in range(T):
        y = torch.addmm(gate_inputs[t], s, gates_weight, alpha=0.2, out=pre[t])
        z, r = torch.clamp(y, 0.0, 1.0, out=gates[t]).split(H, dim=1)
        c = torch.addmm(candidate_inputs[t], s * r, candidate_weight, out=candidates[t]).tanh_()
        s = torch.lerp(c, s, z, out=out[t])  # c + z * (s - c)
    return outputs, s.clone()


def _backward(d_outputs, d_final, weight, previous, kept):
    """-> (dL/d[pre-activations] [T, B, 3H] (z, r, c), dL/ds_0 [B, H])."""
    T, B, H = previous.shape
    z, r = kept.gates[..., :H], kept.gates[..., H:]
    slope = 0.2 * ((kept.pre >= 0) & (kept.pre <= 1)).to(previous.dtype)
    # The factors that do not depend on g, for all steps at once.
    candidate_factor = ((1 - z) * (1 - kept.candidates * kept.candidates)).unbind(0)
    update_factor = ((previous - kept.candidates) * slope[..., :H]).unbind(0)
    reset_factor = (previous * slope[..., H:]).unbind(0)
    gates_weight = weight[:2].reshape(2 * H, H)
    candidate_weight = weight[2]
    d_pre = previous.new_empty(T, B, 3 * H)
    d_gates, d_update = d_pre[..., : 2 * H].unbind(0), d_pre[..., :H].unbind(0)
    d_reset, d_candidate = d_pre[..., H : 2 * H].unbind(0), d_pre[..., 2 * H :].unbind(0)
    d_outputs, z, r = d_outputs.unbind(1), z.unbind(0), r.unbind(0)
    carry = d_final
    for t in range(T - 1, -1, -1):
        g = d_outputs[t] + carry
        torch.mul(g, candidate_factor[t], out=d_candidate[t])
        dq = d_candidate[t] @ candidate_weight
        torch.mul(g, update_factor[t], out=d_update[t])
        torch.mul(dq, reset_factor[t], out=d_reset[t])
        carry = torch.addmm(torch.addcmul(g * z[t], dq, r[t]), d_gates[t], gates_weight)
    return d_pre, carry


def _weight_gradient(d_pre, previous, kept):
    """dW [3, H, H]: all steps' outer products as two products."""
    T, B, H = previous.shape
    rows = d_pre.reshape(T * B, 3 * H)
    d_gates = rows[:, : 2 * H].t() @ previous.reshape(T * B, H)
    reset_state = (previous * kept.gates[..., H:]).reshape(T * B, H)
    d_candidate = rows[:, 2 * H :].t() @ reset_state
    return torch.cat((d_gates, d_candidate)).view(3, H, H)
