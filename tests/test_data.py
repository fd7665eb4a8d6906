"""Datasets: fetching, verification, safe extraction, tokenisation rules and the cache.

No network and no shared files: a local HTTP server on 127.0.0.1 serves small archives
shaped like the real ones, registered under their own checksums (tests/fakedata.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rhn_cli.data import cache
from rhn_cli.data.errors import DatasetError
from rhn_cli.data.loading import inspect_dataset, open_dataset
from rhn_cli.data.registry import DATASETS, ENWIK8, PTB_CHARS, PTB_WORDS, TEXT8, load_corpus
from rhn_cli.data.store import fetch_dataset, verify_dataset
from rhn_cli.experiment.schema import ConfigError, defaults, validate
from tests.fakedata import (
    ENWIK8_BYTES,
    ENWIK8_IDS,
    PTB_CHAR_IDS,
    PTB_CHAR_VOCAB,
    PTB_WORD_FILES,
    PTB_WORD_IDS,
    PTB_WORD_VOCAB,
    FileServer,
    enwik8_zip,
    md5,
    simple_examples_tgz,
    tiny_specs,
    write_ptb_directory,
    zip_bytes,
)

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "valid", "test")


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


@pytest.fixture
def tiny(monkeypatch, server):
    """tiny_ptb, tiny_ptb_char and tiny_enwik8, served by the local server."""
    tgz, zipped = simple_examples_tgz(), enwik8_zip()
    server.files["/simple-examples.tgz"] = tgz
    server.files["/enwik8.zip"] = zipped
    specs = tiny_specs(
        tgz, (server.url("/simple-examples.tgz"),), zipped, (server.url("/enwik8.zip"),)
    )
    for name, spec in specs.items():
        monkeypatch.setitem(DATASETS, name, spec)
    return specs


def quiet(message: str) -> None:
    pass


def leftovers(root: Path = Path("data")) -> list[str]:
    """Every file in the cache except the (persistent, empty) lock files."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".locks" not in p.parts)


def splits_of(name: str, echo=quiet) -> dict[str, list[int]]:
    corpus = load_corpus({"dataset": name}, echo=echo)
    return {split: corpus.split(split).tolist() for split in SPLITS}


def register(monkeypatch, spec):
    monkeypatch.setitem(DATASETS, spec.name, spec)
    return spec


# --- downloads -------------------------------------------------------------------------


def test_good_download_prepares_exactly_the_hand_computed_ids(tiny, server):
    outcome = fetch_dataset("tiny_ptb", echo=quiet)
    assert outcome.prepared and server.requests == ["/simple-examples.tgz"]
    corpus = load_corpus({"dataset": "tiny_ptb"}, echo=quiet)
    assert corpus.vocab == PTB_WORD_VOCAB and corpus.level == "word"
    for split in SPLITS:
        assert corpus.split(split).tolist() == PTB_WORD_IDS[split]
        # Memory-mapped ids in the smallest type that holds them (uint16 for real PTB).
        assert isinstance(corpus.split(split), np.memmap)
        assert corpus.split(split).dtype == np.uint8
    meta = json.loads(Path("data/tiny_ptb/meta.json").read_text())
    assert meta["source"]["archive"]["md5"] == md5(server.files["/simple-examples.tgz"])
    assert meta["source"]["archive"]["matches_published"] is True
    assert meta["splits"]["train"] | {"sha256": None} == meta["splits"]["train"] | {
        "sha256": None,
        "tokens": 12,
        "lines": 3,
        "unk": 1,
        "types": 8,
    }
    assert meta["preprocessing_version"] == cache.PREPROCESSING_VERSION
    assert meta["convention"].startswith("ptb-words")
    assert leftovers() == sorted(
        [
            "tiny_ptb",
            *(f"tiny_ptb/{f}" for f in ("meta.json", "vocab.json")),
            *(f"tiny_ptb/{s}.npy" for s in SPLITS),
        ]
    )


def test_zip_download_of_bytes_matches_np_unique_over_the_whole_file(tiny):
    fetch_dataset("tiny_enwik8", echo=quiet)
    got = splits_of("tiny_enwik8")
    assert got == ENWIK8_IDS
    # The RHN reference: np.unique over the whole file, then the 90/5/5-style split.
    _, inverse = np.unique(np.frombuffer(ENWIK8_BYTES, np.uint8), return_inverse=True)
    assert got["train"] + got["valid"] + got["test"] == inverse.tolist()
    meta = json.loads(Path("data/tiny_enwik8/meta.json").read_text())
    assert meta["splits"]["train"]["dtype"] == "uint8" and meta["vocab"]["size"] == 6


