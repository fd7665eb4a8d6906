"""Shared fixtures: every test runs in its own directory, with no user config leaking in."""

from __future__ import annotations

import json
import signal
import sys

import pytest
from click.testing import CliRunner

# A run that takes about a second: used wherever a test needs a real training run.
FAST_RUN = [
    "depth=2",
    "hidden_size=16",
    "max_max_epoch=2",
    "max_epoch=1",
    "synthetic.train_tokens=20000",
    "synthetic.valid_tokens=4000",
    "synthetic.test_tokens=4000",
]


class Recorder:
    """The engine's Reporter, keeping what it is told: for tests without Sacred."""

    def __init__(self):
        self.scalars, self.info = {}, {}

    def log_scalar(self, name, value, step):
        self.scalars.setdefault(name, []).append((step, value))

    def set_info(self, key, value):
        self.info[key] = value


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("RHN_CONFIG_PATH", "RHN_RUNS_DIR", "RHN_MONGO_URL", "RHN_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    # The user's settings file (~/.config/rhn/config.yaml: mongo_url) must not leak in.
    monkeypatch.delenv("RHN_CONFIG_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    return tmp_path


# The switches between a model's fast path and its reference loop (each True by default):
# resuming or evaluating a run pins them as the run recorded, in the process that does it,
# which for a CliRunner test is pytest's own.
COMPUTE_PATH_SWITCHES = (
    ("rhn_cli.models.lstm", "USE_FUSED"),
    ("rhn_cli.models.charrnn_lstm", "USE_FUSED"),
    ("rhn_cli.models.grid_lstm", "USE_FUSED"),
    ("rhn_cli.models.grid_lstm", "USE_FUSED_DEPTH"),
    ("rhn_cli.kernels.lstm_recurrence", "USE_RECURRENCE"),
    ("rhn_cli.kernels.lstm_recurrence", "ONEDNN_PRODUCTS"),
    ("rhn_cli.kernels.gru_recurrence", "USE_RECURRENCE"),
    ("rhn_cli.kernels.rhn_recurrence", "LARGE_ON_ONEDNN"),
    ("rhn_cli.kernels.onednn", "DENSE_PRODUCTS"),
)


# Pinned values that are not switches: (module, name, the name of its default).
COMPUTE_PATH_VALUES = (("rhn_cli.kernels.rhn_recurrence", "CHUNK_BYTES", "CHUNK_BYTES_NOW"),)


@pytest.fixture(autouse=True)
def default_compute_paths():
    """Every test starts on the default paths, whatever a test before it pinned."""
    yield
    for module_name, switch in COMPUTE_PATH_SWITCHES:
        module = sys.modules.get(module_name)  # never imported here: nothing to restore
        if module is not None:
            setattr(module, switch, True)
    for module_name, name, default in COMPUTE_PATH_VALUES:
        module = sys.modules.get(module_name)
        if module is not None:
            setattr(module, name, getattr(module, default))


@pytest.fixture
def pin_as_recorded(tmp_path):
    """pin(kernels): pins this process's compute paths as a run directory whose info.json
    holds the kernel facts ``kernels`` makes a resumed run pin them (None: a run recorded
    before rhn kept any)."""
    from rhn_cli.experiment import recording

    def pin(kernels):
        info = {"kernels": kernels} if kernels is not None else {"checkpoint": "x"}
        (tmp_path / "info.json").write_text(json.dumps(info))
        recording.pin_recorded_decisions(tmp_path)

    return pin


@pytest.fixture
def runner():
    return CliRunner()


def pytest_configure(config):
    # A shell without job control starts background commands with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler; the tests that send Ctrl-C to
    # rhn (and the processes they start, which inherit it) need the usual one.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers",
        "omniboard: end-to-end tests that start Omniboard (Node.js) on a local MongoDB server; "
        "deselect with -m 'not omniboard'",
    )
    config.addinivalue_line("markers", "slurm: tests on a real one-node Slurm cluster")
    config.addinivalue_line(
        "markers",
        "cuda: tests on a CUDA device, skipped without one (RHN_TEST_CUDA_ON=cpu runs them "
        "on the CPU); select with -m cuda",
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm cluster on 127.0.0.1 (tests/slurm_cluster.py), with SLURM_CONF
    set while it runs. Skips where Slurm cannot be installed (not Linux, not root, no apt-get);
    fails, with the daemon logs, where it is installed but does not start."""
    import os

    from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

    try:
        ensure_installed()
    except SlurmUnavailable as error:
        pytest.skip(f"no Slurm cluster: {error}")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
