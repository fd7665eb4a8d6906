"""``make reproduce-small``: Zaremba et al. 2014's small LSTM (``ptb_lstm_small``) on the
real Penn Treebank, from a fresh clone. Fetches PTB, trains the 13 epochs (hours on 2 CPU
cores), prints the run's valid and test perplexity beside the published ones,
and ends with ``PASS (test perplexity X <= 116)`` (exit 0) or ``MISS (...)`` (exit 1).

    python benchmarks/reproduce_small.py [--ptb-from PATH] [--runs-dir DIR] [UPDATE ...]
    python benchmarks/reproduce_small.py --report RUN_ID [--runs-dir DIR]

``--ptb-from``: a local copy of PTB (a directory of ptb.*.txt, or simple-examples.tgz)
instead of the published URL. Every other argument goes to ``rhn train`` after ``with
ptb_lstm_small``: ``max_max_epoch=1 max_time=30s`` is a smoke run, which reports partial
and MISS. ``--report`` reports a recorded run again (one continued with ``rhn train
--resume``) without fetching or training. docs/reproductions.md has the measured figures.

Only a completed run of ptb_lstm_small's own config (rhn's rule for a paper's config:
seed, device, max_time... may differ, nothing that changes the figures), trained all 13
epochs, can PASS. The run is read with rhn's API (rhn_cli.tracking), not from its output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rhn_cli.experiment.published import (
    EPOCHS_KEY,
    NEUTRAL_KEYS,
    PUBLISHED,
    reference_config,
    targets_for_config,
)
from rhn_cli.tracking.frames import load_records
from rhn_cli.tracking.records import RunRecord, RunStoreError, flatten_config
from rhn_cli.tracking.report import format_duration, summarize

CONFIG = "ptb_lstm_small"
RUN_NAME = "reproduce-small"
# Between Zaremba's 114.5 and the TF tutorial's 115.91: the tutorial says its results
# "may vary depending on the random initialization", so a seed's worth of slack.
PASS_TEST_PPL = 116.0
# (label, figures): the paper's (rhn's published figures of the config) and the
# TensorFlow tutorial's own for its SMALL config (the docstring table of tensorflow/models
# tutorials/rnn/ptb/ptb_word_lm.py). Both tests are B = T = 1, as rhn's full_test; both
# valids are batched, as rhn's per-epoch valid.
REFERENCES = (
    ("Zaremba et al. 2014, Table 1", PUBLISHED[CONFIG][0].figures),
    ("TF tutorial, ptb_word_lm.py", {"valid.ppl": 121.39, "test.ppl": 115.91}),
)


def run_rhn(*args: str) -> int:
    """Run ``rhn ARGS`` (with this interpreter, so the checkout's rhn) and return its exit
    code. Ctrl-C reaches the child too (same process group); it checkpoints and stops,
    so wait for it rather than kill it."""
    print("reproduce-small: rhn " + " ".join(args), flush=True)
    process = subprocess.Popen([sys.executable, "-m", "rhn_cli", *args])
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue


def train(runs_dir: str, updates: list[str]) -> tuple[int, list[RunRecord]]:
    """(rhn train's exit code, the runs it recorded)."""
    recorded = Path(runs_dir).is_dir()
    before = {record.key for record in load_records(runs_dir)} if recorded else set()
    command = ["train", "--name", RUN_NAME, "--runs-dir", runs_dir, "with", CONFIG, *updates]
    code = run_rhn(*command)
    if not Path(runs_dir).is_dir():
        return code, []
    return code, [r for r in load_records(runs_dir) if r.key not in before]


def _gap(value: float | None, published: float) -> str:
    return "" if value is None else f" ({(value / published - 1) * 100:+.1f}%)"


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _commit(record: RunRecord) -> str:
    """The checkout's commit as Sacred recorded it in the run (rhn's RunRecord keeps no
    repository), with "+ changes" where the tree was dirty; a resumed run names the
    commit of every process that computed it, with the epochs each left complete."""
    try:
        run = json.loads((Path(record.location) / "run.json").read_text(encoding="utf-8"))
        last = _short(run["experiment"]["repositories"])
    except (OSError, ValueError, KeyError, TypeError):
        return "commit unknown"
    earlier = record.info.get("earlier_processes") or []
    if not earlier:
        return f"commit {last}"
    parts = [
        f"{_short(process.get('repositories'))} to epoch {process.get('completed_epochs', '?')}"
        for process in earlier
    ]
    return "commits " + ", ".join([*parts, f"{last} from there"])


def _short(repositories) -> str:
    """The first repository's commit, 7 digits, "+ changes" where dirty."""
    try:
        repository = repositories[0]
        return repository["commit"][:7] + (" + changes" if repository.get("dirty") else "")
    except (IndexError, KeyError, TypeError):
        return "unknown"


def _device(record: RunRecord) -> str:
    """GPU or CPU: rhn's device='auto' takes a GPU wherever Sacred found one."""
    gpus = (record.host.get("gpus") or {}).get("gpus") or []
    if gpus and str(record.config.get("device", "auto")) != "cpu":
        return "GPU (" + ", ".join(sorted({str(gpu.get("model")) for gpu in gpus})) + ")"
    threads = (record.host.get("rhn") or {}).get("torch_threads")
    plural = "s" if threads != 1 else ""
    return f"CPU ({record.host.get('cpu', '?')}" + (
        f", {threads} thread{plural})" if threads else ")"
    )


def result_lines(record: RunRecord) -> list[str]:
    """The run beside the published figures, with where and how long it ran."""
    summary = summarize(record)
    epochs = reference_config(CONFIG, {})[EPOCHS_KEY]
    date = record.start_time.date().isoformat() if record.start_time else "date unknown"
    curve = record.metrics.get("valid.ppl", ([], []))
    lines = [
        "",
        f"{CONFIG} reproduction: run {record.key} ({record.location}), {record.status}, "
        f"{summary.epochs or 0} of {epochs} epochs",
        f"  {_commit(record)}, {_device(record)}, {date}, wall time "
        f"{format_duration(record.duration)}",
        "  valid ppl per epoch: "
        + (", ".join(f"{v:.2f}" for v in curve[1]) if curve[1] else "none recorded"),
        "",
        f"  {'':30}{'valid ppl':>20}{'test ppl':>20}",
        f"  {'this run':30}{_ppl(summary.best_valid_ppl):>20}{_ppl(summary.full_test_ppl):>20}",
    ]
    for label, figures in REFERENCES:
        valid, test = figures["valid.ppl"], figures["test.ppl"]
        valid_cell = f"{valid:g}{_gap(summary.best_valid_ppl, valid)}"
        test_cell = f"{test:g}{_gap(summary.full_test_ppl, test)}"
        lines.append(f"  {label:30}{valid_cell:>20}{test_cell:>20}")
    lines += [
        "  (+x%): this run against the figure",
        "  valid: the best per-epoch one, batched (B x T as trained), as the references' valid",
        "  test: the full one (B = T = 1), as the references' test; full valid (B = T = 1): "
        + _ppl(summary.full_valid_ppl),
        "",
    ]
    return lines


def _config_problem(record: RunRecord) -> str | None:
    """Why the run is not of ptb_lstm_small's config (the keys that differ), else None."""
    targets = targets_for_config(record.config, [CONFIG])
    if targets is not None and targets.get("config") == CONFIG:
        return None
    ours, theirs = flatten_config(record.config), flatten_config(reference_config(CONFIG, {}))
    fewer_epochs = ours.get(EPOCHS_KEY, 0) <= theirs[EPOCHS_KEY]  # partial, not another config
    differing = [
        f"{key}={ours.get(key)!r} ({CONFIG}: {theirs.get(key)!r})"
        for key in sorted(set(ours) | set(theirs))
        if key not in NEUTRAL_KEYS and ours.get(key) != theirs.get(key)
        if not (key == EPOCHS_KEY and fewer_epochs)
    ]
    return f"not {CONFIG}'s config: " + (", ".join(differing[:3]) or "its config differs")


def verdict(record: RunRecord) -> tuple[bool, str]:
    """(passed, the last line): PASS only for a completed, whole run of the config."""
    problem = _config_problem(record)
    if problem:
        return False, f"MISS ({problem})"
    summary = summarize(record)
    epochs = reference_config(CONFIG, {})[EPOCHS_KEY]
    test = summary.full_test_ppl
    test_text = "no test perplexity" if test is None else f"test perplexity {test:.3f}"
    if record.status != "COMPLETED" or (summary.epochs or 0) < epochs:
        partial = f"partial: {summary.epochs or 0} of {epochs} epochs, {record.status}"
        return False, f"MISS ({partial}; {test_text})"
    if test is None:
        return False, f"MISS ({test_text} recorded)"
    if test > PASS_TEST_PPL:
        return False, f"MISS ({test_text} > {PASS_TEST_PPL:g})"
    return True, f"PASS ({test_text} <= {PASS_TEST_PPL:g})"


def report_run(runs_dir: str, run_id: str) -> int:
    """Print the run's result and verdict; 0 on PASS, 1 on MISS, 2 for no such run."""
    try:
        records = load_records(runs_dir, ids=run_id)
    except RunStoreError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    if len(records) != 1:
        print(f"Error: --report {run_id}: give one run id", file=sys.stderr)
        return 2
    record = records[0]
    print("\n".join(result_lines(record)))
    passed, last_line = verdict(record)
    print(last_line)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments go to rhn train after 'with ptb_lstm_small': config updates "
        "(max_max_epoch=1 max_time=30s) or options (--seed 1).",
    )
    parser.add_argument("--runs-dir", default="runs", help="file store of the run")
    parser.add_argument("--ptb-from", help="a local PTB copy (rhn data fetch --from)")
    parser.add_argument("--report", metavar="RUN_ID", help="only report this recorded run")
    args, updates = parser.parse_known_args(argv)
    if args.report is not None:
        return report_run(args.runs_dir, args.report)
    fetch = ["data", "fetch", "ptb", *(["--from", args.ptb_from] if args.ptb_from else [])]
    code = run_rhn(*fetch)
    if code:
        return code
    code, runs = train(args.runs_dir, updates)
    if len(runs) != 1:  # refused before recording (bad update: exit 2), or not ours
        return code or 1
    reported = report_run(args.runs_dir, runs[0].key)
    return code or reported  # Ctrl-C (130) or a failure stays what rhn train said


if __name__ == "__main__":
    sys.exit(main())
