"""What ``rhn runs`` shows: tables of runs, one run in full, runs side by side, learning
curves (matplotlib, imported only when plotting) and CSV/JSON exports.

Everything here returns text (or writes a file); the CLI only prints it. Colours are
left to the caller through a ``style(text, kind)`` function, applied after alignment,
where ``kind`` is ``"header"``, ``"title"``, ``"dim"`` or a run status.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rhn_cli.atomic import write_atomically
from rhn_cli.tracking.records import (
    INFO_SERIES_KEY,
    NOISE_KEYS,
    RunRecord,
    best_point,
    differing_keys,
    flatten_config,
    json_clean,
    last_value,
    metric_names,
    record_to_dict,
    value_at,
)

Style = Callable[[str, str], str]
MISSING = "-"
ELLIPSIS = "…"
# Config columns `ls` shows besides the ones that differ between the listed runs.
ALWAYS_SHOWN_KEYS = ("model", "dataset")
LS_CONFIG_COLUMNS = 6
LS_CELL_WIDTH = 14
# Config values and run names when the terminal is narrow (and narrower still).
LS_NARROW_CELL_WIDTH = 10
LS_NARROW_NAME_WIDTH = 16
LS_NARROWEST_NAME_WIDTH = 8
PLOT_FORMATS = ("png", "svg", "pdf")
EXPORT_FORMATS = ("csv", "json")


class ReportError(ValueError):
    """A report cannot be made as asked (a run lacks the metric to plot...)."""


def plain(text: str, kind: str) -> str:
    return text


# --------------------------------------------------------------------------------------
# Formatting of single values
# --------------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``12s``, ``3m05s``, ``1h02m``, ``2d03h``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    total = int(round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def format_time(time: datetime | None) -> str:
    """A naive UTC time (as Sacred records it) in local time, ``YYYY-MM-DD HH:MM``."""
    if time is None:
        return MISSING
    return time.replace(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_metric(name: str, value: Any) -> str:
    """Perplexities with 3 decimals, bits with 4, rates with thousands separators."""
    if value is None:
        return MISSING
    if not _is_number(value):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if name.endswith("ppl") or "perplexity" in name:
        return f"{value:.3f}"
    if name.endswith("bpc") or "bits" in name:
        return f"{value:.4f}"
    if name.endswith("tokens_per_s"):
        return f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def format_value(value: Any) -> str:
    """A config or info value as typed on the command line."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(json_clean(value), separators=(",", ":"))
    if value == "":
        return '""'
    return str(value)


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def human_size(size: int | None) -> str:
    if size is None:
        return MISSING
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return MISSING  # unreachable


# --------------------------------------------------------------------------------------
# Summary of a run's metrics
# --------------------------------------------------------------------------------------


@dataclass
class Summary:
    """The numbers a run is judged by."""

    best_valid_ppl: float | None = None
    best_valid_bpc: float | None = None
    best_epoch: Any = None
    test_ppl: float | None = None  # at the epoch of the best valid perplexity
    full_valid_ppl: float | None = None
    full_test_ppl: float | None = None
    mc_test_ppl: float | None = None
    epochs: Any = None


def _info_number(record: RunRecord, key: str) -> float | None:
    value = record.info.get(key)
    return float(value) if _is_number(value) and math.isfinite(value) else None


def summarize(record: RunRecord) -> Summary:
    summary = Summary()
    best = best_point(record, "valid.ppl")
    if best is not None:
        summary.best_epoch, summary.best_valid_ppl = best
        summary.test_ppl = value_at(record, "test.ppl", summary.best_epoch)
    else:
        summary.best_valid_ppl = _info_number(record, "best_valid_perplexity")
        summary.best_epoch = record.info.get("best_val_epoch")
    bits = best_point(record, "valid.bpc")
    summary.best_valid_bpc = bits[1] if bits else None
    if summary.best_valid_bpc is None and summary.best_valid_ppl:
        summary.best_valid_bpc = math.log2(summary.best_valid_ppl)
    summary.full_valid_ppl = last_value(record, "full_valid.ppl") or _info_number(
        record, "full_best_valid_perplexity"
    )
    summary.full_test_ppl = last_value(record, "full_test.ppl") or _info_number(
        record, "full_test_perplexity"
    )
    summary.mc_test_ppl = last_value(record, "mc_test.ppl") or _info_number(
        record, "mc_test_perplexity"
    )
    steps = [s for s in record.metrics.get("valid.ppl", ([], []))[0] if _is_number(s)]
    summary.epochs = max(steps) if steps else record.info.get("epoch_nr")
    return summary


