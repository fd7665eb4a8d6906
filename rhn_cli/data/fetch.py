"""Getting a dataset's raw files, verified, into a staging directory inside the cache.

A source is the canonical URL (then its mirrors), or what the user names with
``--from``: a local archive, a directory holding the raw files (or the archive), a
single raw file where the dataset has only one, or another URL (a directory URL ends in
``/``). The rules:

* Downloads go through pooch's downloaders (HTTP(S) with a progress bar, FTP, SFTP) to
  a ``.part`` file, are checked against the published checksum of what they are (the
  archive, or a raw file) and only then renamed into place; a mismatch deletes the
  file and fails naming both hashes. A URL whose file name rhn does not know is
  accepted only as an archive whose members then pass the member checks below.
* An archive whose checksum is the published one vouches for its members. Any other
  archive (a repackaging, a local copy) is only a container: each member must match
  its own published checksum.
* Raw files with no published checksum (``ptb.char.*``) are vouched for by the
  statistics of the prepared splits, which :mod:`rhn_cli.data.prepare` checks.
* Extraction never calls ``extractall``: it lists the archive, refuses it outright if
  any member name is absolute or climbs out with ``..``, picks the expected members by
  name (exact path, else a unique base name), requires regular files of the declared
  size, and copies their bytes to names taken from the registry, inside the staging
  directory. Nothing the archive says decides where a byte is written.
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, TextIO
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from rhn_cli.data.cache import Hasher, hash_file, parse_hash
from rhn_cli.data.errors import DatasetError
from rhn_cli.data.spec import DatasetSpec, SourceFile

URL_SCHEMES = ("http", "https", "ftp", "sftp")
# Seconds to connect, and to wait for each read: a dead or stalled server fails soon.
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 60
_CHUNK = 1 << 20


class DownloadFailed(Exception):
    """One URL did not deliver the expected file; the next mirror may."""


@dataclass
class RawSources:
    """The verified raw files (one per ``spec.files``, in order) and where they came from."""

    paths: list[Path]
    provenance: dict[str, Any] = field(default_factory=dict)


def is_url(text: str) -> bool:
    return urlparse(text).scheme.lower() in URL_SCHEMES


def obtain(
    spec: DatasetSpec,
    source: str | None,
    staging: Path,
    echo: Callable[[str], None] = print,
    progress: TextIO | None = None,
) -> RawSources:
    """Verified raw files of ``spec`` from ``source`` (None: the canonical URLs).

    Downloads and extracted members are written under ``staging`` only; files in a
    local directory are read where they are.
    """
    if source is None:
        return _from_published_urls(spec, staging, echo, progress)
    if source.startswith("file://"):
        source = url2pathname(urlparse(source).path)
    if is_url(source):
        try:
            return _from_url(spec, source, staging, echo, progress)
        except DownloadFailed as failure:
            raise DatasetError(f"{spec.name}: cannot download {source}: {failure}") from None
    path = Path(source).expanduser()
    return _from_path(spec, path, staging, echo, origin=str(path.absolute()))


# --- URLs ------------------------------------------------------------------------------


def _from_published_urls(
    spec: DatasetSpec, staging: Path, echo: Callable[[str], None], progress: TextIO | None
) -> RawSources:
    failures = []
    urls = spec.download_urls()
    for number, url in enumerate(urls, start=1):
        try:
            return _from_url(spec, url, staging, echo, progress)
        except DownloadFailed as failure:
            failures.append(f"{url}: {failure}")
            if number < len(urls):
                echo(f"{spec.name}: {failure}; trying the next mirror")
    wanted = spec.archive.filename if spec.archive else ", ".join(f.name for f in spec.files)
    raise DatasetError(
        f"{spec.name} could not be downloaded ({'; '.join(failures) or 'no URL known'}); "
        f"get {wanted} some other way and run 'rhn data fetch {spec.name} --from PATH' "
        "(the archive, a directory holding the files, or a mirror URL)"
    )


def _from_url(
    spec: DatasetSpec,
    url: str,
    staging: Path,
    echo: Callable[[str], None],
    progress: TextIO | None,
) -> RawSources:
    downloads = staging / "download"
    downloads.mkdir(exist_ok=True)
    if url.endswith("/"):  # a directory of raw files
        paths, records = [], []
        for wanted in spec.files:
            echo(f"{spec.name}: downloading {url}{wanted.name}")
            target = downloads / wanted.name
            hashes = download(url + wanted.name, target, wanted.hash, progress, wanted.size)
            paths.append(target)
            records.append(_file_record(wanted, hashes, _published_check(wanted)))
        return RawSources(paths, {"origin": url, "kind": "directory", "files": records})

    name = unquote(PurePosixPath(urlparse(url).path).name)
    archive = spec.archive
    echo(f"{spec.name}: downloading {url}")
    if archive is not None and (url in archive.urls or name == archive.filename):
        target = downloads / archive.filename
        hashes = download(url, target, archive.hash, progress, archive.size)
        return _from_archive(spec, target, staging, echo, origin=url, archive_hashes=hashes)
    if len(spec.files) == 1 and name == spec.files[0].name:
        wanted = spec.files[0]
        target = downloads / wanted.name
        hashes = download(url, target, wanted.hash, progress, wanted.size)
        record = _file_record(wanted, hashes, _published_check(wanted))
        return RawSources([target], {"origin": url, "kind": "file", "files": [record]})
    # A file rhn has no checksum for: usable only as an archive of verifiable members.
    target = downloads / (re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download")
    download(url, target, None, progress)
    return _from_path(spec, target, staging, echo, origin=url)


def download(
    url: str,
    target: Path,
    expected: str | None,
    progress: TextIO | None = None,
    expected_size: int | None = None,
) -> dict[str, str]:
    """Download ``url`` to ``target`` via a ``.part`` file; returns its digests.

    With ``expected`` ('algorithm:hex') the file is kept only if it matches; otherwise
    it is deleted and :class:`DownloadFailed` names the expected and actual hash.
    """
    algorithms = {"sha256"} | ({parse_hash(expected)[0]} if expected else set())
    partial = target.with_name(f".{target.name}.part")
    try:
        with _progress_bar(progress, target.name, expected_size) as bar:
            _downloader(url, bar)(url, str(partial), None)
        hashes = hash_file(partial, algorithms)
        if expected:
            algorithm, digest = parse_hash(expected)
            if hashes[algorithm] != digest:
                size = partial.stat().st_size
                published = f", published size {expected_size:,}" if expected_size else ""
                raise DownloadFailed(
                    f"{algorithm} checksum mismatch for {target.name}: expected {digest}, got "
                    f"{hashes[algorithm]} ({size:,} bytes{published}); the download was deleted"
                )
        os.replace(partial, target)
        return hashes
    except DownloadFailed:
        raise
    except Exception as error:  # requests, ftplib, paramiko and OS errors alike
        raise DownloadFailed(_describe_download_error(error)) from error
    finally:
        partial.unlink(missing_ok=True)


def _downloader(url: str, bar: Any) -> Callable[..., Any]:
    import pooch

    if urlparse(url).scheme.lower() in ("http", "https"):
        # 1 MiB chunks: pooch's default (1 KiB) flushes the file 35,000 times for PTB.
        return pooch.HTTPDownloader(
            progressbar=bar, chunk_size=_CHUNK, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        )
    return pooch.choose_downloader(url, progressbar=bar)


@contextmanager
def _progress_bar(stream: TextIO | None, label: str, size: int | None) -> Iterator[Any]:
    """A tqdm bar on ``stream`` for pooch to drive, or False (no bar) without a stream."""
    if stream is None:
        yield False
        return
    from tqdm import tqdm

    # pooch tests the bar's truth, which for tqdm is total > 0: start from a positive
    # total (pooch sets the real one from Content-Length).
    bar = tqdm(
        total=size or 1, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=stream
    )
    try:
        yield bar
    finally:
        bar.close()


def _describe_download_error(error: BaseException) -> str:
    """One short line for what went wrong with the connection."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}".strip()
    if isinstance(error, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "the connection dropped before the download finished"
    text = str(error)
    if "IncompleteRead" in text or "Connection broken" in text:
        return "the connection dropped before the download finished"
    errno_message = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno_message:
        return errno_message.group(1).strip().rstrip(".").lower()
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    first_line = text.splitlines()[0] if text else type(error).__name__
    return first_line[:200]


# --- local sources ---------------------------------------------------------------------


def _from_path(
    spec: DatasetSpec,
    path: Path,
    staging: Path,
    echo: Callable[[str], None],
    origin: str,
) -> RawSources:
    if path.is_dir():
        return _from_directory(spec, path, staging, echo)
    if not path.is_file():
        raise DatasetError(f"{spec.name}: --from {origin}: no such file or directory")
    if zipfile.is_zipfile(path) or tarfile.is_tarfile(path):
        return _from_archive(spec, path, staging, echo, origin=str(origin))
    if len(spec.files) == 1:
        wanted = spec.files[0]
        hashes = hash_file(path, _algorithms(wanted))
        record = _file_record(wanted, hashes, _checked_member(spec, wanted, hashes, str(path)))
        return RawSources([path], {"origin": str(origin), "kind": "file", "files": [record]})
    raise DatasetError(
        f"{spec.name}: --from {origin} is neither a zip or tar archive nor a directory; "
        f"expected {_what_to_give(spec)}"
    )


def _from_directory(
    spec: DatasetSpec, directory: Path, staging: Path, echo: Callable[[str], None]
) -> RawSources:
    present = [directory / wanted.name for wanted in spec.files]
    if all(path.is_file() for path in present):
        records = []
        for wanted, path in zip(spec.files, present, strict=True):
            hashes = hash_file(path, _algorithms(wanted))
            check = _checked_member(spec, wanted, hashes, str(path))
            records.append(_file_record(wanted, hashes, check))
        echo(f"{spec.name}: using {', '.join(f.name for f in spec.files)} from {directory}")
        origin = str(directory.resolve())
        return RawSources(present, {"origin": origin, "kind": "directory", "files": records})
    if spec.archive is not None and (directory / spec.archive.filename).is_file():
        archive = directory / spec.archive.filename
        return _from_archive(spec, archive, staging, echo, origin=str(archive.resolve()))
    missing = [path.name for path in present if not path.is_file()]
    raise DatasetError(
        f"{spec.name}: {directory} lacks {', '.join(missing)}; expected {_what_to_give(spec)}"
    )


def _from_archive(
    spec: DatasetSpec,
    archive: Path,
    staging: Path,
    echo: Callable[[str], None],
    origin: str,
    archive_hashes: dict[str, str] | None = None,
) -> RawSources:
    published = spec.archive
    algorithms = {"sha256"} | ({parse_hash(published.hash)[0]} if published else set())
    hashes = archive_hashes or hash_file(archive, algorithms)
    canonical = False
    if published is not None:
        algorithm, digest = parse_hash(published.hash)
        canonical = hashes.get(algorithm) == digest
    trust = (
        f"its {published.hash.split(':')[0]} is the published one"
        if canonical
        else "not the published archive: each file is checked on its own"
    )
    echo(
        f"{spec.name}: extracting {', '.join(f.name for f in spec.files)} from {archive.name} "
        f"({trust})"
    )
    extracted = staging / "files"
    extracted.mkdir(exist_ok=True)
    member_algorithms = {a for wanted in spec.files for a in _algorithms(wanted)}
    # The published archive vouches for its members; any other must declare their sizes.
    members = extract_members(
        archive, spec.files, extracted, member_algorithms, check_sizes=not canonical
    )
    paths, records = [], []
    for wanted, (path, member, member_hashes) in zip(spec.files, members, strict=True):
        if canonical:
            check = f"inside {published.filename}, whose checksum is the published one"
        else:
            check = _checked_member(spec, wanted, member_hashes, f"{archive.name}:{member}")
        paths.append(path)
        records.append(_file_record(wanted, member_hashes, check) | {"member": member})
    archive_record = {"name": archive.name, "bytes": archive.stat().st_size, **hashes}
    if published is not None:
        archive_record |= {"published": published.hash, "matches_published": canonical}
    return RawSources(
        paths, {"origin": origin, "kind": "archive", "archive": archive_record, "files": records}
    )


def _algorithms(wanted: SourceFile) -> set[str]:
    return {"sha256"} | ({parse_hash(wanted.hash)[0]} if wanted.hash else set())


def _published_check(wanted: SourceFile) -> str:
    if wanted.hash:
        return f"{parse_hash(wanted.hash)[0]} matches the published checksum"
    return "no published checksum: vouched for by the prepared statistics"


def _checked_member(
    spec: DatasetSpec, wanted: SourceFile, hashes: dict[str, str], where: str
) -> str:
    """Check a raw file against its published checksum; returns what was checked."""
    if not wanted.hash:
        return _published_check(wanted)
    algorithm, digest = parse_hash(wanted.hash)
    if hashes[algorithm] != digest:
        raise DatasetError(
            f"{spec.name}: {where} is not the published {wanted.name}: {algorithm} expected "
            f"{digest}, got {hashes[algorithm]}"
        )
    return _published_check(wanted)


def _file_record(wanted: SourceFile, hashes: dict[str, str], check: str) -> dict[str, Any]:
    return {"name": wanted.name, **hashes, "published": wanted.hash, "check": check}


def _what_to_give(spec: DatasetSpec) -> str:
    files = ", ".join(f.name for f in spec.files)
    archive = f" or {spec.archive.filename}" if spec.archive else ""
    return f"{files}{archive}"


# --- safe extraction -------------------------------------------------------------------


@dataclass
class _Entry:
    name: str  # normalised: no leading './'
    regular: bool
    size: int
    handle: Any  # TarInfo or ZipInfo


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def is_unsafe_member_name(name: str) -> bool:
    """True for absolute paths, drive letters and any '..' component."""
    posix = name.replace("\\", "/")
    return (
        posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix) is not None
        or ".." in PurePosixPath(posix).parts
    )


