"""Checks of a config against this machine and the data, before any run exists.

Config validation (:mod:`rhn_cli.experiment.schema`) judges each value on its own. What
it cannot see needs the machine or the corpus: whether ``device`` exists here, whether
``load_model`` is a readable checkpoint, whether the dataset can be loaded (a text file
that is empty or not UTF-8, a cache changed since it was prepared), whether
``vocab_size`` is the dataset's, and whether every split fills one minibatch. Each
failure is a :class:`ConfigError` naming the value, so the command stops with one line
and exit 2 and no run is recorded. The corpus loaded for the checks is returned, for the
run to train on (it is not loaded twice). A training run on the CPU then has its native
kernels loaded here, built first where this machine has none (:func:`load_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rhn_cli.data.errors import DataInputError
from rhn_cli.data.spec import SPLITS
from rhn_cli.experiment.schema import ConfigError

if TYPE_CHECKING:
    from rhn_cli.data.corpus import Corpus

Echo = Callable[[str], None]
CHECKPOINT_FORMS = "a checkpoint written by rhn (a run's best_model.pt or checkpoint.pt)"


def preflight_training(
    config: Mapping[str, Any],
    *,
    resuming: bool = False,
    echo: Echo = print,
    progress: TextIO | None = None,
) -> Corpus:
    """Check ``config`` for a training run (``resuming``: a resumed one, which does not
    read ``load_model``) and return its corpus. Raises ConfigError; a DatasetError or
    OSError from loading the data is not the config's fault and propagates."""
    check_device(config["device"])
    if config["load_model"] and not resuming:
        check_load_model(config["load_model"])
    corpus = load_data(config, echo, progress)
    check_corpus(config, corpus)
    load_kernels(config["device"])
    return corpus


def preflight_evaluation(
    config: Mapping[str, Any], *, echo: Echo = print, progress: TextIO | None = None
) -> Corpus:
    """Check the device and the data of an evaluation (its checkpoint is already read);
    returns the corpus to evaluate on."""
    check_device(config["device"])
    return load_data(config, echo, progress)


def load_kernels(device: str) -> None:
    """On the CPU, the native kernels loaded before the run exists, and built first where
    this machine has no build of them (announced; about a minute): so a build is never
    timed as part of an epoch, and the run computes as it would with a build made
    earlier. Where they cannot be built, the run takes the Python loop (one warning)."""
    from rhn_cli.kernels import native

    if native.USE_NATIVE and native.enabled() and _computes_on_cpu(device):
        native.prepare("before the run's clock starts")


def _computes_on_cpu(device: str) -> bool:
    """Whether config ``device`` (already checked) is this machine's CPU."""
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def check_device(device: str) -> None:
    """``device`` must exist on this machine ('cuda:1' needs two CUDA devices)."""
    if device in ("auto", "cpu"):
        return  # torch need not be imported for these
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                "device='mps': no MPS (Apple GPU) device is available here; "
                "expected 'auto' or 'cpu'"
            )
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            f"device={device!r}: no CUDA device is available here; expected 'auto' or 'cpu'"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        devices = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ConfigError(
            f"device={device!r}: this machine has {count} CUDA device{'s' * (count > 1)}; "
            f"expected {devices}, 'cuda', 'auto' or 'cpu'"
        )


def check_load_model(path: str) -> None:
    """``load_model`` must be a complete, intact rhn checkpoint holding model weights."""
    from rhn_cli.engine.checkpoint import CheckpointError, load

    if not Path(path).is_file():  # read as the engine reads it: no '~' expansion
        raise ConfigError(f"load_model={path!r}: no such file; expected {CHECKPOINT_FORMS}")
    try:
        state = load(Path(path))
    except CheckpointError as error:
        raise ConfigError(f"load_model={path!r}: {error}; expected {CHECKPOINT_FORMS}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(
            f"load_model={path!r}: the checkpoint holds no model weights; "
            f"expected {CHECKPOINT_FORMS}"
        )


def load_data(config: Mapping[str, Any], echo: Echo, progress: TextIO | None) -> Corpus:
    """The corpus ``config`` names, fetched and prepared on first use; data the user
    must fix (DataInputError) becomes a ConfigError naming the config value."""
    from rhn_cli.data.registry import load_corpus  # looked up now: tests replace it

    try:
        return load_corpus(config, echo=echo, progress=progress)
    except DataInputError as error:
        raise ConfigError(f"{data_value(config)}: {error}") from None


def check_corpus(config: Mapping[str, Any], corpus: Corpus) -> None:
    """``vocab_size`` is the corpus's, and every split fills one minibatch (as the
    engine cuts it: the same functions)."""
    from rhn_cli.engine.train import apply_split, check_splits

    expected = config["vocab_size"]
    if expected is not None and expected != corpus.vocab_size:
        raise ConfigError(
            f"vocab_size={expected}: dataset {corpus.name!r} has {corpus.vocab_size} symbols; "
            f"expected {corpus.vocab_size} or None"
        )
    try:
        check_splits(config, apply_split(config, corpus))
    except ValueError as error:  # SplitTooShortError, or no sentence ends to batch by
        raise ConfigError(f"{data_value(config, getattr(error, 'split', None))}: {error}") from None


def data_value(config: Mapping[str, Any], split: str | None = None) -> str:
    """The config value that chose the data (of ``split``), as ``key=value``."""
    dataset = config["dataset"]
    if dataset == "synthetic" and split in SPLITS:
        key = f"{split}_tokens"
        return f"synthetic.{key}={config['synthetic'][key]}"
    if dataset == "textfile":
        return f"data_path={config['data_path']!r}"
    return f"dataset={dataset!r}"
