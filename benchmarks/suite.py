"""rhn's performance suite: every figure measured in this one process, then the targets.

    python benchmarks/suite.py [--quick] [--json FILE] [--device auto|cpu|cuda]
                                                            (make bench / make bench-quick)

Sections, each timed after a warm-up step on random tokens (the cost does not depend on
the data or the weights):

training   tokens/s and peak memory of one training step (forward, the reference
           loss with its L2 term, backward, TF-exact clipping, SGD) at the ptb_sota and
           enwik8_sota shapes, dropout on, for rhn's RHN (the fast layer), the
           straightforward RHN kept in benchmarks/rhn_baseline.py, and torch.nn.LSTM
           (one layer, the fused library RNN) with the RHN's parameter count.
roofline   the step's matrix products (forward and backward) timed alone at exactly
           those shapes, each the fastest of MKL's four operand layouts and oneDNN
           (torch.ops.mkldnn): their summed time is the fastest a step can be while
           doing those products, and rhn's tokens/s is quoted as a fraction of it (the
           target's figure). Each product costs what it costs in a step: operands from
           memory, not cache (the recurrent ones cycle through the D distinct weight
           matrices, the weight-gradient ones through D operand pairs, as many as
           exceed the caches), and a library's packing of the weight counted (MKL
           packs inside every call; oneDNN's recurrent products take weights packed
           once per window, D packs per T x D products, from the weight as the model
           stores it, as rhn does; its other right operands are packed in the call).
           Also shown: the roofline with torch.mm (MKL) alone, the GEMM the
           straightforward implementation and the rest of rhn's step use.
evaluation no-grad tokens/s, batched (training B and T) and full (B = 1, the whole
           stream in chunks of 1000), at the ptb_sota shape.
mc         MC-dropout samples/s, 32 samples as rows of one batch (as rhn evaluates) vs
           one after another (B = 1 each), at the ptb_sota shape; the log-probabilities
           must agree.
startup    wall time of ``rhn --help`` and ``rhn print-config with ptb_sota``, best of 3.
peers      each peer family's training step beside nn.LSTM of its size (benchmarks/peers.py).

``--device`` (default auto: CUDA when torch sees it) is where training, evaluation and
the peers run. On CUDA the clock waits for the device's queued work, peak memory is the
growth of CUDA memory allocated (torch.cuda.max_memory_allocated), and the roofline,
which times CPU libraries, is skipped: its target reads n/a. Start-up is the same.

Training is measured in rounds: each round takes one step of every model, then times
the roofline's products once, and every ratio (x baseline, fraction of the roofline) is
the median of the per-round ratios, so a machine that speeds up or slows down during
the run (shared hosts do) moves both sides of a ratio alike.

On the CPU, peak memory is the growth of a process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the model is built, through the
first training step: model, gradients, activations and scratch. Each model is measured
in a fresh process, where glibc is told to return large blocks to the system at once
(mallopt), so the resident set follows what is allocated. (Not in the timed process:
the page faults would slow the steps, the baseline's most.)

``--quick`` (under 2 minutes) runs fewer steps, shorter streams and the enwik8 shape
with 10 time steps instead of 50, so its enwik8 memory figures are not comparable with
the full run's; its ratios are indicative only.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_clock import CudaPeakMemory, clock  # noqa: E402
from mask_rows import select_rows  # noqa: E402
from peers import peer_checks, peer_rows  # noqa: E402
from rhn_baseline import BaselineRHNLanguageModel  # noqa: E402

from rhn_cli.engine.device import describe, pick_device  # noqa: E402
from rhn_cli.engine.evaluation import (  # noqa: E402
    MC_BATCH,
    evaluate,
    full_perplexity,
    mc_masks,
    token_log_probs,
)
from rhn_cli.engine.objective import sequence_loss  # noqa: E402
from rhn_cli.engine.optim import make_optimizer, penalised_step  # noqa: E402
from rhn_cli.experiment.resolve import resolve  # noqa: E402
from rhn_cli.kernels.onednn import applies as onednn_applies  # noqa: E402
from rhn_cli.kernels.onednn import linear as onednn_linear  # noqa: E402
from rhn_cli.kernels.onednn import pack as onednn_pack  # noqa: E402
from rhn_cli.models import build_model  # noqa: E402
from rhn_cli.models.base import detach_state  # noqa: E402

KINDS = ("rhn", "baseline", "lstm")
TARGETS = {
    "ptb_speedup": 1.3,  # x the baseline's training tokens/s
    "ptb_roofline": 0.85,  # fraction of the same-run roofline
    "enwik8_speedup": 1.0,
    "enwik8_roofline": 0.85,  # text8_sota has the same shape (issue 21)
    "enwik8_memory": 0.6,  # x the baseline's peak memory, at most
    "mc_speedup": 5.0,
    "help_s": 0.3,
    "print_config_s": 2.0,
}


# --- memory ------------------------------------------------------------------------


def _return_freed_memory_at_once() -> None:
    """Large blocks straight from and back to the system (fixed mmap threshold, no
    trimming delay), so the resident set follows what torch holds."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident-set growth (bytes) inside the ``with`` block; None where the
    system cannot say (no /proc, or clear_refs not writable)."""

    def __enter__(self) -> PeakMemory:
        self.bytes = None
        self.start = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
            self.usable = self.start is not None
        except OSError:
            self.usable = False
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self.usable and peak is not None:
            self.bytes = (peak - self.start) * 1024


def peak_memory_of(kind: str, shape: Shape, device: torch.device) -> int | None:
    """Peak RSS growth (bytes; on CUDA, of CUDA memory allocated) of building ``kind``
    and taking its first training step on ``device``, in a fresh process: freed blocks of
    earlier models would otherwise serve some of its allocations and hide them."""
    command = [sys.executable, __file__, "--memory-of", kind, shape.name, str(shape.T)]
    command += ["--device", str(device)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _measure_memory(kind: str, name: str, num_steps: int, device: torch.device) -> None:
    shape = shape_of(name, num_steps)
    small = shape_of("ptb_sota", 5)
    small.config.update(hidden_size=64, depth=2)
    Trainee(build(kind, small), small, device).step()  # one-time costs first
    peak = PeakMemory() if device.type == "cpu" else CudaPeakMemory(device)
    with peak as memory:
        Trainee(build(kind, shape), shape, device).step()
    print(json.dumps({"peak_bytes": memory.bytes}))


# --- models ------------------------------------------------------------------------


@dataclass
class Shape:
    name: str
    config: dict
    B: int
    T: int
    V: int

    @property
    def tokens(self) -> int:
        return self.B * self.T


def shape_of(name: str, num_steps: int | None = None) -> Shape:
    updates = [name] + ([f"num_steps={num_steps}"] if num_steps else [])
    config = resolve(updates).config
    return Shape(name, config, config["batch_size"], config["num_steps"], config["vocab_size"])


class MatchedLSTM(nn.Module):
    """Embedding -> one fused torch.nn.LSTM layer -> softmax, sized to ``parameters``."""

    def __init__(self, vocab: int, embedding: int, parameters: int) -> None:
        super().__init__()
        # V*E + 4H(E + H) + 8H + H*V + V = parameters, solved for H
        a, b, c = 4, 4 * embedding + 8 + vocab, vocab * embedding + vocab - parameters
        hidden = round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
        self.embedding = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.output = nn.Linear(hidden, vocab)
        self.hidden = hidden

    def initial_state(self, batch_size: int):
        zeros = self.output.weight.new_zeros(1, batch_size, self.hidden)
        return (zeros, zeros.clone())

    def forward(self, tokens, state):
        x, state = self.lstm(self.embedding(tokens), state)
        return self.output(x), state


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rhn_on_meta(shape: Shape) -> nn.Module:
    """The RHN model without storage: its config and parameter count, for free."""
    with torch.device("meta"):
        return build_model(shape.config, shape.V)


def build(kind: str, shape: Shape) -> nn.Module:
    torch.manual_seed(0)
    if kind == "rhn":
        return build_model(shape.config, shape.V)
    rhn = rhn_on_meta(shape)
    if kind == "baseline":
        return BaselineRHNLanguageModel(rhn.config)
    return MatchedLSTM(shape.V, rhn.config.in_size, count(rhn))


# --- training ----------------------------------------------------------------------


class Trainee:
    """A model with its optimiser and carried state, taking timed training steps on
    random tokens on ``device`` (the model is moved there)."""

    def __init__(self, model: nn.Module, shape: Shape, device: torch.device) -> None:
        self.model, self.shape, self.device = model.to(device), shape, device
        self.parameters = list(model.parameters())
        self.optimizer = make_optimizer(shape.config, self.parameters)
        self.rng = np.random.default_rng(0)
        self.state = model.initial_state(shape.B)
        model.train()

    def step(self) -> float:
        """One training step as rhn's trainer takes it; returns its seconds."""
        config, shape, parameters = self.shape.config, self.shape, self.parameters
        tokens = torch.from_numpy(self.rng.integers(0, shape.V, (shape.B, shape.T + 1)))
        tokens = tokens.to(self.device)
        started = clock(self.device)
        logits, state = self.model(tokens[:, :-1], self.state)
        cost = sequence_loss(logits, tokens[:, 1:])
        self.optimizer.zero_grad(set_to_none=True)
        cost.backward()
        penalised_step(  # L2 term, clipping and SGD, as rhn's trainer takes them
            self.optimizer, parameters, "grad_norm", config["max_grad_norm"], config["weight_decay"]
        )
        self.state = detach_state(state)
        return clock(self.device) - started


