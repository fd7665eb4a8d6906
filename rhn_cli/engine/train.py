"""The reference RHN training loop (``rhn_train.py`` of the original code), resumable.

Per epoch: set the scheduled learning rate, one pass of stateful truncated BPTT over
the training streams (fresh dropout masks per minibatch, the state carried and
detached between minibatches, global-norm clipping, plain SGD), then batched
evaluation on valid and test with the training B and T and no dropout. Every pass over
a split starts from a zero state. Perplexity is exp(mean NLL per token); bits are
log2(perplexity). As in the reference, the training perplexity is computed from the
full cost, so it includes the (tiny) L2 term.

Beyond the reference, the complete training state (model, optimiser, epoch and step,
carried hidden state, running sums, every RNG, metric history, best so far) is
checkpointed at the end of every epoch, every ``checkpoint_every`` minutes, and when a
stop is requested (a signal, ``max_time``). Resuming from any of these checkpoints
reproduces the uninterrupted run bit for bit on the CPU.

The same loop trains the peer models; the config picks what the references differ in:
the optimiser and clipping rule (:mod:`rhn_cli.engine.optim`), the loss scaling, how the
training data is cut into minibatches (``batching``: carried streams, independent
chunks from a learned initial state, or whole sentences), char-rnn's stream-wise split,
and the Zoneout baselines' regularisers (:mod:`rhn_cli.engine.regularizers`).

The engine knows nothing about Sacred: it reports through a :class:`Reporter`.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import torch

from rhn_cli.data.batching import (
    PAD_TARGET,
    chunk_batches,
    minibatches,
    num_minibatches,
    sentence_batches,
    sentences,
    stream_split,
)
from rhn_cli.data.corpus import Corpus
from rhn_cli.engine import checkpoint
from rhn_cli.engine.device import as_tensor, pick_device
from rhn_cli.engine.device import describe as describe_device
from rhn_cli.engine.distributed import SINGLE, Shard, batch_dims, rank_seed
from rhn_cli.engine.evaluation import (
    evaluate,
    evaluate_independent,
    full_perplexity,
    mc_dropout_perplexity,
)
from rhn_cli.engine.objective import (
    MAX_FINITE_NLL,
    add_l2_gradient,
    l2_penalty,
    learning_rate_at,
    perplexity,
    sequence_loss,
)
from rhn_cli.engine.optim import clip_and_step, make_optimizer, penalised_step
from rhn_cli.engine.progress import ProgressOutput, clock
from rhn_cli.engine.regularizers import norm_stabilizer, weight_noise
from rhn_cli.engine.timing import parse_duration
from rhn_cli.kernels.library_choice import library_decisions, pin_library_decisions
from rhn_cli.models import build_model
from rhn_cli.models.base import State, detach_state, map_state

_SPLITS = ("train", "valid", "test")
# The run-info key of the per-epoch throughput. Not a metric: Omniboard plots all of a
# run's metrics on one linear axis, where ~1e5 tokens/s flattens perplexities of ~3. The
# value has metrics.json's shape, {"tokens_per_s": {"steps": [epochs], "values": [...]}},
# and rhn's readers show it as the metric tokens_per_s.
THROUGHPUT_INFO = "throughput"


class Reporter(Protocol):
    """Where the engine sends metrics and facts about the run.

    A reporter may also have ``flush() -> int | None``: write out everything reported so
    far (metrics, info, output) and return the length of the recorded output, which a
    checkpoint keeps so that a resumed run continues the record from that point."""

    def log_scalar(self, name: str, value: float, step: int) -> None: ...

    def set_info(self, key: str, value: Any) -> None: ...


class MetricLog:
    """A Reporter in front of the run's: passes everything on and keeps every metric
    logged, so that each checkpoint holds the run's metric record up to it. Resuming
    replays that record: whatever killed the process, every step is recorded once."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.entries: list[list] = []  # [name, step, value, ISO time logged]

    def log_scalar(self, name: str, value: float, step: int) -> None:
        stamp = datetime.now(UTC).replace(tzinfo=None).isoformat()
        self.entries.append([name, int(step), float(value), stamp])
        self.reporter.log_scalar(name, value, step)

    def set_info(self, key: str, value: Any) -> None:
        self.reporter.set_info(key, value)

    def flush(self) -> int | None:
        flush = getattr(self.reporter, "flush", None)
        return flush() if flush is not None else None


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class TrainingOutOfMemory(RuntimeError):
    """A step needed more memory than the device has."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped early on request, after writing a checkpoint.

    A KeyboardInterrupt so that run recorders (Sacred) mark the run as stopped rather
    than failed; ``STATUS`` is the status to record.
    """

    STATUS = "INTERRUPTED"

    def __init__(self, message: str, checkpoint_path: Path | None, signal: int | None = None):
        super().__init__(message)
        self.checkpoint_path = checkpoint_path
        self.signal = signal


