"""Checkpoint files: written atomically, loaded only if whole and safe.

A checkpoint holds nothing but tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)``: no pickled code runs when a file is opened.
Each file carries a format version and the SHA-256 of its payload, so a truncated or
corrupted file is reported instead of being loaded half-way.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rhn_cli.atomic import write_atomically

FORMAT_VERSION = 1
LAST = "checkpoint.pt"
BEST = "best_model.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or from another format."""


def save(path: Path, state: dict[str, Any]) -> None:
    payload = io.BytesIO()
    torch.save(state, payload)
    body = payload.getvalue()
    envelope = io.BytesIO()
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "sha256": hashlib.sha256(body).hexdigest(),
            "payload": torch.frombuffer(bytearray(body), dtype=torch.uint8),
        },
        envelope,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, envelope.getvalue())


def load(path: Path) -> dict[str, Any]:
    """The state saved in ``path``; raises CheckpointError unless it is complete and intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        envelope = torch.load(path, map_location="cpu", weights_only=True)
        version = envelope["format_version"]
        body = envelope["payload"].numpy().tobytes()
        expected = envelope["sha256"]
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted and was not loaded "
            f"({error.__class__.__name__})"
        ) from error
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {version}; this rhn reads {FORMAT_VERSION}"
        )
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupted (sha256 {actual[:12]}..., expected {expected[:12]}...)"
        )
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every random number generator training may touch, in weights-only-safe form."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    # Only where this process has used CUDA: asking for the state of an unused CUDA
    # generator would create a CUDA context (GPU memory, seconds) in a CPU run.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per device that saved it; a machine with fewer devices restores those
        # it has (set_rng_state_all would fail on the first one missing).
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