# --- roofline ----------------------------------------------------------------------


# oneDNN's products (packed right operands) as rhn's native loop and output layer run
# them: a candidate for every product, so the roofline stays the fastest way this torch
# build has to run each of them.
_ONEDNN = onednn_applies(torch.float32)


# More than this machine's caches hold (the 2-core dev CPU has a 32 MB L3).
CACHE_BYTES = 64 * 2**20


class _Cycle:
    """``product(*operands[i], **kwargs)`` with the operand sets in turn."""

    def __init__(self, product, operands, **kwargs) -> None:
        self.product, self.kwargs = product, kwargs
        self.operands = itertools.cycle(operands)

    def __call__(self):
        return self.product(*next(self.operands), **self.kwargs)


class _PackedOncePerWindow:
    """A recurrent product through oneDNN as rhn's loop runs it: the D weights in turn,
    each packed (mkldnn::_reorder_linear_weight, from the weight as the model stores it)
    once per window of T steps, so every T x D calls pay for D packs."""

    def __init__(self, weights, left, steps: int) -> None:
        self.weights, self.left, self.steps = weights, left, steps
        self.packed = [onednn_pack(w, left.shape[0]) for w in weights]
        self.calls = 0

    def __call__(self):
        D, i = len(self.weights), self.calls
        self.calls += 1
        if i % self.steps == 0:  # one pack per T calls: D per window of T x D calls
            slot = (i // self.steps) % D
            self.packed[slot] = onednn_pack(self.weights[slot], self.left.shape[0])
        return onednn_linear(self.left, self.packed[i % D])


def _seconds_per_call(call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


class Roofline:
    """The step's matrix products timed alone at their shapes, each the fastest way this
    torch build has (MKL in its four operand layouts, oneDNN; chosen at the first
    measurement): the fastest a step doing those products can be. The recurrent
    products take the weights of the D micro-layers in turn, as the recurrence reads
    them (5.5 MB each for ptb_sota, more than the caches hold), oneDNN's packed once
    per window; the D weight-gradient products take distinct operands in turn too."""

    def __init__(self, shape: Shape) -> None:
        c = shape.config
        B, T, V, D, H = shape.B, shape.T, shape.V, c["depth"], c["hidden_size"]
        E = rhn_on_meta(shape).config.in_size
        N = shape.tokens
        self.tokens = N
        g = torch.Generator().manual_seed(0)

        def rand(*size):
            return torch.rand(*size, generator=g) - 0.5

        def stored(rows, cols, transposed):
            """A [rows, cols] operand held row-major, or column-major."""
            return rand(cols, rows).t() if transposed else rand(rows, cols)

        # (what, calls per step, flops per call, calls per timing, one call per layout)
        self.products = []
        per_step = T * D
        for what, k, n in (("recurrent s R^T", H, 2 * H), ("recurrent dp R", 2 * H, H)):
            left, out = rand(B, k), torch.empty(B, n)
            candidates = {}
            for transposed in (False, True):
                candidates[f"MKL{' (B transposed)' if transposed else ''}"] = _Cycle(
                    torch.mm, [(left, stored(k, n, transposed)) for _ in range(D)], out=out
                )
            if _ONEDNN:  # packed once per window, as rhn packs: D packs per T x D calls
                forward = what == "recurrent s R^T"
                weights = [rand(n, k) if forward else rand(k, n).t() for _ in range(D)]
                candidates["oneDNN, packed once per window"] = _PackedOncePerWindow(
                    weights, left, T
                )
            self.products.append((what, per_step, 2 * B * k * n, max(per_step // 5, D), candidates))
        for what, m, k, n, times in (
            ("input projection", N, E, 2 * H, 1),
            ("d input projection", N, 2 * H, E, 1),
            ("d W_x", 2 * H, N, E, 1),
            ("d R (whole sequence)", 2 * H, N, H, D),
            ("output", N, H, V, 1),
            ("d output input", N, V, H, 1),
            ("d output weight", V, N, H, 1),
        ):
            out = torch.empty(m, n)
            # The step's D weight-gradient products each have their own operands, from
            # memory: as many operand pairs in turn as exceed the caches (one pair
            # repeated would run from cache).
            pairs = min(times, max(1, -(-2 * CACHE_BYTES // (4 * k * (m + n)))))
            candidates = {
                f"MKL ({'AT' if ta else 'A'}, {'BT' if tb else 'B'})": _Cycle(
                    torch.mm, [(stored(m, k, ta), stored(k, n, tb)) for _ in range(pairs)], out=out
                )
                for ta in (False, True)
                for tb in (False, True)
            }
            if _ONEDNN:  # packing the right operand is part of each call
                candidates["oneDNN, packed in the call"] = _Cycle(
                    lambda a, b_t, m=m: onednn_linear(a, onednn_pack(b_t, m)),
                    [(rand(m, k), rand(n, k)) for _ in range(pairs)],
                )
            self.products.append((what, times, 2 * m * k * n, pairs, candidates))
        self.chosen: list[str] | None = None
        self.chosen_mkl: list[str] | None = None  # the fastest of torch.mm's layouts
        self.seconds: dict[str, list[float]] = {what: [] for what, *_ in self.products}
        self.mkl_totals: list[float] = []
        self.flops = sum(times * flops for _, times, flops, _, _ in self.products)
        self.recurrent_flops = sum(
            times * flops for what, times, flops, _, _ in self.products if "recurrent" in what
        )

    def measure(self) -> tuple[float, float]:
        """(seconds per step of the products, of which the recurrent ones)."""
        if self.chosen is None:  # warm every way up, keep the fastest of two rounds
            self.chosen, self.chosen_mkl = [], []
            for _, _, _, calls, candidates in self.products:
                times = {}
                for call in candidates.values():
                    call()
                for label, call in [*candidates.items()] * 2:  # the better of two timings
                    seconds = _seconds_per_call(call, calls)
                    times[label] = min(times.get(label, seconds), seconds)
                self.chosen.append(min(times, key=times.get))
                mkl = {label: t for label, t in times.items() if label.startswith("MKL")}
                self.chosen_mkl.append(min(mkl, key=mkl.get))
            return 0.0, 0.0
        total = recurrent = mkl_total = 0.0
        for (what, times, _, calls, candidates), label, mkl in zip(
            self.products, self.chosen, self.chosen_mkl, strict=True
        ):
            seconds = times * _seconds_per_call(candidates[label], calls)
            self.seconds[what].append(seconds)
            total += seconds
            recurrent += seconds if "recurrent" in what else 0.0
            same = mkl == label
            mkl_total += seconds if same else times * _seconds_per_call(candidates[mkl], calls)
        self.mkl_totals.append(mkl_total)
        return total, recurrent

    def breakdown(self) -> list[dict]:
        """Per product: calls per step, median seconds per step and the way chosen."""
        return [
            {
                "product": what,
                "calls": times,
                "seconds_per_step": statistics.median(self.seconds[what]),
                "way": label,
            }
            for (what, times, *_), label in zip(self.products, self.chosen, strict=True)
        ]


# --- evaluation --------------------------------------------------------------------


def evaluation(
    shape: Shape,
    full_tokens: int,
    mc_tokens: int,
    samples: int,
    sequential_samples: int,
    device: torch.device,
) -> dict:
    torch.manual_seed(0)
    model = build_model(shape.config, shape.V).to(device)
    rng = np.random.default_rng(1)
    batched_stream = rng.integers(0, shape.V, 4 * shape.tokens + 1)
    evaluate(model, batched_stream[: 2 * shape.tokens], shape.B, shape.T, device, "w")
    started = clock(device)
    evaluate(model, batched_stream, shape.B, shape.T, device, "bench")
    batched = (len(batched_stream) - 1) / (clock(device) - started)

    stream = rng.integers(0, shape.V, full_tokens + 1)
    full_perplexity(model, stream[:50])
    started = clock(device)
    full_perplexity(model, stream)
    full = full_tokens / (clock(device) - started)

    # rhn's MC evaluation runs MC_BATCH samples as one batch; one after another, every
    # sample costs the same, so a few of them give the sequential rate.
    stream = rng.integers(0, shape.V, mc_tokens + 1)
    masks = mc_masks(model, samples)
    token_log_probs(model, stream[:50], rows=samples, masks=masks)
    started = clock(device)
    together = token_log_probs(model, stream, rows=samples, masks=masks)
    batched_mc = clock(device) - started
    started = clock(device)
    apart = torch.cat(
        [
            token_log_probs(model, stream, rows=1, masks=select_rows(masks, [r]))
            for r in range(sequential_samples)
        ]
    )
    sequential_mc = clock(device) - started
    return {
        "batched_tokens_per_s": batched,
        "full_tokens_per_s": full,
        "mc_batched_samples_per_s": samples / batched_mc,
        "mc_sequential_samples_per_s": sequential_samples / sequential_mc,
        "mc_max_difference": (together[:sequential_samples] - apart).abs().max().item(),
        "mc_tokens": mc_tokens,
        "mc_samples": samples,
    }


# --- start-up ----------------------------------------------------------------------


def startup(repeats: int = 3) -> dict:
    rhn = shutil.which("rhn", path=str(Path(sys.executable).parent)) or shutil.which("rhn")
    command = [rhn] if rhn else [sys.executable, "-m", "rhn_cli"]

    def best(*args):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([*command, *args], check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        return min(times)

    return {"help_s": best("--help"), "print_config_s": best("print-config", "with", "ptb_sota")}


# --- report ------------------------------------------------------------------------


def _mb(value: int | None) -> str:
    return "   n/a" if value is None else f"{value / 2**20:7.0f}"


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else "PASS" if ok else "MISS"


def _arguments() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 2 minutes")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the models train and evaluate (auto: CUDA when torch sees it); the "
        "roofline is measured on the CPU only",
    )
    parser.add_argument(
        "--memory-of", nargs=3, metavar=("KIND", "SHAPE", "T"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    try:
        return args, pick_device(args.device)
    except RuntimeError:
        print(
            f"--device {args.device}: torch sees no CUDA device here; use --device cpu or auto",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _training(shapes: list[Shape], rounds: dict, device: torch.device) -> dict:
    """The training table: one row of figures per shape."""
    # One-time costs (thread pools, kernel set-up, allocator arenas; on CUDA the cuDNN and
    # cuBLAS handles) before anything counts.
    small = shape_of("ptb_sota", 5)
    small.config.update(hidden_size=64, depth=2)
    for kind in KINDS:
        Trainee(build(kind, small), small, device).step()
    on_cpu = device.type == "cpu"
    then = ",\nthen the roofline's products" if on_cpu else ""
    peak = "RSS growth" if on_cpu else "growth of CUDA memory allocated"
    print(
        "\nTraining step (dropout on; tokens/s: median of rounds that take one step of each "
        f"model{then}; peak: {peak} over the first step, in a fresh process)"
    )
    print(f"  {'shape':<16} {'model':<32} {'params':>11} {'tok/s':>7} {'x base':>7} {'peak MB':>8}")
    return {shape.name: _training_row(shape, rounds[shape.name], device) for shape in shapes}


def _training_row(shape: Shape, rounds: int, device: torch.device) -> dict:
    row = {"B": shape.B, "T": shape.T}
    trainees = {}
    for kind in KINDS:
        trainees[kind] = Trainee(build(kind, shape), shape, device)
        trainees[kind].step()  # warm-up
        model = trainees[kind].model
        row[kind] = {
            "peak_bytes": peak_memory_of(kind, shape, device),
            "parameters": count(model),
            "hidden": getattr(model, "hidden", None),
            "step_seconds": [],
        }
    # The roofline times CPU libraries (MKL, oneDNN): it bounds a CPU step only.
    roofline = Roofline(shape) if device.type == "cpu" else None
    if roofline is not None:
        roofline.measure()  # warm-up, and the fastest ways chosen
    measured = []
    # Interleaved, so that a machine that speeds up or slows down during the run
    # (shared hosts do) changes every figure of a round alike: ratios are per round.
    for _ in range(rounds):
        for kind in KINDS:
            row[kind]["step_seconds"].append(trainees[kind].step())
        if roofline is not None:
            measured.append(roofline.measure())
    del trainees
    rhn_seconds = row["rhn"]["step_seconds"]
    for kind in KINDS:
        row[kind]["tokens_per_s"] = shape.tokens / statistics.median(row[kind]["step_seconds"])
        row[kind]["x_baseline"] = statistics.median(
            base / own
            for own, base in zip(
                row[kind]["step_seconds"], row["baseline"]["step_seconds"], strict=True
            )
        )
    row["speedup"] = row["rhn"]["x_baseline"]
    if row["rhn"]["peak_bytes"] and row["baseline"]["peak_bytes"]:
        row["memory_ratio"] = row["rhn"]["peak_bytes"] / row["baseline"]["peak_bytes"]
    if roofline is not None:
        row.update(_roofline_figures(shape, roofline, measured, rhn_seconds))
    _print_training_row(shape, row, rounds)
    return row


def _roofline_figures(
    shape: Shape, roofline: Roofline, measured: list[tuple[float, float]], rhn_seconds: list
) -> dict:
    roof_seconds = statistics.median(total for total, _ in measured)
    recurrent_seconds = statistics.median(recurrent for _, recurrent in measured)
    return {
        "roofline": {
            "seconds_per_step": roof_seconds,
            "tokens_per_s": shape.tokens / roof_seconds,
            "gemm_gflops": roofline.flops / roof_seconds / 1e9,
            "flops_per_token": roofline.flops / shape.tokens,
            "recurrent_share": recurrent_seconds / roof_seconds,
            "recurrent_gflops": roofline.recurrent_flops / recurrent_seconds / 1e9,
            "products": roofline.breakdown(),
            # The same products in torch.mm (MKL) only, as the earlier suite measured them.
            "mkl_tokens_per_s": shape.tokens / statistics.median(roofline.mkl_totals),
        },
        "mkl_roofline_fraction": statistics.median(
            mkl / own for mkl, own in zip(roofline.mkl_totals, rhn_seconds, strict=True)
        ),
        "roofline_fraction": statistics.median(
            total / own for (total, _), own in zip(measured, rhn_seconds, strict=True)
        ),
    }


def _print_training_row(shape: Shape, row: dict, rounds: int) -> None:
    for kind in KINDS:
        figures = row[kind]
        label = {
            "rhn": f"rhn RHN (depth {shape.config['depth']}, {shape.config['hidden_size']})",
            "baseline": "straightforward RHN (baseline)",
            "lstm": f"nn.LSTM, 1 layer x {figures['hidden']}",
        }[kind]
        print(
            f"  {shape.name + f' T={shape.T}':<16} {label:<32} {figures['parameters']:>11,} "
            f"{figures['tokens_per_s']:>7.0f} {figures['x_baseline']:>7.2f} "
            f"{_mb(figures['peak_bytes']):>8}",
            flush=True,
        )
    print(
        f"  {'':<16} rhn vs baseline: {row['speedup']:.2f}x tokens/s, "
        f"{row.get('memory_ratio', float('nan')):.2f}x peak memory "
        f"({rounds} round(s))"
    )


def _print_roofline(shapes: list[Shape], results: dict, device: torch.device) -> None:
    if device.type != "cpu":
        print(f"\nroofline: CPU only (it times MKL's and oneDNN's products), skipped on {device}")
        return
    print(
        "\nRoofline (the step's matrix products alone, each the fastest of MKL's operand "
        "layouts and oneDNN, same rounds)"
    )
    for shape in shapes:
        row = results[shape.name]
        line = row["roofline"]
        share = 100 * line["recurrent_share"]
        print(
            f"  {shape.name:<12} {line['flops_per_token'] / 1e6:6.1f} MFLOP/token in products, "
            f"{line['gemm_gflops']:5.1f} GFLOP/s overall, recurrent "
            f"{line['recurrent_gflops']:5.1f} GFLOP/s ({share:.0f}% of the time): "
            f"{line['tokens_per_s']:6.0f} tok/s; rhn reaches {100 * row['roofline_fraction']:.0f}%",
            flush=True,
        )
        print(
            f"  {'':<12}   with torch.mm (MKL) alone: {line['mkl_tokens_per_s']:6.0f} tok/s; "
            f"rhn reaches {100 * row['mkl_roofline_fraction']:.0f}%"
        )
        for product in line["products"]:
            print(
                f"  {'':<12}   {product['product']:<22} x{product['calls']:<4} "
                f"{1e3 * product['seconds_per_step']:8.1f} ms/step  {product['way']}"
            )


def _evaluation_section(ptb: Shape, quick: bool, device: torch.device) -> dict:
    print("\nEvaluation at the ptb_sota shape (no gradient)")
    ev = evaluation(
        ptb,
        full_tokens=300 if quick else 1500,
        mc_tokens=100 if quick else 400,
        samples=MC_BATCH,
        sequential_samples=2 if quick else 4,
        device=device,
    )
    ev["mc_speedup"] = ev["mc_batched_samples_per_s"] / ev["mc_sequential_samples_per_s"]
    print(f"  batched (B={ptb.B}, T={ptb.T})         {ev['batched_tokens_per_s']:8.0f} tok/s")
    print(f"  full (B=1, chunks of 1000)       {ev['full_tokens_per_s']:8.0f} tok/s")
    print(
        f"  MC dropout, {ev['mc_samples']} samples as one batch x {ev['mc_tokens']} tokens: "
        f"{ev['mc_batched_samples_per_s']:.3f} samples/s batched, "
        f"{ev['mc_sequential_samples_per_s']:.3f} one after another: "
        f"{ev['mc_speedup']:.1f}x (max |log p| difference {ev['mc_max_difference']:.1e})",
        flush=True,
    )
    return ev


def _roofline_check(name: str, row: dict, quick: bool = False) -> tuple[str, str, bool | None]:
    target = TARGETS[f"{name.split('_')[0]}_roofline"]
    what = f"{name} training >= {target:.0%} of roofline"
    if "roofline_fraction" not in row:  # not measured: the roofline is CPU-only
        return what, "n/a (CPU only)", None
    fraction = row["roofline_fraction"]
    if quick:  # a shortened window (enwik8_sota at T=10): not the target's shape
        return what, f"{fraction:.0%} (at T={row['T']}, not the target's shape)", None
    return what, f"{fraction:.0%}", fraction >= target


def _checks(results: dict, quick: bool) -> list[tuple[str, str, bool | None]]:
    """The suite's own target lines: (what, the figure, met; None: not judged)."""
    ptb_row, enwik8_row = results["ptb_sota"], results["enwik8_sota"]
    ev, up = results["evaluation"], results["startup"]
    return [
        (
            f"ptb_sota training >= {TARGETS['ptb_speedup']}x baseline",
            f"{ptb_row['speedup']:.2f}x",
            ptb_row["speedup"] >= TARGETS["ptb_speedup"],
        ),
        _roofline_check("ptb_sota", ptb_row),
        (
            f"enwik8_sota training >= {TARGETS['enwik8_speedup']}x baseline",
            f"{enwik8_row['speedup']:.2f}x",
            enwik8_row["speedup"] >= TARGETS["enwik8_speedup"],
        ),
        _roofline_check("enwik8_sota", enwik8_row, quick),
        (
            f"enwik8_sota peak memory <= {TARGETS['enwik8_memory']}x baseline",
            f"{enwik8_row.get('memory_ratio', float('nan')):.2f}x"
            + (" (at T=10, not the target's shape)" if quick else ""),
            None if quick else enwik8_row.get("memory_ratio", math.inf) <= TARGETS["enwik8_memory"],
        ),
        (
            f"MC dropout batched >= {TARGETS['mc_speedup']:g}x sequential",
            f"{ev['mc_speedup']:.1f}x",
            ev["mc_speedup"] >= TARGETS["mc_speedup"],
        ),
        (
            f"rhn --help <= {TARGETS['help_s']} s",
            f"{up['help_s']:.2f} s",
            up["help_s"] <= TARGETS["help_s"],
        ),
        (
            f"rhn print-config with ptb_sota <= {TARGETS['print_config_s']:g} s",
            f"{up['print_config_s']:.2f} s",
            up["print_config_s"] <= TARGETS["print_config_s"],
        ),
    ]


def main() -> None:
    args, device = _arguments()
    if args.memory_of:
        # Only here: returning every large block at once costs page faults, which would
        # slow the timed steps (the baseline's many allocations most).
        _return_freed_memory_at_once()
        kind, name, num_steps = args.memory_of
        _measure_memory(kind, name, int(num_steps), device)
        return
    wall = time.perf_counter()
    quick = args.quick
    results: dict = {"threads": torch.get_num_threads(), "quick": quick, "torch": torch.__version__}
    results["device"] = describe(device)
    print(
        f"rhn benchmark suite{' (--quick)' if quick else ''}: torch {torch.__version__}, "
        f"device {results['device']}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, fp32",
        flush=True,
    )

    shapes = [shape_of("ptb_sota"), shape_of("enwik8_sota", 10 if quick else None)]
    rounds = {"ptb_sota": 2 if quick else 5, "enwik8_sota": 1 if quick else 3}
    results.update(_training(shapes, rounds, device))
    _print_roofline(shapes, results, device)
    results["evaluation"] = _evaluation_section(shapes[0], quick, device)

    print("\nStart-up (best of 3)")
    results["startup"] = up = startup()
    print(f"  rhn --help                         {up['help_s']:6.2f} s")
    print(f"  rhn print-config with ptb_sota     {up['print_config_s']:6.2f} s")

    peers = peer_rows(rounds=1 if quick else 5, quick=quick, device=device)
    results["peers"] = peers
    checks = _checks(results, quick) + peer_checks(peers)
    print("\nTargets")
    for what, figure, ok in checks:
        print(f"  {verdict(ok)}  {what:<46} {figure}")
    results["targets"] = {what: {"figure": fig, "pass": ok} for what, fig, ok in checks}
    results["wall_s"] = time.perf_counter() - wall
    print(f"\nsuite wall time {results['wall_s']:.0f} s")
    if quick:
        print("(--quick: fewer steps and enwik8 at T=10; indicative only)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
