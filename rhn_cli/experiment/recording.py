"""How a Sacred run is recorded so that nothing is lost, whatever ends the process.

The engine reports through :class:`SacredReporter`, whose ``flush`` writes out at once
everything reported so far (Sacred's heartbeat: metrics, info, captured output), as the
engine asks at every epoch end and checkpoint. Heartbeats from Sacred's own thread and
from those flushes go one at a time (:func:`start_run`). A run that raises has its
output recorded up to the end, with a line saying why it ended
(:func:`recording_the_end`): Sacred itself closes its capture first and drops what was
printed since the last heartbeat. The run also records which kernels computed it
(:func:`kernel_facts`), and a resumed or evaluated run computes with the libraries its
run recorded (:func:`pin_recorded_decisions`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rhn_cli.tracking.sanitize import clean, clean_number


class SacredReporter:
    """The engine's Reporter, backed by a Sacred run. Values are recorded clean
    (:mod:`rhn_cli.tracking.sanitize`): numpy/torch scalars become Python numbers,
    non-finite values None."""

    def __init__(self, run) -> None:
        self._run = run

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self._run.log_scalar(name, clean_number(value), int(clean(step)))

    def set_info(self, key: str, value: Any) -> None:
        self._run.info[key] = clean(value)

    def flush(self) -> int | None:
        """Record now what the run has reported (metrics, info, output: Sacred's
        heartbeat, at once); the length of the recorded output (cout.txt), or None
        without a file store."""
        self._run.info["kernels"] = kernel_facts()
        self._run._emit_heartbeat()
        run_dir = next((o.dir for o in self._run.observers if getattr(o, "dir", None)), None)
        if run_dir is None:
            return None
        with contextlib.suppress(OSError):
            return os.path.getsize(os.path.join(run_dir, "cout.txt"))
        return None


def kernel_facts() -> dict[str, Any]:
    """What computed the run so far: the native RHN loop or the Python one, MKL or
    oneDNN for each weight-gradient product, and torch's fused LSTM kernel or the Python
    loop for the ``lstm`` model's layers without drop_h, for the ``charrnn_lstm``
    model's layers and for the ``grid_lstm`` model's temporal and depth LSTMs, and the
    hand-written recurrence or the autograd loop for the ``zoneout_lstm`` model and the ``lstm``
    model's layers with drop_h and for the ``gru`` model's tutorial layers, and oneDNN or
    ATen for the backward products of RHN recurrent weights too large to copy and for the
    RHN's input projection and output layer (they round differently), and the size of
    the RHN backward's chunks of steps (the order its weight gradients sum in)."""
    from rhn_cli.kernels import gru_recurrence, lstm_recurrence, native, onednn, rhn_recurrence
    from rhn_cli.kernels.library_choice import library_decisions
    from rhn_cli.models import charrnn_lstm, grid_lstm, lstm

    return {
        "native_loop": native.loaded(),
        "library_decisions": library_decisions(),
        "lstm_fused": lstm.USE_FUSED,
        "charrnn_lstm_fused": charrnn_lstm.USE_FUSED,
        "grid_lstm_fused": grid_lstm.USE_FUSED,
        "grid_lstm_depth_fused": grid_lstm.USE_FUSED_DEPTH,
        "lstm_recurrence": lstm_recurrence.USE_RECURRENCE,
        "lstm_recurrence_onednn": lstm_recurrence.ONEDNN_PRODUCTS,
        "gru_recurrence": gru_recurrence.USE_RECURRENCE,
        "rhn_large_on_onednn": rhn_recurrence.LARGE_ON_ONEDNN,
        "rhn_dense_onednn": onednn.DENSE_PRODUCTS,
        "rhn_chunk_bytes": rhn_recurrence.CHUNK_BYTES,
    }


