"""Benchmark: MC-dropout evaluation, samples one after another vs many as one batch.

The reference ``evaluate_mc`` runs its samples one after another, each a B = T = 1
pass over the test stream. rhn runs ``--batch`` samples as rows of one batch (each row
its own masks) over long chunks. Both are timed here in one process on the same model
and the same stream, and the per-sample log-probabilities are checked to agree.

By default the model is a freshly initialised reduced ptb_sota (depth 3, 200 units,
vocabulary 10,000) on a random stream of PTB-test length (82,430 tokens): the cost does
not depend on the weights. ``--checkpoint runs/N/best_model.pt --dataset ptb`` uses a
trained model and the real test split instead.

    python benchmarks/mc_dropout.py [--samples 8] [--checkpoint PATH --dataset NAME]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mask_rows import select_rows  # benchmarks/, the script's own directory

from rhn_cli.engine import checkpoint
from rhn_cli.engine.evaluation import mc_masks, token_log_probs
from rhn_cli.experiment.resolve import resolve
from rhn_cli.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--checkpoint", help="a best_model.pt or checkpoint.pt")
    parser.add_argument("--dataset", help="take the test split of this dataset")
    parser.add_argument("--tokens", type=int, default=82_430)
    args = parser.parse_args()

    if args.checkpoint:
        saved = checkpoint.load(args.checkpoint)
        config = saved["config"]
    else:
        config = resolve(["ptb_sota", "hidden_size=200", "depth=3"]).config
    torch.manual_seed(0)
    if args.dataset:
        from rhn_cli.data.registry import load_corpus

        stream = np.asarray(load_corpus({**config, "dataset": args.dataset}).test)
    else:
        stream = np.random.default_rng(0).integers(0, 10_000, args.tokens)
    model = build_model(config, config["vocab_size"] or 10_000)
    if args.checkpoint:
        model.load_state_dict(saved["model"])
    masks = mc_masks(model, args.samples)

    started = time.perf_counter()
    batched = token_log_probs(model, stream, rows=args.samples, masks=masks)
    batched_s = time.perf_counter() - started

    started = time.perf_counter()
    rows = [
        token_log_probs(model, stream, rows=1, masks=select_rows(masks, [r]), chunk=1000)
        for r in range(args.samples)
    ]
    sequential_s = time.perf_counter() - started
    difference = (torch.cat(rows) - batched).abs().max().item()

    per = args.samples
    shape = f"depth {config['depth']}, {config['hidden_size']} units"
    print(
        f"MC dropout, {per} samples over {len(stream):,} tokens ({shape}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"  one after another : {sequential_s:8.1f} s  ({sequential_s / per:.1f} s/sample)")
    print(f"  {per} as one batch   : {batched_s:8.1f} s  ({batched_s / per:.1f} s/sample)")
    print(
        f"  speed-up          : {sequential_s / batched_s:8.2f}x  "
        f"(max |log p| difference {difference:.1e})"
    )


if __name__ == "__main__":
    main()