def _zip_entries(archive: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in archive.infolist():
        mode = info.external_attr >> 16
        is_link = (mode & 0o170000) == 0o120000
        regular = not info.is_dir() and not is_link
        entries.append(_Entry(_normalise(info.filename), regular, info.file_size, info))
    return entries


def _tar_entries(archive: tarfile.TarFile) -> list[_Entry]:
    return [_Entry(_normalise(m.name), m.isfile(), m.size, m) for m in archive.getmembers()]


def extract_members(
    archive_path: Path,
    wanted: tuple[SourceFile, ...],
    destination: Path,
    algorithms: set[str],
    check_sizes: bool = True,
) -> list[tuple[Path, str, dict[str, str]]]:
    """Copy the ``wanted`` members out of a zip or tar archive into ``destination``.

    Returns (path, member name, digests) per wanted file. Raises DatasetError for an
    archive with an unsafe member name, a missing, ambiguous or non-regular member, a
    member whose declared size is not the published one (with ``check_sizes``; this
    stops a decompression bomb before it is unpacked) or a corrupt archive.
    """
    label = archive_path.name
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as archive:
                chosen = _choose(label, _zip_entries(archive), wanted, check_sizes)
                return [
                    _copy_member(label, entry, archive.open(entry.handle), target, algorithms)
                    for entry, target in _targets(chosen, wanted, destination)
                ]
        with tarfile.open(archive_path, "r:*") as archive:
            chosen = _choose(label, _tar_entries(archive), wanted, check_sizes)
            return [
                _copy_member(label, entry, archive.extractfile(entry.handle), target, algorithms)
                for entry, target in _targets(chosen, wanted, destination)
            ]
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError) as error:
        raise DatasetError(f"{label} is not a readable archive ({error})") from None


