"""Everything ``rhn data`` does, by dataset name: fetch, ls, path, rm, verify.

The functions back the ``rhn data`` commands and return data for the CLI to print;
opening, building and inspecting a cache is :mod:`rhn_cli.data.loading`.

Every operation on a dataset directory holds that dataset's lock, so a second process
waits for the first and then finds a complete cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rhn_cli.data import cache
from rhn_cli.data.errors import DatasetError
from rhn_cli.data.loading import Echo, build, inspect_dataset, textfile_spec
from rhn_cli.data.registry import DATASETS, get_spec
from rhn_cli.data.spec import SPLITS, DatasetSpec, SourceFile
from rhn_cli.data.textfile import TEXTFILE_DATASET

# --- rhn data fetch ----------------------------------------------------------------------


@dataclass
class FetchOutcome:
    name: str
    prepared: bool  # False: the cache was already complete and current
    directory: Path
    meta: dict[str, Any]


def fetch_dataset(
    name: str,
    source: str | None = None,
    force: bool = False,
    echo: Echo = print,
    progress: TextIO | None = None,
) -> FetchOutcome:
    """Fetch, verify and prepare ``name`` from ``source`` (None: the published URLs).

    A complete, current and intact cache is kept unless ``force``; a stale or corrupted
    one is rebuilt.
    """
    spec = _downloadable(name)
    directory = cache.dataset_dir(spec.name)
    with cache.locked(spec.name, echo):
        state = inspect_dataset(spec, contents=True)
        if state.ready and not force:
            return FetchOutcome(spec.name, False, directory, state.meta or {})
        if state.status in ("stale", "corrupted"):
            echo(
                f"{spec.name}: the cache in {directory} is {state.status} ({state.reason}); "
                "rebuilding it"
            )
        meta = build(spec, source, directory, echo, progress)
    return FetchOutcome(spec.name, True, directory, meta)


def _downloadable(name: str) -> DatasetSpec:
    spec = get_spec(name)
    if spec.name == TEXTFILE_DATASET:
        raise DatasetError(
            "textfile is prepared from your own files on first use: "
            "rhn train with dataset='textfile' data_path='FILE' (nothing to fetch)"
        )
    if not spec.downloadable:
        raise DatasetError(f"{spec.name} is generated in memory; it has no cache")
    return spec


def _textfile_entries() -> list[Path]:
    root = cache.data_dir() / TEXTFILE_DATASET
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# --- rhn data ls / path / rm ---------------------------------------------------------------


@dataclass
class DatasetRow:
    """One line of ``rhn data ls``."""

    name: str
    level: str
    status: str  # ready, missing, stale, built-in, 'N prepared' (textfile)
    size: int  # bytes on disk
    tokens: tuple[int, ...] | None = None  # train, valid, test
    vocab: int | None = None
    published: bool = False  # statistics from the registry: the dataset is not prepared
    reason: str = ""  # why a cache is stale
    summary: str = ""


def dataset_rows() -> list[DatasetRow]:
    rows = []
    for spec in DATASETS.values():
        if spec.name == TEXTFILE_DATASET:
            entries = _textfile_entries()
            size = sum(cache.size_on_disk(entry) for entry in entries)
            status = f"{len(entries)} prepared" if entries else "none prepared"
            rows.append(DatasetRow(spec.name, "char/word", status, size, summary=spec.summary))
        elif not spec.downloadable:
            rows.append(DatasetRow(spec.name, spec.level, "built-in", 0, summary=spec.summary))
        else:
            rows.append(_cached_row(spec))
    return rows


def _cached_row(spec: DatasetSpec) -> DatasetRow:
    state = inspect_dataset(spec)
    row = DatasetRow(spec.name, spec.level, state.status, cache.size_on_disk(state.directory))
    row.summary, row.reason = spec.summary, state.reason
    if state.ready and state.meta:
        row.tokens = tuple(state.meta["splits"][split]["tokens"] for split in SPLITS)
        row.vocab = state.meta["vocab"]["size"]
    elif spec.expected is not None:
        row.tokens = tuple(spec.expected.tokens[split] for split in SPLITS)
        row.vocab, row.published = spec.expected.vocab_size, True
    return row


def dataset_path(name: str) -> Path:
    """Where ``name`` is (or would be) cached."""
    spec = get_spec(name)
    if spec.name != TEXTFILE_DATASET and not spec.downloadable:
        raise DatasetError(f"{spec.name} is generated in memory; it has no cache directory")
    return cache.dataset_dir(spec.name)


def cached_size(name: str) -> int:
    return cache.size_on_disk(dataset_path(name))


def remove_dataset(name: str, echo: Echo = print) -> int:
    """Delete the cache of ``name``; returns the bytes freed (0 when there was none)."""
    directory = dataset_path(name)
    if name == TEXTFILE_DATASET:
        freed = 0
        for entry in _textfile_entries():
            with cache.locked(f"{TEXTFILE_DATASET}-{entry.name}", echo):
                freed += cache.remove_tree(entry)
        freed += cache.remove_tree(directory)
        return freed
    with cache.locked(name, echo):
        return cache.remove_tree(directory)


# --- rhn data verify ------------------------------------------------------------------------


@dataclass
class Check:
    ok: bool
    what: str


@dataclass
class Verification:
    name: str
    directory: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def add(self, ok: bool, what: str) -> bool:
        self.checks.append(Check(ok, what))
        return ok


def verify_dataset(name: str, echo: Echo = print) -> list[Verification]:
    """Re-check a cache: array and vocabulary checksums, statistics recomputed from the
    arrays against meta.json and the published ones, and the recorded source checksums
    against the published ones. One :class:`Verification` per cache (textfile may have
    several)."""
    spec = get_spec(name)
    if spec.name == TEXTFILE_DATASET:
        entries = _textfile_entries()
        if not entries:
            raise DatasetError("textfile: nothing prepared yet (rhn train with dataset='textfile')")
        results = []
        for entry in entries:
            level = entry.name.split("-", 1)[0]
            with cache.locked(f"{TEXTFILE_DATASET}-{entry.name}", echo):
                results.append(_verify(textfile_spec(level), entry, f"textfile/{entry.name}"))
        return results
    spec = _downloadable(name)
    with cache.locked(spec.name, echo):
        return [_verify(spec, cache.dataset_dir(spec.name), spec.name)]


def _verify(spec: DatasetSpec, directory: Path, label: str) -> Verification:
    import numpy as np

    result = Verification(label, directory)
    state = inspect_dataset(spec, directory)
    if state.status == "missing":
        result.add(False, f"not in the cache ({directory}); run 'rhn data fetch {spec.name}'")
        return result
    if not result.add(
        state.ready,
        "meta.json, array headers and file sizes"
        + ("" if state.ready else f": {state.reason}; {_rebuild_hint(spec)}"),
    ):
        return result
    meta = state.meta or {}
    result.add(
        True,
        f"meta.json: preprocessing version {meta['preprocessing_version']}, "
        f"convention {meta['convention'].split(':')[0]}",
    )

    vocab = meta["vocab"]
    digest = cache.hash_file(directory / vocab["file"])["sha256"]
    result.add(
        digest == vocab["sha256"], f"{vocab['file']}: sha256 as recorded, {vocab['size']:,} symbols"
    )
    splits, symbols = cache.load_arrays(directory, meta)
    if spec.expected is not None and spec.expected.symbols is not None:
        result.add(
            "".join(symbols) == spec.expected.symbols,
            f"vocabulary: exactly the {spec.expected.vocab_size} published symbols",
        )

    for split in SPLITS:
        entry, ids = meta["splits"][split], splits[split]
        digest = cache.hash_file(directory / entry["file"])["sha256"]
        result.add(digest == entry["sha256"], f"{entry['file']}: sha256 as recorded")
        counts = np.zeros(vocab["size"], dtype=np.int64)
        out_of_range = 0
        step = 1 << 22  # np.bincount widens to int64: 32 MiB per step
        for start in range(0, ids.size, step):
            chunk_counts = np.bincount(ids[start : start + step], minlength=vocab["size"])
            counts += chunk_counts[: vocab["size"]]
            out_of_range += int(chunk_counts[vocab["size"] :].sum())
        recomputed = {"tokens": int(ids.size), "types": int(np.count_nonzero(counts))}
        if "lines" in entry:
            eos = "\n" if spec.level == "char" else "<eos>"
            recomputed["lines"] = int(counts[symbols.index(eos)]) if eos in symbols else 0
        recorded = {key: entry[key] for key in recomputed}
        ok = out_of_range == 0 and recomputed == recorded
        shown = ", ".join(f"{v:,} {k}" for k, v in recomputed.items())
        result.add(
            ok,
            f"{split}: {shown} recomputed from the array"
            + ("" if ok else f", meta.json says {recorded}"),
        )

    expected = spec.expected
    if expected is not None:
        tokens = [meta["splits"][split]["tokens"] for split in SPLITS]
        published = [expected.tokens[split] for split in SPLITS]
        ok = tokens == published and vocab["size"] == expected.vocab_size
        result.add(
            ok,
            "statistics as published: "
            + " / ".join(f"{n:,}" for n in published)
            + f" tokens, vocabulary {expected.vocab_size:,}",
        )
    for check in _source_checks(spec, meta.get("source", {})):
        result.add(*check)
    return result


def _rebuild_hint(spec: DatasetSpec) -> str:
    if spec.name == TEXTFILE_DATASET:
        return "the next run with its data_path rebuilds it"
    return f"'rhn data fetch {spec.name}' rebuilds it"


def _source_checks(spec: DatasetSpec, source: dict[str, Any]) -> list[tuple[bool, str]]:
    """The checksums recorded when the sources were fetched, against the published ones.

    The raw files are not kept (only the prepared arrays), so this checks what was
    verified at fetch time, as recorded in meta.json.
    """
    checks = []
    archive = source.get("archive")
    if archive and spec.archive is not None and archive.get("matches_published"):
        algorithm, digest = cache.parse_hash(spec.archive.hash)
        checks.append(
            (
                archive.get(algorithm) == digest,
                f"source {archive['name']}: recorded {algorithm} {digest} is the "
                "published checksum",
            )
        )
    published: dict[str, SourceFile] = {f.name: f for f in spec.files}
    for record in source.get("files", []):
        wanted = published.get(record["name"])
        if wanted is not None and wanted.hash:
            algorithm, digest = cache.parse_hash(wanted.hash)
            checks.append(
                (
                    record.get(algorithm) == digest,
                    f"source {wanted.name}: recorded {algorithm} {digest} is the published "
                    "checksum",
                )
            )
        elif wanted is not None and not (archive and archive.get("matches_published")):
            checks.append(
                (
                    True,
                    f"source {wanted.name}: no published checksum; its statistics "
                    "are the published ones",
                )
            )
        elif spec.name == TEXTFILE_DATASET:
            path = Path(record["name"])
            now = cache.hash_file(path)["sha256"] if path.is_file() else None
            state = "unchanged since" if now == record["sha256"] else "changed or gone since"
            checks.append(
                (True, f"source {path}: sha256 {record['sha256'][:12]}…, {state} preparation")
            )
    return checks
