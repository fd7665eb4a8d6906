"""Small hand-made datasets shaped like the real ones, a local HTTP server, and their
registration under test checksums. Importable by the subprocesses of the tests too.

The expected statistics and ids below are worked out by hand from the literal file
contents, independently of rhn's tokenisers.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rhn_cli.data.registry import (
    DATASETS,
    ENWIK8,
    PTB_CHARS,
    PTB_WORDS,
    Archive,
    DatasetSpec,
    Expected,
)

# --- Penn Treebank look-alikes (same layout: leading space, ' \n' line ends) ---------

PTB_WORD_FILES = {
    "ptb.train.txt": " the cat sat \n the dog sat \n a <unk> ran \n",
    "ptb.valid.txt": " the cat ran \n",
    "ptb.test.txt": " a dog sat \n the <unk> \n",
}
# Train counts: <eos> 3, sat 2, the 2, then <unk> a cat dog ran once each.
PTB_WORD_VOCAB = ["<eos>", "sat", "the", "<unk>", "a", "cat", "dog", "ran"]
PTB_WORD_IDS = {
    "train": [2, 5, 1, 0, 2, 6, 1, 0, 4, 3, 7, 0],
    "valid": [2, 5, 7, 0],
    "test": [4, 6, 1, 0, 2, 3, 0],
}
PTB_WORD_STATS = {"train": 12, "valid": 4, "test": 7}

# ptb.char format: symbols separated by single spaces, one final space.
PTB_CHAR_FILES = {
    "ptb.char.train.txt": "t h e _ c a t \n a _ < u n k > \n ",
    "ptb.char.valid.txt": "t h e \n ",
    "ptb.char.test.txt": "c a t _ a \n ",
}
PTB_CHAR_VOCAB = "\n<>_acehkntu"  # sorted by byte value
PTB_CHAR_IDS = {
    "train": [10, 7, 6, 3, 5, 4, 10, 0, 4, 3, 1, 11, 9, 8, 2, 0],
    "valid": [10, 7, 6, 0],
    "test": [5, 4, 10, 3, 4, 0],
}
PTB_CHAR_STATS = {"train": 16, "valid": 4, "test": 6}

# --- enwik8 look-alike: bytes, some of them UTF-8 continuation bytes ------------------

ENWIK8_BYTES = b"abc\n" * 50 + "é".encode() * 25  # 250 bytes, 6 distinct values
ENWIK8_HELD_OUT = 25  # train 200, valid 25, test 25
# Sorted distinct bytes: \n a b c 0xa9 0xc3 -> ids 0..5
ENWIK8_IDS = {
    "train": [1, 2, 3, 0] * 50,
    "valid": [5, 4] * 12 + [5],
    "test": [4] + [5, 4] * 12,
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def simple_examples_tgz(extra: dict[str, bytes] | None = None, symlink: str | None = None) -> bytes:
    """A gzip'd tar laid out like Mikolov's simple-examples.tgz.

    ``extra`` adds members by name (e.g. a path-traversal one); ``symlink`` replaces that
    data file by a symbolic link to /etc/passwd.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for directory in ("simple-examples", "simple-examples/data"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        members = {f"simple-examples/data/{n}": t.encode() for n, t in PTB_WORD_FILES.items()}
        members |= {f"simple-examples/data/{n}": t.encode() for n, t in PTB_CHAR_FILES.items()}
        members["simple-examples/README"] = b"not needed\n"
        members |= extra or {}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if symlink and name.endswith("/" + symlink):
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
                continue
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def enwik8_zip(data: bytes = ENWIK8_BYTES) -> bytes:
    return zip_bytes({"enwik8": data})


def write_ptb_directory(directory: Path, words: bool = True, chars: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = (PTB_WORD_FILES if words else {}) | (PTB_CHAR_FILES if chars else {})
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


# --- registration ----------------------------------------------------------------------


def tiny_specs(
    tgz: bytes, tgz_urls: tuple[str, ...] = (), zip_data: bytes | None = None, zip_urls=()
) -> dict[str, DatasetSpec]:
    """tiny_ptb, tiny_ptb_char and tiny_enwik8: the real specs with test checksums,
    sizes and statistics, and the test server's URLs."""
    tgz_archive = Archive("simple-examples.tgz", f"md5:{md5(tgz)}", len(tgz), tuple(tgz_urls))
    words = replace(
        PTB_WORDS,
        name="tiny_ptb",
        archive=tgz_archive,
        file_urls=(),
        files=tuple(
            replace(f, hash=f"sha256:{sha256(text.encode())}", size=len(text))
            for f in PTB_WORDS.files
            for text in [PTB_WORD_FILES[f.name]]
        ),
        expected=Expected(PTB_WORD_STATS, len(PTB_WORD_VOCAB)),
    )
    chars = replace(
        PTB_CHARS,
        name="tiny_ptb_char",
        archive=tgz_archive,
        files=tuple(replace(f, size=len(PTB_CHAR_FILES[f.name])) for f in PTB_CHARS.files),
        expected=Expected(PTB_CHAR_STATS, len(PTB_CHAR_VOCAB), symbols=PTB_CHAR_VOCAB),
    )
    zip_data = enwik8_zip() if zip_data is None else zip_data
    enwik8 = replace(
        ENWIK8,
        name="tiny_enwik8",
        archive=Archive("enwik8.zip", f"sha256:{sha256(zip_data)}", len(zip_data), zip_urls),
        files=(replace(ENWIK8.files[0], hash=f"md5:{md5(ENWIK8_BYTES)}", size=len(ENWIK8_BYTES)),),
        held_out=ENWIK8_HELD_OUT,
        expected=Expected({k: len(v) for k, v in ENWIK8_IDS.items()}, 6),
    )
    return {spec.name: spec for spec in (words, chars, enwik8)}


def register(specs: dict[str, DatasetSpec]) -> None:
    """Add specs to the registry (for subprocesses; tests use monkeypatch instead)."""
    DATASETS.update(specs)


# --- a local HTTP server ---------------------------------------------------------------


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 at a free port, in a thread.

    Paths in ``drop`` get their full Content-Length but only half the body before the
    connection is closed, as a flaky server would.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if self.path in server.drop:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
