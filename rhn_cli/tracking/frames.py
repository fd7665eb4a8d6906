"""Recorded runs as pandas DataFrames, for notebooks: ``load_runs`` (one row per run) and
``load_metrics`` (every metric point).

    from rhn_cli.tracking.frames import load_runs, load_metrics

    runs = load_runs("runs", tag="lr-depth")              # or mongo_url="mongodb://host/rhn"
    runs.sort_values("valid.ppl")[["config.depth", "valid.ppl", "test.ppl"]]
    curves = load_metrics("runs", ids="1-10", wide=True)  # index (id, step), a column a metric
    curves["valid.ppl"].unstack("id").plot()

Both read the runs as ``rhn runs`` does (:mod:`rhn_cli.tracking.records`), and the runs
table is the one ``rhn runs export`` writes as CSV (:func:`report.export_table`). Names
hold dots (``valid.ppl``, ``config.synthetic.order``): index them as ``df["valid.ppl"]``,
never as attributes. pandas is imported on the first call, not with this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from rhn_cli.tracking.records import (
    RunRecord,
    check_keys,
    filter_runs,
    open_store,
    parse_statuses,
    parse_where,
    select_runs,
)
from rhn_cli.tracking.report import export_table, table_id

if TYPE_CHECKING:
    import pandas

METRIC_COLUMNS = ("id", "metric", "step", "value")
Wanted = str | int | Iterable[str | int] | None


def _listed(value: Wanted) -> list[str]:
    """One value or several, as a list of strings (None: none)."""
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [str(value)]
    return [str(v) for v in value]


def load_records(
    runs_dir: str | os.PathLike = "runs",
    mongo_url: str | None = None,
    *,
    ids: Wanted = None,
    tag: Wanted = None,
    where: Wanted = None,
    status: Wanted = None,
) -> list[RunRecord]:
    """The recorded runs, chosen as on ``rhn runs``'s command line: ``ids`` (``3``,
    ``"1-10"``, ``"1,4,9"`` or a list; in that order), every ``tag``, every ``where``
    condition (``"depth=10"``, ``"valid.ppl<120"``) and any of ``status``. Raises
    :class:`~rhn_cli.tracking.records.RunStoreError` (MongoDB down, an unknown id) or
    :class:`~rhn_cli.tracking.records.QueryError` (a malformed or unknown condition)."""
    conditions = [parse_where(text) for text in _listed(where)]
    statuses = parse_statuses(_listed(status))
    store = open_store(runs_dir, mongo_url)
    records = store.load()
    check_keys(conditions, records)
    if ids is not None:
        records = select_runs(records, _listed(ids), store.label)
    return filter_runs(records, conditions, statuses, tags=_listed(tag))


def runs_frame(records: Sequence[RunRecord]) -> pandas.DataFrame:
    """One row per run, indexed by run id; the columns of ``rhn runs export``'s CSV with
    their Python types (UTC timestamps, numbers, lists for tags and named configs)."""
    import pandas

    header, rows = export_table(records)
    frame = pandas.DataFrame(rows, columns=header)
    for column in ("start_time", "stop_time"):
        frame[column] = pandas.to_datetime(frame[column], utc=True)
    return frame.set_index("id")


def metrics_frame(
    records: Sequence[RunRecord], metrics: Wanted = None, wide: bool = False
) -> pandas.DataFrame:
    """Every point of every metric (or of those named in ``metrics``): columns id, metric,
    step, value, in run order, then by metric name and step. ``wide``: indexed by (id,
    step), one column per metric; where a step was recorded twice (a resumed run
    repeating an epoch), the last value."""
    import pandas

    wanted = set(_listed(metrics))
    rows = [
        (table_id(record), name, step, value)
        for record in records
        for name, (steps, values) in sorted(record.metrics.items())
        if not wanted or name in wanted
        for step, value in zip(steps, values, strict=False)
    ]
    frame = pandas.DataFrame(rows, columns=list(METRIC_COLUMNS))
    frame["value"] = pandas.to_numeric(frame["value"], errors="coerce")
    if not wide:
        return frame
    frame = frame.drop_duplicates(["id", "metric", "step"], keep="last")
    table = frame.pivot(index=["id", "step"], columns="metric", values="value")
    table.columns.name = None
    return table


def load_runs(
    runs_dir: str | os.PathLike = "runs",
    mongo_url: str | None = None,
    *,
    ids: Wanted = None,
    tag: Wanted = None,
    where: Wanted = None,
    status: Wanted = None,
) -> pandas.DataFrame:
    """The runs of the file store ``runs_dir`` (or of MongoDB at ``mongo_url``) as a
    DataFrame, one row per run, indexed by id (see :func:`runs_frame`; docs/tracking.md,
    "Runs in Python", lists the columns). Choosing runs: :func:`load_records`."""
    records = load_records(runs_dir, mongo_url, ids=ids, tag=tag, where=where, status=status)
    return runs_frame(records)


def load_metrics(
    runs_dir: str | os.PathLike = "runs",
    mongo_url: str | None = None,
    *,
    ids: Wanted = None,
    tag: Wanted = None,
    where: Wanted = None,
    status: Wanted = None,
    metrics: Wanted = None,
    wide: bool = False,
) -> pandas.DataFrame:
    """The metric series of the chosen runs (:func:`load_records`) as one long DataFrame
    (id, metric, step, value), or ``wide`` (see :func:`metrics_frame`)."""
    records = load_records(runs_dir, mongo_url, ids=ids, tag=tag, where=where, status=status)
    return metrics_frame(records, metrics, wide)
