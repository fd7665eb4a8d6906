"""Data-parallel training over ``torch.distributed``: one process per rank, B/N streams each.

A job is started the standard way, ``torchrun --nproc-per-node N -m rhn_cli train with
...`` (or ``rhn train --nproc N``, which runs the same launcher locally); torchrun hands
every process its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), and :func:`init_from_env` joins the
process group: ``nccl`` when the run trains on a GPU (each process on ``cuda:LOCAL_RANK``),
``gloo`` on the CPU.

The config's ``batch_size`` B stays the global batch: rank r owns the contiguous streams
(rows) ``[r B/N, (r+1) B/N)`` of every minibatch, so the hidden state each rank carries
from one minibatch to the next is exactly that of its rows in a one-process run. Each
rank's loss is the mean over its own rows, and DistributedDataParallel averages the
gradients over the ranks during the backward pass (bucketed all-reduces, overlapped with
the rest of the backward), which gives the gradient of the global mean: the one-process
gradient, up to float rounding. Clipping then sees the global gradient, and
every rank takes the same optimiser step. Scalars that decide what happens next (the
training cost, a stop request, a due checkpoint) are summed over the ranks every step,
so every rank stops, checkpoints and diverges at the same step.

Everything here is a no-op for the single process (:data:`SINGLE`), so the engine has
one code path. Importing this module does not import torch (the CLI asks
:func:`launched` and :func:`env_rank` before anything heavy).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Set by torchrun (and any launcher that follows its conventions) in every worker.
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# Batching modes whose minibatches are B carried streams, which split into rank rows.
SPLITTABLE_BATCHING = ("streams",)


class DistributedError(RuntimeError):
    """The job cannot run as configured on several processes, or lost one of them."""


def launched() -> bool:
    """True in a process started by torchrun (or an equivalent launcher)."""
    return all(key in os.environ for key in _ENV_KEYS)


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def _leaves(state: Any) -> list:
    """The tensors of a (nested tuple) model state, in order."""
    if state is None:
        return []
    if isinstance(state, (tuple, list)):
        return [leaf for part in state for leaf in _leaves(part)]
    return [state]


def _rebuild(template: Any, values: list) -> Any:
    """``template``'s structure with its tensors replaced, in order, by ``values``."""
    from rhn_cli.models.base import map_state

    remaining = iter(values)
    return map_state(lambda _: next(remaining), template)


