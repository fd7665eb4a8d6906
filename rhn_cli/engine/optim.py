"""Optimisers and clipping rules of the reference code bases, one small piece each.

* ``sgd``: plain SGD (RHN, Zaremba).
* ``adam``: Blocks' Adam (Zoneout): m, v as usual, and the bias correction folded into
  the learning rate, step = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
  (torch's Adam divides eps by sqrt(1 - b2^t) as well; the two differ early on.)
* ``rmsprop``: torch / optim.rmsprop.lua as char-rnn uses it:
  m = a m + (1 - a) g^2, p -= lr g / (sqrt(m) + 1e-8).
* ``rmsprop_eps_inside``: the WildML GRU tutorial: p -= lr g / sqrt(m + 1e-6).

Clipping (``clip``):

* ``grad_norm`` rescales the gradient to a global L2 norm of at most ``max_grad_norm``
  (TF's ``clip_by_global_norm``: g * c / max(norm, c), with no epsilon added to the norm
  as torch's ``clip_grad_norm_`` does);
* ``grad_value`` clamps every gradient entry to +-``max_grad_norm`` (char-rnn);
* ``update_norm`` rescales the optimiser's *step* to a global norm of at most
  ``max_grad_norm`` (Blocks' ``StepClipping`` placed after ``Adam``, as the Zoneout
  scripts do: the moments still see the raw gradient).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from rhn_cli.engine.objective import add_l2_gradient, l2_penalty
from rhn_cli.kernels import native


class BlocksAdam(torch.optim.Optimizer):
    """Adam with the bias correction in the learning rate (``blocks.algorithms.Adam``)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                lr_t = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(state["m"], state["v"].sqrt().add_(group["eps"]), value=-lr_t)


class RMSpropEpsInside(torch.optim.Optimizer):
    """RMSprop with eps under the square root (the WildML tutorial's ``sgd_step``)."""

    def __init__(self, params, lr: float, decay: float = 0.9, eps: float = 1e-6):
        super().__init__(params, {"lr": lr, "decay": decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            decay = group["decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                state["m"].mul_(decay).addcmul_(p.grad, p.grad, value=1 - decay)
                p.addcdiv_(p.grad, state["m"].add(group["eps"]).sqrt_(), value=-group["lr"])


def make_optimizer(config: Mapping[str, Any], parameters: Iterable[torch.nn.Parameter]):
    name, lr = config["optimizer"], config["learning_rate"]
    parameters = list(parameters)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    if name == "adam":
        return BlocksAdam(parameters, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, alpha=config["rmsprop_decay"], eps=1e-8)
    if name == "rmsprop_eps_inside":
        return RMSpropEpsInside(parameters, lr=lr, decay=config["rmsprop_decay"])
    raise ValueError(f"unknown optimizer {name!r}")


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    norms = [t.detach().norm(2) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), 2) if norms else torch.tensor(0.0)


def clip_and_step(optimizer, parameters: list[torch.nn.Parameter], clip: str, threshold: float):
    """Clip as ``clip`` says and take the optimiser step; returns the raw gradient norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    grad_norm = global_norm(grads)
    norm = grad_norm.item()
    if not math.isfinite(norm):
        return grad_norm  # the caller stops the run before anything is changed
    if clip == "grad_norm" and norm > threshold:
        for g in grads:
            g.mul_(threshold / norm)
    if clip == "grad_value":
        for g in grads:
            g.clamp_(-threshold, threshold)
    if clip != "update_norm":
        optimizer.step()
        return grad_norm
    before = [p.detach().clone() for p in parameters]
    optimizer.step()
    with torch.no_grad():
        steps = [p - old for p, old in zip(parameters, before, strict=True)]
        step_norm = global_norm(steps).item()
        if step_norm > threshold:
            scale = threshold / step_norm
            for p, old, step in zip(parameters, before, steps, strict=True):
                p.copy_(old + step * scale)
    return grad_norm


def penalised_step(
    optimizer,
    parameters: list[torch.nn.Parameter],
    clip: str,
    threshold: float,
    weight_decay: float,
) -> tuple[torch.Tensor, float]:
    """The step after ``backward()``: the L2 term's gradient added (``add_l2_gradient``),
    clipping and the optimiser's step (``clip_and_step``); returns (the raw gradient
    norm, the L2 penalty's value, ``l2_penalty``). Nothing changes when the norm is not
    finite.

    Plain SGD with ``grad_norm`` or no clipping on the CPU takes two fused passes over
    the parameters (native kernels: the sums of p^2 and (g + wd p)^2, then p -= lr c (g + wd
    p)) instead of four (ptb_sota: about 470 MB of memory traffic instead of 750). The
    norms are summed in float64 there, so the clipping factor can differ from the other
    path's by float32 rounding; p.grad is left as backward() made it.
    """
    native = _fused_sgd(optimizer, parameters, clip)
    if native is None:
        penalty = l2_penalty(parameters, weight_decay)
        add_l2_gradient(parameters, weight_decay)
        return clip_and_step(optimizer, parameters, clip, threshold), penalty
    params = [p.detach() for p in parameters]
    grads = [p.grad for p in parameters]
    weights, gradients = native.l2_squares(params, grads, weight_decay)
    norm = math.sqrt(gradients)
    if math.isfinite(norm):
        scale = threshold / norm if clip == "grad_norm" and norm > threshold else 1.0
        step = optimizer.param_groups[0]["lr"] * scale
        native.l2_sgd_update(params, grads, weight_decay, step)
    penalty = weight_decay * 0.5 * weights if weight_decay else 0.0
    return torch.tensor(norm, dtype=params[0].dtype), penalty


def _fused_sgd(optimizer, parameters, clip):
    """The native kernels when the fused step applies (plain SGD in one group, every
    parameter with a gradient, contiguous, of the same float dtype on the CPU), else None."""
    if type(optimizer) is not torch.optim.SGD or clip not in ("grad_norm", "none"):
        return None
    if len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    plain = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False}
    if any(group.get(key) != value for key, value in plain.items()) or group.get("maximize"):
        return None
    if not parameters or any(p.grad is None for p in parameters):
        return None
    tensors = [t for p in parameters for t in (p, p.grad)]
    if not all(t.is_contiguous() for t in tensors):
        return None
    return native.kernels_for(*tensors)
