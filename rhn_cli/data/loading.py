"""A dataset's corpus from its cache, built first when need be: what ``load_corpus`` uses.

:func:`open_dataset` uses the cache when it is complete and current, and otherwise
fetches, verifies and prepares the dataset first (:func:`build`); :func:`load_textfile`
does the same for the user's own text, cached under the hash of its contents. Works on
dataset descriptions (:class:`~rhn_cli.data.spec.DatasetSpec`), never on names: looking
names up is the registry's job, which sits above this module.

Every operation on a dataset directory holds that dataset's lock, so a second process
waits for the first and then finds a complete cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rhn_cli import __version__
from rhn_cli.data import cache
from rhn_cli.data.errors import DataInputError, DatasetError
from rhn_cli.data.spec import SPLITS, DatasetSpec
from rhn_cli.data.textfile import TEXT_LEVELS, TEXTFILE_DATASET, textfile_paths

if TYPE_CHECKING:
    from rhn_cli.data.corpus import Corpus
    from rhn_cli.data.fetch import RawSources
    from rhn_cli.data.prepare import Prepared

Echo = Callable[[str], None]


def open_dataset(spec: DatasetSpec, echo: Echo = print, progress: TextIO | None = None) -> Corpus:
    """The cached corpus of ``spec``, fetched from its published URLs if need be.

    A cache whose files changed since they were written is never used: it is rebuilt
    from the local file or directory it was made from, or else DataInputError names
    the file and the command that rebuilds it.
    """
    directory = cache.dataset_dir(spec.name)
    with cache.locked(spec.name, echo):
        state = inspect_dataset(spec, contents=True)
        if not state.ready:
            source = _local_origin(state)
            if state.status == "corrupted" and source is None:
                raise DataInputError(
                    f"{state.reason} (it changed since it was prepared); "
                    f"'rhn data fetch {spec.name}' rebuilds it"
                )
            if state.status != "missing":
                where = f" from {source}" if source else ""
                echo(
                    f"{spec.name}: the cache in {directory} is {state.status} ({state.reason}); "
                    f"rebuilding it{where}"
                )
            else:
                echo(f"{spec.name}: not in the cache ({directory}) yet; fetching it")
            build(spec, source, directory, echo, progress)
            state = inspect_dataset(spec)
        return _corpus(spec, state)


def _local_origin(state: cache.CacheState) -> str | None:
    """The local file or directory a stale cache was built from, if it is still there:
    an air-gapped machine can then rebuild without the network."""
    from rhn_cli.data.fetch import is_url

    origin = ((state.meta or {}).get("source") or {}).get("origin")
    if isinstance(origin, str) and not is_url(origin) and Path(origin).exists():
        return origin
    return None


def inspect_dataset(
    spec: DatasetSpec, directory: Path | None = None, contents: bool = False
) -> cache.CacheState:
    """The state of ``spec``'s cache; ``contents`` also checks every file's SHA-256."""
    directory = directory or cache.dataset_dir(spec.name)
    return cache.inspect(directory, lambda meta: _spec_mismatch(spec, meta), contents)


def _spec_mismatch(spec: DatasetSpec, meta: dict[str, Any]) -> str | None:
    """Why a cache (whose files are intact) does not hold what ``spec`` describes."""
    if meta.get("dataset") != spec.name or meta.get("tokenizer") != spec.tokenizer:
        return f"it holds {meta.get('dataset')} tokenised by {meta.get('tokenizer')}"
    expected = spec.expected
    if expected is not None:
        tokens = {split: meta["splits"][split]["tokens"] for split in SPLITS}
        if tokens != dict(expected.tokens) or meta["vocab"]["size"] != expected.vocab_size:
            return "its statistics are not the published ones"
    return None


def build(
    spec: DatasetSpec,
    source: str | None,
    directory: Path,
    echo: Echo,
    progress: TextIO | None,
) -> dict[str, Any]:
    """Obtain verified raw files, tokenise, check and commit; returns the new metadata."""
    from rhn_cli.data.fetch import obtain

    with cache.staging_area(spec.name) as staging:
        raw = obtain(spec, source, staging, echo, progress)
        return _prepare_into(spec, raw, directory, echo)


def _prepare_into(
    spec: DatasetSpec, raw: RawSources, directory: Path, echo: Echo
) -> dict[str, Any]:
    from rhn_cli.data.prepare import check_expected, prepare

    existed = directory.exists()
    writer = cache.CacheWriter(directory)
    try:
        echo(f"{spec.name}: tokenising ({spec.convention.split(':')[0]})")
        prepared = prepare(spec, raw.paths, writer)
        check_expected(spec, prepared)
        writer.save_bytes(cache.VOCAB_FILE, cache.dump_json(prepared.vocab))
        meta = _meta(spec, raw, writer, prepared)
        writer.commit(meta)
    except BaseException:
        writer.discard()
        if not existed:
            cache.remove_tree(directory)
        raise
    splits = meta["splits"]
    echo(
        f"{spec.name}: ready in {directory}: "
        + "/".join(f"{splits[s]['tokens']:,}" for s in SPLITS)
        + f" tokens, vocabulary {len(prepared.vocab):,}"
    )
    return meta


def _meta(
    spec: DatasetSpec, raw: RawSources, writer: cache.CacheWriter, prepared: Prepared
) -> dict[str, Any]:
    from rhn_cli.data.prepare import id_dtype

    dtype = id_dtype(len(prepared.vocab)).name
    vocab_file = writer.files[cache.VOCAB_FILE]
    return {
        "format": cache.CACHE_FORMAT,
        "preprocessing_version": cache.PREPROCESSING_VERSION,
        "dataset": spec.name,
        "level": spec.level,
        "tokenizer": spec.tokenizer,
        "convention": spec.convention,
        "created": cache.utc_now(),
        "rhn_version": __version__,
        "source": raw.provenance,
        "vocab": {
            "file": cache.VOCAB_FILE,
            "size": len(prepared.vocab),
            "kind": prepared.vocab_kind,
            "bytes": vocab_file.size,
            "sha256": vocab_file.sha256,
        },
        "splits": {
            split: {
                "file": cache.split_file(split),
                "dtype": dtype,
                "bytes": writer.files[cache.split_file(split)].size,
                "sha256": writer.files[cache.split_file(split)].sha256,
                **prepared.splits[split],
            }
            for split in SPLITS
        },
    }


def _corpus(spec: DatasetSpec, state: cache.CacheState) -> Corpus:
    from rhn_cli.data.corpus import Corpus

    meta = state.meta or {}
    splits, vocab = cache.load_arrays(state.directory, meta)
    source = meta.get("source", {})
    return Corpus(
        name=spec.name,
        vocab=vocab,
        level=spec.level,
        description={
            "dataset": spec.name,
            "convention": meta.get("convention", ""),
            "cache": str(state.directory),
            "source": source.get("origin"),
            "source_sha256": {f["name"]: f.get("sha256") for f in source.get("files", [])},
            "preprocessing_version": meta.get("preprocessing_version"),
            "tokens": {split: meta["splits"][split]["tokens"] for split in SPLITS},
            "vocab_size": len(vocab),
        },
        **splits,
    )


def textfile_spec(level: str) -> DatasetSpec:
    """How a user's text is tokenised at ``level`` ('char' or 'word')."""
    if level == "word":
        convention = (
            "text-words: line.split() + ['<eos>'] for every line; vocabulary from train by "
            "(-count, word); valid/test words unseen in train become '<unk>'; one file is "
            "split 90/5/5 by tokens"
        )
    else:
        convention = (
            "text-chars: Unicode characters, newline included; ids sorted by code point over "
            "all splits; one file is split 90/5/5 by characters"
        )
    return DatasetSpec(
        name=TEXTFILE_DATASET,
        summary=f"your own UTF-8 text, {level} level",
        level=level,
        tokenizer=f"text_{level}s",
        convention=convention,
    )