def test_download_progress_bar_reaches_the_full_size(tiny, server):
    terminal = io.StringIO()
    fetch_dataset("tiny_enwik8", echo=quiet, progress=terminal)
    size = len(server.files["/enwik8.zip"])
    assert "enwik8.zip: 100%" in terminal.getvalue() and f"{size}/{size}" in terminal.getvalue()


def test_corrupted_download_names_both_hashes_and_leaves_nothing(tiny, server):
    published = md5(server.files["/simple-examples.tgz"])
    server.files["/simple-examples.tgz"] = simple_examples_tgz(extra={"x/y": b"tampered"})
    actual = md5(server.files["/simple-examples.tgz"])
    with pytest.raises(DatasetError) as failure:
        fetch_dataset("tiny_ptb", echo=quiet)
    message = str(failure.value)
    assert "\n" not in message
    assert f"expected {published}, got {actual}" in message
    assert "rhn data fetch tiny_ptb --from" in message
    assert leftovers() == []


def test_connection_dropped_mid_file_fails_cleanly(tiny, server):
    server.drop.add("/simple-examples.tgz")
    with pytest.raises(DatasetError, match="connection dropped before the download finished"):
        fetch_dataset("tiny_ptb", echo=quiet)
    assert leftovers() == []


def test_unreachable_mirror_is_skipped_for_the_next_one(tiny, monkeypatch, server):
    dead = "http://127.0.0.1:9/simple-examples.tgz"  # discard port: nothing listens
    spec = tiny["tiny_ptb"]
    archive = replace(spec.archive, urls=(dead, server.url("/simple-examples.tgz")))
    register(monkeypatch, replace(spec, archive=archive))
    messages = []
    fetch_dataset("tiny_ptb", echo=messages.append)
    assert any(dead in m for m in messages)
    assert splits_of("tiny_ptb") == PTB_WORD_IDS


def test_no_network_on_first_use_says_how_to_fetch_offline(tiny, monkeypatch):
    spec = tiny["tiny_ptb"]
    dead = replace(spec.archive, urls=("http://127.0.0.1:9/simple-examples.tgz",))
    register(monkeypatch, replace(spec, archive=dead))
    with pytest.raises(DatasetError) as failure:
        load_corpus({"dataset": "tiny_ptb"}, echo=quiet)
    message = str(failure.value)
    assert "\n" not in message and "could not be downloaded" in message
    assert "rhn data fetch tiny_ptb --from PATH" in message
    assert leftovers() == []


# --- safe extraction ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tgz", "zip"])
@pytest.mark.parametrize("evil", ["../../escaped.txt", "/tmp/rhn-absolute-escape.txt"])
def test_archive_with_a_path_traversal_member_is_rejected(tmp_path, monkeypatch, kind, evil):
    payload = b"should never be written"
    if kind == "tgz":
        data = simple_examples_tgz(extra={evil: payload})
        spec = tiny_specs(data)["tiny_ptb"]
        archive = tmp_path / "simple-examples.tgz"
    else:
        members = {"enwik8": ENWIK8_BYTES, evil: payload}
        data = zip_bytes(members)
        spec = tiny_specs(simple_examples_tgz(), zip_data=data)["tiny_enwik8"]
        archive = tmp_path / "enwik8.zip"
    archive.write_bytes(data)
    register(monkeypatch, spec)
    with pytest.raises(DatasetError, match="points outside the archive"):
        fetch_dataset(spec.name, str(archive), echo=quiet)
    assert leftovers() == []
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not (tmp_path.parent.parent / "escaped.txt").exists()
    assert not Path("/tmp/rhn-absolute-escape.txt").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert written == [archive]  # nothing but the archive itself


def test_a_symlink_where_a_data_file_should_be_is_refused(tmp_path, monkeypatch):
    data = simple_examples_tgz(symlink="ptb.valid.txt")
    archive = tmp_path / "simple-examples.tgz"
    archive.write_bytes(data)
    register(monkeypatch, tiny_specs(data)["tiny_ptb"])
    with pytest.raises(DatasetError, match="not a regular file"):
        fetch_dataset("tiny_ptb", str(archive), echo=quiet)
    assert leftovers() == []


