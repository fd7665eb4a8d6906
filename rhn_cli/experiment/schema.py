"""Every config key rhn accepts: its default, type, allowed range and one-line doc.

This table is the single source of truth for the default config (what ``rhn
print-config`` shows with no arguments), for validation (run before anything is
trained or recorded) and for the docs printed beside each value. The general keys are
declared here; the keys only some model families read are declared by each family
beside its ``build()`` (:mod:`rhn_cli.models`) and merged in, and which family reads
which key (:data:`USED_BY`) follows from those declarations. Key names follow the
reference RHN code (``depth``, ``lr_decay`` as a divisor, ``drop_*`` as drop rates...).
The defaults are a small RHN on the built-in synthetic corpus that trains in well
under a minute on two CPU cores.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any

from rhn_cli.data.errors import DatasetError
from rhn_cli.data.registry import DATASETS as DATASET_REGISTRY
from rhn_cli.data.textfile import DATA_PATH_FORMS, TEXT_LEVELS, textfile_paths
from rhn_cli.models import FAMILIES, family_keys
from rhn_cli.models.option import Option, at_least, drop_rate, one_of, positive


class ConfigError(ValueError):
    """A config value or key is not acceptable; the message is one line for the user."""


def _seed(v: Any) -> str | None:
    # numpy's global seed, which Sacred sets from it, takes 0 to 2**32 - 1.
    return None if v is None or 0 <= v < 2**32 else f"an integer from 0 to {2**32 - 1}"


def _duration(v: Any) -> str | None:
    from rhn_cli.engine.timing import parse_duration

    if v is None:
        return None
    try:
        parse_duration(v)
    except ValueError:
        return "a duration such as '3.5h', '90m', '45s' or a number of seconds"
    return None


def _device(v: Any) -> str | None:
    ok = re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)
    return None if ok else "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


# Model names and their keys come from the model registry, whose declarations import no
# torch. Dataset names come from the data registry, which imports nothing heavy, at check
# time (so datasets registered later are known too).
MODELS = tuple(FAMILIES)
OPTIMIZERS = ("sgd", "adam", "rmsprop", "rmsprop_eps_inside")
CLIP_MODES = ("grad_norm", "grad_value", "update_norm", "none")
LOSSES = ("sum_over_steps", "mean")
BATCHINGS = ("streams", "chunks", "sentences")
SPLITS = ("dataset", "streams_95_5")
# Models whose dropout masks are drawn once per minibatch (MC dropout re-draws them).
MC_DROPOUT_MODELS = tuple(name for name in MODELS if family_keys(name).mc_dropout)


def _known_dataset(v: Any) -> str | None:
    return None if v in DATASET_REGISTRY else "one of " + ", ".join(map(repr, DATASET_REGISTRY))


_GENERAL: dict[str, Any] = {
    "model": Option(
        "rhn",
        str,
        "model family: " + ", ".join(MODELS) + " ('rhn configs' shows examples)",
        one_of(*MODELS),
    ),
    "dataset": Option(
        "synthetic", str, "corpus to train on ('rhn data ls' lists them)", _known_dataset
    ),
    "data_path": Option(
        None,
        str,
        "dataset='textfile': a UTF-8 file (split 90/5/5), a directory of "
        "train/valid/test.txt, or a {split} pattern",
    ),
    "text_level": Option(
        "char",
        str,
        "dataset='textfile': 'char' or 'word' (split on whitespace, <eos> per line)",
        one_of(*TEXT_LEVELS),
    ),
    "hidden_size": Option(128, int, "units H of each recurrent layer", at_least(1)),
    "num_layers": Option(1, int, "stacked recurrent layers", at_least(1)),
    "learning_rate": Option(0.5, float, "learning rate of the optimizer", positive),
    "optimizer": Option(
        "sgd",
        str,
        "sgd; adam (Blocks' Adam, eps 1e-8); rmsprop (char-rnn/torch: eps 1e-8 outside the "
        "sqrt); rmsprop_eps_inside (WildML tutorial: lr g / sqrt(m + 1e-6))",
        one_of(*OPTIMIZERS),
    ),
    "rmsprop_decay": Option(
        0.95, float, "RMSprop moving-average decay (char-rnn 0.95, WildML 0.9)", drop_rate
    ),
    "lr_decay": Option(
        1.5, float, "lr is divided by this after every epoch past max_epoch", positive
    ),
    "max_epoch": Option(2, int, "last epoch at the full learning rate", at_least(0)),
    "max_max_epoch": Option(4, int, "number of training epochs", at_least(1)),
    "weight_decay": Option(
        1e-7, float, "L2 penalty weight_decay * sum(p^2)/2 added to the loss", at_least(0)
    ),
    "max_grad_norm": Option(10.0, float, "clipping threshold (see clip)", positive),
    "clip": Option(
        "grad_norm",
        str,
        "grad_norm: global gradient norm; grad_value: clamp each gradient entry (char-rnn); "
        "update_norm: the optimizer's step (Blocks StepClipping after Adam); none",
        one_of(*CLIP_MODES),
    ),
    "loss": Option(
        "sum_over_steps",
        str,
        "sum_over_steps: NLL summed over the T steps, mean over the batch (RHN, Zaremba, "
        "WildML); mean: per-token mean (Zoneout, char-rnn)",
        one_of(*LOSSES),
    ),
    "batching": Option(
        "streams",
        str,
        "streams: B contiguous streams, state carried (TBPTT); chunks: shuffled independent "
        "chunks of num_steps+1 from a random offset, each from the initial state (Zoneout); "
        "sentences: one sentence per row, from a zero state (WildML)",
        one_of(*BATCHINGS),
    ),
    "reset_state_each_epoch": Option(
        True,
        bool,
        "batching='streams': start every epoch from the initial state (RHN, Zaremba); "
        "False carries it over the wrap-around (char-rnn)",
    ),
    "split": Option(
        "dataset",
        str,
        "dataset: the dataset's own splits; streams_95_5: char-rnn's split of the whole text "
        "into B streams, the last 5% of each stream for validation (no test split)",
        one_of(*SPLITS),
    ),
    "num_steps": Option(35, int, "truncated-BPTT window T", at_least(1)),
    "batch_size": Option(50, int, "parallel token streams B per minibatch", at_least(1)),
    "norm_stabilizer": Option(
        0.0,
        float,
        "beta of the norm stabiliser: beta * mean over batch of sum_t (|h_t+1| - |h_t|)^2 "
        "/ num_steps",
        at_least(0),
    ),
    "weight_noise": Option(
        0.0,
        float,
        "std of Gaussian noise added to every weight matrix (not biases) for each update",
        at_least(0),
    ),
    "device": Option("auto", str, "'auto' picks cuda when available, else cpu", _device),
    "vocab_size": Option(
        None, int, "expected vocabulary size; None: whatever the dataset has", at_least(1)
    ),
    "load_model": Option(
        "", str, "start from the weights of this checkpoint (best_model.pt or checkpoint.pt)"
    ),
    "mc_steps": Option(
        0, int, "MC-dropout samples for a final test evaluation (0: none)", at_least(0)
    ),
    "checkpoint_every": Option(
        30.0,
        float,
        "minutes between checkpoints inside an epoch (0: only at epoch ends)",
        at_least(0),
    ),
    "max_time": Option(
        None,
        object,
        "stop cleanly, checkpointed, after this wall time ('3.5h', '90m', seconds)",
        _duration,
    ),
    "early_stopping": Option(
        0,
        int,
        "stop after this many epochs without a better valid perplexity (0: off)",
        at_least(0),
    ),
    "deterministic": Option(
        False, bool, "use only deterministic torch kernels (GPU reproducibility)"
    ),
    "synthetic": {
        "alphabet_size": Option(12, int, "symbols of the synthetic source", at_least(2)),
        "order": Option(2, int, "Markov order: symbols of context", at_least(1)),
        "branching": Option(3, int, "possible next symbols in each context", at_least(1)),
        "train_tokens": Option(200_000, int, "length of the training split", at_least(1)),
        "valid_tokens": Option(20_000, int, "length of the validation split", at_least(1)),
        "test_tokens": Option(20_000, int, "length of the test split", at_least(1)),
        "source_seed": Option(1234, int, "seed of the source (fixed: runs share one corpus)"),
    },
    "seed": Option(None, int, "random seed of the run (chosen by Sacred when not given)", _seed),
}


def _model_keys() -> tuple[dict[str, Option], dict[str, tuple[str, ...]]]:
    """Every family's declared keys, merged, and which families read each (in the order
    of :data:`MODELS`). A key two families declare must be the same declaration
    (:mod:`rhn_cli.models.shared_keys`), and no family may redeclare a general key."""
    options: dict[str, Option] = {}
    used_by: dict[str, tuple[str, ...]] = {}
    for model in MODELS:
        for key, option in family_keys(model).options.items():
            if key in _GENERAL:
                raise TypeError(f"model {model!r} redeclares the general config key {key!r}")
            if options.setdefault(key, option) is not option:
                raise TypeError(
                    f"models {', '.join(used_by[key])} and {model!r} declare config key "
                    f"{key!r} differently: declare it once, in rhn_cli/models/shared_keys.py"
                )
            used_by[key] = (*used_by.get(key, ()), model)
    return options, used_by


# Which models read each model-specific key. Setting one the chosen model ignores is an
# error: a silently ignored hyperparameter is a wrong experiment.
_MODEL_OPTIONS, USED_BY = _model_keys()
SCHEMA: dict[str, Any] = {**_GENERAL, **_MODEL_OPTIONS}


def defaults(schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    """The default config as a nested dict (``seed`` left out: Sacred adds it)."""
    out: dict[str, Any] = {}
    for key, opt in schema.items():
        if isinstance(opt, Mapping):
            out[key] = defaults(opt)
        elif key != "seed":
            out[key] = opt.default
    return out


def doc(path: str) -> str:
    """The one-line doc of a dotted key, or '' if unknown."""
    node: Any = SCHEMA
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    return node.doc if isinstance(node, Option) else ""


def all_keys(schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> list[str]:
    keys = []
    for key, opt in schema.items():
        keys.append(prefix + key)
        if isinstance(opt, Mapping):
            keys.extend(all_keys(opt, prefix + key + "."))
    return keys


# Names other codebases use for the same thing (awd-lstm-lm, pytorch/examples, zoneout).
ALIASES = {
    "lr": "learning_rate",
    "bptt": "num_steps",
    "seq_len": "num_steps",
    "seq_length": "num_steps",
    "nhid": "hidden_size",
    "rnn_size": "hidden_size",
    "units": "hidden_size",
    "nlayers": "num_layers",
    "layers": "num_layers",
    "recurrence_depth": "depth",
    "epochs": "max_max_epoch",
    "wdecay": "weight_decay",
    "tied_embeddings": "tied",
    "init_T_bias": "init_bias",
    "drop_s": "drop_h",
}


def suggest(key: str, candidates: list[str]) -> str:
    """'; did you mean ...?' for the closest candidate, or ''."""
    if ALIASES.get(key) in candidates:
        return f"; did you mean {ALIASES[key]!r}?"
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(kind: type | tuple[type, ...]) -> str:
    if kind == (int, float):
        return "a number or None"
    return {int: "an integer", float: "a number", bool: "True or False", str: "a string"}[kind]


def _coerce(path: str, value: Any, opt: Option, origin: str) -> Any:
    where = f" (from {origin})" if origin else ""
    if opt.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is None and opt.default is None:
        return value
    if (isinstance(value, bool) and opt.kind is not bool) or not isinstance(value, opt.kind):
        raise ConfigError(f"{path}={value!r}{where}: expected {_type_name(opt.kind)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}={value!r}{where}: expected a finite number")
    if opt.check is not None and (allowed := opt.check(value)) is not None:
        raise ConfigError(f"{path}={value!r}{where}: expected {allowed}")
    return value


def validate(
    config: Mapping[str, Any],
    origins: Mapping[str, str] | None = None,
    schema: Mapping[str, Any] = SCHEMA,
    prefix: str = "",
) -> dict[str, Any]:
    """Check every key and value; return the config with ints widened to floats where due.

    ``origins`` maps dotted keys to where their value came from (a named config or the
    command line), so the message can say where to fix it. Raises :class:`ConfigError`.
    """
    origins = origins or {}
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = prefix + key
        if key not in schema:
            where = f" (from {origins[path]})" if path in origins else ""
            hint = suggest(path, all_keys()) or suggest(key, list(schema))
            raise ConfigError(
                f"unknown config key {path!r}{where}{hint} ('rhn print-config' lists every key)"
            )
        opt = schema[key]
        if isinstance(opt, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}={value!r}: expected a group of keys ({', '.join(opt)})")
            out[key] = validate(value, origins, opt, path + ".")
        else:
            out[key] = _coerce(path, value, opt, origins.get(path, ""))
    if not prefix:
        _check_consistency(out, origins)
    return out


def plain(config: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    """A plain copy of a config :func:`validate` has accepted (Sacred's read-only copy of
    it), as :func:`validate` returns it: ints widened to floats where the schema wants a
    float. Checks nothing: a config is validated once, before Sacred ever sees it."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        option = schema.get(key)
        if isinstance(option, Mapping) and isinstance(value, Mapping):
            out[key] = plain(value, option)
        elif (
            isinstance(option, Option)
            and option.kind is float
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _check_model_keys(config: Mapping[str, Any], origins: Mapping[str, str]) -> None:
    """A key the model ignores may be neither set (by a named config or the command
    line) nor changed from its default."""
    model = config.get("model", SCHEMA["model"].default)
    for key, users in USED_BY.items():
        if key not in config or model in users:
            continue
        default = SCHEMA[key].default
        if key in origins or config[key] != default:
            where = f" (from {origins[key]})" if key in origins else ""
            raise ConfigError(
                f"{key}={config[key]!r}{where} has no effect on model={model!r} (used by "
                f"{', '.join(users)}); drop it"
                + ("" if config[key] == default else f" or set it back to {default!r}")
            )
    if config.get("mc_steps") and model not in MC_DROPOUT_MODELS:
        raise ConfigError(
            f"mc_steps={config['mc_steps']}: MC dropout needs per-sequence dropout masks, "
            f"which model={model!r} does not have (allowed for {', '.join(MC_DROPOUT_MODELS)})"
        )
    if config.get("reset_state_each_epoch") is False and config.get("batching") != "streams":
        raise ConfigError(
            f"reset_state_each_epoch=False carries the streams' state, so it needs "
            f"batching='streams' (not {config['batching']!r})"
        )
    if config.get("split", "dataset") != "dataset" and config.get("batching", "streams") != (
        "streams"
    ):
        raise ConfigError(
            f"split={config['split']!r} cuts the text into the training streams, so it needs "
            f"batching='streams' (not {config['batching']!r})"
        )


def _check_consistency(config: Mapping[str, Any], origins: Mapping[str, str]) -> None:
    """Rules that involve several keys."""
    _check_data_path(config.get("dataset"), config.get("data_path"))
    _check_model_keys(config, origins)
    synthetic = config.get("synthetic", {})
    if synthetic and synthetic["branching"] > synthetic["alphabet_size"]:
        raise ConfigError(
            f"synthetic.branching={synthetic['branching']}: expected at most "
            f"synthetic.alphabet_size={synthetic['alphabet_size']}"
        )
    if synthetic and synthetic["alphabet_size"] ** synthetic["order"] > 1_000_000:
        raise ConfigError(
            f"synthetic.order={synthetic['order']}: alphabet_size**order must be at most "
            "1,000,000 contexts"
        )


def _check_data_path(dataset: Any, data_path: Any) -> None:
    """``textfile`` needs an existing ``data_path``; other datasets must not be given one."""
    if dataset != "textfile":
        if data_path is not None:
            raise ConfigError(
                f"data_path={data_path!r}: only used with dataset='textfile' "
                f"(dataset={dataset!r}); drop it or set dataset='textfile'"
            )
        return
    if data_path is None:
        raise ConfigError(f"dataset='textfile' needs data_path: {DATA_PATH_FORMS}")
    try:
        textfile_paths(data_path)
    except DatasetError as error:
        raise ConfigError(str(error)) from None
