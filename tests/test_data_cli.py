"""``rhn data`` as a user drives it: exit codes, one-line errors, tables, confirmation;
``rhn train`` on the user's own text file, and on caches changed since they were made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.data.registry import DATASETS
from tests.fakedata import (
    FileServer,
    enwik8_zip,
    simple_examples_tgz,
    tiny_specs,
    write_ptb_directory,
)


@pytest.fixture
def tiny_ptb(monkeypatch, tmp_path):
    """tiny_ptb and tiny_ptb_char registered; returns a directory holding their raw files."""
    for name, spec in tiny_specs(simple_examples_tgz()).items():
        monkeypatch.setitem(DATASETS, name, spec)
    return write_ptb_directory(tmp_path / "raw")


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_data_help_lists_the_commands_and_imports_nothing_heavy():
    code = (
        "import sys; from rhn_cli.cli import cli\n"
        "try:\n    cli(['data', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'sacred', 'numpy', 'pooch', 'requests')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    for command in ("fetch", "ls", "verify", "path", "rm"):
        assert f"  {command} " in out.stdout


def test_fetch_from_a_directory_then_ls_verify_path(runner, tiny_ptb):
    result = runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb)])
    assert result.exit_code == 0, result.output
    assert "tiny_ptb: ready in data/tiny_ptb: 12/4/7 tokens, vocabulary 8" in result.output

    again = runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb)])
    assert again.exit_code == 0 and "already prepared" in again.output
    forced = runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb), "--force"])
    assert forced.exit_code == 0 and "ready in" in forced.output

    listing = runner.invoke(cli, ["data", "ls"])
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    header = next(line for line in lines if line.startswith("DATASET"))
    row = next(line for line in lines if line.startswith("tiny_ptb "))
    assert row.split() == ["tiny_ptb", "word", "ready", *row.split()[3:5], "12", "4", "7", "8"]
    # Every dataset is listed, fetched or not, the missing ones with published statistics.
    ptb = next(line for line in lines if line.startswith("ptb "))
    assert "missing" in ptb and "(929,589)" in ptb and "(10,000)" in ptb
    for name in ("ptb_char", "enwik8", "text8", "textfile", "synthetic", "tiny_ptb_char"):
        assert any(line.startswith(name + " ") for line in lines), name
    # The columns line up: each header starts where its column does.
    assert header.index("STATUS") == row.index("ready")

    verify = runner.invoke(cli, ["data", "verify", "tiny_ptb"])
    assert verify.exit_code == 0, verify.output
    assert "ok    train: 12 tokens, 8 types, 3 lines recomputed from the array" in verify.output
    assert verify.output.rstrip().endswith("verified (13 checks passed)")

    path = runner.invoke(cli, ["data", "path", "tiny_ptb"])
    assert path.exit_code == 0 and path.output.strip() == str(Path("data/tiny_ptb").absolute())


def test_verify_fails_with_exit_1_on_a_damaged_cache(runner, tiny_ptb):
    assert runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb)]).exit_code == 0
    vocab = Path("data/tiny_ptb/vocab.json")
    vocab.write_text(vocab.read_text().replace("sat", "sit"))
    result = runner.invoke(cli, ["data", "verify", "tiny_ptb"])
    assert result.exit_code == 1
    assert "FAIL  vocab.json: sha256 as recorded" in result.output
    assert one_line_error(result) == "Error: tiny_ptb: 1 of 13 checks failed"


def test_verify_of_a_dataset_not_fetched(runner, tiny_ptb):
    result = runner.invoke(cli, ["data", "verify", "tiny_ptb"])
    assert result.exit_code == 1
    assert "not in the cache" in result.output and "rhn data fetch tiny_ptb" in result.output


def test_errors_are_one_line_with_the_right_exit_code(runner, tiny_ptb, tmp_path):
    unknown = runner.invoke(cli, ["data", "fetch", "ptx"])
    assert unknown.exit_code == 2
    assert "unknown dataset 'ptx'; did you mean 'ptb'?" in one_line_error(unknown)

    builtin = runner.invoke(cli, ["data", "fetch", "synthetic"])
    assert builtin.exit_code == 1 and "generated in memory" in one_line_error(builtin)

    textfile = runner.invoke(cli, ["data", "fetch", "textfile"])
    assert textfile.exit_code == 1 and "data_path" in one_line_error(textfile)

    (tiny_ptb / "ptb.test.txt").write_text(" a cat \n")
    tampered = runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb)])
    assert tampered.exit_code == 1
    assert "sha256 expected" in one_line_error(tampered)
    assert not Path("data/tiny_ptb").exists()


def test_corrupted_download_through_the_cli(runner, monkeypatch):
    with FileServer() as server:
        published = simple_examples_tgz()
        server.files["/simple-examples.tgz"] = published[:-10] + b"0123456789"
        specs = tiny_specs(published, (server.url("/simple-examples.tgz"),))
        monkeypatch.setitem(DATASETS, "tiny_ptb", specs["tiny_ptb"])
        result = runner.invoke(cli, ["data", "fetch", "tiny_ptb"])
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "md5 checksum mismatch for simple-examples.tgz: expected" in line
    assert "the download was deleted" in line
    assert not Path("data/tiny_ptb").exists() and not Path("data/.staging").exists()


def test_rm_asks_first_unless_yes(runner, tiny_ptb):
    assert runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb)]).exit_code == 0
    declined = runner.invoke(cli, ["data", "rm", "tiny_ptb"], input="n\n")
    assert declined.exit_code == 1 and "Remove " in declined.output
    assert Path("data/tiny_ptb/meta.json").exists()

    accepted = runner.invoke(cli, ["data", "rm", "tiny_ptb"], input="y\n")
    assert accepted.exit_code == 0 and "removed" in accepted.output
    assert not Path("data/tiny_ptb").exists()

    assert runner.invoke(cli, ["data", "fetch", "tiny_ptb", "--from", str(tiny_ptb)]).exit_code == 0
    forced = runner.invoke(cli, ["data", "rm", "tiny_ptb", "--yes"])
    assert forced.exit_code == 0 and not Path("data/tiny_ptb").exists()

    nothing = runner.invoke(cli, ["data", "rm", "tiny_ptb"])
    assert nothing.exit_code == 0 and "nothing to remove" in nothing.output


@pytest.mark.slow
def test_train_on_a_text_file_end_to_end(runner, tmp_path):
    text = "".join(f"the {w} sat on the mat\n" for w in ("cat", "dog", "rat", "bat") * 15)
    (tmp_path / "mine.txt").write_text(text)
    tiny_model = ["depth=2", "hidden_size=16", "max_max_epoch=1", "batch_size=4", "num_steps=5"]
    result = runner.invoke(
        cli, ["train", "with", "dataset='textfile'", "data_path='mine.txt'", *tiny_model]
    )
    assert result.exit_code == 0, result.output
    assert "COMPLETED" in result.output
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert info["dataset"]["convention"].startswith("text-chars")
    # 60 lines of 23 characters: 1,380 characters, 5% (69) each for valid and test.
    assert info["dataset"]["tokens"] == {"train": 1242, "valid": 69, "test": 69}
    # Prepared once, into the cache; the listing counts it.
    listing = runner.invoke(cli, ["data", "ls"])
    assert next(line for line in listing.output.splitlines() if line.startswith("textfile"))
    assert "1 prepared" in listing.output


def test_the_run_trains_on_the_text_rhn_checked_and_loaded(runner, tmp_path, monkeypatch):
    """The config is validated once, before the run exists: a text file moved away after
    rhn checked and loaded it is not looked for again inside the run (where it would
    fail a recorded run)."""
    import rhn_cli.data.registry as registry

    text = tmp_path / "mine.txt"
    text.write_text("".join(f"the {w} sat on the mat\n" for w in ("cat", "dog", "rat") * 20))
    load_corpus = registry.load_corpus

    def load_then_move_the_file(config, **kwargs):
        corpus = load_corpus(config, **kwargs)
        text.rename(tmp_path / "moved.txt")
        return corpus

    monkeypatch.setattr(registry, "load_corpus", load_then_move_the_file)
    tiny_model = ["depth=2", "hidden_size=16", "max_max_epoch=1", "batch_size=4", "num_steps=5"]
    result = runner.invoke(
        cli, ["train", "with", "dataset='textfile'", "data_path='mine.txt'", *tiny_model]
    )
    assert result.exit_code == 0, result.output
    assert not text.exists() and "COMPLETED" in result.output


def test_train_with_a_missing_text_file_fails_before_any_run(runner, tmp_path):
    result = runner.invoke(cli, ["train", "with", "dataset='textfile'", "data_path='no.txt'"])
    assert result.exit_code == 2
    assert one_line_error(result) == "Error: data_path='no.txt': no such file or directory"
    assert not (tmp_path / "runs").exists()


# --- a cache changed since it was prepared is never trained on ---------------------------

TINY_ENWIK8_RUN = [
    "dataset='tiny_enwik8'",
    "depth=1",
    "hidden_size=8",
    "max_max_epoch=1",
    "batch_size=2",
    "num_steps=5",
]


def corrupt_the_middle(path: Path) -> None:
    """Eight bytes in the middle of the array changed, the size kept (a bad disk, a stray
    write): only the recorded sha256 can tell."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # past the 128-byte .npy header
    data[middle : middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


@pytest.fixture
def tiny_enwik8(monkeypatch, tmp_path):
    """tiny_enwik8 registered (no URL to fetch from); returns its archive on disk."""
    zipped = enwik8_zip()
    monkeypatch.setitem(DATASETS, "tiny_enwik8", tiny_specs(b"", zip_data=zipped)["tiny_enwik8"])
    archive = tmp_path / "enwik8.zip"
    archive.write_bytes(zipped)
    return archive


def test_a_corrupted_cache_is_rebuilt_from_its_source_or_refused(runner, tiny_enwik8, tmp_path):
    fetched = runner.invoke(cli, ["data", "fetch", "tiny_enwik8", "--from", str(tiny_enwik8)])
    assert fetched.exit_code == 0, fetched.output
    train_npy = Path("data/tiny_enwik8/train.npy")
    prepared = train_npy.read_bytes()
    corrupt_the_middle(train_npy)
    assert runner.invoke(cli, ["data", "verify", "tiny_enwik8"]).exit_code == 1

    # The archive it was prepared from is still there: training rebuilds from it.
    rebuilt = runner.invoke(cli, ["train", "with", *TINY_ENWIK8_RUN])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert f"{train_npy} does not match the sha256 recorded in its meta.json" in rebuilt.output
    assert f"rebuilding it from {tiny_enwik8}" in rebuilt.output
    assert train_npy.read_bytes() == prepared

    # Without it, training stops before any run, naming the file and the remedy.
    tiny_enwik8.unlink()
    corrupt_the_middle(train_npy)
    refused = runner.invoke(cli, ["train", "--runs-dir", "other", "with", *TINY_ENWIK8_RUN])
    assert refused.exit_code == 2
    assert one_line_error(refused) == (
        f"Error: dataset='tiny_enwik8': {train_npy} does not match the sha256 recorded in its "
        "meta.json (it changed since it was prepared); 'rhn data fetch tiny_enwik8' rebuilds it"
    )
    assert not (tmp_path / "other").exists()

    # That command rebuilds it (from the archive given again), without --force.
    tiny_enwik8.write_bytes(enwik8_zip())
    again = runner.invoke(cli, ["data", "fetch", "tiny_enwik8", "--from", str(tiny_enwik8)])
    assert again.exit_code == 0 and "is corrupted" in again.output, again.output
    assert train_npy.read_bytes() == prepared


def test_train_rebuilds_a_corrupted_textfile_cache_from_the_text(runner, tmp_path):
    (tmp_path / "mine.txt").write_text("".join(f"the {w} sat\n" for w in ("cat", "dog") * 40))
    argv = ["train", "with", "dataset='textfile'", "data_path='mine.txt'"]
    tiny_model = ["depth=1", "hidden_size=8", "max_max_epoch=1", "batch_size=4", "num_steps=5"]
    assert runner.invoke(cli, [*argv, *tiny_model]).exit_code == 0
    (entry,) = Path("data/textfile").iterdir()
    prepared = (entry / "train.npy").read_bytes()
    corrupt_the_middle(entry / "train.npy")

    result = runner.invoke(cli, [*argv, *tiny_model])
    assert result.exit_code == 0, result.output
    assert f"textfile: the cache in {entry} is corrupted" in result.output
    assert (entry / "train.npy").read_bytes() == prepared
    assert json.loads(Path("runs/2/run.json").read_text())["status"] == "COMPLETED"