# --- --from ------------------------------------------------------------------------------


def test_from_a_local_archive_with_the_published_checksum(tmp_path, monkeypatch):
    data = simple_examples_tgz()
    archive = tmp_path / "downloads" / "simple-examples.tgz"
    archive.parent.mkdir()
    archive.write_bytes(data)
    specs = tiny_specs(data, ("http://127.0.0.1:9/unused",))
    register(monkeypatch, specs["tiny_ptb"])
    register(monkeypatch, specs["tiny_ptb_char"])
    fetch_dataset("tiny_ptb", str(archive), echo=quiet)
    fetch_dataset("tiny_ptb_char", str(archive), echo=quiet)
    assert splits_of("tiny_ptb") == PTB_WORD_IDS
    assert splits_of("tiny_ptb_char") == PTB_CHAR_IDS
    assert load_corpus({"dataset": "tiny_ptb_char"}, echo=quiet).vocab == list(PTB_CHAR_VOCAB)


def test_from_a_repackaged_archive_verifies_each_member(tmp_path, monkeypatch):
    """Another layout and checksum (like d2l's ptb.zip): the members must be the published
    files, found by name."""
    register(monkeypatch, tiny_specs(simple_examples_tgz())["tiny_ptb"])
    good = {f"ptb/{name}": text.encode() for name, text in PTB_WORD_FILES.items()}
    (tmp_path / "ptb.zip").write_bytes(zip_bytes(good))
    fetch_dataset("tiny_ptb", str(tmp_path / "ptb.zip"), echo=quiet)
    assert splits_of("tiny_ptb") == PTB_WORD_IDS
    meta = json.loads(Path("data/tiny_ptb/meta.json").read_text())
    assert meta["source"]["archive"]["matches_published"] is False

    bad = good | {"ptb/ptb.test.txt": b" a dog ran \n the <unk> \n"}  # same size
    (tmp_path / "bad.zip").write_bytes(zip_bytes(bad))
    with pytest.raises(DatasetError, match=r"bad.zip:ptb/ptb.test.txt is not the published"):
        fetch_dataset("tiny_ptb", str(tmp_path / "bad.zip"), force=True, echo=quiet)
    # A member of another size is refused before a byte of it is unpacked.
    longer = good | {"ptb/ptb.test.txt": b" a dog sat \n the <unk> cat \n"}
    (tmp_path / "longer.zip").write_bytes(zip_bytes(longer))
    with pytest.raises(DatasetError, match="has 28 bytes, the published ptb.test.txt has 24"):
        fetch_dataset("tiny_ptb", str(tmp_path / "longer.zip"), force=True, echo=quiet)
    # The failed rebuilds left the good cache alone.
    assert inspect_dataset(DATASETS["tiny_ptb"]).ready
    assert splits_of("tiny_ptb") == PTB_WORD_IDS


def test_from_a_directory_of_raw_files_verifies_them(tmp_path, monkeypatch):
    specs = tiny_specs(simple_examples_tgz())
    register(monkeypatch, specs["tiny_ptb"])
    register(monkeypatch, specs["tiny_ptb_char"])
    raw = write_ptb_directory(tmp_path / "ptb")
    fetch_dataset("tiny_ptb", str(raw), echo=quiet)
    fetch_dataset("tiny_ptb_char", str(raw), echo=quiet)
    assert splits_of("tiny_ptb") == PTB_WORD_IDS
    assert splits_of("tiny_ptb_char") == PTB_CHAR_IDS

    (raw / "ptb.valid.txt").write_text(" the cat sat \n")
    with pytest.raises(DatasetError) as failure:
        fetch_dataset("tiny_ptb", str(raw), force=True, echo=quiet)
    assert "ptb.valid.txt is not the published ptb.valid.txt: sha256 expected" in str(failure.value)

    # No published checksum for the char files: their statistics vouch for them.
    (raw / "ptb.char.test.txt").write_text("c a t \n ")
    with pytest.raises(DatasetError, match="the test split has 4 tokens, the published dataset 6"):
        fetch_dataset("tiny_ptb_char", str(raw), force=True, echo=quiet)


