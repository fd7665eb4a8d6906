"""What the engine needs from a language model, whatever its family.

Every model maps token ids to next-token logits while threading a recurrent state:

    logits, state = model(tokens, state)              # tokens [B, T] -> logits [B, T, V]
    logits, state, hidden = model(tokens, state, return_hidden=True)

``hidden`` [B, T, H] is the top recurrent layer's output sequence before any output
dropout (the norm stabiliser reads it). A state is a tensor or a (nested) tuple of
tensors whose leading batch dimension is documented by the model; the engine only
detaches it, moves it and stores it, through :func:`map_state`.

``initial_state(B)`` is what every pass over a split (and, for models trained on
independent chunks, every minibatch) starts from: zeros, or learned vectors broadcast
over the batch. ``draw_masks(tokens)`` draws the per-minibatch (variational) dropout
masks of models that have them; models whose noise is drawn per time step return None
and draw it inside ``forward``. In eval mode nothing is dropped or zoned out: zoneout
uses its expectation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

State = torch.Tensor | tuple  # a tensor, or a (nested) tuple of tensors


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply ``fn`` to every tensor of a (nested tuple) state."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return tuple(map_state(fn, part) for part in state)
    if state is None:
        return None
    raise TypeError(f"a model state is a tensor or a tuple of tensors, not {type(state)}")


def detach_state(state: Any) -> Any:
    return map_state(lambda t: t.detach(), state)


class LanguageModel(nn.Module):
    """Base class of rhn's language models (see the module docstring)."""

    def initial_state(self, batch_size: int) -> State:
        raise NotImplementedError

    def draw_masks(self, tokens: torch.Tensor) -> dict | None:
        return None

    def describe(self) -> str:
        """One line for the start of a run, e.g. 'LSTM 2 x 200 units'."""
        return type(self).__name__

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def partly_used_parameters(self) -> list[str]:
        """The names of parameters that take part in some training steps only (none by
        default); data-parallel training averages their gradients apart."""
        return []


def one_layer_lstm(inputs, h, c, weights, training: bool):
    """torch's fused LSTM kernel (what nn.LSTM calls) over ``inputs`` [B, T, in] from
    h, c [B, H], for one layer with both biases and no dropout inside (each model's own
    dropout acts between its layers): (outputs [B, T, H] as the kernel lays them out,
    time-major in memory; final h; final c). ``weights`` are [w_ih, w_hh, b_ih, b_hh]
    in torch's gate order [i, f, g, o]. ``training`` as nn.LSTM passes it: cuDNN keeps
    what its backward needs only then. torch.lstm is looked up at each call, so tests
    can watch the calls."""
    outputs, h_n, c_n = torch.lstm(
        inputs, (h.unsqueeze(0), c.unsqueeze(0)), weights, True, 1, 0.0, training, False, True
    )
    return outputs, h_n[0], c_n[0]
