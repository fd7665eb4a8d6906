"""Bad input stops before any run exists: exit code 2, one line naming the bad value and
what is allowed, and no run directory in --runs-dir.

Each case is a real command line (click's CliRunner, in process). The data-dependent
cases (a text file's content, vocab_size, splits too short for one minibatch), the
device, load_model and a run resumed or evaluated on data that has since gone bad are
caught by the pre-flight of ``rhn train`` / ``rhn evaluate``
(:mod:`rhn_cli.experiment.preflight`); malformed MongoDB URLs by the --mongo option;
unreadable named configs by their resolution.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from rhn_cli.cli import cli
from tests.conftest import FAST_RUN

TEXT = "".join(f"the {w} sat on the mat\n" for w in ("cat", "dog", "rat", "bat") * 15)
TINY_TEXT_RUN = ["depth=2", "hidden_size=16", "max_max_epoch=1", "batch_size=4", "num_steps=5"]
RUNS = "runs"


def _tar_of_text() -> bytes:
    """An uncompressed tar of a text file: valid UTF-8 byte for byte, NUL-padded."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = TEXT.encode()
        info = tarfile.TarInfo("notes.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def bad_files(tmp_path):
    """The files the cases name, in the working directory."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "random.bin").write_bytes(bytes(range(128, 256)) * 16)
    (tmp_path / "notes.tar").write_bytes(_tar_of_text())
    (tmp_path / "latin1.txt").write_bytes(("café crème brûlée\n" * 40).encode("latin-1"))
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text(TEXT)
    (splits / "valid.txt").write_text("")
    (splits / "test.txt").write_text(TEXT[:200])
    (tmp_path / "notes.txt").write_text(TEXT)
    (tmp_path / "latin1.yaml").write_bytes("# caf\xe9\ndepth: 3\n".encode("latin-1"))
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "mine.yaml").write_bytes("# d\xe9j\xe0 vu\ndepth: 4\n".encode("latin-1"))
    return tmp_path


def _run_dirs(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def assert_refused(result, value: str, runs: Path, before: list[str] | None = None) -> str:
    """Exit 2, a single 'Error:' line on stderr naming ``value``, no new run directory."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert value in lines[0], lines[0]
    assert _run_dirs(runs) == (before or []), "a run directory was created"
    return lines[0]


TEXTFILE = ["train", "--runs-dir", RUNS, "with", "dataset='textfile'"]
TRAIN = ["train", "--runs-dir", RUNS, "with"]

CASES = [
    # dataset='textfile' whose content cannot be trained on
    pytest.param([*TEXTFILE, "data_path='empty.txt'"], "data_path='empty.txt'", {}, id="empty"),
    pytest.param([*TEXTFILE, "data_path='random.bin'"], "is not UTF-8 text", {}, id="binary"),
    pytest.param([*TEXTFILE, "data_path='notes.tar'"], "a binary file", {}, id="nul-bytes"),
    pytest.param([*TEXTFILE, "data_path='latin1.txt'"], "data_path='latin1.txt'", {}, id="latin1"),
    pytest.param(
        [*TEXTFILE, "data_path='splits'", "text_level='word'"],
        "valid.txt has no tokens",
        {},
        id="empty-split-file",
    ),
    # values that do not fit the dataset
    pytest.param(
        [*TRAIN, "vocab_size=50"], "vocab_size=50: dataset 'synthetic' has 12", {}, id="vocab-size"
    ),
    pytest.param(
        [*TRAIN, "synthetic.train_tokens=10"], "synthetic.train_tokens=10", {}, id="train-tokens"
    ),
    pytest.param(
        [*TRAIN, "synthetic.valid_tokens=100"], "synthetic.valid_tokens=100", {}, id="valid-tokens"
    ),
    pytest.param(
        [*TRAIN, "batch_size=20", "num_steps=100", "synthetic.test_tokens=1000"],
        "synthetic.test_tokens=1000",
        {},
        id="test-tokens",
    ),
    pytest.param(
        [*TRAIN, "batching='sentences'"],
        "batching='sentences' needs sentence ends",
        {},
        id="no-sentence-ends",
    ),
    pytest.param(
        ["train", "--nproc", "2", "--runs-dir", RUNS, "with", "vocab_size=50"],
        "vocab_size=50",
        {},
        id="nproc-parent",
    ),
    # a seed numpy cannot take (Sacred seeds numpy's global generator with it)
    pytest.param([*TRAIN, "seed=-1"], "seed=-1", {}, id="negative-seed"),
    pytest.param(
        ["train", "--seed", "4294967296", "--runs-dir", RUNS], "seed=4294967296", {}, id="big-seed"
    ),
    # load_model
    pytest.param(
        [*TRAIN, "load_model='missing.pt'"],
        "load_model='missing.pt': no such file",
        {},
        id="load-model-missing",
    ),
    pytest.param(
        [*TRAIN, "load_model='notes.txt'"],
        "load_model='notes.txt'",
        {},
        id="load-model-not-a-checkpoint",
    ),
    # named configs that are not UTF-8
    pytest.param([*TRAIN, "latin1.yaml"], "latin1.yaml is not UTF-8 text", {}, id="yaml-latin1"),
    pytest.param(
        [*TRAIN, "mine"],
        "mine.yaml is not UTF-8 text",
        {"RHN_CONFIG_PATH": "configs"},
        id="yaml-in-config-path",
    ),
    pytest.param(
        ["print-config", "with", "latin1.yaml"], "latin1.yaml", {}, id="print-config-yaml-latin1"
    ),
    # MongoDB URLs that can never work
    pytest.param(
        ["train", "--mongo", "http://x", "--runs-dir", RUNS], "'http://x'", {}, id="mongo-http"
    ),
    pytest.param(
        ["train", "--mongo", "mongodb://", "--runs-dir", RUNS],
        "'mongodb://'",
        {},
        id="mongo-no-host",
    ),
    pytest.param(
        ["train", "--mongo", "mongodb://h:99999/rhn", "--runs-dir", RUNS],
        "port '99999'",
        {},
        id="mongo-port",
    ),
    pytest.param(
        ["train", "--mongo", "mongodb://u:hunter2@h:0/rhn", "--runs-dir", RUNS],
        "'mongodb://u:***@h:0/rhn'",
        {},
        id="mongo-port-0-redacted",
    ),
    pytest.param(
        ["train", "--mongo", "mongodb+srv://c.example.net:27017/x", "--runs-dir", RUNS],
        "takes no port",
        {},
        id="mongo-srv-port",
    ),
    pytest.param(
        ["train", "--runs-dir", RUNS],
        "RHN_MONGO_URL 'mongodb://a:1,:2/x'",
        {"RHN_MONGO_URL": "mongodb://a:1,:2/x"},
        id="mongo-env",
    ),
    pytest.param(
        ["evaluate", "1", "--mongo", "localhost:27017/rhn", "--runs-dir", RUNS],
        "'localhost:27017/rhn'",
        {},
        id="mongo-evaluate",
    ),
    # the run-directory listing and the named config listing
    pytest.param(
        ["configs"],
        "configs/mine.yaml is not UTF-8 text",
        {"RHN_CONFIG_PATH": "configs"},
        id="configs-latin1",
    ),
]


@pytest.mark.parametrize(("argv", "value", "env"), CASES)
def test_bad_input_stops_before_any_run(runner, bad_files, argv, value, env):
    result = runner.invoke(cli, argv, env=env)
    assert_refused(result, value, bad_files / RUNS)
    assert "hunter2" not in result.output  # a password is never printed


def test_a_malformed_url_in_the_settings_file(runner, bad_files):
    settings = bad_files / ".config" / "rhn" / "config.yaml"  # conftest's XDG_CONFIG_HOME
    settings.parent.mkdir(parents=True)
    settings.write_text("mongo_url: mongodb://lab:s3cret@db.lab:0/rhn\n")
    result = runner.invoke(cli, ["train", "--runs-dir", RUNS])
    line = assert_refused(
        result, f"mongo_url in {settings} 'mongodb://lab:***@db.lab:0/rhn'", bad_files / RUNS
    )
    assert "s3cret" not in result.output and "1..65535" in line


def test_a_malformed_yaml_in_the_config_path_is_not_listed_as_a_config(runner, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "broken.yaml").write_text("# half a list\ndepth: [1,\n")
    (configs / "fine.yaml").write_text("# one deeper\ndepth: 4\n")
    result = runner.invoke(cli, ["configs"], env={"RHN_CONFIG_PATH": str(configs)})
    line = assert_refused(result, f"{configs / 'broken.yaml'} is not valid YAML", tmp_path / RUNS)
    assert "RHN_CONFIG_PATH" in line
    listed = result.stdout.splitlines()
    assert any(row.startswith("fine ") and "one deeper" in row for row in listed)
    broken = next(row for row in listed if row.startswith("broken "))
    assert "half a list" not in broken and "unusable" in broken


@pytest.mark.parametrize(
    ("device", "cuda_devices", "value"),
    [
        ("cuda", 0, "device='cuda': no CUDA device is available here"),
        ("cuda:1", 0, "device='cuda:1': no CUDA device"),
        ("cuda:1", 1, "device='cuda:1': this machine has 1 CUDA device; expected cuda:0"),
        ("mps", 0, "device='mps'"),
    ],
)
def test_a_device_this_machine_lacks(runner, tmp_path, monkeypatch, device, cuda_devices, value):
    import torch

    # The machine's devices as torch reports them: none, or one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = runner.invoke(cli, ["train", "--runs-dir", RUNS, "with", f"device='{device}'"])
    assert_refused(result, value, tmp_path / RUNS)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("store") / RUNS
    for _ in range(2):
        # Module-scoped, so made before conftest isolates a test: keep the user's
        # MongoDB and named configs out by hand.
        result = CliRunner().invoke(
            cli,
            ["train", "--mongo", "none", "--runs-dir", str(runs), "with", *FAST_RUN],
            env={"RHN_CONFIG_PATH": None, "RHN_MONGO_URL": None},
        )
        assert result.exit_code == 0, result.output
    return runs


def test_a_reversed_run_range_is_an_error(runner, two_runs):
    before = _run_dirs(two_runs)
    result = runner.invoke(cli, ["runs", "compare", "2-1", "--runs-dir", str(two_runs)])
    line = assert_refused(result, "run range '2-1'", two_runs, before)
    assert "1-2" in line  # the range the user probably meant
    assert (
        runner.invoke(cli, ["runs", "compare", "1-2", "--runs-dir", str(two_runs)]).exit_code == 0
    )


def test_resume_and_evaluate_check_the_recorded_config_against_the_data_now(runner, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text(TEXT)
    argv = [*TEXTFILE, f"data_path='{text}'", *TINY_TEXT_RUN, "max_time=0.001"]
    stopped = runner.invoke(cli, argv)
    assert stopped.exit_code == 0 and "TIMEOUT" in stopped.output, stopped.output
    run_json = tmp_path / RUNS / "1" / "run.json"
    record = run_json.read_text()
    text.write_bytes(TEXT.replace("cat", "chât").encode("latin-1"))  # edited in another encoding

    resumed = runner.invoke(cli, ["train", "--resume", "1", "--runs-dir", RUNS])
    assert_refused(resumed, f"data_path='{text}'", tmp_path / RUNS, ["1", "_sources"])
    evaluated = runner.invoke(cli, ["evaluate", f"{RUNS}/1/checkpoint.pt", "--runs-dir", RUNS])
    assert_refused(evaluated, "is not UTF-8 text", tmp_path / RUNS, ["1", "_sources"])
    assert run_json.read_text() == record  # the stopped run is as it was: still resumable
    assert json.loads(record)["status"] == "TIMEOUT"


def test_data_that_cannot_be_obtained_exits_1_before_any_run(runner, tmp_path, monkeypatch):
    """Not the config's fault (the server is down), so not exit 2; still no run."""
    from rhn_cli.data.registry import DATASETS
    from tests.fakedata import simple_examples_tgz, tiny_specs

    closed_port = "http://127.0.0.1:9/simple-examples.tgz"  # discard: nothing listens
    spec = tiny_specs(simple_examples_tgz(), (closed_port,))["tiny_ptb"]
    monkeypatch.setitem(DATASETS, "tiny_ptb", spec)
    result = runner.invoke(cli, [*TRAIN, "dataset='tiny_ptb'", "batch_size=1", "num_steps=2"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: dataset='tiny_ptb' cannot be loaded")
    assert _run_dirs(tmp_path / RUNS) == []