def test_from_a_missing_path_or_an_incomplete_directory(tmp_path, monkeypatch):
    register(monkeypatch, tiny_specs(simple_examples_tgz())["tiny_ptb"])
    with pytest.raises(DatasetError, match="no such file or directory"):
        fetch_dataset("tiny_ptb", str(tmp_path / "nowhere"), echo=quiet)
    raw = write_ptb_directory(tmp_path / "ptb", words=False)
    with pytest.raises(DatasetError, match="lacks ptb.train.txt, ptb.valid.txt, ptb.test.txt"):
        fetch_dataset("tiny_ptb", str(raw), echo=quiet)


def test_from_another_url_and_a_directory_url(tiny, server):
    server.files["/mirror/simple-examples.tgz"] = server.files["/simple-examples.tgz"]
    fetch_dataset("tiny_ptb", server.url("/mirror/simple-examples.tgz"), echo=quiet)
    assert splits_of("tiny_ptb") == PTB_WORD_IDS
    for name, text in PTB_WORD_FILES.items():
        server.files[f"/raw/{name}"] = text.encode()
    fetch_dataset("tiny_ptb", server.url("/raw/"), force=True, echo=quiet)
    assert server.requests[-3:] == [f"/raw/{name}" for name in PTB_WORD_FILES]
    assert splits_of("tiny_ptb") == PTB_WORD_IDS


# --- the cache ---------------------------------------------------------------------------


def test_truncated_or_outdated_cache_is_rebuilt_not_used(tiny, server):
    fetch_dataset("tiny_ptb", echo=quiet)
    spec = DATASETS["tiny_ptb"]
    train = Path("data/tiny_ptb/train.npy")
    train.write_bytes(train.read_bytes()[:-4])
    state = inspect_dataset(spec)
    assert state.status == "stale" and "truncated" in state.reason
    assert fetch_dataset("tiny_ptb", echo=quiet).prepared  # rebuilt without --force
    assert splits_of("tiny_ptb") == PTB_WORD_IDS

    meta_path = Path("data/tiny_ptb/meta.json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"preprocessing_version": 0}))
    assert "preprocessing version 0" in inspect_dataset(spec).reason
    messages: list[str] = []
    corpus = load_corpus({"dataset": "tiny_ptb"}, echo=messages.append)  # first use rebuilds
    assert any("stale" in m for m in messages)
    assert corpus.split("train").tolist() == PTB_WORD_IDS["train"]
    assert server.requests.count("/simple-examples.tgz") == 3


def test_a_stale_cache_is_rebuilt_from_its_local_source_without_the_network(tmp_path, monkeypatch):
    spec = tiny_specs(simple_examples_tgz(), ("http://127.0.0.1:9/simple-examples.tgz",))
    register(monkeypatch, spec["tiny_ptb"])
    fetch_dataset("tiny_ptb", str(write_ptb_directory(tmp_path / "raw")), echo=quiet)
    meta_path = Path("data/tiny_ptb/meta.json")
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"format": "old"}))
    messages: list[str] = []
    assert splits_of("tiny_ptb", messages.append) == PTB_WORD_IDS
    assert any(f"rebuilding it from {tmp_path / 'raw'}" in m for m in messages)


def test_a_cache_without_meta_json_is_not_trusted(tiny):
    fetch_dataset("tiny_ptb", echo=quiet)
    Path("data/tiny_ptb/meta.json").unlink()  # as after a crash before the commit
    assert inspect_dataset(DATASETS["tiny_ptb"]).status == "stale"
    assert fetch_dataset("tiny_ptb", echo=quiet).prepared


def test_a_complete_cache_is_used_without_fetching(tiny, server):
    fetch_dataset("tiny_ptb", echo=quiet)
    assert not fetch_dataset("tiny_ptb", echo=quiet).prepared
    open_dataset(DATASETS["tiny_ptb"], echo=quiet)
    assert server.requests == ["/simple-examples.tgz"]


def test_verify_recomputes_and_catches_a_flipped_byte(tiny):
    fetch_dataset("tiny_ptb", echo=quiet)
    (result,) = verify_dataset("tiny_ptb", echo=quiet)
    assert result.ok
    whats = " | ".join(check.what for check in result.checks)
    assert "train: 12 tokens, 8 types, 3 lines recomputed from the array" in whats
    assert "statistics as published: 12 / 4 / 7 tokens, vocabulary 8" in whats
    assert "source simple-examples.tgz: recorded md5" in whats
    train = Path("data/tiny_ptb/train.npy")
    data = bytearray(train.read_bytes())
    data[-1] ^= 1  # same size: only the checksums can tell
    train.write_bytes(bytes(data))
    (result,) = verify_dataset("tiny_ptb", echo=quiet)
    assert not result.ok
    assert [c.what for c in result.checks if not c.ok][0] == "train.npy: sha256 as recorded"


