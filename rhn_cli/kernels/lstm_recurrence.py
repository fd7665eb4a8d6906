"""The recurrence of one LSTM layer with a hand-written backward pass, for the LSTMs that
torch's fused kernel cannot run: the Zoneout LSTM (:mod:`rhn_cli.models.zoneout_lstm`)
and the Zaremba LSTM's layers with Gal's recurrent mask (:mod:`rhn_cli.models.lstm`).

The layer projects its input for all time steps in one product, ``projected`` [B, T, 4H]
(input weight and bias), before calling :func:`recurrence`. What is left, per step t,
with W [H, 4H] the recurrent weight and the four gate blocks of a_t where :class:`Cell`
says (the Zoneout LSTM stores them input, forget, candidate, output; TF's cell i, j, f, o):

    a_t  = projected_t + (h_{t-1} * m_h) W          m_h: Gal's mask, constant over time
    i_t  = sigmoid(a_i) * m_t                        input-gate dropout (not rescaled):
                                                     train m_t ~ Bernoulli(1 - drop) per
                                                     step, eval m_t = 1 - drop
    f_t  = sigmoid(a_f + forget_bias),  g_t = tanh(a_g),  o_t = sigmoid(a_o)
    c~_t = f_t * c_{t-1} + i_t * g_t,   h~_t = o_t * tanh(c~_t)
    c_t  = zoneout(c~_t, c_{t-1}, z_cells),   h_t = zoneout(h~_t, h_{t-1}, z_states)

zoneout as :mod:`rhn_cli.models.zoneout`: train keeps the old value where a fresh draw
is < z, eval takes z * old + (1 - z) * new. The draws are made in the autograd loop's
order (input gate, cells, states; each a [B, H] ``rand``), so a seed gives the same masks.

Why: in the autograd loop every step's backward adds its own [H, 4H] product to dW
(K = B rows: memory-bound, a 16 MB write per step at H = 1000) and saves a dozen [B, H]
intermediates per step. Here the forward runs the loop without autograd, keeping the four
gates, tanh(c~_t), c_{t-1} and the draws; the backward carries only dL/dh and dL/dc
through the loop (elementwise work and dL/dh_{t-1} = (da_t W^T) * m_h per step) and
computes dW = sum_t (h_{t-1} * m_h)^T da_t as ONE product over all steps after it;
dL/dprojected is da. In float32 on the CPU the per-step products go through oneDNN on
weights packed once per pass (:mod:`rhn_cli.kernels.onednn`), which runs these skinny
products faster than ATen's ``addmm``. Float32 results differ from the autograd loop's
by rounding (the sums run in another order), so a run records which path computed it
(:mod:`rhn_cli.experiment.recording`); float64 results agree to ~1e-15 (the tests).

``USE_RECURRENCE = False`` makes both models run their autograd loop, the reference and
the fallback. Without gradients (``torch.no_grad()`` or no input requiring grad) the
same loop runs and keeps nothing.

The large products over all T x B rows go through oneDNN too in float32 on the CPU
(``ONEDNN_PRODUCTS``): for the ``lstm`` model's Gal layers the input projection and its
input gradient (:func:`input_projection`), where MKL, which ATen's ``mm`` calls, runs at
well under half oneDNN's speed on the AVX-512 EPYC dev CPU (ptb_variational_lstm's
[700, 1500] x [1500, 6000]: about 84 against 35 ms); and the weight gradients (dW after
the loop, the input weight's) through whichever of the two the machine's recorded
library decision picks for the shape (:mod:`rhn_cli.kernels.weight_gradient`). They round
otherwise, so a run records it (``kernels.lstm_recurrence_onednn``); runs recorded
before keep ATen's products.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from rhn_cli.kernels import onednn, projection, weight_gradient

# Off: both models run their autograd loop (the reference), as runs recorded before this
# recurrence did; recording.pin_recorded_decisions sets it as a run recorded.
USE_RECURRENCE = True
# Off: dW and the input projection through ATen's products (MKL), as runs recorded before
# them did; pinned likewise.
ONEDNN_PRODUCTS = True

# Block positions of the input, forget, candidate and output gates in a_t's 4H columns.
ZONEOUT_GATES = (0, 1, 2, 3)  # ZoneoutLSTMLayer: input, forget, candidate, output
TF_GATES = (0, 2, 1, 3)  # TF's BasicLSTMCell: i, j (candidate), f, o


class Cell(NamedTuple):
    """The cell's math apart from its weights (see the module docstring)."""

    gates: tuple[int, int, int, int] = ZONEOUT_GATES
    forget_bias: float = 0.0
    drop_igates: float = 0.0
    z_cells: float = 0.0
    z_states: float = 0.0
    training: bool = False


