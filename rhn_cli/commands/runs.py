"""``rhn runs``: find, inspect, compare, plot, export, remove and sync recorded runs.

Parsing and printing only: reading runs is :mod:`rhn_cli.tracking.records`, the tables,
plots and exports are :mod:`rhn_cli.tracking.report`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence

import click

from rhn_cli.commands.completion import complete_run_ids
from rhn_cli.commands.messages import echo_lines as _echo_lines
from rhn_cli.commands.messages import fail as _fail
from rhn_cli.commands.messages import style as _style
from rhn_cli.commands.options import mongo_source_option, runs_dir_option


def _load(runs_dir: str, mongo_url: str | None):
    """(store, every recorded run); a store that cannot be read is a one-line error."""
    from rhn_cli.tracking.records import RunStoreError, open_store

    store = open_store(runs_dir, mongo_url)
    try:
        return store, store.load()
    except RunStoreError as error:
        _fail(str(error), code=1)


def _select(records, tokens: Sequence[str], label: str):
    from rhn_cli.tracking.records import RunSelectionError, select_runs

    try:
        return select_runs(records, tokens, label)
    except RunSelectionError as error:
        _fail(str(error))


# For commands that take run ids or a sweep's tag (compare, export).
tag_option = click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="The runs tagged TAG (a sweep's name), or those of the given ids that are; repeat to AND.",
)


def _select_tagged(runs_dir: str, mongo_url: str | None, run_ids, tags) -> list:
    """The runs named by ``run_ids`` (all, if none), those tagged every one of ``tags``;
    none tagged so is an error (exit 1)."""
    from rhn_cli.tracking.records import filter_runs

    store, records = _load(runs_dir, mongo_url)
    chosen = _select(records, run_ids, store.label) if run_ids else records
    if tags:
        chosen = filter_runs(chosen, tags=tags)
        if not chosen:
            _fail(f"no run tagged {' and '.join(map(repr, tags))} in {store.label}", code=1)
    return chosen


def _order(records: list, sort_key: str | None, desc: bool, limit: int | None) -> list:
    """``ls``'s runs sorted, then the first ``limit``; with no --sort, by id and the newest
    ``limit`` (a run list's tail is what one looks for)."""
    from rhn_cli.tracking.records import sort_runs
    from rhn_cli.tracking.report import ls_column_values

    if sort_key and records:
        ordered = sort_runs(records, sort_key, reverse=desc, columns=ls_column_values())
        return ordered[:limit] if limit else ordered
    newest = records[-limit:] if limit else records
    return newest[::-1] if desc else newest


def _output_width() -> int | None:
    """The width ``ls`` fits: COLUMNS where set, else the terminal's; None (no limit)
    for a pipe or file, so scripts get every column."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


@click.group()
def runs() -> None:
    """Browse the runs recorded in the file store (and MongoDB with --mongo).

    \b
    Examples:
      rhn runs ls                               # every run, newest last
      rhn runs ls --where depth=10 --sort valid.ppl
      rhn runs show 7                           # config, metrics, files, fail trace
      rhn runs compare 1-10                     # config differences and results side by side
      rhn runs plot 3 5 --metric valid.ppl -o curves.png
      rhn runs export 1-10 -o runs.csv
      rhn runs rm 4
    """


@runs.command("ls")
@click.option(
    "--where",
    "wheres",
    multiple=True,
    metavar="KEY=VALUE",
    help="Keep runs whose config KEY equals VALUE (a Python literal: depth=10, tied=True, "
    "model=lstm, synthetic.order=2); also KEY!=VALUE, KEY>VALUE, KEY<VALUE, KEY>=VALUE, "
    "KEY<=VALUE. A metric name compares its best value (valid.ppl<120). Repeat to AND.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    metavar="STATUS",
    help="Keep runs with this status (any case; repeat or comma-separate): COMPLETED, "
    "FAILED, INTERRUPTED, TIMEOUT, RUNNING, QUEUED, PROBABLY_DEAD, UNREADABLE.",
)
@click.option(
    "--name",
    "name_pattern",
    metavar="PATTERN",
    help="Keep runs whose name matches this glob pattern (case-insensitive): --name 'depth*'.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Keep runs tagged TAG ('rhn train --tag', or a sweep's name); repeat to AND.",
)
@click.option(
    "--sort",
    "sort_key",
    metavar="KEY",
    help="Order by KEY, best or newest first: a metric by its best value (lowest first for "
    "ppl, bpc and loss; highest for tokens_per_s and accuracies; test.ppl and the other "
    "columns by the value shown), start newest first, duration longest first; id, name, "
    "status and config keys ascending. Runs without a value go last. Default: by id, "
    "newest last.",
)
@click.option(
    "--desc",
    is_flag=True,
    help="Reverse the order: worst, oldest or shortest first (with no --sort: newest "
    "first). A leading '-' on KEY does the same.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="Show only the first N runs after sorting (--sort valid.ppl --limit 5: the 5 "
    "best); with no --sort, the N newest.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as a JSON list (all fields).")
@runs_dir_option
@mongo_source_option
def list_runs(
    wheres, statuses, name_pattern, tags, sort_key, desc, limit, as_json, runs_dir, mongo_url
):
    """List runs: id, name, status, start, duration, key config values, best metrics.

    The config columns are model, dataset and the keys whose values differ between the
    listed runs (not the seed). valid.ppl and valid.bpc are the best values; test.ppl
    is at the epoch of the best valid.ppl; full_test.ppl and mc_test.ppl are the
    closing evaluations, where recorded.

    On a terminal (or with COLUMNS set) the table fits the width: config values and
    the name are shortened, then config columns left out (those all runs share first;
    the note under the table names them), then the slurm job, duration and start; id,
    status and metrics always stay. Piped, it has every column.
    """
    from rhn_cli.tracking.records import (
        QueryError,
        check_keys,
        filter_runs,
        parse_statuses,
        parse_where,
        record_to_dict,
    )
    from rhn_cli.tracking.report import ls_lines

    try:
        conditions = [parse_where(text) for text in wheres]
        wanted = parse_statuses(statuses)
    except QueryError as error:
        _fail(str(error))
    store, records = _load(runs_dir, mongo_url)
    try:
        check_keys(conditions, records)
        shown = filter_runs(records, conditions, wanted, name_pattern, tags)
        shown = _order(shown, sort_key, desc, limit)
    except QueryError as error:
        _fail(str(error))
    if as_json:
        click.echo(json.dumps([record_to_dict(r) for r in shown], indent=2))
        return
    if not records:
        click.echo(f"No runs recorded in {store.label} ('rhn train' records one).")
        return
    if not shown:
        click.echo(f"No run matches ({len(records)} recorded in {store.label}).")
        return
    _echo_lines(ls_lines(shown, _style, _output_width()))
    if len(shown) < len(records):
        click.echo(_style(f"({len(shown)} of {len(records)} runs in {store.label})", "dim"))


@runs.command()
@click.argument(
    "run_ids", nargs=-1, required=True, metavar="RUN_ID...", shell_complete=complete_run_ids
)
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON (all fields).")
@runs_dir_option
@mongo_source_option
def show(run_ids, as_json, runs_dir, mongo_url) -> None:
    """Show a run in full: header, config, result, metrics, info, artifacts, fail trace."""
    from rhn_cli.tracking.records import record_to_dict
    from rhn_cli.tracking.report import show_lines

    store, records = _load(runs_dir, mongo_url)
    chosen = _select(records, run_ids, store.label)
    if as_json:
        data = [record_to_dict(r) for r in chosen]
        click.echo(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        return
    for index, record in enumerate(chosen):
        if index:
            click.echo()
        _echo_lines(show_lines(record, _style))


@runs.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...", shell_complete=complete_run_ids)
@tag_option
@click.option(
    "--all", "all_keys", is_flag=True, help="Every config key, not only those that differ."
)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@runs_dir_option
@mongo_source_option
def compare(run_ids, tags, all_keys, as_json, runs_dir, mongo_url) -> None:
    """Runs side by side, one column each: the config keys that differ, then results.

    Run ids: 3, ranges 1-10 and comma lists 1,4,9; or --tag TAG for a sweep's runs.
    """
    from rhn_cli.tracking.report import compare_dict, compare_lines

    if not run_ids and not tags:
        _fail("compare needs run ids (3, 1-10, 1,4,9) or --tag TAG")
    chosen = _select_tagged(runs_dir, mongo_url, run_ids, tags)
    if len(chosen) < 2:
        _fail(f"compare needs at least two runs; got {', '.join(r.key for r in chosen)}")
    if as_json:
        click.echo(json.dumps(compare_dict(chosen, all_keys), indent=2))
        return
    _echo_lines(compare_lines(chosen, all_keys, _style))


@runs.command()
@click.argument(
    "run_ids", nargs=-1, required=True, metavar="RUN_ID...", shell_complete=complete_run_ids
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    default=("valid.ppl",),
    show_default=True,
    help="Metric to plot; repeat for one subplot each (--metric valid.ppl --metric lr).",
)
@click.option(
    "-o",
    "--output",
    default="curves.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Image to write (.png, .svg or .pdf).",
)
@click.option("--log", "log_scale", is_flag=True, help="Logarithmic y axis.")
@runs_dir_option
@mongo_source_option
def plot(run_ids, metrics, output, log_scale, runs_dir, mongo_url) -> None:
    """Learning curves of several runs in one image (x: epoch).

    The legend names each run by id and name, with the config values that differ.
    Labelled horizontal lines mark the published figures of a run of a paper's config
    (dashed) and, on synthetic data, the source's entropy rate (dotted).
    Run ids: 3, ranges 1-10 and comma lists 1,4,9.
    """
    from rhn_cli.tracking.report import ReportError, plot_curves, plot_format

    try:
        plot_format(output)
    except ReportError as error:
        _fail(str(error))
    store, records = _load(runs_dir, mongo_url)
    chosen = _select(records, run_ids, store.label)
    try:
        path = plot_curves(chosen, list(metrics), output, log_scale)
    except ReportError as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"cannot write {output}: {error.strerror or error}", code=1)
    click.echo(str(path))


@runs.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...", shell_complete=complete_run_ids)
@click.option(
    "-o",
    "--output",
    required=True,
    help="File to write, runs.csv or runs.json; '-' for standard output (with --format).",
)
@click.option(
    "--format",
    "export_as",
    type=click.Choice(["csv", "json"], case_sensitive=False),
    help="Format (default: from the file name's extension).",
)
@tag_option
@runs_dir_option
@mongo_source_option
def export(run_ids, output, export_as, tags, runs_dir, mongo_url) -> None:
    """Export runs (all of them if no ids are given) as CSV or JSON.

    CSV: the table load_runs() gives in Python (rhn_cli.tracking.frames): one row per
    run with its fields, the flattened config as config.KEY columns, the results as
    'rhn runs ls' shows them (valid.ppl, test.ppl...), published.KEY targets where the
    run recorded them, and each metric's best and last value (METRIC.best, METRIC.last).
    JSON: the full records, metric series included (as 'rhn runs show --json').
    Run ids: 3, ranges 1-10 and comma lists 1,4,9.
    """
    from rhn_cli.atomic import write_atomically
    from rhn_cli.tracking.report import ReportError, export_format, export_text

    try:
        chosen_format = export_format(output, export_as)
    except ReportError as error:
        _fail(str(error))
    chosen = _select_tagged(runs_dir, mongo_url, run_ids, tags)
    text = export_text(chosen, chosen_format)
    if output == "-":
        click.echo(text, nl=False)
        return
    try:
        write_atomically(click.format_filename(output), text.encode("utf-8"))
    except OSError as error:
        _fail(f"cannot write {output}: {error.strerror or error}", code=1)
    click.echo(f"wrote {len(chosen)} run{'s' * (len(chosen) != 1)} to {output}")


@runs.command()
@click.argument(
    "run_ids", nargs=-1, required=True, metavar="RUN_ID...", shell_complete=complete_run_ids
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@runs_dir_option
@mongo_source_option
def rm(run_ids, yes, runs_dir, mongo_url) -> None:
    """Remove runs: their directories (or, with --mongo, their MongoDB documents, metrics
    and artifact files). Asks first; a run that is still running is never removed.
    Run ids: 3, ranges 1-10 and comma lists 1,4,9.
    """
    from rhn_cli.tracking.records import RunStoreError, removal_problem
    from rhn_cli.tracking.report import brief_lines

    store, records = _load(runs_dir, mongo_url)
    chosen = _select(records, run_ids, store.label)
    for record in chosen:
        problem = removal_problem(record)
        if problem:
            _fail(problem, code=1)
    _echo_lines(["  " + line for line in brief_lines(chosen, _style)])
    if not yes:
        count = f"these {len(chosen)} runs" if len(chosen) > 1 else "this run"
        click.confirm(f"Remove {count} from {store.label}?", abort=True)
    try:
        store.remove(chosen)
    except (RunStoreError, OSError) as error:
        _fail(str(error), code=1)
    for record in chosen:
        click.echo(f"removed run {record.key} ({record.name})")