def test_rhn_data_dir_moves_the_cache(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("RHN_DATA_DIR", str(tmp_path / "elsewhere"))
    outcome = fetch_dataset("tiny_enwik8", echo=quiet)
    assert outcome.directory == tmp_path / "elsewhere" / "tiny_enwik8"
    assert (outcome.directory / "meta.json").is_file() and not Path("data").exists()


CONCURRENT_FETCH = """
import sys, time
from pathlib import Path
from tests import fakedata
from rhn_cli.data import prepare, store

archive, waiting = Path(sys.argv[1]), Path(sys.argv[2])
fakedata.register(fakedata.tiny_specs(archive.read_bytes()))
tokenize = prepare.TOKENIZERS["ptb_words"]

def tokenize_once_the_other_waits(*args):
    # Whoever holds the lock tokenises only once the other process is waiting for it,
    # so the two fetches certainly overlap (a broken lock would never wait: time out).
    deadline = time.monotonic() + 20
    while not waiting.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return tokenize(*args)

def echo(message):
    if "waiting for another process" in message:
        waiting.touch()
    print(message, flush=True)

prepare.TOKENIZERS["ptb_words"] = tokenize_once_the_other_waits
outcome = store.fetch_dataset("tiny_ptb", str(archive), echo=echo)
print("PREPARED" if outcome.prepared else "REUSED", flush=True)
"""


def test_two_concurrent_fetches_prepare_once_and_agree(tmp_path, monkeypatch):
    archive = tmp_path / "simple-examples.tgz"
    archive.write_bytes(simple_examples_tgz())
    env = os.environ | {"PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", CONCURRENT_FETCH, str(archive), str(tmp_path / "waiting")]
    workers = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=60) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    verdicts = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert verdicts == ["PREPARED", "REUSED"], outputs
    assert any("waiting for another process" in out for out, _ in outputs)
    assert sorted(p.name for p in Path("data/tiny_ptb").iterdir()) == [
        "meta.json",
        "test.npy",
        "train.npy",
        "valid.npy",
        "vocab.json",
    ]
    register(monkeypatch, tiny_specs(archive.read_bytes())["tiny_ptb"])
    (result,) = verify_dataset("tiny_ptb", echo=quiet)
    assert result.ok
    assert not Path("data/.staging").exists()


# --- tokenisation rules ------------------------------------------------------------------


def test_ptb_char_rejects_a_file_not_in_the_space_separated_format(tmp_path, monkeypatch):
    register(monkeypatch, tiny_specs(simple_examples_tgz())["tiny_ptb_char"])
    raw = write_ptb_directory(tmp_path / "ptb", words=False)
    (raw / "ptb.char.valid.txt").write_text("the\n")  # awd-lstm-style, no separators
    with pytest.raises(DatasetError, match="not in the ptb.char format"):
        fetch_dataset("tiny_ptb_char", str(raw), echo=quiet)


def test_the_real_registry_entries_carry_the_published_numbers():
    assert PTB_WORDS.archive.hash == "md5:30177ea32e27c525793142b6bf2c8e2d"
    assert dict(PTB_WORDS.expected.tokens) == {"train": 929_589, "valid": 73_760, "test": 82_430}
    assert PTB_WORDS.expected.vocab_size == 10_000
    assert dict(PTB_CHARS.expected.tokens) == {
        "train": 5_017_482,
        "valid": 393_042,
        "test": 442_423,
    }
    assert len(PTB_CHARS.expected.symbols) == 50
    # ptb.char files are the symbols joined by spaces plus one: bytes = 2 x symbols.
    for f in PTB_CHARS.files:
        split = f.name.split(".")[2]
        assert f.size == 2 * PTB_CHARS.expected.tokens[split]
    for spec, vocab in ((ENWIK8, 205), (TEXT8, 27)):
        assert spec.expected.vocab_size == vocab and spec.held_out == 5_000_000
        assert sum(spec.expected.tokens.values()) == spec.files[0].size == 100_000_000


# --- textfile ----------------------------------------------------------------------------


