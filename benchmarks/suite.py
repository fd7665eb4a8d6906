"""rhn's performance suite: every figure measured in this one process, then the targets.

    python benchmarks/suite.py [--quick] [--json FILE]      (make bench / make bench-quick)

Sections, each timed after a warm-up step on random tokens (the cost does not depend on
the data or the weights):

training   tokens/s and peak memory of one training step (forward, the reference
           loss with its L2 term, backward, TF-exact clipping, SGD) at the ptb_sota and
           enwik8_sota shapes, dropout on, for rhn's RHN (the fast layer), the
           straightforward RHN kept in benchmarks/rhn_baseline.py, and torch.nn.LSTM
           (one layer, the fused library RNN) with the RHN's parameter count.
roofline   the step's matrix products (forward and backward, recurrent ones cycling
           through the D distinct weight matrices as the recurrence does) timed alone at
           exactly those shapes: their summed time is the fastest a step can be while
           doing those products, and rhn's tokens/s is quoted as a fraction of it.
evaluation no-grad tokens/s, batched (training B and T) and full (B = 1, the whole
           stream in chunks of 1000), at the ptb_sota shape.
mc         MC-dropout samples/s, the samples as rows of one batch vs one after another
           (B = 1 each), at the ptb_sota shape; the log-probabilities must agree.
startup    wall time of ``rhn --help`` and ``rhn print-config with ptb_sota``, best of 3.

Peak memory is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before each model is built) over its resident set at that moment:
model, gradients, activations and scratch of that step. glibc is told to return large
blocks to the system at once (mallopt), so one model's freed memory is not counted in
the next one's peak.

``--quick`` (under 2 minutes) runs fewer steps, shorter streams and the enwik8 shape
with 10 time steps instead of 50, so its enwik8 memory figures are not comparable with
the full run's; its ratios are indicative only.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rhn_baseline import BaselineRHNLanguageModel  # noqa: E402

from rhn_cli.engine.evaluation import (  # noqa: E402
    MC_BATCH,
    full_perplexity,
    mc_masks,
    select_rows,
    token_log_probs,
)
from rhn_cli.engine.objective import add_l2_gradient, l2_penalty, sequence_loss  # noqa: E402
from rhn_cli.engine.optim import clip_and_step, make_optimizer  # noqa: E402
from rhn_cli.engine.train import build_model, evaluate  # noqa: E402
from rhn_cli.experiment.resolve import resolve  # noqa: E402
from rhn_cli.models.base import detach_state  # noqa: E402

TARGETS = {
    "ptb_speedup": 1.3,  # x the baseline's training tokens/s
    "ptb_roofline": 0.85,  # fraction of the same-run roofline
    "enwik8_speedup": 1.0,
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
        zeros = torch.zeros(1, batch_size, self.hidden)
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


def training_steps(model: nn.Module, shape: Shape, steps: int, warmup: int = 1) -> float:
    """Seconds per training step, the mean over ``steps`` after ``warmup`` steps."""
    config = shape.config
    parameters = list(model.parameters())
    optimizer = make_optimizer(config, parameters)
    rng = np.random.default_rng(0)
    state = model.initial_state(shape.B)
    model.train()
    elapsed = 0.0
    for step in range(warmup + steps):
        tokens = torch.from_numpy(rng.integers(0, shape.V, (shape.B, shape.T + 1)))
        started = time.perf_counter()
        logits, state = model(tokens[:, :-1], state)
        cost = sequence_loss(logits, tokens[:, 1:])
        l2_penalty(parameters, config["weight_decay"])  # its value, reported by training
        optimizer.zero_grad(set_to_none=True)
        cost.backward()
        add_l2_gradient(parameters, config["weight_decay"])
        clip_and_step(optimizer, parameters, "grad_norm", config["max_grad_norm"])
        state = detach_state(state)
        if step >= warmup:
            elapsed += time.perf_counter() - started
    return elapsed / steps


# --- roofline ----------------------------------------------------------------------


def _time_calls(call, calls: int, repeats: int) -> float:
    """Seconds per call: best of ``repeats`` runs of ``calls`` calls (after one run)."""
    call()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def roofline(shape: Shape, repeats: int) -> dict:
    """The step's matrix products timed alone at their shapes, each in the fastest
    layout of its operands: seconds per step at that rate, and the step's GEMM FLOPs."""
    c = shape.config
    B, T, V, D, H = shape.B, shape.T, shape.V, c["depth"], c["hidden_size"]
    E = rhn_on_meta(shape).config.in_size
    N = B * T
    g = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.rand(*size, generator=g) - 0.5

    def stored(rows, cols, transposed):
        """A [rows, cols] operand held row-major, or column-major (a transposed copy)."""
        return rand(cols, rows).t() if transposed else rand(rows, cols)

    products = []  # (what, seconds per call, calls per step, flops per call)
    layouts = [(False, False), (False, True), (True, False), (True, True)]
    per_step = T * D
    calls = max(per_step // 5, D)
    # The recurrent products, with the weights of the D micro-layers in turn (as the
    # recurrence reads them: 5.5 MB each for ptb_sota, more than the caches hold), in
    # the faster of the weights' two layouts.
    for what, rows, k, n in (("recurrent s R^T", B, H, 2 * H), ("recurrent dp R", B, 2 * H, H)):
        left = rand(rows, k)
        out = torch.empty(rows, n)
        best = math.inf
        for transposed in (False, True):
            weights = [stored(k, n, transposed) for _ in range(D)]
            cycle = itertools.cycle(weights)
            seconds = _time_calls(
                lambda c=cycle, a=left, o=out: torch.mm(a, next(c), out=o), calls, repeats
            )
            best = min(best, seconds)
        products.append((what, best, per_step, 2 * rows * k * n))

    def big(name, m, k, n, times=1):
        """An [m, k] x [k, n] product in the fastest of the operands' four layouts."""
        out = torch.empty(m, n)
        best = math.inf
        for transposed_a, transposed_b in layouts:
            a, b = stored(m, k, transposed_a), stored(k, n, transposed_b)
            best = min(best, _time_calls(functools.partial(torch.mm, a, b, out=out), 2, repeats))
        products.append((name, best, times, 2 * m * k * n))

    big("input projection", N, E, 2 * H)
    big("d input projection", N, 2 * H, E)
    big("d W_x", 2 * H, N, E)
    big("d R (whole sequence)", 2 * H, N, H, times=D)
    big("output", N, H, V)
    big("d output input", N, V, H)
    big("d output weight", V, N, H)
    seconds = sum(t * n for _, t, n, _ in products)
    flops = sum(f * n for _, _, n, f in products)
    recurrent = sum(t * n for what, t, n, _ in products if what.startswith("recurrent"))
    return {
        "seconds_per_step": seconds,
        "tokens_per_s": N / seconds,
        "gemm_gflops": flops / seconds / 1e9,
        "flops_per_token": flops / N,
        "recurrent_share": recurrent / seconds,
        "recurrent_gflops": 4 * B * H * H * 2 * per_step / recurrent / 1e9,
    }


# --- evaluation --------------------------------------------------------------------


def evaluation(
    shape: Shape, full_tokens: int, mc_tokens: int, samples: int, sequential_samples: int
) -> dict:
    torch.manual_seed(0)
    model = build_model(shape.config, shape.V)
    rng = np.random.default_rng(1)
    batched_stream = rng.integers(0, shape.V, 4 * shape.tokens + 1)
    evaluate(model, batched_stream[: 2 * shape.tokens], shape.B, shape.T, torch.device("cpu"), "w")
    started = time.perf_counter()
    evaluate(model, batched_stream, shape.B, shape.T, torch.device("cpu"), "bench")
    batched = (len(batched_stream) - 1) / (time.perf_counter() - started)

    stream = rng.integers(0, shape.V, full_tokens + 1)
    full_perplexity(model, stream[:50])
    started = time.perf_counter()
    full_perplexity(model, stream)
    full = full_tokens / (time.perf_counter() - started)

    # rhn's MC evaluation runs MC_BATCH samples as one batch; one after another, every
    # sample costs the same, so a few of them give the sequential rate.
    stream = rng.integers(0, shape.V, mc_tokens + 1)
    masks = mc_masks(model, samples)
    token_log_probs(model, stream[:50], rows=samples, masks=masks)
    started = time.perf_counter()
    together = token_log_probs(model, stream, rows=samples, masks=masks)
    batched_mc = time.perf_counter() - started
    started = time.perf_counter()
    apart = torch.cat(
        [
            token_log_probs(model, stream, rows=1, masks=select_rows(masks, [r]))
            for r in range(sequential_samples)
        ]
    )
    sequential_mc = time.perf_counter() - started
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 2 minutes")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    _return_freed_memory_at_once()
    wall = time.perf_counter()
    quick = args.quick
    results: dict = {"threads": torch.get_num_threads(), "quick": quick, "torch": torch.__version__}
    print(
        f"rhn benchmark suite{' (--quick)' if quick else ''}: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32",
        flush=True,
    )

    shapes = [shape_of("ptb_sota"), shape_of("enwik8_sota", 10 if quick else None)]
    # One-time costs (thread pools, kernel set-up, allocator arenas) before anything counts.
    small = shape_of("ptb_sota", 5)
    small.config.update(hidden_size=64, depth=2)
    for kind in ("rhn", "baseline", "lstm"):
        training_steps(build(kind, small), small, 1)
    steps = {"ptb_sota": 2 if quick else 4, "enwik8_sota": 1 if quick else 2}
    print("\nTraining step (dropout on; tokens/s after one warm-up step; peak = RSS growth)")
    print(f"  {'shape':<12} {'model':<34} {'params':>11} {'tok/s':>8} {'x base':>7} {'peak MB':>8}")
    for shape in shapes:
        row = results.setdefault(shape.name, {"B": shape.B, "T": shape.T})
        for kind in ("rhn", "baseline", "lstm"):
            with PeakMemory() as memory:
                model = build(kind, shape)
                seconds = training_steps(model, shape, steps[shape.name])
            row[kind] = {
                "tokens_per_s": shape.tokens / seconds,
                "peak_bytes": memory.bytes,
                "parameters": count(model),
                "hidden": getattr(model, "hidden", None),
            }
            del model
            base = row.get("baseline", row[kind])["tokens_per_s"]
            label = {
                "rhn": f"rhn RHN (depth {shape.config['depth']}, {shape.config['hidden_size']})",
                "baseline": "straightforward RHN (baseline)",
                "lstm": f"nn.LSTM, 1 layer x {row[kind].get('hidden', 0)}",
            }[kind]
            ratio = row[kind]["tokens_per_s"] / base if kind != "rhn" else None
            print(
                f"  {shape.name + f' T={shape.T}':<12} {label:<34} "
                f"{row[kind]['parameters']:>11,} {row[kind]['tokens_per_s']:>8.0f} "
                f"{'' if ratio is None else f'{ratio:.2f}':>7} {_mb(memory.bytes):>8}",
                flush=True,
            )
        row["speedup"] = row["rhn"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
        if row["rhn"]["peak_bytes"] and row["baseline"]["peak_bytes"]:
            row["memory_ratio"] = row["rhn"]["peak_bytes"] / row["baseline"]["peak_bytes"]
        print(
            f"  {'':<12} rhn vs baseline: {row['speedup']:.2f}x tokens/s, "
            f"{row.get('memory_ratio', float('nan')):.2f}x peak memory"
        )

    print("\nRoofline (the step's matrix products alone, at the step's shapes, this run)")
    for shape in shapes:
        line = roofline(shape, repeats=2 if quick else 3)
        row = results[shape.name]
        row["roofline"] = line
        row["roofline_fraction"] = row["rhn"]["tokens_per_s"] / line["tokens_per_s"]
        share = 100 * line["recurrent_share"]
        print(
            f"  {shape.name:<12} {line['flops_per_token'] / 1e6:6.1f} MFLOP/token in products, "
            f"{line['gemm_gflops']:5.1f} GFLOP/s overall, recurrent "
            f"{line['recurrent_gflops']:5.1f} GFLOP/s ({share:.0f}% of the time): "
            f"{line['tokens_per_s']:6.0f} tok/s; rhn reaches {100 * row['roofline_fraction']:.0f}%",
            flush=True,
        )

    print("\nEvaluation at the ptb_sota shape (no gradient)")
    ptb = shapes[0]
    ev = evaluation(
        ptb,
        full_tokens=300 if quick else 1500,
        mc_tokens=100 if quick else 400,
        samples=MC_BATCH,
        sequential_samples=2 if quick else 4,
    )
    results["evaluation"] = ev
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

    print("\nStart-up (best of 3)")
    results["startup"] = up = startup()
    print(f"  rhn --help                         {up['help_s']:6.2f} s")
    print(f"  rhn print-config with ptb_sota     {up['print_config_s']:6.2f} s")

    ptb_row, enwik8_row = results["ptb_sota"], results["enwik8_sota"]
    checks = [
        (
            f"ptb_sota training >= {TARGETS['ptb_speedup']}x baseline",
            f"{ptb_row['speedup']:.2f}x",
            ptb_row["speedup"] >= TARGETS["ptb_speedup"],
        ),
        (
            f"ptb_sota training >= {TARGETS['ptb_roofline']:.0%} of roofline",
            f"{ptb_row['roofline_fraction']:.0%}",
            ptb_row["roofline_fraction"] >= TARGETS["ptb_roofline"],
        ),
        (
            f"enwik8_sota training >= {TARGETS['enwik8_speedup']}x baseline",
            f"{enwik8_row['speedup']:.2f}x",
            enwik8_row["speedup"] >= TARGETS["enwik8_speedup"],
        ),
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