def batch_dims(initial_state: Callable[[int], Any]) -> list[int]:
    """For every tensor of a model's state, the dimension that runs over the streams:
    the one whose size follows the batch size (models document it; this reads it)."""
    one, two = _leaves(initial_state(1)), _leaves(initial_state(2))
    dims = []
    for a, b in zip(one, two, strict=True):
        differing = [d for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        if len(differing) != 1:
            raise DistributedError(
                f"cannot tell the batch dimension of a state tensor of shape {tuple(b.shape)}"
            )
        dims.append(differing[0])
    return dims


def rank_seed(seed: int, rank: int, *position: int) -> int:
    """The seed of rank ``rank``'s random stream (dropout masks), derived from the run seed
    (and a position in training, for a stream started mid-run): reproducible for a given
    world size, different on every rank."""
    import numpy as np

    entropy = [seed & 0xFFFFFFFF, rank, *position, 0x52484E]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass
class Shard:
    """This process's part of a data-parallel job (``SINGLE``: the whole of a one-process
    run, where every method does nothing or returns its input)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group
    _reduce_device: Any = field(default=None, repr=False)
    # Parameters DistributedDataParallel leaves alone (used in some steps only): their
    # gradients are averaged by backward().
    _partly_used: list = field(default_factory=list, repr=False)

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def gpu(self) -> int:
        """This rank's CUDA device index (the nccl backend: see :func:`init_from_env`)."""
        return self._reduce_device.index

    # -- the streams this rank owns ----------------------------------------------------

    def local_batch(self, batch_size: int) -> int:
        return batch_size // self.world_size

    def rows(self, batch_size: int) -> slice:
        """The rows (streams) of a global minibatch of ``batch_size`` this rank owns."""
        size = self.local_batch(batch_size)
        return slice(self.rank * size, (self.rank + 1) * size)

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Refuse what cannot be split over the ranks exactly (one-process equivalence)."""
        if self.world_size == 1:
            return
        n, batch_size = self.world_size, config["batch_size"]
        batching = config.get("batching", "streams")
        if batching not in SPLITTABLE_BATCHING:
            raise DistributedError(
                f"batching={batching!r} cannot be split over {n} processes (its minibatches "
                "are not B carried streams); use batching='streams' or train in one process"
            )
        if batch_size % n:
            nearby = [
                m for m in (batch_size - batch_size % n, batch_size - batch_size % n + n) if m
            ]
            raise DistributedError(
                f"batch_size={batch_size} cannot be split over {n} processes; use a multiple "
                f"of {n} (e.g. {' or '.join(map(str, nearby))}) or another number of processes"
            )
        if config.get("weight_noise", 0):
            raise DistributedError(
                f"weight_noise={config['weight_noise']} is not supported on several "
                "processes (every rank would train at differently perturbed weights); "
                "train it in one process"
            )

    # -- collectives -------------------------------------------------------------------

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; a peer that died surfaces as one clear error, not a traceback
        from the transport."""
        try:
            return fn()
        except RuntimeError as error:  # DistBackendError is a RuntimeError
            raise DistributedError(
                f"rank {self.rank} lost contact with the other processes during {what} "
                f"(another rank stopped or failed): {str(error).splitlines()[0][:200]}"
            ) from error

    def sum(self, values: Sequence[float]) -> list[float]:
        """Every rank's ``values`` summed, element by element (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        tensor = tensor.to(self._reduce_device)
        self._collective("a reduction", lambda: dist.all_reduce(tensor))
        return tensor.cpu().tolist()

    def data_parallel(self, module: Any) -> Any:
        """``module`` wrapped in DistributedDataParallel, which broadcasts rank 0's
        parameters now and, during every ``backward()``, replaces each gradient by its
        mean over the ranks; ``module`` itself in one process."""
        if not self.distributed:
            return module
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        # A parameter used in some steps only (the Zoneout LSTM's learned initial state:
        # the first window of carried streams) is left out of DDP, which then needs no
        # search for unused parameters at every step, and averaged by backward() when it
        # has a gradient: when no rank used it, it keeps none, as in one process. (DDP's
        # own find_unused_parameters aborted a gloo rank now and then in CI.)
        named = dict(module.named_parameters())
        partly_used = list(module.partly_used_parameters())
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, partly_used)
        self._partly_used = [named[name] for name in partly_used]
        for parameter in self._partly_used:
            self._collective(
                "the parameter broadcast", lambda p=parameter: dist.broadcast(p.data, 0)
            )
        device_ids = [self.gpu] if self.backend == "nccl" else None
        return self._collective(
            "the parameter broadcast",
            lambda: DistributedDataParallel(module, device_ids=device_ids),
        )

    def backward(self, loss: Any) -> None:
        """``loss.backward()``; on several processes DistributedDataParallel's gradient
        all-reduce runs inside it, so a lost peer surfaces here, and then the partly used
        parameters' gradients are averaged as DDP averages (divided, then summed)."""
        if not self.distributed:
            loss.backward()
            return
        import torch.distributed as dist

        self._collective("the gradient all-reduce", loss.backward)
        for parameter in self._partly_used:
            # Every rank runs the same windows: a gradient here is one on every rank.
            if parameter.grad is not None:
                parameter.grad.div_(self.world_size)
                self._collective(
                    "the gradient all-reduce", lambda g=parameter.grad: dist.all_reduce(g)
                )

    def broadcast_int(self, value: int | None) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return int(value or 0)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(value or 0)], dtype=torch.int64).to(self._reduce_device)
        self._collective("a broadcast", lambda: dist.broadcast(tensor, 0))
        return int(tensor.item())

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        self._collective("a gather", lambda: dist.all_gather_object(out, obj))
        return out

    def gather_state(self, state: Any, dims: list[int]) -> Any:
        """The global model state (all B streams) from every rank's B/N streams."""
        if not self.distributed:
            return state
        import torch
        import torch.distributed as dist

        gathered = []
        for tensor, dim in zip(_leaves(state), dims, strict=True):
            tensor = tensor.contiguous()
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self._collective("the state gather", lambda p=parts, t=tensor: dist.all_gather(p, t))
            gathered.append(torch.cat(parts, dim=dim))
        return _rebuild(state, gathered)

    def slice_state(self, state: Any, dims: list[int], batch_size: int) -> Any:
        """This rank's streams of a global model state (e.g. from a checkpoint)."""
        if self.world_size == 1:
            return state
        rows = self.rows(batch_size)
        sliced = [
            t.narrow(d, rows.start, rows.stop - rows.start).contiguous()
            for t, d in zip(_leaves(state), dims, strict=True)
        ]
        return _rebuild(state, sliced)