class Kept(NamedTuple):
    """What the forward keeps for the backward (time-major, [T, B, ...])."""

    gates: torch.Tensor  # sigmoid(a_i), sigmoid(a_f + fb), tanh(a_g), sigmoid(a_o): [T,B,4H]
    cell_tanh: torch.Tensor  # tanh(c~_t) [T, B, H]
    previous_c: torch.Tensor  # c_{t-1} [T, B, H]
    input_mask: torch.Tensor | None  # training input-gate dropout's m_t [T, B, H]
    keep_c: torch.Tensor | None  # training zoneout's draws, bool [T, B, H]
    keep_h: torch.Tensor | None


def recurrence(
    projected: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    weight: torch.Tensor,
    cell: Cell,
    state_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """projected [B, T, 4H], h, c [B, H], weight [H, 4H] -> (outputs [B, T, H] (the h_t,
    contiguous), final h, final c). ``state_mask`` [B, H] (Gal's m_h) gets no gradient."""
    if projected.shape[1] == 0:
        raise ValueError("an LSTM layer needs at least one time step")
    if state_mask is not None and state_mask.requires_grad:
        raise ValueError("the state mask gets no gradient here; use the autograd loop")
    inputs = (projected, h, c, weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Recurrence.apply(*inputs, state_mask, cell)
    with torch.no_grad():
        return _forward(projected, h, c, weight, cell, state_mask, None)


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, h, c, weight, state_mask, cell):
        B, T, width = projected.shape
        H = width // 4
        kept = Kept(
            projected.new_empty(T, B, width),
            projected.new_empty(T, B, H),
            projected.new_empty(T, B, H),
            projected.new_empty(T, B, H) if cell.drop_igates > 0 and cell.training else None,
            _draws(projected, T, B, H) if cell.z_cells > 0 and cell.training else None,
            _draws(projected, T, B, H) if cell.z_states > 0 and cell.training else None,
        )
        outputs, h_n, c_n = _forward(projected, h, c, weight, cell, state_mask, kept)
        ctx.save_for_backward(h, weight, state_mask, outputs, *kept)
        ctx.cell = cell
        return outputs, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_outputs, d_h, d_c):
        h0, weight, state_mask, outputs, *saved = ctx.saved_tensors
        kept = Kept(*saved)
        d_pre, d_h0, d_c0 = _backward(d_outputs, d_h, d_c, weight, ctx.cell, state_mask, kept)
        d_weight = None
        if ctx.needs_input_grad[3]:
            d_weight = _weight_gradient(d_pre, h0, outputs, state_mask)
        return d_pre.transpose(0, 1), d_h0, d_c0, d_weight, None, None


def _draws(like, T, B, H):
    return torch.empty(T, B, H, dtype=torch.bool, device=like.device)


def _gate_views(a, gates):
    """The blocks of a [..., 4H] in the order input, forget, candidate, output."""
    blocks = a.chunk(4, dim=-1)
    return tuple(blocks[position] for position in gates)


