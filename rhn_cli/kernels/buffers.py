"""Memory that the kernels hand on from one step to the next, and the questions they ask
the autograd engine: one place for the module-level pools and for torch's private calls,
each with what happens where this torch lacks the call.

Pools: large buffers that a training step allocates again and again are kept for the next
use of the same shape. Their pages are mapped already, where a new buffer costs a page
fault per 4 KB on first touch (ptb_sota's 46 MB of gates: ~11k faults, ~9 ms of a ~0.7 s
step on the 2-core dev CPU; glibc hands large blocks back to the system when they are
freed).

* :func:`spare` / :func:`give_back`: scratch buffers and the RHN forward's gates, handed
  back once nothing uses them (a backward that freed its graph); a request of another
  shape lets the spares go.
* :func:`gradient_buffer`: the memory of an earlier gradient that nothing holds any more
  (a trainer's ``zero_grad(set_to_none=True)`` drops it), for the next gradient of that
  size (ptb_sota's recurrent weights: 55 MB, ~13k faults, ~10 ms a step). Needs torch's
  private storage use count; without it every gradient is new memory.
* :func:`forget`: lets all pooled memory go.

The autograd engine (private calls; without them, the safe answer):

* :func:`graph_kept`: whether the running backward keeps its graph for another
  (``retain_graph``); True where torch cannot say, so that nothing saved is overwritten.
* :func:`backward_pass`: an id of the running backward pass; None where torch cannot say,
  and then no hand-over between two Functions of one pass is attempted.
"""

from __future__ import annotations

import math

import torch

_SPARE_BUFFERS: list[torch.Tensor] = []
_GRADIENT_STORAGES: dict[tuple, list[torch.UntypedStorage]] = {}
# A few gradient storages per size (one per RHN layer); the oldest, still in use
# elsewhere, go.
GRADIENT_STORAGES_PER_SIZE = 4


def spare(shape, like) -> torch.Tensor:
    """An uninitialised buffer of ``shape`` with ``like``'s dtype and device: a spare one
    (nothing else holds it), else a new one, and the spares of other shapes let go."""
    for index, buffer in enumerate(_SPARE_BUFFERS):
        if buffer.shape == shape and buffer.dtype == like.dtype and buffer.device == like.device:
            return _SPARE_BUFFERS.pop(index)
    _SPARE_BUFFERS.clear()
    return like.new_empty(shape)


def give_back(*buffers: torch.Tensor) -> None:
    """Keep ``buffers`` for :func:`spare`: the caller holds no view of them any more."""
    _SPARE_BUFFERS.extend(buffers)


def spares() -> tuple[torch.Tensor, ...]:
    """The buffers kept for :func:`spare`, oldest first."""
    return tuple(_SPARE_BUFFERS)


def gradient_buffer(shape, like) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` like ``like``, in the memory of an earlier
    gradient of this size that nothing uses any more (no tensor, no view of it left), else
    new (and remembered). The memory of the last few stays held between steps: meant for
    tensors of a moderate size."""
    if not _storage_use_count_known():
        return like.new_empty(shape)
    nbytes = math.prod(shape) * like.element_size()
    storages = _GRADIENT_STORAGES.setdefault((nbytes, like.dtype, like.device), [])
    for storage in storages:
        if _only_held_here(storage):
            return like.new_empty(0).set_(storage, 0, shape)
    fresh = like.new_empty(shape)
    storages.append(fresh.untyped_storage())
    del storages[:-GRADIENT_STORAGES_PER_SIZE]
    return fresh


def forget() -> None:
    """Let all pooled memory go (spares and gradient storages)."""
    _SPARE_BUFFERS.clear()
    _GRADIENT_STORAGES.clear()


def graph_kept() -> bool:
    """Whether the running backward keeps the graph for another (``retain_graph``); True
    where this torch cannot say."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


def backward_pass() -> int | None:
    """An id of the running backward pass (the autograd graph task), the same for every
    Function of one pass; None where this torch cannot say."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return None if probe is None else probe()


def _storage_use_count_known() -> bool:
    return hasattr(torch._C, "_storage_Use_Count")


def _only_held_here(storage: torch.UntypedStorage) -> bool:
    """Whether only the pool's list holds ``storage`` (no tensor, no view of it)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1
