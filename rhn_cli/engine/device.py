"""Where the engine's tensors live: the device a config names, and token arrays on it.

Training (:mod:`rhn_cli.engine.train`) and evaluation (:mod:`rhn_cli.engine.evaluation`)
both need these; they live here so that neither has to import the other for them.
"""

from __future__ import annotations

import numpy as np
import torch


def pick_device(name: str) -> torch.device:
    """The device of config key ``device``: 'auto' (CUDA when there is one), 'cpu',
    'cuda', 'cuda:N'; a CUDA device on a machine without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but no CUDA device is available here; use device=cpu")
    return torch.device(name)


def here_or_auto(name: str) -> str:
    """Config ``device`` for using a trained model on this machine: ``name`` where this
    machine has that device, else 'auto'. Weights load onto any device, so a model trained
    on a GPU is evaluated or sampled on a machine without one (and on its GPU if it has)."""
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return name if int(name.partition(":")[2] or 0) < count else "auto"
    if name == "mps":
        return name if torch.backends.mps.is_available() else "auto"
    return name


def describe(device: torch.device) -> str:
    """The device a run computes on, as its record names it: 'cpu', or 'cuda:0 (its name)'
    (config 'auto' or 'cuda' alone does not say which GPU, or whether one was used)."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def as_tensor(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token ids (any integer array) as a contiguous int64 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(device)
