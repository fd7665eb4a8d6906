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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import torch
from tqdm import tqdm

from rhn_cli.data.batching import (
    chunk_batches,
    minibatches,
    num_minibatches,
    sentence_batches,
    sentences,
    stream_split,
)
from rhn_cli.data.corpus import Corpus
from rhn_cli.engine import checkpoint
from rhn_cli.engine.distributed import SINGLE, Shard, batch_dims, rank_seed
from rhn_cli.engine.objective import (
    MAX_FINITE_NLL,
    add_l2_gradient,
    l2_penalty,
    learning_rate_at,
    perplexity,
    sequence_loss,
)
from rhn_cli.engine.optim import clip_and_step, make_optimizer, penalised_step
from rhn_cli.engine.regularizers import norm_stabilizer, weight_noise
from rhn_cli.engine.timing import parse_duration
from rhn_cli.models import build_model as _build_model
from rhn_cli.models.base import LanguageModel, detach_state, map_state
from rhn_cli.models.library_choice import library_decisions, pin_library_decisions

PLAIN_PROGRESS_LINES_PER_EPOCH = 10
_SPLITS = ("train", "valid", "test")


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but no CUDA device is available here; use device=cpu")
    return torch.device(name)


def build_model(config: Mapping[str, Any], vocab_size: int) -> LanguageModel:
    return _build_model(config, vocab_size)


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


def _bits(ppl: float) -> float:
    return math.log2(ppl)


def _as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokens: np.ndarray,
    batch_size: int,
    num_steps: int,
    device: torch.device,
    split: str,
    shard: Shard = SINGLE,
) -> float:
    """Batched perplexity of ``tokens`` with no dropout, state carried from the initial one.

    On several processes each rank reads its own streams of the B and the sums are
    added up, which gives the one-process number."""
    model.eval()
    rows, local_batch = shard.rows(batch_size), shard.local_batch(batch_size)
    state = model.initial_state(local_batch)
    total_nll, count = 0.0, 0
    for inputs, targets in minibatches(tokens, batch_size, num_steps, split):
        inputs, targets = inputs[rows], targets[rows]
        logits, state = model(_as_tensor(inputs, device), state)
        total_nll += sequence_loss(logits, _as_tensor(targets, device)).item() * local_batch
        count += targets.size
    total_nll, count = shard.sum([total_nll, count])
    return perplexity(total_nll / count)


@torch.no_grad()
def evaluate_independent(model: LanguageModel, batches, device: torch.device) -> float:
    """Perplexity over minibatches that each start from the initial state (chunks or
    padded sentences; padded targets do not count)."""
    model.eval()
    total_nll, count = 0.0, 0
    for inputs, targets in batches:
        state = model.initial_state(inputs.shape[0])
        logits, _ = model(_as_tensor(inputs, device), state)
        total_nll += sequence_loss(logits, _as_tensor(targets, device)).item() * len(inputs)
        count += int((targets != -100).sum())
    return perplexity(total_nll / count)


