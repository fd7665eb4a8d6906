"""The reference's final evaluations: "full" (non-batched) and MC-dropout perplexity.

Full evaluation is the reference ``mtest``: one stream (B = 1), no dropout, the state
carried through the whole split, every token after the first predicted. The reference
feeds one token per call (T = 1); feeding long chunks computes exactly the same
numbers, many times faster.

MC dropout is the reference ``evaluate_mc``: per sample, masks are drawn once (at
training dropout rates, with B = T = 1, so the embedding mask is a single scalar that
drops every word vector of the sample with probability ``drop_x``) and kept for the
whole stream; a sample whose perplexity is 500 or more is rejected and redrawn; the
per-token probabilities of the accepted samples are averaged and the perplexity of the
average is reported. Here many samples run at once as rows of one batch, each row with
its own masks; rows are independent, so this equals running them one after another.
The reference also averaged in one never-filled zero entry (clipped to 1e-10) at the
end of its probability array; this module averages the real tokens only.

The per-epoch numbers of training come from here too: batched perplexity (:func:`evaluate`,
streams carried with the training B and T) and that of independent minibatches
(:func:`evaluate_independent`, chunks or sentences). Training imports this module, never
the reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from rhn_cli.data.batching import PAD_TARGET, minibatches, num_minibatches
from rhn_cli.engine import checkpoint
from rhn_cli.engine.device import as_tensor, pick_device
from rhn_cli.engine.distributed import SINGLE, Shard
from rhn_cli.engine.objective import perplexity, sequence_loss
from rhn_cli.engine.progress import SILENT, Progress, ProgressOutput, eta
from rhn_cli.models import build_model
from rhn_cli.models.base import LanguageModel
from rhn_cli.models.dropout import variational_mask

if TYPE_CHECKING:  # only named in annotations: imported with the model when one is built
    from rhn_cli.models.rhn import RHNLanguageModel

FULL_EVALUATION_CHUNK = 1000
MC_REJECT_PERPLEXITY = 500.0
# MC samples run as rows of one batch: past a few rows the recurrence stops being bound
# by reading the weights, and the output layer costs the same per sample either way.
MC_BATCH = 32


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokens: np.ndarray,
    batch_size: int,
    num_steps: int,
    device: torch.device,
    split: str,
    shard: Shard = SINGLE,
    progress: ProgressOutput = SILENT,
) -> float:
    """Batched perplexity of ``tokens`` with no dropout, state carried from the initial one.

    On several processes each rank reads its own streams of the B and the sums are
    added up, which gives the one-process number."""
    model.eval()
    rows, local_batch = shard.rows(batch_size), shard.local_batch(batch_size)
    state = model.initial_state(local_batch)
    total_nll, count = 0.0, 0
    layouts = _running_perplexity(lambda: (total_nll, count))
    steps = num_minibatches(len(tokens), batch_size, num_steps)
    with progress.start(steps, split, "batch", layouts) as bar:
        for inputs, targets in minibatches(tokens, batch_size, num_steps, split):
            inputs, targets = inputs[rows], targets[rows]
            logits, state = model(as_tensor(inputs, device), state)
            total_nll += sequence_loss(logits, as_tensor(targets, device)).item() * local_batch
            count += targets.size
            bar.update()
    total_nll, count = shard.sum([total_nll, count])
    return perplexity(total_nll / count)


def _running_perplexity(sums):
    """Layouts of an evaluation's progress: the perplexity so far (from ``sums()``: total
    NLL, tokens it is over) and the time left."""

    def layouts(seconds_left: float | None) -> list[str]:
        total_nll, count = sums()
        ppl = f"ppl {perplexity(total_nll / count):.2f}  " if count else ""
        return [ppl + eta(seconds_left)]

    return layouts


@torch.no_grad()
def evaluate_independent(
    model: LanguageModel,
    batches,
    device: torch.device,
    progress: ProgressOutput = SILENT,
    total: tuple[int, str] = (0, "valid"),
) -> float:
    """Perplexity over minibatches that each start from the initial state (chunks or
    padded sentences; padded targets do not count). ``total``: (number of minibatches,
    split), for the progress."""
    model.eval()
    total_nll, count = 0.0, 0
    layouts = _running_perplexity(lambda: (total_nll, count))
    with progress.start(*total, "batch", layouts) as bar:
        for inputs, targets in batches:
            state = model.initial_state(inputs.shape[0])
            logits, _ = model(as_tensor(inputs, device), state)
            total_nll += sequence_loss(logits, as_tensor(targets, device)).item() * len(inputs)
            count += int((targets != PAD_TARGET).sum())
            bar.update()
    return perplexity(total_nll / count)


def _stream(tokens: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = as_tensor(tokens, device)
    return data[:-1], data[1:]


@torch.no_grad()
def token_log_probs(
    model: RHNLanguageModel,
    tokens: np.ndarray,
    *,
    rows: int = 1,
    masks: dict | None = None,
    chunk: int = FULL_EVALUATION_CHUNK,
    device: torch.device | None = None,
    bar: Progress | _Scaled | None = None,
) -> torch.Tensor:
    """log p(token_{k+1} | tokens_{..k}) for k = 0..n-2, as [rows, n - 1] (float64).

    Every row reads the same stream with the state carried from a zero start. With
    ``masks`` (one row each) dropout is applied with those fixed masks; without, the
    model runs in eval mode (no dropout). ``bar`` counts the chunks read.
    """
    device = device or next(model.parameters()).device
    inputs, targets = _stream(tokens, device)
    model.train(masks is not None)
    state = model.initial_state(rows)
    pieces = []
    for start in range(0, len(inputs), chunk):
        x = inputs[start : start + chunk].expand(rows, -1)
        logits, state = model(x, state, masks)
        y = targets[start : start + chunk].expand(rows, -1)
        # Only the target's log-probability is kept: a fused cross-entropy in the model's
        # precision, accumulated in float64 afterwards.
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        pieces.append(-nll.view(rows, -1).double())
        if bar is not None:
            bar.update()
    model.eval()
    return torch.cat(pieces, dim=1)


def _chunks(tokens: np.ndarray, chunk: int) -> int:
    """Chunks :func:`token_log_probs` reads ``tokens`` in."""
    return -(-max(len(tokens) - 1, 0) // chunk)


def full_perplexity(
    model: RHNLanguageModel,
    tokens: np.ndarray,
    *,
    progress: ProgressOutput = SILENT,
    desc: str = "full evaluation",
    **kwargs,
) -> float:
    """Non-batched perplexity: B = 1, no dropout, state carried through the split."""
    chunks = _chunks(tokens, kwargs.get("chunk", FULL_EVALUATION_CHUNK))
    layouts = lambda seconds_left: [eta(seconds_left)]  # noqa: E731
    with progress.start(chunks, desc, "chunk", layouts) as bar:
        log_probs = token_log_probs(model, tokens, bar=bar, **kwargs)
    return perplexity(-log_probs.mean().item())


def mc_masks(model: RHNLanguageModel, samples: int) -> dict:
    """One set of masks per sample, at the model's training dropout rates (B = T = 1)."""
    c, like = model.config, model.output_bias
    masks = model.draw_masks(torch.zeros(samples, 1, dtype=torch.long, device=like.device))
    # With B = T = 1 the reference embedding mask is one scalar per sample.
    masks["x"] = variational_mask((samples, 1, 1), c.drop_x, like=like)
    return masks