def _targets(chosen: list[_Entry], wanted: tuple[SourceFile, ...], destination: Path):
    for entry, file in zip(chosen, wanted, strict=True):
        # The registry's name, never the archive's: nothing the archive says picks a path.
        yield entry, destination / PurePosixPath(file.name).name


def _choose(
    label: str, entries: list[_Entry], wanted: tuple[SourceFile, ...], check_sizes: bool
) -> list[_Entry]:
    for entry in entries:
        if is_unsafe_member_name(entry.name):
            raise DatasetError(
                f"{label} has a member that points outside the archive ({entry.name!r}); "
                "refusing to extract anything from it"
            )
    chosen = []
    for file in wanted:
        exact = [e for e in entries if e.name == file.member]
        by_name = [e for e in entries if PurePosixPath(e.name).name == file.name and e.regular]
        candidates = exact or by_name
        if not candidates:
            raise DatasetError(f"{label} has no member {file.member} (nor any {file.name})")
        if len(candidates) > 1:
            names = ", ".join(e.name for e in candidates[:3])
            raise DatasetError(f"{label}: {file.name} is ambiguous ({names})")
        entry = candidates[0]
        if not entry.regular:
            raise DatasetError(f"{label}: member {entry.name} is not a regular file")
        if check_sizes and file.size is not None and entry.size != file.size:
            raise DatasetError(
                f"{label}: member {entry.name} has {entry.size:,} bytes, the published "
                f"{file.name} has {file.size:,}"
            )
        chosen.append(entry)
    return chosen


def _copy_member(
    label: str, entry: _Entry, source: IO[bytes] | None, target: Path, algorithms: set[str]
) -> tuple[Path, str, dict[str, str]]:
    if source is None:
        raise DatasetError(f"{label}: member {entry.name} cannot be read")
    hasher = Hasher(algorithms)
    with source, open(target, "xb") as out:
        while chunk := source.read(_CHUNK):
            hasher.update(chunk)
            if hasher.size > entry.size:  # never trust a stream past its declared size
                raise DatasetError(f"{label}: member {entry.name} is longer than it declares")
            out.write(chunk)
    if hasher.size != entry.size:
        raise DatasetError(f"{label}: member {entry.name} is truncated")
    return target, entry.name, hasher.hexdigests()