def pin_recorded_decisions(run_dir: Path) -> None:
    """Compute with the libraries and the LSTM paths the run in ``run_dir`` recorded,
    where it did."""
    from rhn_cli.kernels import gru_recurrence, lstm_recurrence, onednn, rhn_recurrence
    from rhn_cli.kernels.library_choice import pin_library_decisions
    from rhn_cli.models import charrnn_lstm, grid_lstm, lstm

    try:
        info = json.loads((run_dir / "info.json").read_text())
    except (OSError, ValueError):
        return  # not a run directory: nothing recorded to keep
    kernels = info.get("kernels") if isinstance(info, dict) else None
    kernels = kernels if isinstance(kernels, dict) else {}
    # A run recorded before the fused LSTM kernel (no such fact) was computed by the loop.
    lstm.USE_FUSED = kernels.get("lstm_fused") is True
    charrnn_lstm.USE_FUSED = kernels.get("charrnn_lstm_fused") is True
    grid_lstm.USE_FUSED = kernels.get("grid_lstm_fused") is True
    grid_lstm.USE_FUSED_DEPTH = kernels.get("grid_lstm_depth_fused") is True
    # Zoneout LSTM and Gal-masked layers: the hand-written recurrence, or (not recorded)
    # the autograd loop.
    lstm_recurrence.USE_RECURRENCE = kernels.get("lstm_recurrence") is True
    lstm_recurrence.ONEDNN_PRODUCTS = kernels.get("lstm_recurrence_onednn") is True
    gru_recurrence.USE_RECURRENCE = kernels.get("gru_recurrence") is True
    # Large RHN weights' backward products: oneDNN, or (not recorded) ATen's.
    rhn_recurrence.LARGE_ON_ONEDNN = kernels.get("rhn_large_on_onednn") is True
    # The RHN's input projection and output layer: oneDNN, or (not recorded) ATen's.
    onednn.DENSE_PRODUCTS = kernels.get("rhn_dense_onednn") is True
    # The RHN backward's chunks of steps (the order dR sums in): as recorded, or (not
    # recorded) the size before.
    chunk_bytes = kernels.get("rhn_chunk_bytes")
    valid = isinstance(chunk_bytes, int) and not isinstance(chunk_bytes, bool) and chunk_bytes > 0
    rhn_recurrence.CHUNK_BYTES = chunk_bytes if valid else rhn_recurrence.CHUNK_BYTES_BEFORE
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        pin_library_decisions(kernels["library_decisions"])  # absent in older runs


def serialize_heartbeats(run) -> None:
    """Sacred's heartbeat thread and the engine's flushes both emit heartbeats (reading
    the captured output, writing cout.txt): one at a time, or text is lost or doubled."""
    emit, lock = run._emit_heartbeat, threading.RLock()

    def emit_one_at_a_time() -> None:
        with lock:
            emit()

    run._emit_heartbeat = emit_one_at_a_time
    run.heartbeat_lock = lock


def closing_line(error: BaseException) -> str:
    """How a run that raised ended, for its recorded output (the terminal gets the CLI's
    own message)."""
    from rhn_cli.engine.train import TrainingStopped

    if isinstance(error, TrainingStopped):
        saved = f"; checkpoint saved in {error.checkpoint_path}" if error.checkpoint_path else ""
        return f"{error.STATUS}: {error}{saved}"
    if isinstance(error, KeyboardInterrupt):
        return "INTERRUPTED: stopped at once (a second Ctrl-C)"
    return f"FAILED: {type(error).__name__}: {error}".rstrip(": ")


def recording_the_end(main: Callable, stop) -> Callable:
    """``main`` whose run, however it ends, has its whole output recorded, the reason
    for the end included: Sacred closes its capture before a failed or interrupted run's
    last heartbeat, which would then drop what was printed since the one before."""

    @functools.wraps(main)  # Sacred records the command under main's name
    def recorded_main(_config, _run, _seed):
        try:
            return main(_config, _run, _seed)
        except BaseException as error:
            lock = getattr(_run, "heartbeat_lock", None) or contextlib.nullcontext()
            with lock:
                _run._get_captured_output()
                _run.captured_out = (_run.captured_out or "") + closing_line(error) + "\n"
            raise
        finally:
            if stop is not None:  # from here on a Ctrl-C must not cut the record short
                stop.finishing = True

    return recorded_main


def start_run(experiment, command_name: str | None = None, **arguments: Any):
    """Sacred's ``experiment.run``, its heartbeats made safe to emit from the engine."""
    run = experiment._create_run(command_name, **arguments)
    serialize_heartbeats(run)
    run()
    return run