@dataclass
class MCResult:
    perplexity: float
    samples: int
    rejected: int


def mc_dropout_perplexity(
    model: RHNLanguageModel,
    tokens: np.ndarray,
    samples: int,
    *,
    batch: int = MC_BATCH,
    chunk: int = FULL_EVALUATION_CHUNK,
    progress: ProgressOutput = SILENT,
    desc: str = "MC dropout",
) -> MCResult:
    """MC-dropout perplexity over ``samples`` accepted samples, ``batch`` at a time.

    Its progress counts the chunks read by every sample (a rejected sample's are redone)."""
    total_probs = None
    accepted = rejected = 0
    per_sample = _chunks(tokens, chunk)

    def layouts(seconds_left: float | None) -> list[str]:
        done = f"{accepted}/{samples} samples ({rejected} rejected)"
        return [f"{done}  {eta(seconds_left)}", eta(seconds_left)]

    with progress.start(per_sample * samples, desc, "chunk", layouts) as bar:
        while accepted < samples:
            count = min(batch, samples - accepted)
            masks = mc_masks(model, count)
            # The bar counts one sample's chunks; a batch of rows reads them together.
            pass_bar = _Scaled(bar, count)
            log_probs = token_log_probs(
                model, tokens, rows=count, masks=masks, chunk=chunk, bar=pass_bar
            )
            keep = torch.exp(-log_probs.mean(dim=1)) < MC_REJECT_PERPLEXITY
            rejected += int((~keep).sum())
            bar.extend(per_sample * int((~keep).sum()))  # the redrawn samples
            probs = log_probs[keep].exp().sum(dim=0)
            total_probs = probs if total_probs is None else total_probs + probs
            accepted += int(keep.sum())
            if accepted == 0 and rejected >= 10 * samples:
                raise RuntimeError(
                    f"MC dropout: {rejected} samples in a row had perplexity >= "
                    f"{MC_REJECT_PERPLEXITY:g}; is the dropout rate too high for this model?"
                )
    mean_probs = (total_probs / samples).clamp(1e-10, 1 - 1e-10)
    return MCResult(perplexity(-mean_probs.log().mean().item()), samples, rejected)


@dataclass
class _Scaled:
    """A progress bar advanced ``rows`` units per update: one chunk read by many rows."""

    bar: Progress
    rows: int

    def update(self) -> None:
        self.bar.update(self.rows)


def evaluate_saved_model(
    config, corpus, reporter, splits, *, echo=print, progress: ProgressOutput = SILENT
) -> dict[str, float]:
    """The reference ``evaluate`` / ``evaluate_mc`` commands on ``config['load_model']``:
    batched (training B and T) and full perplexity on each split, and MC-dropout
    perplexity when ``config['mc_steps']`` > 0. Returns {metric name: perplexity}."""
    device = pick_device(config["device"])
    model = build_model(config, corpus.vocab_size).to(device)
    model.load_state_dict(checkpoint.load(Path(config["load_model"]))["model"])
    results: dict[str, float] = {}
    for split in splits:
        tokens = corpus.split(split)
        B, T = config["batch_size"], config["num_steps"]
        results[f"{split}.ppl"] = evaluate(model, tokens, B, T, device, split, progress=progress)
        results[f"full_{split}.ppl"] = full_perplexity(
            model, tokens, progress=progress, desc=f"full {split}"
        )
        if config["mc_steps"]:
            mc = mc_dropout_perplexity(
                model, tokens, config["mc_steps"], progress=progress, desc=f"MC {split}"
            )
            results[f"mc_{split}.ppl"] = mc.perplexity
            reporter.set_info(f"mc_{split}_rejected_samples", mc.rejected)
    for name, ppl in results.items():
        reporter.log_scalar(name, ppl, 1)
        reporter.log_scalar(name.replace(".ppl", ".bpc"), math.log2(ppl), 1)
        reporter.set_info(name.replace(".", "_"), ppl)
        echo(f"{name:<16} {ppl:10.3f}   bits {math.log2(ppl):.4f}")
    return results