class Trainer:
    """Owns the model, the optimiser and the position in training; can save and restore all."""

    def __init__(
        self,
        config: Mapping[str, Any],
        corpus: Corpus,
        reporter: Reporter,
        *,
        echo=print,
        progress: TextIO | None = None,
        run_dir: Path | None = None,
        stop: StopRequest | None = None,
        shard: Shard = SINGLE,
    ) -> None:
        self.config = config
        self.corpus = corpus
        self.reporter = MetricLog(reporter)
        self.echo = echo
        self.progress = progress
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.stop = stop or StopRequest()
        # This process's part of a data-parallel job (SINGLE: all of it).
        self.shard = shard
        shard.check_config(config)
        self.device = pick_device(config["device"])
        if shard.backend == "nccl":
            self.device = torch.device("cuda", shard.local_rank)
        self.model = build_model(config, corpus.vocab_size).to(self.device)
        # What the training step calls: the model, or on several processes the model in
        # DistributedDataParallel (rank 0's weights everywhere, gradients averaged).
        self.parallel_model = shard.data_parallel(self.model)
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
        self.best_valid = math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0
        self.best_weights: dict | None = None
        self.epoch_tokens, self.tokens_per_s = 0, 0.0

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
            return evaluate_independent(
                self.model,
                sentence_batches(self.sentences[split], self.batch_size, None)[1],
                self.device,
            )
        tokens = self.corpus.split(split)
        return evaluate(
            self.model, tokens, self.batch_size, self.num_steps, self.device, split, self.shard
        )

    def evaluate_chunks(self, split: str, epoch_index: int) -> float:
        """The Zoneout scripts' dev metric: independent chunks after a random offset, each
        from the learned initial state (no state carried)."""
        _, batches = chunk_batches(
            self.corpus.split(split),
            self.batch_size,
            self.num_steps,
            self._rng(epoch_index, purpose=1),
            shuffle=False,
        )
        return evaluate_independent(self.model, batches, self.device)

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

    def _where(self, step: int | None = None) -> str:
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
            raise TrainingStopped(f"stopped at {self._where()}", path, number)
        if late:
            path = self.save_checkpoint()
            raise TimeLimitReached(
                f"max_time={self.config['max_time']} reached at {self._where()}", path
            )
        if due:
            self.save_checkpoint()

    def _stop_if_requested(self) -> None:
        self._act_on_flags(self.shard.sum(self._stop_flags()))

    # -- one epoch ---------------------------------------------------------------------

    def train_epoch(self, lr: float) -> float:
        """Continue (or start) the current epoch; returns its training perplexity."""
        config, model = self.config, self.model
        parameters = list(model.parameters())
        model.train()
        epoch = self.epoch_index + 1
        first_step = self.step
        self.steps_per_epoch, epoch_batches = self._epoch_batches(self.epoch_index)
        batches = itertools.islice(epoch_batches, first_step, None)
        independent = self.batching != "streams"  # every minibatch from the initial state
        beta, noise = config["norm_stabilizer"], config["weight_noise"]
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=first_step,
            desc=f"epoch {epoch}",
            unit="batch",
            leave=False,
            disable=self.progress is None,
            file=self.progress,
            mininterval=1.0,
        )
        line_every = max(self.steps_per_epoch // PLAIN_PROGRESS_LINES_PER_EPOCH, 1)
        started = time.monotonic()
        self.epoch_tokens = 0  # input tokens of this call, for tokens/s
        with bar:
            for inputs, targets in batches:
                rows = inputs.shape[0]
                self.epoch_tokens += inputs.size * self.shard.world_size
                start = model.initial_state(rows) if independent else self.state
                target_tensor = _as_tensor(targets, self.device)
                with weight_noise(model, noise):
                    out = self.parallel_model(
                        _as_tensor(inputs, self.device), start, return_hidden=beta > 0
                    )
                    logits, state = out[0], out[1]
                    cost = sequence_loss(logits, target_tensor, config["loss"])
                    if beta > 0:
                        cost = cost + norm_stabilizer(out[2], beta)
                    self.optimizer.zero_grad(set_to_none=True)
                    # On several processes the gradients come out averaged over the
                    # ranks: the gradient of the global batch, so clipping and the step
                    # below see what one process would.
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
                cost_value = cost.item() + penalty
                # Running sums of the per-token cost (regularisers included, as the
                # reference's training perplexity), over every rank's streams, with
                # the stop/checkpoint wishes: one small reduction per step.
                real_tokens = int((targets != -100).sum()) if independent else targets.size
                weight = real_tokens if config["loss"] == "mean" else rows
                cost_sum, tokens, *flags = self.shard.sum(
                    [cost_value * weight, real_tokens, *self._stop_flags()]
                )
                if self.shard.distributed:  # the global batch's cost, for the check below
                    mean = config["loss"] == "mean"
                    cost_value = cost_sum / (tokens if mean else self.batch_size)
                step_nll = cost_sum / max(tokens, 1)  # the global batch's NLL per token
                if not (math.isfinite(grad_norm.item()) and step_nll <= MAX_FINITE_NLL):
                    # NaN compares false: a NaN loss fails the test too. A finite loss past
                    # MAX_FINITE_NLL is a perplexity no float holds: diverged all the same.
                    raise TrainingDiverged(
                        f"training diverged at {self._where(self.step + 1)}: loss {cost_value}, "
                        f"gradient norm {grad_norm.item()}; the last good checkpoint is kept. "
                        "Try a lower learning_rate or max_grad_norm, or a smaller init_scale"
                    )
                if not independent:
                    self.state = detach_state(state)
                if self.shard.distributed:
                    self.costs += cost_sum
                    self.iters += int(tokens)
                else:  # exactly as before: the local numbers are the global ones
                    self.costs += cost_value * weight
                    self.iters += real_tokens
                self.step += 1
                done = self.step - first_step
                elapsed = time.monotonic() - started
                per_step = elapsed / done
                self.tokens_per_s = self.epoch_tokens / max(elapsed, 1e-9)
                if self.progress is not None:
                    bar.update()
                    if done % 10 == 0 or self.step == self.steps_per_epoch:
                        bar.set_postfix_str(self._status(lr, per_step), refresh=False)
                elif self.step % line_every == 0 and self.step < self.steps_per_epoch:
                    self.echo(
                        f"  epoch {epoch} {100 * self.step / self.steps_per_epoch:3.0f}%  "
                        + self._status(lr, per_step)
                    )
                self._act_on_flags(flags)
        return perplexity(self.costs / self.iters)

    def _status(self, lr: float, per_step: float) -> str:
        tokens_per_s = self.tokens_per_s
        left_in_epoch = (self.steps_per_epoch - self.step) * per_step
        epochs_after = self.config["max_max_epoch"] - self.epoch_index - 1
        left_in_run = left_in_epoch + epochs_after * self.steps_per_epoch * per_step
        ppl = perplexity(self.costs / self.iters)
        return (
            f"ppl {ppl:.2f}  lr {lr:.4g}  {tokens_per_s:,.0f} tok/s  "
            f"ETA epoch {_clock(left_in_epoch)}, run {_clock(left_in_run)}"
        )

    # -- the whole run -----------------------------------------------------------------

    def fit(self) -> TrainingSummary:
        config, corpus, reporter = self.config, self.corpus, self.reporter
        entropy = corpus.entropy_rate_bits
        if entropy is not None:
            reporter.set_info("source_entropy_bits", entropy)
        reporter.set_info("nr_parameters", self.model.num_parameters())

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
                    f"out of memory on {self.device} at {self._where(self.step + 1)}; reduce "
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
            reporter.log_scalar("tokens_per_s", tokens_per_s, epoch)
            self._record_info(epoch)

            improved = valid_ppl < self.best_valid
            if improved:
                self.best_valid, self.best_epoch = valid_ppl, epoch
                self.epochs_without_improvement = 0
                self._save_best_model(epoch, valid_ppl)
            else:
                self.epochs_without_improvement += 1

            line = (
                f"epoch {epoch:>3}/{config['max_max_epoch']}  lr {lr:.4g}  "
                f"train ppl {train_ppl:8.3f} bits {_bits(train_ppl):.4f}  "
                f"valid ppl {valid_ppl:8.3f} bits {_bits(valid_ppl):.4f}"
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
        return self._summary()

    def _record_info(self, epoch: int) -> None:
        self.reporter.set_info("epoch_nr", epoch)
        self.reporter.set_info(
            "logs",
            {
                "train_perplexity": list(self.history["train"]),
                "valid_perplexity": list(self.history["valid"]),
                "test_perplexity": list(self.history["test"]),
            },
        )

    def final_evaluation(self) -> dict[str, float]:
        """The reference's closing numbers, from the best-valid model: non-batched
        ("full") valid and test perplexity and, with ``mc_steps``, MC-dropout test."""
        from rhn_cli.engine.evaluation import full_perplexity, mc_dropout_perplexity

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
            results[f"full_{split}"] = full_perplexity(self.model, tokens)
        mc_steps = self.config["mc_steps"]
        if mc_steps:
            mc = mc_dropout_perplexity(
                self.model,
                self.corpus.test,
                mc_steps,
                progress=lambda done, bad: None,
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

    def _summary(self) -> TrainingSummary:
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
    *,
    echo=print,
    progress: TextIO | None = None,
    run_dir: Path | None = None,
    resume_from: Mapping[str, Any] | None = None,
    stop: StopRequest | None = None,
    shard: Shard = SINGLE,
) -> TrainingSummary:
    """Train and evaluate a model on ``corpus`` as ``config`` says; returns the best epoch.

    Epoch summaries go to ``echo``; a per-epoch progress bar goes to ``progress`` if
    given, else a plain line every tenth of an epoch. Checkpoints are written into
    ``run_dir`` (none if it is None); ``resume_from`` is a loaded checkpoint to continue.
    ``shard`` is this process's part of a data-parallel job
    (:mod:`rhn_cli.engine.distributed`); only its rank 0 should get a ``run_dir``.
    """
    if config["vocab_size"] is not None and config["vocab_size"] != corpus.vocab_size:
        raise ValueError(
            f"vocab_size={config['vocab_size']} but dataset {corpus.name!r} has "
            f"{corpus.vocab_size} symbols; drop vocab_size or use the matching dataset"
        )
    corpus = apply_split(config, corpus)
    check_splits(config, corpus)
    trainer = Trainer(
        config,
        corpus,
        reporter,
        echo=echo,
        progress=progress,
        run_dir=run_dir,
        stop=stop,
        shard=shard,
    )
    echo(
        f"model: {trainer.model.describe()}, {trainer.model.num_parameters():,} parameters, "
        f"on {trainer.device}"
    )
    if shard.distributed:
        echo(
            f"data-parallel: {shard.world_size} processes ({shard.backend}), "
            f"{trainer.local_batch} of the {trainer.batch_size} streams each"
        )
    entropy = corpus.entropy_rate_bits
    echo(
        f"data: {corpus.name}, vocabulary {corpus.vocab_size}, "
        f"{len(corpus.train):,}/{len(corpus.valid):,}/{len(corpus.test):,} tokens"
        + (f", source entropy rate {entropy:.4f} bits/symbol" if entropy is not None else "")
    )
    if config["load_model"] and resume_from is None:
        trainer.model.load_state_dict(checkpoint.load(Path(config["load_model"]))["model"])
        echo(f"weights loaded from {config['load_model']}")
    if resume_from is not None:
        trainer.load_state_dict(resume_from)
        echo(f"resumed at {trainer._where()} from the last checkpoint")
        if trainer.history["valid"]:
            trainer._record_info(len(trainer.history["valid"]))
    if trainer.epoch_index >= config["max_max_epoch"]:
        echo("nothing left to train: the checkpoint is past max_max_epoch")
        summary = trainer._summary()
    else:
        summary = trainer.fit()
    summary.final = trainer.final_evaluation()
    return summary
