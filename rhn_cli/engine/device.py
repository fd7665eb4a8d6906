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


def as_tensor(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token ids (any integer array) as a contiguous int64 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(device)