class _Products(NamedTuple):
    """x @ W and x @ W^T for one pass: through oneDNN on packed weights where it applies
    (float32 on the CPU), else ATen's."""

    weight: torch.Tensor
    forward_packed: object | None
    backward_packed: object | None

    @classmethod
    def for_pass(cls, weight, rows, backward):
        if weight.device.type != "cpu" or not onednn.applies(weight.dtype):
            return cls(weight, None, None)
        if backward:
            return cls(weight, None, onednn.pack(weight.contiguous(), rows))
        return cls(weight, onednn.pack(weight.t().contiguous(), rows), None)

    def forward(self, x, add, out):
        """out = add + x W."""
        if self.forward_packed is None:
            return torch.addmm(add, x, self.weight, out=out)
        return torch.add(onednn.linear(x, self.forward_packed), add, out=out)

    def backward(self, d):
        """d W^T."""
        if self.backward_packed is None:
            return d @ self.weight.t()
        return onednn.linear(d, self.backward_packed)


def _forward(projected, h, c, weight, cell, state_mask, kept):
    """The time loop; with ``kept``, what the backward needs is written there."""
    B, T, width = projected.shape
    H = width // 4
    outputs = projected.new_empty(B, T, H)
    scratch = projected.new_empty(1, B, width) if kept is None else None
    products = _Products.for_pass(weight, B, backward=False)
    for t in range(T):
        a = scratch[0] if kept is None else kept.gates[t]
        h_in = h if state_mask is None else h * state_mask
        products.forward(h_in, projected[:, t], a)
        i, f, g, o = _gate_views(a, cell.gates)
        i.sigmoid_()
        if cell.forget_bias:
            f.add_(cell.forget_bias)
        f.sigmoid_()
        g.tanh_()
        o.sigmoid_()
        i_used = _dropped_input_gate(i, cell, None if kept is None else kept.input_mask, t)
        new_c = torch.mul(f, c).addcmul_(i_used, g)
        cell_tanh = torch.tanh(new_c)
        if kept is not None:
            kept.previous_c[t] = c
            kept.cell_tanh[t] = cell_tanh
        new_h = torch.mul(o, cell_tanh)
        keep_c, keep_h = (None, None) if kept is None else (kept.keep_c, kept.keep_h)
        c = _zoneout(new_c, c, cell.z_cells, cell.training, keep_c, t)
        h = _zoneout(new_h, h, cell.z_states, cell.training, keep_h, t)
        outputs[:, t] = h
    return outputs, h, c


def _dropped_input_gate(i, cell, masks, t):
    """i_t * m_t, drawing m_t (into masks[t] where given) as the autograd loop does."""
    drop = cell.drop_igates
    if drop <= 0.0:
        return i
    if not cell.training:
        return i * (1.0 - drop)
    mask = (torch.rand_like(i) >= drop).to(i.dtype)
    if masks is not None:
        masks[t] = mask
    return i * mask


def _zoneout(new, old, z, training, keep, t):
    """As :func:`rhn_cli.models.zoneout.zoneout`, with the draw kept in keep[t]."""
    if z <= 0.0:
        return new
    if not training:
        return z * old + (1.0 - z) * new
    keep_old = torch.rand_like(new) < z
    if keep is not None:
        keep[t] = keep_old
    return torch.where(keep_old, old, new)


def _zoned_split(d, z, training, keep, t):
    """dL/d(new), dL/d(old) of a zoneout from its output's gradient ``d`` (old: None when
    there is no zoneout)."""
    if z <= 0.0:
        return d, None
    if training:
        return torch.where(keep[t], 0.0, d), torch.where(keep[t], d, 0.0)
    return (1.0 - z) * d, z * d