class TimeLimitReached(TrainingStopped):
    STATUS = "TIMEOUT"


@dataclass
class StopRequest:
    """Set (typically from a signal handler); the trainer stops after the current step."""

    signal: int | None = None
    finishing: bool = False  # training is over and the run is being recorded

    def request(self, signal: int) -> None:
        self.signal = signal

    @property
    def requested(self) -> bool:
        return self.signal is not None


@dataclass
class TrainingSummary:
    best_epoch: int  # 1-based
    best_valid_ppl: float
    history: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)  # full / MC-dropout perplexities


@dataclass
class RunContext:
    """Where a training run speaks, writes and starts from, beyond its config and data.

    Epoch summaries go to ``echo``. Progress (of each epoch, evaluation) is drawn as
    bars on ``progress``, a terminal, if given; else written now and then as plain lines
    on ``progress_log`` if given (:mod:`rhn_cli.engine.progress`). Checkpoints are written into
    ``run_dir`` (none if it is None); ``resume_from`` is a loaded checkpoint to continue;
    ``stop`` is set to stop after the current step. ``shard`` is this process's part of
    a data-parallel job (:mod:`rhn_cli.engine.distributed`); only its rank 0 should get
    a ``run_dir``."""

    echo: Callable[[str], None] = print
    progress: TextIO | None = None
    progress_log: TextIO | None = None
    run_dir: Path | None = None
    resume_from: Mapping[str, Any] | None = None
    stop: StopRequest | None = None
    shard: Shard = field(default_factory=lambda: SINGLE)


@dataclass
class StepResult:
    """What one training step (:meth:`Trainer.train_step`) hands the epoch loop."""

    cost: float  # loss (scaled as config['loss'] says) + norm stabiliser + L2 penalty
    rows: int  # minibatch rows: streams, chunks or sentences
    tokens: int  # targets that count (padding does not)
    grad_norm: float  # the global gradient norm before clipping
    state: State | None  # the hidden state it leaves, detached (None: nothing carried)


def configure_determinism(enabled: bool) -> None:
    """Only deterministic kernels (and cuBLAS workspace settings) when ``enabled``.

    CPU runs are reproducible without it; on GPUs some kernels (scatter/index_add in
    backward passes, cuBLAS split-K reductions) are not unless this is set.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def sentence_end_id(corpus: Corpus) -> int:
    """The id that ends a sentence: '<eos>' (word corpora) or a newline (characters)."""
    for symbol in ("<eos>", "\n"):
        if symbol in corpus.vocab:
            return corpus.vocab.index(symbol)
    raise ValueError(
        f"batching='sentences' needs sentence ends ('<eos>' or a newline) in the "
        f"vocabulary, and dataset {corpus.name!r} has none; use batching='streams'"
    )


def apply_split(config: Mapping[str, Any], corpus: Corpus) -> Corpus:
    """The corpus as the config's ``split`` cuts it (char-rnn: stream-wise 95/5)."""
    if config["split"] == "dataset":
        return corpus
    from dataclasses import replace

    text = np.concatenate([corpus.train, corpus.valid, corpus.test])
    parts = stream_split(text, config["batch_size"], config["num_steps"])
    return replace(corpus, **parts)


def _recorded_throughput(state: Mapping[str, Any]) -> dict[str, list]:
    """A checkpoint's tokens_per_s series; one written before rhn kept it apart has it
    among its metric entries ([name, step, value, time])."""
    if "throughput" in state:
        return {k: list(v) for k, v in state["throughput"].items()}
    entries = [e for e in state.get("metrics", []) if e[0] == "tokens_per_s"]
    return {"steps": [e[1] for e in entries], "values": [e[2] for e in entries]}


def _bits(ppl: float) -> float:
    return math.log2(ppl)