# (column/row name, Summary attribute, metric name for formatting)
SUMMARY_FIELDS = (
    ("valid.ppl", "best_valid_ppl", "ppl"),
    ("valid.bpc", "best_valid_bpc", "bpc"),
    ("test.ppl", "test_ppl", "ppl"),
    ("full_valid.ppl", "full_valid_ppl", "ppl"),
    ("full_test.ppl", "full_test_ppl", "ppl"),
    ("mc_test.ppl", "mc_test_ppl", "ppl"),
)


# --------------------------------------------------------------------------------------
# Published targets (info.published; rhn_cli.experiment.published says what is compared)
# --------------------------------------------------------------------------------------

TARGET_UNITS = ("ppl", "bpc")


@dataclass
class Target:
    """A published figure and the run's value it compares to."""

    metric: str  # valid.ppl, test.ppl, test.bpc...
    published: float
    value: float | None
    compared_to: str  # which of the run's values, in words

    @property
    def gap(self) -> float | None:
        """The run's value above (+) or below (-) the published one, in percent."""
        if self.value is None or not self.published:
            return None
        return (self.value / self.published - 1) * 100


def _run_value(summary: Summary, split: str) -> tuple[float | None, str]:
    """(the run's perplexity compared to a published ``split`` figure, what it is):
    valid: the best per-epoch value (the reference's result); test: the final
    non-batched one, else the batched one at the best valid epoch."""
    if split == "valid":
        return summary.best_valid_ppl, "best valid (batched)"
    if split == "test" and summary.full_test_ppl is not None:
        return summary.full_test_ppl, "full test (non-batched)"
    if split == "test":
        return summary.test_ppl, "test at the best valid epoch (batched)"
    return None, MISSING


def paper_targets(record: RunRecord) -> list[Target]:
    """The run's published figures (numbers named SPLIT.ppl or SPLIT.bpc in
    ``info.published``), each with the run's value; the source and config are not."""
    summary = summarize(record)
    targets = []
    for metric, published in published_targets(record).items():
        split, _, unit = metric.rpartition(".")
        if unit not in TARGET_UNITS or not _is_number(published):
            continue
        ppl, compared_to = _run_value(summary, split)
        value = ppl if ppl is None or unit == "ppl" else math.log2(ppl)
        targets.append(Target(metric, float(published), value, compared_to))
    return targets


def partial_note(record: RunRecord) -> str | None:
    """``partial: 12 of 500 epochs`` for a run of a paper's config that trained fewer
    epochs than the paper's; None otherwise."""
    published = (record.info or {}).get("published")
    epochs = published.get("epochs") if isinstance(published, dict) else None
    trained = summarize(record).epochs
    if _is_number(epochs) and _is_number(trained) and trained < epochs:
        return f"partial: {trained} of {epochs} epochs"
    return None


def format_gap(gap: float | None) -> str:
    return MISSING if gap is None else f"{gap:+.1f}%"


def format_target(target: Target) -> str:
    """``65.912 (+0.8% vs 65.4)``."""
    value = format_metric(target.metric, target.value)
    return f"{value} ({format_gap(target.gap)} vs {target.published:g})"


def headline_gap(record: RunRecord) -> str:
    """``ls``'s cell: the gap to the published test figure (``+0.8%``), else to the valid
    one, so marked (``+0.9% valid``: a run without a test value yet)."""
    targets = sorted(paper_targets(record), key=lambda t: not t.metric.startswith("test"))
    for target in targets:
        if target.gap is not None:
            split = target.metric.rpartition(".")[0]
            return format_gap(target.gap) + ("" if split == "test" else f" {split}")
    return MISSING


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