def load_textfile(data_path: str, level: str, echo: Echo = print) -> Corpus:
    """The corpus of the user's text at ``data_path``, prepared once and cached.

    The cache entry is named after the level and the hash of the files' contents, so an
    edited file is prepared afresh and never confused with its old version.
    """
    if level not in TEXT_LEVELS:
        raise DatasetError(f"text_level={level!r}: expected one of {', '.join(TEXT_LEVELS)}")
    paths = textfile_paths(data_path)
    digests = [cache.hash_file(path)["sha256"] for path in paths]
    key = hashlib.sha256("\n".join([level, *digests]).encode()).hexdigest()[:16]
    entry = f"{level}-{key}"
    directory = cache.data_dir() / TEXTFILE_DATASET / entry
    spec = textfile_spec(level)
    with cache.locked(f"{TEXTFILE_DATASET}-{entry}", echo):
        state = inspect_dataset(spec, directory, contents=True)
        if not state.ready:
            from rhn_cli.data.fetch import RawSources

            if state.status != "missing":
                echo(f"textfile: the cache in {directory} is {state.status} ({state.reason})")
            echo(f"textfile: preparing {data_path} at the {level} level into {directory}")
            files = [
                {"name": str(path.resolve()), "sha256": digest, "bytes": path.stat().st_size}
                for path, digest in zip(paths, digests, strict=True)
            ]
            raw = RawSources(paths, {"origin": data_path, "kind": TEXTFILE_DATASET, "files": files})
            _prepare_into(spec, raw, directory, echo)
            state = inspect_dataset(spec, directory)
        return _corpus(spec, state)