def test_textfile_char_level_single_file_splits_90_5_5(tmp_path):
    text = "abcab\n" * 6 + "éa\n" + "x"  # 40 characters: 36 / 2 / 2
    (tmp_path / "mine.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(
        {"dataset": "textfile", "data_path": str(tmp_path / "mine.txt"), "text_level": "char"},
        echo=quiet,
    )
    assert corpus.vocab == ["\n", "a", "b", "c", "x", "é"] and corpus.level == "char"
    ids = {c: i for i, c in enumerate(corpus.vocab)}
    expected = [ids[c] for c in text]
    assert corpus.train.tolist() == expected[:36]
    assert corpus.valid.tolist() == expected[36:38] and corpus.test.tolist() == expected[38:]
    assert corpus.train.dtype == np.uint8


def test_textfile_word_level_three_files_with_unknown_words(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("b a b\nc\n")
    (folder / "valid.txt").write_text("a z\n")
    (folder / "test.txt").write_text("b")  # no final newline: the line still ends
    config = {"dataset": "textfile", "data_path": str(folder), "text_level": "word"}
    corpus = load_corpus(config, echo=quiet)
    # Train counts: <eos> 2, b 2, a 1, c 1 -> by (-count, word); <unk> added for 'z'.
    assert corpus.vocab == ["<eos>", "b", "a", "c", "<unk>"] and corpus.level == "word"
    assert corpus.train.tolist() == [1, 2, 1, 0, 3, 0]
    assert corpus.valid.tolist() == [2, 4, 0]
    assert corpus.test.tolist() == [1, 0]
    pattern = {**config, "data_path": str(folder / "{split}.txt")}
    assert load_corpus(pattern, echo=quiet).vocab == corpus.vocab  # same files, same cache


def test_an_edited_textfile_gets_a_fresh_cache_entry(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("abcd" * 10)
    config = {"dataset": "textfile", "data_path": str(path), "text_level": "char"}
    assert load_corpus(config, echo=quiet).vocab == list("abcd")
    path.write_text("abce" * 10)
    assert load_corpus(config, echo=quiet).vocab == list("abce")
    assert len(list(Path("data/textfile").iterdir())) == 2


def test_verify_and_remove_prepared_textfiles(tmp_path):
    from rhn_cli.data.store import remove_dataset

    path = tmp_path / "mine.txt"
    path.write_text("a b c d\n" * 10)
    load_corpus({"dataset": "textfile", "data_path": str(path), "text_level": "word"}, quiet)
    (result,) = verify_dataset("textfile", echo=quiet)
    assert result.ok and result.name.startswith("textfile/word-")
    assert any("unchanged since preparation" in check.what for check in result.checks)
    assert remove_dataset("textfile", echo=quiet) > 0
    assert not Path("data/textfile").exists()


def test_a_too_short_or_non_utf8_textfile_is_a_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(DatasetError, match="too few for a 90/5/5 split"):
        load_corpus(
            {"dataset": "textfile", "data_path": "short.txt", "text_level": "char"}, echo=quiet
        )
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1") * 10)
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        load_corpus(
            {"dataset": "textfile", "data_path": "latin1.txt", "text_level": "char"}, echo=quiet
        )


# --- config validation -------------------------------------------------------------------


def test_dataset_names_come_from_the_registry(tiny):
    assert validate(defaults() | {"dataset": "tiny_ptb"})["dataset"] == "tiny_ptb"
    with pytest.raises(ConfigError, match="dataset='nope': expected one of 'ptb', 'ptb_char'"):
        validate(defaults() | {"dataset": "nope"})


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"dataset": "textfile"}, "dataset='textfile' needs data_path: a UTF-8 text file"),
        ({"dataset": "textfile", "data_path": "missing.txt"}, "data_path='missing.txt': no such"),
        ({"data_path": "x.txt"}, "data_path='x.txt': only used with dataset='textfile'"),
        ({"dataset": "textfile", "data_path": "d/{split}.txt"}, "d/train.txt, d/valid.txt"),
        ({"text_level": "byte"}, "text_level='byte': expected one of 'char', 'word'"),
    ],
)
def test_textfile_config_errors_are_one_line(updates, message):
    with pytest.raises(ConfigError) as failure:
        validate(defaults() | updates)
    assert message in str(failure.value) and "\n" not in str(failure.value)


def test_registry_and_schema_import_nothing_heavy():
    code = (
        "import sys; import rhn_cli.experiment.schema, rhn_cli.data.registry\n"
        "print(sorted(m for m in ('numpy', 'torch', 'pooch', 'requests') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