class Trainer:
    """Owns the model, the optimiser and the position in training; can save and restore all."""

    def __init__(
        self,
        config: Mapping[str, Any],
        corpus: Corpus,
        reporter: Reporter,
        context: RunContext | None = None,
    ) -> None:
        context = context or RunContext()
        self.config = config
        self.corpus = corpus
        self.reporter = MetricLog(reporter)
        self.echo = context.echo
        self.progress_output = ProgressOutput(context.progress, context.progress_log)
        self.run_dir = Path(context.run_dir) if context.run_dir is not None else None
        self.stop = context.stop or StopRequest()
        # This process's part of a data-parallel job (SINGLE: all of it).
        self.shard = shard = context.shard
        shard.check_config(config)
        self.device = pick_device(config["device"])
        if shard.backend == "nccl":
            self.device = torch.device("cuda", shard.gpu)
        self.model = build_model(config, corpus.vocab_size).to(self.device)
        # What the training step calls: the model, or on several processes the model in
        # DistributedDataParallel (rank 0's weights everywhere, gradients averaged).
        self.parallel_model = shard.data_parallel(self.model)
        self.parameters = list(self.model.parameters())
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.batch_size, self.num_steps = config["batch_size"], config["num_steps"]
        self.local_batch = shard.local_batch(self.batch_size)  # the streams this rank owns
        self.state_dims = batch_dims(self.model.initial_state) if shard.distributed else []
        # Only rank 0 writes, and every rank must take part in gathering what it writes.
        self.records = shard.sum([self.run_dir is not None])[0] > 0
        self.batching = config.get("batching", "streams")
        self.seed = config.get("seed") or 0
        self.sentences: dict[str, list[np.ndarray]] = {}
        if self.batching == "sentences":
            end = sentence_end_id(corpus)
            self.sentences = {split: sentences(corpus.split(split), end) for split in _SPLITS}
        self.steps_per_epoch = self._epoch_batches(0)[0]
        self.max_time = parse_duration(config["max_time"]) if config["max_time"] else None
        self.started = time.monotonic()
        self.last_checkpoint = time.monotonic()
        # Position in training: epoch in progress (0-based) and minibatches done in it.
        self.epoch_index = 0
        self.step = 0
        self.costs, self.iters = 0.0, 0
        self.state = self.model.initial_state(self.local_batch)
        if shard.distributed:
            # The model is built (the same on every rank); from here each rank draws its
            # dropout masks from its own stream, fixed by the seed and the rank.
            torch.manual_seed(rank_seed(self.seed, shard.rank))
        self.history: dict[str, list[float]] = {"train": [], "valid": [], "test": [], "lr": []}
        # Kept apart from the history: timings differ between runs that compute alike.
        self.throughput: dict[str, list] = {"steps": [], "values": []}  # tokens_per_s
        self.best_valid = math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0
        self.best_weights: dict | None = None
        self.epoch_tokens = 0  # input tokens (every rank's) trained on in this epoch's call

    def _rng(self, epoch_index: int, purpose: int = 0) -> np.random.Generator:
        """A generator fixed by the seed and the epoch, so a resumed epoch sees the same
        chunks in the same order."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, epoch_index, purpose])

    def _epoch_batches(self, epoch_index: int):
        """(number of minibatches, minibatches) of one training epoch."""
        tokens = self.corpus.train
        if self.batching == "chunks":
            return chunk_batches(tokens, self.batch_size, self.num_steps, self._rng(epoch_index))
        if self.batching == "sentences":
            return sentence_batches(
                self.sentences["train"], self.batch_size, self._rng(epoch_index)
            )
        steps = num_minibatches(len(tokens), self.batch_size, self.num_steps)
        rows = self.shard.rows(self.batch_size)  # this rank's streams (all of them in one)
        batches = minibatches(tokens, self.batch_size, self.num_steps, "train")
        return steps, ((inputs[rows], targets[rows]) for inputs, targets in batches)

    def evaluate_split(self, split: str) -> float:
        """The per-epoch perplexity of a split: carried streams with the training B and T,
        or whole sentences for a sentence model."""
        if self.batching == "sentences":
            count, batches = sentence_batches(self.sentences[split], self.batch_size, None)
            return evaluate_independent(
                self.model, batches, self.device, self.progress_output, (count, split)
            )
        tokens = self.corpus.split(split)
        return evaluate(
            self.model,
            tokens,
            self.batch_size,
            self.num_steps,
            self.device,
            split,
            self.shard,
            self.progress_output,
        )

    def evaluate_chunks(self, split: str, epoch_index: int) -> float:
        """The Zoneout scripts' dev metric: independent chunks after a random offset, each
        from the learned initial state (no state carried)."""
        count, batches = chunk_batches(
            self.corpus.split(split),
            self.batch_size,
            self.num_steps,
            self._rng(epoch_index, purpose=1),
            shuffle=False,
        )
        total = (count, f"{split} chunks")
        return evaluate_independent(self.model, batches, self.device, self.progress_output, total)

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole training state. On several processes this is a collective (every
        rank must call it): the hidden state of all B streams is gathered, so the
        checkpoint is the one a single process would write, plus every rank's RNG."""
        hidden = self.shard.gather_state(detach_state(self.state), self.state_dims)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch_index": self.epoch_index,
            "step": self.step,
            "costs": self.costs,
            "iters": self.iters,
            "hidden_state": map_state(lambda t: t.detach().cpu(), hidden),
            "rng": checkpoint.rng_state(),
            "history": {k: list(v) for k, v in self.history.items()},
            "best_valid": self.best_valid,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "config": dict(self.config),
            "metrics": [list(entry) for entry in self.reporter.entries],
            "throughput": {k: list(v) for k, v in self.throughput.items()},
            # MKL or oneDNN for each product (they round differently): kept on resume.
            "library_decisions": library_decisions(),
        }
        if self.shard.distributed:
            state["world_size"] = self.shard.world_size
            state["rank_rng"] = self.shard.gather_objects(checkpoint.rng_state())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch_index, self.step = state["epoch_index"], state["step"]
        self.costs, self.iters = state["costs"], state["iters"]
        hidden = map_state(lambda t: t.to(self.device), state["hidden_state"])
        self.state = self.shard.slice_state(hidden, self.state_dims, self.batch_size)
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.best_valid, self.best_epoch = state["best_valid"], state["best_epoch"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.reporter.entries = [list(entry) for entry in state.get("metrics", [])]
        self.throughput = _recorded_throughput(state)
        pin_library_decisions(state.get("library_decisions", {}))
        rank_rngs = state.get("rank_rng")
        if not self.shard.distributed:
            checkpoint.restore_rng_state(state["rng"])
        elif rank_rngs is not None and len(rank_rngs) == self.shard.world_size:
            checkpoint.restore_rng_state(rank_rngs[self.shard.rank])
        else:
            # Saved by another number of processes: the data and the weights continue
            # exactly, the dropout masks from fresh rank streams.
            self.echo(
                f"checkpoint written by {state.get('world_size', 1)} process(es), resumed on "
                f"{self.shard.world_size}: dropout masks are drawn afresh from here"
            )
            torch.manual_seed(rank_seed(self.seed, self.shard.rank, self.epoch_index, self.step))

    def save_checkpoint(self) -> Path | None:
        if not self.records:
            return None
        state = self.state_dict()  # every rank: a collective on several processes
        self.last_checkpoint = time.monotonic()
        if self.run_dir is None:  # a rank other than 0
            return None
        # The record first (metrics, info, output so far), then the checkpoint that
        # says how far the record goes: a kill in between only repeats recorded work.
        state["output_bytes"] = self.reporter.flush()
        path = self.run_dir / checkpoint.LAST
        checkpoint.save(path, state)
        self.last_checkpoint = time.monotonic()
        return path

    def _save_best_model(self, epoch: int, valid_ppl: float) -> None:
        if not self.shard.is_main:  # only rank 0 evaluates the best model at the end
            return
        if self.run_dir is None:  # unobserved: keep the best weights in memory instead
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            checkpoint.save(
                self.run_dir / checkpoint.BEST,
                {
                    "model": self.model.state_dict(),
                    "epoch": epoch,
                    "valid_ppl": valid_ppl,
                    "config": dict(self.config),
                },
            )

    def where(self, step: int | None = None) -> str:
        """Where training is, for messages: epoch E, step S/N."""
        step = self.step if step is None else step
        return f"epoch {self.epoch_index + 1}, step {step}/{self.steps_per_epoch}"

    def _stop_flags(self) -> list[float]:
        """What this process asks for after a step, as numbers every rank can add up:
        [stop on SIGINT, stop on SIGTERM, stop otherwise, max_time reached, checkpoint due]."""
        signal_number = self.stop.signal if self.stop.requested else None
        now = time.monotonic()
        every = self.config["checkpoint_every"]
        known = (signal.SIGINT, signal.SIGTERM)
        return [
            float(signal_number == signal.SIGINT),
            float(signal_number == signal.SIGTERM),
            float(signal_number is not None and signal_number not in known),
            float(self.max_time is not None and now - self.started >= self.max_time),
            float(bool(every) and now - self.last_checkpoint >= every * 60),
        ]

    def _act_on_flags(self, flags: list[float]) -> None:
        """Stop or checkpoint as the (summed) flags say: any rank's wish goes for all, so
        every rank stops at the same step and the checkpoint is consistent."""
        by_int, by_term, by_other, late, due = (flag > 0 for flag in flags)
        if by_int or by_term or by_other:
            number = signal.SIGINT if by_int else signal.SIGTERM if by_term else self.stop.signal
            path = self.save_checkpoint()
            raise TrainingStopped(f"stopped at {self.where()}", path, number)
        if late:
            path = self.save_checkpoint()
            raise TimeLimitReached(
                f"max_time={self.config['max_time']} reached at {self.where()}", path
            )
        if due:
            self.save_checkpoint()

    def _stop_if_requested(self) -> None:
        self._act_on_flags(self.shard.sum(self._stop_flags()))

    # -- one epoch ---------------------------------------------------------------------

    def train_epoch(self, lr: float) -> float:
        """Continue (or start) the current epoch; returns its training perplexity."""
        self.model.train()
        first_step = self.step
        self.steps_per_epoch, epoch_batches = self._epoch_batches(self.epoch_index)
        self.epoch_tokens = 0
        with EpochProgress(self, lr) as progress:
            for inputs, targets in itertools.islice(epoch_batches, first_step, None):
                self.epoch_tokens += inputs.size * self.shard.world_size
                result = self.train_step(inputs, targets)
                wishes = self._add_to_epoch(result)
                if result.state is not None:  # carried streams: on to the next minibatch
                    self.state = result.state
                self.step += 1
                progress.after_step()
                self._act_on_flags(wishes)
        return perplexity(self.costs / self.iters)

    def train_step(self, inputs: np.ndarray, targets: np.ndarray) -> StepResult:
        """One minibatch: forward from the carried state (from the initial state when
        minibatches are independent), loss, backward, clipping and the optimiser's step.

        With weight noise, forward and backward see the noisy weights and the step
        changes the clean ones. On several processes the gradients come out of backward
        averaged over the ranks (the global batch's gradient), so clipping and the step
        see what one process would."""
        config, model, parameters = self.config, self.model, self.parameters
        beta, noise = config["norm_stabilizer"], config["weight_noise"]
        independent = self.batching != "streams"
        start = model.initial_state(inputs.shape[0]) if independent else self.state
        target_tensor = as_tensor(targets, self.device)
        with weight_noise(model, noise):
            out = self.parallel_model(as_tensor(inputs, self.device), start, return_hidden=beta > 0)
            cost = sequence_loss(out[0], target_tensor, config["loss"])
            if beta > 0:
                cost = cost + norm_stabilizer(out[2], beta)
            self.optimizer.zero_grad(set_to_none=True)
            self.shard.backward(cost)
            if noise:  # the L2 term of the noisy weights, the step on the clean
                penalty = l2_penalty(parameters, config["weight_decay"])
                add_l2_gradient(parameters, config["weight_decay"])
        clip, threshold = config["clip"], config["max_grad_norm"]
        if noise:
            grad_norm = clip_and_step(self.optimizer, parameters, clip, threshold)
        else:
            grad_norm, penalty = penalised_step(
                self.optimizer, parameters, clip, threshold, config["weight_decay"]
            )
        return StepResult(
            cost=cost.item() + penalty,
            rows=inputs.shape[0],
            tokens=int((targets != PAD_TARGET).sum()) if independent else targets.size,
            grad_norm=grad_norm.item(),
            state=None if independent else detach_state(out[1]),
        )

    def _add_to_epoch(self, result: StepResult) -> list[float]:
        """Add a step to the epoch's running sums of the per-token cost (regularisers
        included, as the reference's training perplexity) over every rank's streams;
        a diverged step fails the run. The sums travel with the stop/checkpoint wishes:
        one small reduction per step, which returns the wishes of every rank added up."""
        mean = self.config["loss"] == "mean"
        weight = result.tokens if mean else result.rows
        cost_sum, tokens, *wishes = self.shard.sum(
            [result.cost * weight, result.tokens, *self._stop_flags()]
        )
        cost = result.cost
        if self.shard.distributed:  # the global batch's cost, for the check below
            cost = cost_sum / (tokens if mean else self.batch_size)
        step_nll = cost_sum / max(tokens, 1)  # the global batch's NLL per token
        if not (math.isfinite(result.grad_norm) and step_nll <= MAX_FINITE_NLL):
            # NaN compares false: a NaN loss fails the test too. A finite loss past
            # MAX_FINITE_NLL is a perplexity no float holds: diverged all the same.
            raise TrainingDiverged(
                f"training diverged at {self.where(self.step + 1)}: loss {cost}, "
                f"gradient norm {result.grad_norm}; the last good checkpoint is kept. "
                "Try a lower learning_rate or max_grad_norm, or a smaller init_scale"
            )
        if self.shard.distributed:
            self.costs += cost_sum
            self.iters += int(tokens)
        else:  # exactly as before: the local numbers are the global ones
            self.costs += result.cost * weight
            self.iters += result.tokens
        return wishes

    # -- the whole run -----------------------------------------------------------------

    def announce(self) -> None:
        """Say what is trained, where, and on which data."""
        model, corpus, shard = self.model, self.corpus, self.shard
        self.echo(
            f"model: {model.describe()}, {model.num_parameters():,} parameters, on {self.device}"
        )
        if shard.distributed:
            self.echo(
                f"data-parallel: {shard.world_size} processes ({shard.backend}), "
                f"{self.local_batch} of the {self.batch_size} streams each"
            )
        entropy = corpus.entropy_rate_bits
        self.echo(
            f"data: {corpus.name}, vocabulary {corpus.vocab_size}, "
            f"{len(corpus.train):,}/{len(corpus.valid):,}/{len(corpus.test):,} tokens"
            + (f", source entropy rate {entropy:.4f} bits/symbol" if entropy is not None else "")
        )

    def start(self, resume_from: Mapping[str, Any] | None = None) -> None:
        """Continue from ``resume_from`` (a loaded checkpoint), recording its history
        again; without one, start from config['load_model']'s weights if it names any."""
        load_model = self.config["load_model"]
        if load_model and resume_from is None:
            self.model.load_state_dict(checkpoint.load(Path(load_model))["model"])
            self.echo(f"weights loaded from {load_model}")
        if resume_from is not None:
            self.load_state_dict(resume_from)
            self.echo(f"resumed at {self.where()} from the last checkpoint")
            if self.history["valid"]:
                self.record_info(len(self.history["valid"]))
            else:  # the recorded info may hold an epoch this checkpoint is before
                self._record_throughput()

    def fit(self) -> TrainingSummary:
        config, corpus, reporter = self.config, self.corpus, self.reporter
        entropy = corpus.entropy_rate_bits
        if entropy is not None:
            reporter.set_info("source_entropy_bits", entropy)
        reporter.set_info("nr_parameters", self.model.num_parameters())
        reporter.set_info("device", describe_device(self.device))

        while self.epoch_index < config["max_max_epoch"]:
            epoch = self.epoch_index + 1
            lr = learning_rate_at(
                self.epoch_index, config["learning_rate"], config["lr_decay"], config["max_epoch"]
            )
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            try:
                train_ppl = self.train_epoch(lr)
            except (torch.OutOfMemoryError, MemoryError) as error:
                raise TrainingOutOfMemory(
                    f"out of memory on {self.device} at {self.where(self.step + 1)}; reduce "
                    "batch_size, num_steps or hidden_size (the last checkpoint is kept)"
                ) from error
            train_seconds = time.perf_counter() - started
            tokens_per_s = self.epoch_tokens / max(train_seconds, 1e-9)
            valid_ppl = self.evaluate_split("valid")
            results = [("train", train_ppl), ("valid", valid_ppl)]
            if len(corpus.test):
                results.append(("test", self.evaluate_split("test")))
            for split, ppl in results:
                self.history[split].append(ppl)
                reporter.log_scalar(f"{split}.ppl", ppl, epoch)
                reporter.log_scalar(f"{split}.bpc", _bits(ppl), epoch)
            chunk_line = ""
            if self.batching == "chunks":
                chunk_ppl = self.evaluate_chunks("valid", self.epoch_index)
                reporter.log_scalar("valid_chunks.ppl", chunk_ppl, epoch)
                reporter.log_scalar("valid_chunks.bpc", _bits(chunk_ppl), epoch)
                chunk_line = f"  (per-chunk valid bits {_bits(chunk_ppl):.4f})"
            self.history["lr"].append(lr)
            reporter.log_scalar("lr", lr, epoch)
            self.throughput["steps"].append(epoch)
            self.throughput["values"].append(tokens_per_s)
            self.record_info(epoch)

            improved = valid_ppl < self.best_valid
            if improved:
                self.best_valid, self.best_epoch = valid_ppl, epoch
                self.epochs_without_improvement = 0
                self._save_best_model(epoch, valid_ppl)
            else:
                self.epochs_without_improvement += 1

            # The perplexities first: at 80 columns they fit one line, the rest wraps.
            line = (
                f"epoch {epoch:>3}/{config['max_max_epoch']}  "
                f"train ppl {train_ppl:8.3f} bits {_bits(train_ppl):.4f}  "
                f"valid ppl {valid_ppl:8.3f} bits {_bits(valid_ppl):.4f}  lr {lr:.4g}"
            )
            if entropy is not None:
                line += f"  (source entropy {entropy:.4f})"
            seconds = time.perf_counter() - started
            self.echo(line + chunk_line + f"  {tokens_per_s:,.0f} tok/s  {seconds:.1f}s")

            # The next epoch starts from a zero state (reference run_epoch), or, as in
            # char-rnn, continues from where the last minibatch left the streams.
            self.epoch_index += 1
            self.step, self.costs, self.iters = 0, 0.0, 0
            if config["reset_state_each_epoch"]:
                self.state = self.model.initial_state(self.local_batch)
            self.save_checkpoint()

            patience = config["early_stopping"]
            if patience and self.epochs_without_improvement >= patience:
                self.echo(f"early stopping: no better valid perplexity for {patience} epochs")
                break
            if self.epoch_index < config["max_max_epoch"]:
                self._stop_if_requested()
        return self.summarize()

    def record_info(self, epoch: int) -> None:
        """The run info the reference keeps after ``epoch``: its number, the perplexities."""
        self.reporter.set_info("epoch_nr", epoch)
        self.reporter.set_info(
            "logs",
            {
                "train_perplexity": list(self.history["train"]),
                "valid_perplexity": list(self.history["valid"]),
                "test_perplexity": list(self.history["test"]),
            },
        )
        self._record_throughput()

    def _record_throughput(self) -> None:
        """The whole series each time, from the training state: a resumed run's info
        holds each epoch once, whatever its record held when the last process died."""
        series = {k: list(v) for k, v in self.throughput.items()}
        self.reporter.set_info(THROUGHPUT_INFO, {"tokens_per_s": series})

    def final_evaluation(self) -> dict[str, float]:
        """The reference's closing numbers, from the best-valid model: non-batched
        ("full") valid and test perplexity and, with ``mc_steps``, MC-dropout test."""
        if not self.shard.is_main:
            # One stream (B = 1) does not split; rank 0 evaluates while the others are
            # done (they wait on nothing, so no collective can hang or time out).
            return {}
        if self.run_dir is not None and (self.run_dir / checkpoint.BEST).exists():
            weights = checkpoint.load(self.run_dir / checkpoint.BEST)["model"]
        else:
            weights = self.best_weights
        if weights is not None:
            self.model.load_state_dict(weights)
        epoch = self.best_epoch or len(self.history["valid"])
        if self.batching == "sentences" or self.config["split"] != "dataset":
            # Sentences never carry state, so the batched numbers are already exact; a
            # stream-wise split is B separate pieces of text, not one stream to read.
            self.echo("no full (non-batched) evaluation: the per-epoch numbers are final")
            return {}
        results = {}
        for split, tokens in (("valid", self.corpus.valid), ("test", self.corpus.test)):
            results[f"full_{split}"] = full_perplexity(
                self.model, tokens, progress=self.progress_output, desc=f"full {split}"
            )
        mc_steps = self.config["mc_steps"]
        if mc_steps:
            mc = mc_dropout_perplexity(
                self.model, self.corpus.test, mc_steps, progress=self.progress_output
            )
            results["mc_test"] = mc.perplexity
            self.reporter.set_info("mc_rejected_samples", mc.rejected)
        for name, ppl in results.items():
            self.reporter.log_scalar(f"{name}.ppl", ppl, epoch)
            self.reporter.log_scalar(f"{name}.bpc", _bits(ppl), epoch)
        self.reporter.set_info("full_best_valid_perplexity", results["full_valid"])
        self.reporter.set_info("full_test_perplexity", results["full_test"])
        if "mc_test" in results:
            self.reporter.set_info("mc_test_perplexity", results["mc_test"])
        message = (
            f"full (non-batched) evaluation of the epoch-{epoch} model: valid ppl "
            f"{results['full_valid']:.3f} bits {_bits(results['full_valid']):.4f}, test ppl "
            f"{results['full_test']:.3f} bits {_bits(results['full_test']):.4f}"
        )
        if "mc_test" in results:
            message += f"; MC dropout ({mc_steps} samples) test ppl {results['mc_test']:.3f}"
        self.echo(message)
        return results

    def summarize(self) -> TrainingSummary:
        """The best epoch so far, recorded in the run info and printed."""
        history = self.history
        best_index = int(np.argmin(history["valid"]))
        summary = TrainingSummary(best_index + 1, history["valid"][best_index], history)
        self.reporter.set_info("best_val_epoch", summary.best_epoch)
        self.reporter.set_info("best_valid_perplexity", summary.best_valid_ppl)
        best_bits = _bits(summary.best_valid_ppl)
        message = (
            f"best valid: epoch {summary.best_epoch}, ppl {summary.best_valid_ppl:.3f}, "
            f"{best_bits:.4f} bits"
        )
        if history["test"]:
            message += f"; test ppl {history['test'][best_index]:.3f}"
        entropy = self.corpus.entropy_rate_bits
        if entropy:
            message += (
                f"; source entropy {entropy:.4f} bits, "
                f"model {100 * (best_bits - entropy) / entropy:+.1f}% above it"
            )
        self.echo(message)
        return summary


class EpochProgress:
    """The progress of one epoch's training (:mod:`rhn_cli.engine.progress`): the running
    perplexity and the time left in the epoch and the run; on wide terminals also the
    learning rate and tokens/s."""

    def __init__(self, trainer: Trainer, lr: float) -> None:
        self.trainer, self.lr = trainer, lr
        self.first_step = trainer.step
        self.pass_ = trainer.progress_output.start(
            trainer.steps_per_epoch,
            f"epoch {trainer.epoch_index + 1}",
            "batch",
            self._layouts,
            initial=self.first_step,
        )
        self.started = time.monotonic()

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.pass_.close()

    def after_step(self) -> None:
        """Count the step the trainer has just taken."""
        self.pass_.update()

    def _layouts(self, left_in_epoch: float | None) -> list[str]:
        trainer = self.trainer
        if left_in_epoch is None or not trainer.iters:
            return ["ppl ?  ETA ?"]
        ppl = f"ppl {perplexity(trainer.costs / trainer.iters):.2f}"
        epochs_after = trainer.config["max_max_epoch"] - trainer.epoch_index - 1
        per_step = left_in_epoch / max(trainer.steps_per_epoch - trainer.step, 1)
        left_in_run = left_in_epoch + epochs_after * trainer.steps_per_epoch * per_step
        tokens_per_s = trainer.epoch_tokens / max(time.monotonic() - self.started, 1e-9)
        times = f"ETA epoch {clock(left_in_epoch)}, run {clock(left_in_run)}"
        return [
            f"{ppl}  lr {self.lr:.4g}  {tokens_per_s:,.0f} tok/s  {times}",
            f"{ppl}  {times}",
            f"{ppl}  ETA {clock(left_in_epoch)}",
        ]


def check_splits(config: Mapping[str, Any], corpus: Corpus) -> None:
    """Fail on a split too short for one minibatch now, not after the first epoch."""
    B, T = config["batch_size"], config["num_steps"]
    batching = config.get("batching", "streams")
    for split in _SPLITS:
        tokens = corpus.split(split)
        if split == "test" and len(tokens) == 0 and config["split"] != "dataset":
            continue  # char-rnn's split often leaves no test minibatch
        if batching == "sentences":
            sentence_batches(sentences(tokens, sentence_end_id(corpus)), B, None)
        elif batching == "chunks" and split == "train":
            chunk_batches(tokens, B, T, np.random.default_rng(0))
        else:
            next(minibatches(tokens, B, T, split))


def train(
    config: Mapping[str, Any],
    corpus: Corpus,
    reporter: Reporter,
    context: RunContext | None = None,
) -> TrainingSummary:
    """Train and evaluate a model on ``corpus`` as ``config`` says; returns the best epoch.

    ``context`` says where the run speaks and writes, and what it continues from
    (:class:`RunContext`; by default: print, no progress bar, no checkpoints)."""
    context = context or RunContext()
    if config["vocab_size"] is not None and config["vocab_size"] != corpus.vocab_size:
        raise ValueError(
            f"vocab_size={config['vocab_size']} but dataset {corpus.name!r} has "
            f"{corpus.vocab_size} symbols; drop vocab_size or use the matching dataset"
        )
    corpus = apply_split(config, corpus)
    check_splits(config, corpus)
    trainer = Trainer(config, corpus, reporter, context)
    trainer.announce()
    trainer.start(context.resume_from)
    if trainer.epoch_index >= config["max_max_epoch"]:
        context.echo("nothing left to train: the checkpoint is past max_max_epoch")
        summary = trainer.summarize()
    else:
        summary = trainer.fit()
    summary.final = trainer.final_evaluation()
    return summary