def _backward(d_outputs, d_h, d_c, weight, cell, state_mask, kept):
    """The time loop backwards, carrying dL/dh and dL/dc: (d_pre [T, B, 4H] = dL/da_t,
    dL/dh_0, dL/dc_0)."""
    T, B, width = kept.gates.shape
    d_pre = kept.gates.new_empty(T, B, width)
    products = _Products.for_pass(weight, B, backward=True)
    dh = d_outputs[:, T - 1] + d_h
    dc = d_c.clone()
    for t in reversed(range(T)):
        dh_new, dh_old = _zoned_split(dh, cell.z_states, cell.training, kept.keep_h, t)
        dc_new, dc_old = _zoned_split(dc, cell.z_cells, cell.training, kept.keep_c, t)
        i, f, g, o = _gate_views(kept.gates[t], cell.gates)
        di, df, dg, do = _gate_views(d_pre[t], cell.gates)
        cell_tanh = kept.cell_tanh[t]
        # dL/dc~ = dc_new + dh_new * o * (1 - tanh(c~)^2)
        d_cell = torch.mul(cell_tanh, cell_tanh).neg_().add_(1.0).mul_(o).mul_(dh_new)
        d_cell.add_(dc_new)
        torch.mul(dh_new, cell_tanh, out=do).mul_(o).mul_(1.0 - o)
        torch.mul(d_cell, kept.previous_c[t], out=df).mul_(f).mul_(1.0 - f)
        i_used = _used_input_gate(i, cell, kept.input_mask, t)
        torch.mul(g, g, out=dg).neg_().add_(1.0).mul_(i_used).mul_(d_cell)
        torch.mul(d_cell, g, out=di).mul_(i).mul_(1.0 - i)
        if cell.drop_igates > 0:
            di.mul_(kept.input_mask[t] if cell.training else 1.0 - cell.drop_igates)
        dc = d_cell.mul_(f)
        if dc_old is not None:
            dc.add_(dc_old)
        dh = products.backward(d_pre[t])
        if state_mask is not None:
            dh.mul_(state_mask)
        if dh_old is not None:
            dh.add_(dh_old)
        if t > 0:
            dh.add_(d_outputs[:, t - 1])
    return d_pre, dh, dc


def _used_input_gate(i, cell, masks, t):
    """The i_t the forward used: sigmoid(a_i) * m_t."""
    if cell.drop_igates <= 0.0:
        return i
    return i * (masks[t] if cell.training else 1.0 - cell.drop_igates)


def _weight_gradient(d_pre, h0, outputs, state_mask):
    """dW = sum_t (h_{t-1} * m_h)^T da_t, one [H, T B] x [T B, 4H] product."""
    T, B, width = d_pre.shape
    previous_h = torch.cat((h0.unsqueeze(0), outputs[:, : T - 1].transpose(0, 1)))
    if state_mask is not None:
        previous_h.mul_(state_mask)
    rows = previous_h.reshape(T * B, -1), d_pre.reshape(T * B, width)
    return weight_gradient.product(None, *rows, False, _weight_gradient_on_onednn(*rows))


def _on_onednn(tensor: torch.Tensor) -> bool:
    return ONEDNN_PRODUCTS and tensor.device.type == "cpu" and onednn.applies(tensor.dtype)


def _weight_gradient_on_onednn(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether left^T right goes through oneDNN: where ``ONEDNN_PRODUCTS`` applies, as the
    machine's recorded library decision for the shape says (neither library wins at every
    shape: zoneout_char_ptb's dW runs faster in MKL on the dev CPU, the Gal layers' in
    oneDNN), as the RHN's weight gradients do."""
    return _on_onednn(left) and weight_gradient.through_onednn([left], [right])


def input_projection(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """inputs [B, T, in] @ weight [in, 4H] + bias [4H], for all steps at once: through
    oneDNN (forward and gradients, :func:`rhn_cli.kernels.projection.linear`, W read as
    the linear weight W^T, a view) where ``ONEDNN_PRODUCTS`` applies, else ATen's."""
    if not _on_onednn(inputs):
        return inputs @ weight + bias
    return projection.linear(inputs, weight.t(), bias)