Cell = str | tuple[str, str | None]


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    right: Sequence[bool],
    style: Style = plain,
    header_kind: str | None = "header",
) -> list[str]:
    """Aligned columns two spaces apart; styling applied after padding."""
    cells = [[c if isinstance(c, tuple) else (c, None) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, (text, _) in enumerate(row):
            widths[i] = max(widths[i], len(text))

    def line(row: Sequence[tuple[str, str | None]]) -> str:
        # Trailing empty cells are dropped, so no line ends in (styled) spaces.
        used = max((i + 1 for i, (text, _) in enumerate(row) if text), default=0)
        parts = []
        for i, (text, kind) in enumerate(row[:used]):
            if right[i]:
                padded = text.rjust(widths[i])
            else:
                padded = text if i == used - 1 else text.ljust(widths[i])
            parts.append(style(padded, kind) if kind else padded)
        return "  ".join(parts)

    header = [(h, header_kind) for h in headers]
    return [line(header), *(line(row) for row in cells)]


def _ls_config_columns(records: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """(shown config keys, differing keys left out for width)."""
    readable = [r for r in records if r.config]
    keys = [k for k in ALWAYS_SHOWN_KEYS if any(k in r.config for r in readable)]
    differing = [k for k in differing_keys(readable, NOISE_KEYS) if k not in keys]
    room = max(LS_CONFIG_COLUMNS - len(keys), 0)
    return keys + differing[:room], differing[room:]


def scheduler_job(record: RunRecord) -> str | None:
    """The Slurm job that last ran the run (``12345_3``), with its requeues: ``12345_3
    (requeued 2x)``; None for a run started by hand."""
    slurm = (record.info or {}).get("slurm")
    if not isinstance(slurm, dict) or not slurm.get("job"):
        return None
    requeues = slurm.get("requeues") or 0
    return f"{slurm['job']} (requeued {requeues}x)" if requeues else str(slurm["job"])


def ls_column_values() -> dict[str, Callable[[RunRecord], float | None]]:
    """Each metric column of ``ls`` as a function of a run, so that ``--sort test.ppl``
    orders by the value shown (test.ppl at the best valid epoch, not its own best)."""
    return {
        name: (lambda record, attribute=attribute: getattr(summarize(record), attribute))
        for name, attribute, _ in SUMMARY_FIELDS
    }


@dataclass
class _Column:
    """One column of the ``ls`` table; ``role`` says how it may give way to the width."""

    label: str  # the full name, for the note on what was left out
    cells: list[Cell]
    right: bool = False
    role: str = "kept"  # or "config", "name", "start", "duration", "job", "published"
    header: str = ""

    def __post_init__(self) -> None:
        self.header = self.header or self.label

    def width(self) -> int:
        return max(len(self.header), *(len(_cell_text(cell)) for cell in self.cells))

    def shorten(self, width: int) -> None:
        self.header = truncate(self.header, width)
        self.cells = [_map_cell(cell, lambda text: truncate(text, width)) for cell in self.cells]


def _cell_text(cell: Cell) -> str:
    return cell[0] if isinstance(cell, tuple) else cell


def _map_cell(cell: Cell, change: Callable[[str], str]) -> Cell:
    return (change(cell[0]), cell[1]) if isinstance(cell, tuple) else change(cell)


def _ls_columns(records: Sequence[RunRecord], config_keys: Sequence[str]) -> list[_Column]:
    summaries = [summarize(r) for r in records]
    configs = [flatten_config(r.config) for r in records]
    jobs = [scheduler_job(r) for r in records]
    columns = [
        _Column("id", [r.key for r in records], right=True),
        _Column("name", [truncate(r.name, 24) for r in records], role="name"),
        _Column("status", [(r.status, r.status) for r in records]),
        _Column("start", [format_time(r.start_time) for r in records], role="start"),
        _Column("duration", [format_duration(r.duration) for r in records], True, "duration"),
    ]
    if any(jobs):
        columns.append(_Column("slurm job", [job or MISSING for job in jobs], role="job"))
    for key in config_keys:
        cells = [
            truncate(format_value(c[key]), LS_CELL_WIDTH) if key in c else MISSING for c in configs
        ]
        columns.append(_Column(key, cells, role="config", header=truncate(key, LS_CELL_WIDTH)))
    for name, attribute, unit in SUMMARY_FIELDS:
        values = [getattr(s, attribute) for s in summaries]
        if name != "full_valid.ppl" and any(v is not None for v in values):
            columns.append(_Column(name, [format_metric(unit, v) for v in values], right=True))
    if any(paper_targets(r) for r in records):
        gaps = [headline_gap(r) for r in records]
        columns.append(_Column("vs paper", gaps, right=True, role="published"))
    return columns


def _table_width(columns: Sequence[_Column]) -> int:
    return sum(c.width() for c in columns) + 2 * (len(columns) - 1)


def _without_year(columns: list[_Column]) -> None:
    """Start times as ``MM-DD HH:MM``, where every run started in the same year."""
    start = next((c for c in columns if c.role == "start"), None)
    if start and len({_cell_text(c)[:4] for c in start.cells if c != MISSING}) <= 1:
        start.cells = [c if c == MISSING else _cell_text(c)[5:] for c in start.cells]


def _drop_order(column: _Column) -> bool:
    """Config columns whose value every run shares go before those that tell runs apart."""
    return len({_cell_text(cell) for cell in column.cells}) > 1


def _fit_width(columns: list[_Column], width: int) -> list[str]:
    """Narrow the ``ls`` table to ``width`` columns where it can, giving way in this
    order: config values shortened, the name shortened, the start's year, config columns
    left out (shared values first, then the last), the slurm job, duration and start
    left out, the name shortened further, the gap to the published figures left out.
    Id, status and metrics always stay. Returns the names of the columns left out, in
    table order."""
    position = {column.label: index for index, column in enumerate(columns)}
    left_out: list[str] = []

    def drop(role: str) -> None:
        candidates = [c for c in columns if c.role == role]
        if candidates:  # min() keeps the first of equals, so reverse to drop the last
            column = min(reversed(candidates), key=_drop_order)
            columns.remove(column)
            left_out.append(column.label)

    def shorten(role: str, most: int) -> None:
        for column in (c for c in columns if c.role == role):
            column.shorten(most)

    config_count = sum(c.role == "config" for c in columns)
    for step in (
        lambda: shorten("config", LS_NARROW_CELL_WIDTH),
        lambda: shorten("name", LS_NARROW_NAME_WIDTH),
        lambda: _without_year(columns),
        *[lambda: drop("config")] * config_count,
        lambda: drop("job"),
        lambda: drop("duration"),
        lambda: drop("start"),
        lambda: shorten("name", LS_NARROWEST_NAME_WIDTH),
        lambda: drop("published"),
    ):
        if _table_width(columns) <= width:
            break
        step()
    return sorted(left_out, key=position.get)


def _ls_note(hidden: Sequence[str], left_out: Sequence[str], width: int | None) -> list[str]:
    """The line under the table naming the differences and columns not shown."""
    if left_out:
        also = f"also differing: {', '.join(hidden)}; " if hidden else ""
        text = (
            f"({also}left out to fit {width} columns: {', '.join(left_out)}; "
            "'rhn runs show ID' shows everything)"
        )
    elif hidden:
        text = f"(also differing: {', '.join(hidden)}; 'rhn runs compare' shows them all)"
    else:
        return []
    return textwrap.wrap(text, width, break_on_hyphens=False) if width else [text]


def ls_lines(
    records: Sequence[RunRecord], style: Style = plain, width: int | None = None
) -> list[str]:
    """The ``rhn runs ls`` table: one line per run, plus a note on hidden differences.
    With ``width``, the table is narrowed to fit it (:func:`_fit_width`)."""
    config_keys, hidden = _ls_config_columns(records)
    columns = _ls_columns(records, config_keys)
    left_out = _fit_width(columns, width) if width else []
    rows = [[c.cells[i] for c in columns] for i in range(len(records))]
    lines = render_table([c.header for c in columns], rows, [c.right for c in columns], style)
    return lines + [style(line, "dim") for line in _ls_note(hidden, left_out, width)]


def brief_lines(records: Sequence[RunRecord], style: Style = plain) -> list[str]:
    """One aligned line per run (id, name, status, start): what ``rm`` asks about."""
    rows = [
        [r.key, truncate(r.name, 32), (r.status, r.status), format_time(r.start_time)]
        for r in records
    ]
    return render_table(["id", "name", "status", "start"], rows, [True, False, False, False], style)


# --------------------------------------------------------------------------------------
# One run in full
# --------------------------------------------------------------------------------------

FAIL_TRACE_LINES = 20


def _key_values(pairs: Sequence[tuple[str, str]], indent: str = "  ") -> list[str]:
    if not pairs:
        return []
    width = max(len(key) for key, _ in pairs)
    return [f"{indent}{key.ljust(width)}  {value}".rstrip() for key, value in pairs]


def _host(host: dict) -> str:
    if not host:
        return MISSING
    parts = []
    system = host.get("os")
    if isinstance(system, list) and system:
        parts.append(str(system[-1]))
    for key, label in (("cpu", ""), ("python_version", "Python ")):
        if host.get(key):
            parts.append(f"{label}{host[key]}")
    gpus = host.get("gpus")
    if isinstance(gpus, dict) and gpus.get("gpus"):
        models = sorted({str(g.get("model")) for g in gpus["gpus"] if isinstance(g, dict)})
        parts.append(f"{len(gpus['gpus'])} GPU ({', '.join(models)})")
    name = str(host.get("hostname") or MISSING)
    return f"{name} ({', '.join(parts)})" if parts else name


def _info_value(key: str, value: Any) -> str:
    shown = format_metric(key, value) if _is_number(value) else format_value(value)
    return truncate(shown, 80)


def _info_pairs(info: dict) -> list[tuple[str, str]]:
    """Info entries, one level of nesting flattened; the per-epoch ``logs`` (a copy of
    the metrics), the ``throughput`` series (shown with the metrics) and MongoDB's
    ``metrics`` links are left out."""
    pairs = []
    for key in sorted(info):
        if key in ("logs", INFO_SERIES_KEY, "metrics"):
            continue
        value = info[key]
        if isinstance(value, dict):
            pairs += [(f"{key}.{sub}", _info_value(sub, value[sub])) for sub in sorted(value)]
        else:
            pairs.append((key, _info_value(key, value)))
    return pairs


def show_lines(record: RunRecord, style: Style = plain) -> list[str]:
    """``rhn runs show``: everything about one run, in sections."""
    title = f"run {record.key}  {record.name}  "
    lines = [style(title, "title") + style(record.status, record.status)]
    lines += _key_values(_show_header(record))

    lines += ["", style("config", "header")]
    config = flatten_config(record.config)
    lines += _key_values([(k, format_value(v)) for k, v in sorted(config.items())]) or [
        f"  {MISSING}"
    ]

    result = record.result
    shown = format_metric("ppl", result) if _is_number(result) else format_value(result)
    lines += ["", style("result", "header") + f"  {shown if result is not None else MISSING}"]
    lines += _show_published(record, style)
    lines += ["", style("metrics", "header"), *_show_metrics(record, style)]

    info = _info_pairs(record.info)
    if info:
        lines += ["", style("info", "header"), *_key_values(info)]

    lines += ["", style("artifacts", "header")]
    if record.artifacts:
        pairs = []
        for artifact in record.artifacts:
            note = "" if artifact.recorded else "  (file in the run directory)"
            pairs.append((artifact.name, human_size(artifact.size) + note))
        lines += _key_values(pairs)
    else:
        lines.append(f"  {MISSING}")

    if record.fail_trace:
        trace = record.fail_trace
        shown_lines = trace[-FAIL_TRACE_LINES:]
        what = (
            "fail trace"
            if len(trace) <= FAIL_TRACE_LINES
            else (f"fail trace (last {len(shown_lines)} of {len(trace)} lines)")
        )
        lines += ["", style(what, "header"), *(f"  {line}" for line in shown_lines)]
    return lines


def _show_published(record: RunRecord, style: Style) -> list[str]:
    """``rhn runs show``'s comparison with the published figures (none: no lines)."""
    targets = paper_targets(record)
    if not targets:
        return []
    published = record.info.get("published") or {}
    where = [str(published[k]) for k in ("config", "source") if published.get(k)]
    lines = ["", style("published", "header") + (f"  {': '.join(where)}" if where else "")]
    rows = [[t.metric, format_target(t), t.compared_to] for t in targets]
    headers = ["metric", "run (gap vs published)", "compared"]
    table = render_table(headers, rows, [False] * 3, style, header_kind="dim")
    lines += ["  " + line for line in table]
    note = partial_note(record)
    return lines + ([f"  ({note})"] if note else [])


def _show_header(record: RunRecord) -> list[tuple[str, str]]:
    """``rhn runs show``'s first section: when, where and how the run ran."""
    where = f"{record.location} (file store)" if record.source == "file" else record.location
    header = [
        ("start", format_time(record.start_time)),
        ("stop", format_time(record.stop_time)),
        ("duration", format_duration(record.duration)),
    ]
    if record.status in ("RUNNING", "PROBABLY_DEAD", "QUEUED"):
        header.append(("heartbeat", format_time(record.heartbeat)))
    header += [
        ("host", _host(record.host)),
        ("command", record.command or MISSING),
        ("comment", record.comment or MISSING),
        ("named configs", ", ".join(map(str, record.named_configs)) or MISSING),
        ("tags", ", ".join(record.tags) or MISSING),
    ]
    if record.resumed_at:
        header.append(("resumed at", ", ".join(format_time(t) for t in record.resumed_at)))
    earlier = record.info.get("earlier_processes")
    if isinstance(earlier, list) and earlier:
        header.append(("earlier processes", "; ".join(map(_earlier_process, earlier))))
    header.append(("recorded in", where))
    if record.mongo is not None:
        header.append(("mongodb", json.dumps(json_clean(record.mongo), sort_keys=True)))
    if record.problem:
        header.append(("problem", record.problem))
    return header


def _earlier_process(process) -> str:
    """One process before a resumption: its commit, the epochs it left, how it ended."""
    if not isinstance(process, dict):
        return MISSING
    repositories = process.get("repositories") or [{}]
    repository = repositories[0] if isinstance(repositories[0], dict) else {}
    commit = str(repository.get("commit") or "no commit")[:7]
    if repository.get("dirty"):
        commit += " + changes"
    return (
        f"{commit} to epoch {process.get('completed_epochs', '?')}, "
        f"{str(process.get('status', '?')).lower()}"
    )


def _show_metrics(record: RunRecord, style: Style) -> list[str]:
    """``rhn runs show``'s metrics: each series' last and best value, and its length."""
    if not record.metrics:
        return [f"  {MISSING}"]
    rows = []
    for name in sorted(record.metrics):
        _, values = record.metrics[name]
        best = best_point(record, name)
        rows.append(
            [
                name,
                format_metric(name, last_value(record, name)),
                format_metric(name, best[1] if best else None),
                str(best[0]) if best else MISSING,
                str(len(values)),
            ]
        )
    table = render_table(
        ["name", "last", "best", "at step", "points"],
        rows,
        [False, True, True, True, True],
        style,
        header_kind="dim",
    )
    return ["  " + line for line in table]


# --------------------------------------------------------------------------------------
# Runs side by side
# --------------------------------------------------------------------------------------

STATUS_SHORT = {"INTERRUPTED": "INTERRUPT.", "PROBABLY_DEAD": "DEAD?"}
COMPARE_KEY_WIDTH = 24
# compare's metric rows: (label, Summary attribute or None, how to format)
COMPARE_METRIC_ROWS = (
    ("best valid.ppl", "best_valid_ppl", "ppl"),
    ("best valid.bpc", "best_valid_bpc", "bpc"),
    ("best epoch", "best_epoch", "count"),
    ("test.ppl at best", "test_ppl", "ppl"),
    ("full_valid.ppl", "full_valid_ppl", "ppl"),
    ("full_test.ppl", "full_test_ppl", "ppl"),
    ("mc_test.ppl", "mc_test_ppl", "ppl"),
    ("epochs", "epochs", "count"),
)


class _MissingType:
    """A config key a run does not have (unlike a key whose value is None)."""

    def __repr__(self) -> str:
        return MISSING


_MISSING_KEY = _MissingType()


def compare_cell_width(runs: int) -> int:
    """Narrower columns for more runs: ten runs fit in about 150 characters."""
    if runs <= 4:
        return 16
    if runs <= 7:
        return 12
    return 10


def compare_table(
    records: Sequence[RunRecord], all_keys: bool = False
) -> tuple[dict[str, list[Any]], list[tuple[str, str, list[Any]]]]:
    """({config key: value per run}, [(metric row, unit, value per run)]).

    Config keys are those that differ between the runs (the seed included), or all
    keys with ``all_keys``; metric rows no run has a value for are left out."""
    configs = [flatten_config(r.config) for r in records]
    if all_keys:
        keys = sorted(set().union(*configs))
    else:
        keys = differing_keys(records, ignore=())
    config_rows = {k: [c.get(k, _MISSING_KEY) for c in configs] for k in keys}
    summaries = [summarize(r) for r in records]
    metric_rows = []
    for label, attribute, unit in COMPARE_METRIC_ROWS:
        values = [getattr(s, attribute) for s in summaries]
        if any(v is not None for v in values):
            metric_rows.append((label, unit, values))
    metric_rows += _compare_paper_rows(records)
    metric_rows.append(("duration", "duration", [r.duration for r in records]))
    return config_rows, metric_rows


def _compare_paper_rows(records: Sequence[RunRecord]) -> list[tuple[str, str, list[Any]]]:
    """compare's ``vs paper METRIC`` rows: per run, the published figure, the run's value
    and the gap in percent (None where the run has no such figure)."""
    per_run = [{t.metric: t for t in paper_targets(r)} for r in records]
    metrics = sorted(set().union(*per_run), key=lambda m: (not m.startswith("valid"), m))
    rows = []
    for metric in metrics:
        values = [
            {"published": t.published, "value": t.value, "gap_percent": t.gap} if t else None
            for t in (targets.get(metric) for targets in per_run)
        ]
        rows.append((f"vs paper {metric}", "paper", values))
    return rows


def _format_as(unit: str, value: Any) -> str:
    if unit == "paper":
        return (
            MISSING
            if value is None
            else f"{format_gap(value['gap_percent'])} vs {value['published']:g}"
        )
    if unit == "duration":
        return format_duration(value)
    if unit == "count":
        return MISSING if value is None else str(value)
    return format_metric(unit, value)


def abbreviate_row(values: Sequence[str], width: int) -> list[str]:
    """Values cut to ``width`` so that they stay apart: a prefix they all share, up to a
    separator (``rhn-depth-`` of ``rhn-depth-1-ptb`` ... ``rhn-depth-10-ptb``), becomes
    ``…``."""
    if all(len(v) <= width for v in values):
        return list(values)
    prefix = os.path.commonprefix(list(values)) if len(values) > 1 else ""
    prefix = prefix.rstrip("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if len(prefix) >= 3 and len(set(values)) > 1:
        return [truncate(ELLIPSIS + v[len(prefix) :], width) for v in values]
    return [truncate(v, width) for v in values]


def compare_lines(
    records: Sequence[RunRecord], all_keys: bool = False, style: Style = plain
) -> list[str]:
    """``rhn runs compare``: one column per run; config differences, then metrics."""
    width = compare_cell_width(len(records))
    config_rows, metric_rows = compare_table(records, all_keys)

    def status(record: RunRecord) -> Cell:
        text = record.status
        if len(text) > width:
            text = STATUS_SHORT.get(text, truncate(text, width))
        return (text, record.status)

    blank = [""] * len(records)
    body: list[list[Cell]] = [
        ["name", *abbreviate_row([r.name for r in records], width)],
        ["status", *(status(r) for r in records)],
    ]
    if len(records) <= 7:  # ten columns have no room for it; ls and show have it
        start = [format_time(r.start_time)[5:] if r.start_time else MISSING for r in records]
        body.append(["start", *start])
    body.append([("config", "header"), *blank])
    if not config_rows:
        note = "(no config)" if all_keys else "(the same in every run; --all lists it)"
        body.append([(f"  {note}", "dim"), *blank])
    for key, values in config_rows.items():
        shown = [MISSING if v is _MISSING_KEY else format_value(v) for v in values]
        body.append([truncate(f"  {key}", COMPARE_KEY_WIDTH), *abbreviate_row(shown, width)])
    body.append([("metrics", "header"), *blank])
    for label, unit, values in metric_rows:
        body.append([f"  {label}", *(truncate(_format_as(unit, v), width) for v in values)])
    headers = ["run", *(truncate(r.key, width) for r in records)]
    return render_table(headers, body, [False, *([True] * len(records))], style)


def compare_dict(records: Sequence[RunRecord], all_keys: bool = False) -> dict:
    """The comparison as JSON: ids, names, statuses, config rows and metric rows."""
    config_rows, metric_rows = compare_table(records, all_keys)
    return json_clean(
        {
            "runs": [r.id for r in records],
            "names": [r.name for r in records],
            "status": [r.status for r in records],
            "config": {
                k: [None if v is _MISSING_KEY else v for v in values]
                for k, values in config_rows.items()
            },
            "metrics": {label: values for label, _, values in metric_rows},
        }
    )


# --------------------------------------------------------------------------------------
# Learning curves
# --------------------------------------------------------------------------------------


def _legend(record: RunRecord, keys: Sequence[str]) -> str:
    label = f"{record.key} {record.name}" if record.name != MISSING else record.key
    config = flatten_config(record.config)
    shown = [f"{k}={format_value(config[k])}" for k in keys if k in config]
    return f"{label} ({', '.join(shown)})" if shown else label


def _in_unit(value: float, unit: str, wanted: str) -> float:
    """A perplexity as bits per symbol or back (log2(ppl) = bpc)."""
    if unit == wanted:
        return value
    return math.log2(value) if wanted == "bpc" else 2.0**value


def reference_lines(records: Sequence[RunRecord], metric: str) -> list[tuple[float, str]]:
    """(y, label) of the horizontal lines on a plot of ``metric`` (SPLIT.ppl or
    SPLIT.bpc): each run's published figure for that split (``full_test`` and ``mc_test``
    compare to the test figure), in the plot's unit, and on synthetic data the source's
    entropy rate (``info.source_entropy_bits``): no model can go below it on any split."""
    split, _, unit = metric.rpartition(".")
    if unit not in TARGET_UNITS:
        return []
    split = split.removeprefix("full_").removeprefix("mc_")
    lines: dict[str, float] = {}
    for record in records:
        figures = published_targets(record)
        named = f" ({figures['config']})" if figures.get("config") else ""
        for name, value in figures.items():
            target_split, _, target_unit = name.rpartition(".")
            if target_split == split and target_unit in TARGET_UNITS and _is_number(value):
                label = f"published {name} {value:g}{named}"
                lines[label] = _in_unit(float(value), target_unit, unit)
        entropy = _info_number(record, "source_entropy_bits")
        if entropy is not None:
            shown = f" = ppl {2.0**entropy:.3f}" if unit == "ppl" else ""
            lines[f"source entropy rate {entropy:.4f} bpc{shown}"] = _in_unit(entropy, "bpc", unit)
    return [(y, label) for label, y in lines.items()]


def plot_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ReportError(
            f"cannot tell the image format of '{path}': give a name ending in "
            f"{', '.join('.' + f for f in PLOT_FORMATS)}"
        )
    return suffix


def plot_curves(
    records: Sequence[RunRecord],
    metrics: Sequence[str],
    path: str | Path,
    log_scale: bool = False,
) -> Path:
    """One subplot per metric, one line per run (x: epoch), with labelled horizontal
    lines for the published figures and a synthetic source's entropy rate
    (:func:`reference_lines`); written atomically."""
    image_format = plot_format(path)
    for record in records:
        for metric in metrics:
            steps, values = record.metrics.get(metric, ([], []))
            if not values:
                has = ", ".join(metric_names([record]))
                has = f"it has {has}" if has else "it has no metrics recorded"
                raise ReportError(
                    f"run {record.key} ({record.name}) has no metric '{metric}'; {has}"
                )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = differing_keys(records)[:4]
    figure = Figure(figsize=(8, 4.2 * len(metrics)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        for record in records:
            steps, values = record.metrics[metric]
            points = [
                (s, float(v))
                for s, v in zip(steps, values, strict=False)
                if _is_number(v) and math.isfinite(v) and (v > 0 or not log_scale)
            ]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            marker = "o" if len(points) <= 30 else None
            ax.plot(xs, ys, marker=marker, markersize=3, label=_legend(record, keys))
        for y, label in reference_lines(records, metric):
            style = ":" if label.startswith("source") else "--"
            ax.axhline(y, linestyle=style, color="0.3", linewidth=1, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=image_format, dpi=100)
    path = Path(path)
    write_atomically(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def export_format(path: str, given: str | None) -> str:
    """The export format: ``given`` (--format), else from the file name's extension."""
    if given:
        return given.lower()
    suffix = Path(path).suffix.lower().lstrip(".")
    if path == "-" or suffix not in EXPORT_FORMATS:
        where = "standard output ('-')" if path == "-" else f"'{path}'"
        raise ReportError(
            f"cannot tell the export format of {where}: give a name ending in .csv or "
            ".json, or --format csv|json"
        )
    return suffix


# The runs table's columns every run has (load_runs and the CSV export alike), whatever
# was recorded; config.KEY, published.KEY and METRIC.best/.last columns follow the runs.
RUN_COLUMNS = (
    "id",
    "name",
    "status",
    "start_time",
    "stop_time",
    "duration_s",
    "host",
    "command",
    "comment",
    "named_configs",
    "tags",
)
RESULT_COLUMNS = ("result", "best_epoch", "epochs", *(name for name, _, _ in SUMMARY_FIELDS))


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(json_clean(value), sort_keys=True)
    return str(value)


def published_targets(record: RunRecord) -> dict[str, Any]:
    """The published figures the run's config reproduces (``info.published``, a mapping
    such as ``{"valid.ppl": 67.9, "test.ppl": 65.4}`` or nested), flattened with dots;
    empty for a run without them."""
    published = (record.info or {}).get("published")
    return flatten_config(published) if isinstance(published, dict) else {}


def table_id(record: RunRecord) -> int | str:
    """The run id as a table holds it: a number where it is one (file store directories
    too), so that ids sort and select alike from either store."""
    return int(record.key) if record.key.isdigit() else record.key


def _utc(time: datetime | None) -> datetime | None:
    return None if time is None else time.replace(tzinfo=UTC)


def _run_fields(record: RunRecord) -> list[Any]:
    """The values of RUN_COLUMNS."""
    return [
        table_id(record),
        record.name,
        record.status,
        _utc(record.start_time),
        _utc(record.stop_time),
        record.duration,
        record.host.get("hostname"),
        record.command,
        record.comment,
        list(record.named_configs),
        list(record.tags),
    ]


def _results(record: RunRecord) -> list[Any]:
    """The values of RESULT_COLUMNS: what ``rhn runs ls`` shows (test.ppl at the epoch of
    the best valid.ppl)."""
    summary = summarize(record)
    summary_values = [getattr(summary, attribute) for _, attribute, _ in SUMMARY_FIELDS]
    return [record.result, summary.best_epoch, summary.epochs, *summary_values]


def _metric_ends(record: RunRecord, metrics: Sequence[str]) -> list[Any]:
    """Each metric's best and last value (None where the run lacks the metric)."""
    values: list[Any] = []
    for metric in metrics:
        best = best_point(record, metric)
        values += [best[1] if best else None, last_value(record, metric)]
    return values


def export_table(records: Sequence[RunRecord]) -> tuple[list[str], list[list[Any]]]:
    """The runs table, one row per run, as Python values (UTC datetimes, lists, None):
    RUN_COLUMNS, ``config.KEY`` (flattened), RESULT_COLUMNS, ``published.KEY``, then
    ``METRIC.best`` and ``METRIC.last`` for every metric. Both ``rhn runs export``'s CSV
    and :func:`rhn_cli.tracking.frames.load_runs` are this table."""
    configs = [flatten_config(r.config) for r in records]
    published = [published_targets(r) for r in records]
    config_keys = sorted(set().union(*configs))
    published_keys = sorted(set().union(*published))
    metrics = metric_names(records)
    header = [*RUN_COLUMNS, *(f"config.{k}" for k in config_keys), *RESULT_COLUMNS]
    header += [f"published.{k}" for k in published_keys]
    for metric in metrics:
        header += [f"{metric}.best", f"{metric}.last"]
    rows = [
        [
            *_run_fields(record),
            *(config.get(k) for k in config_keys),
            *_results(record),
            *(targets.get(k) for k in published_keys),
            *_metric_ends(record, metrics),
        ]
        for record, config, targets in zip(records, configs, published, strict=True)
    ]
    return header, rows


def export_rows(records: Sequence[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """CSV header and rows: :func:`export_table` as text (ISO times, JSON lists, empty
    cells for missing values)."""
    header, rows = export_table(records)
    return header, [[_csv_value(v) for v in row] for row in rows]


def export_text(records: Sequence[RunRecord], export: str) -> str:
    """The runs as CSV (one row each) or JSON (full records with metric series)."""
    if export == "json":
        return json.dumps([record_to_dict(r) for r in records], indent=2) + "\n"
    header, rows = export_rows(records)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