SINGLE = Shard()


def backend_for(device_name: str) -> str:
    """``nccl`` when the run trains on a CUDA device, else ``gloo``."""
    import torch

    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda and torch.distributed.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(device_name: str) -> Shard:
    """Join the job torchrun started (its environment says where); returns this rank's
    Shard. Waits until every rank has joined, so it is also a barrier."""
    import torch
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend_for(device_name)
    reduce_device = torch.device("cpu")
    if backend == "nccl":
        # This rank's own GPU: cuda:LOCAL_RANK when every rank of the node sees all of them,
        # cuda:0 when the launcher gave each rank its own (Slurm's --gpus-per-task).
        device = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(device)  # 'cuda' now means this rank's own GPU
        reduce_device = torch.device("cuda", device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        except Exception as error:
            raise DistributedError(
                f"rank {rank} of {world_size} could not join the process group "
                f"({backend}): {str(error).splitlines()[0][:200]}"
            ) from error
    return Shard(rank, world_size, local_rank, backend, reduce_device)


def shutdown(shard: Shard) -> None:
    """Leave the process group (local: no other rank is waited for)."""
    if not shard.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# -- the local launcher (rhn train --nproc N) -------------------------------------------


@dataclass
class LaunchOutcome:
    """How a local job ended: ``exit_code`` 0 on success; ``failed`` the ranks that did
    not succeed, with their exit codes (a negative code: killed by that signal)."""

    exit_code: int
    failed: dict[int, int] = field(default_factory=dict)
    interrupted: bool = False  # stopped by a signal, every rank checkpointed and stopped

    def describe(self) -> str:
        """'rank 1 failed (exit code -9, killed by SIGKILL)' or several ranks."""

        def why(code: int) -> str:
            if code < 0:
                try:
                    return f"exit code {code}, killed by {signal.Signals(-code).name}"
                except ValueError:
                    return f"exit code {code}"
            return f"exit code {code}"

        # The likely cause first: a rank killed by a signal other than the launcher's
        # SIGTERM (which stops the survivors), then a rank that exited with an error.
        order = sorted(
            self.failed,
            key=lambda r: (self.failed[r] == -signal.SIGTERM, self.failed[r] >= 0, r),
        )
        first = order[0]
        message = f"rank {first} failed ({why(self.failed[first])})"
        others = [f"rank {r} ({why(self.failed[r])})" for r in order[1:]]
        if others:
            message += "; also " + ", ".join(others)
        return message


_STOP_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def threads_per_process(processes: int) -> str:
    """OMP_NUM_THREADS for ``processes`` torch processes sharing this machine's cores:
    more threads than cores in all would make them fight over the cores."""
    return str(max((os.cpu_count() or 1) // processes, 1))


def launch_local(nproc: int, module_args: list[str]) -> LaunchOutcome:
    """Run ``python -m rhn_cli <module_args>`` on ``nproc`` local processes with torchrun's
    own launcher (``torch.distributed.run --standalone``), in this process so that the
    failed ranks come back as data. ``OMP_NUM_THREADS`` defaults to cores // nproc."""
    os.environ.setdefault("OMP_NUM_THREADS", threads_per_process(nproc))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "-m", "rhn_cli", *module_args]
    )
    try:
        run(args)
    except ChildFailedError as error:
        failed = {rank: failure.exitcode for rank, failure in error.failures.items()}
        stopped = [code for code in failed.values() if code in _STOP_CODES]
        # A rank still exiting when the launcher stops the job dies of its SIGTERM.
        stopping = (*_STOP_CODES, -signal.SIGINT, -signal.SIGTERM)
        if stopped and all(code in stopping for code in failed.values()):
            return LaunchOutcome(max(stopped), failed, interrupted=True)
        return LaunchOutcome(1, failed)
    except SignalException as error:
        return LaunchOutcome(128 + int(error.sigval), interrupted=True)
    return LaunchOutcome(0)
