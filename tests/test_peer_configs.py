"""Every peer named config trains end to end through the CLI, and ``rhn sample`` reads it.

The datasets are replaced by generated token streams with the real vocabulary sizes
(and a sentence end where the real corpus has one), and the models are shrunk to 16
units for one short epoch: what is checked is that each config's combination of model,
optimiser, clipping, batching and split runs and is recorded, not its final quality.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import rhn_cli.data.registry as registry
from rhn_cli.cli import cli
from rhn_cli.data.corpus import Corpus
from rhn_cli.experiment.resolve import resolve

PEER_CONFIGS = [
    "zoneout_char_ptb",
    "char_ptb_baseline",
    "char_ptb_weight_noise",
    "char_ptb_norm_stabilizer",
    "char_ptb_igate_dropout",
    "zoneout_text8",
    "gridlstm_tinyshakespeare",
    "lstm_tinyshakespeare",
    "wiki_grid3",
    "wiki_grid6",
    "wiki_stacked3",
    "wiki_stacked6",
    "gru_tutorial",
    "ptb_lstm_small",
    "ptb_lstm_medium",
    "ptb_lstm_large",
    "ptb_variational_lstm",
]
WORD_DATASETS = {"ptb"}


def generated_corpus(config, echo=print, progress=None) -> Corpus:
    """A random corpus with the dataset's vocabulary size; id 0 ends sentences."""
    name, size = config["dataset"], config["vocab_size"]
    word = name in WORD_DATASETS
    vocab = (["<eos>"] if word else ["\n"]) + [
        f"w{i}" if word else chr(65 + i) for i in range(size - 1)
    ]
    if config["batching"] == "sentences":
        lengths = (2_000, 300, 300)
    elif config["split"] == "streams_95_5":
        lengths = (60_000, 2_000, 2_000)  # char-rnn's 95/5 needs 20 minibatches of 50x50
    else:
        lengths = (12_000, 8_000, 8_000)
    rng = np.random.default_rng(0)
    splits = []
    for length in lengths:
        tokens = rng.integers(1, size, size=length)
        tokens[rng.random(length) < 0.1] = 0
        splits.append(tokens)
    return Corpus(name, *splits, vocab=vocab, level="word" if word else "char")


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(registry, "load_corpus", generated_corpus)


def test_every_peer_config_is_listed(runner):
    listed = runner.invoke(cli, ["configs"]).output
    for name in PEER_CONFIGS:
        assert name in listed


@pytest.mark.parametrize("name", PEER_CONFIGS)
def test_peer_config_trains_records_and_samples(name, runner, fake_data, tmp_path):
    updates = ["hidden_size=16", "max_max_epoch=1"]
    if resolve([name]).config["mc_steps"]:
        # A small vocabulary keeps random text under MC dropout's rejection threshold.
        updates += ["mc_steps=2", "vocab_size=50"]
    result = runner.invoke(cli, ["train", "with", name, *updates, "--seed", "1"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "1"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "COMPLETED"
    config = json.loads((run_dir / "config.json").read_text())
    expected = resolve([name, *updates]).config
    for key in ("model", "optimizer", "clip", "batching", "split", "loss"):
        assert config[key] == expected[key]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["valid.ppl"]["values"][0])
    if config["batching"] == "chunks":
        assert "valid_chunks.bpc" in metrics  # the Zoneout scripts' own dev metric

    sample = runner.invoke(cli, ["sample", "1", "--length", "12", "--seed", "3"])
    assert sample.exit_code == 0, sample.output
    text = sample.output.strip("\n")
    if config["dataset"] in WORD_DATASETS:
        assert len(text.split()) >= 1
    else:
        assert 1 <= len(text) <= 12
    again = runner.invoke(cli, ["sample", "1", "--length", "12", "--seed", "3"])
    assert again.output == sample.output  # the seed fixes the sample


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        (
            ["ptb_lstm_small", "depth=3"],
            "depth=3 (from the command line) has no effect on model='lstm' (used by rhn)",
        ),
        (
            ["ptb_sota", "model=gru"],
            "depth=10 (from named config ptb_sota) has no effect on model='gru'",
        ),
        (["zoneout_char_ptb", "mc_steps=5"], "mc_steps=5: MC dropout needs per-sequence"),
        (["gridlstm_tinyshakespeare", "batching='chunks'"], "needs batching='streams'"),
        (
            ["ptb_lstm_small", "split='streams_95_5'", "batching='chunks'"],
            "split='streams_95_5' cuts",
        ),
        (["optimizer='adagrad'"], "optimizer='adagrad' (from the command line): expected one of"),
    ],
)
def test_settings_a_model_would_ignore_are_refused_before_any_run(
    runner, tmp_path, updates, message
):
    result = runner.invoke(cli, ["train", "with", *updates])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "runs").exists()


def test_sample_names_prime_symbols_outside_the_vocabulary(runner, fake_data, tmp_path):
    assert (
        runner.invoke(
            cli, ["train", "with", "lstm_tinyshakespeare", "hidden_size=8", "max_max_epoch=1"]
        ).exit_code
        == 0
    )
    result = runner.invoke(cli, ["sample", "1", "--prime", "AB#!#"])
    assert result.exit_code == 2
    assert (
        "--prime has 2 symbol(s) not in the tinyshakespeare vocabulary: '!', '#'" in result.output
    )
    primed = runner.invoke(cli, ["sample", "1", "--prime", "ABC", "--length", "5", "--argmax"])
    assert primed.exit_code == 0
    assert primed.output.startswith("ABC") and len(primed.output.rstrip("\n")) <= 8
    missing = runner.invoke(cli, ["sample", "7"])
    assert missing.exit_code == 2
    assert "no run '7'" in missing.output


@pytest.mark.parametrize("model", ["lstm", "zoneout_lstm", "grid_lstm", "charrnn_lstm", "gru"])
def test_every_model_trains_on_the_default_corpus_and_beats_uniform(runner, tmp_path, model):
    """``model=...`` in any config: the quickstart corpus (12 symbols) with each family."""
    result = runner.invoke(
        cli,
        [
            "train",
            "with",
            f"model={model}",
            "hidden_size=16",
            "max_max_epoch=2",
            "optimizer='adam'",  # one setting that suits every family
            "learning_rate=0.01",
            "loss='mean'",
            "synthetic.train_tokens=20000",
            "synthetic.valid_tokens=4000",
            "synthetic.test_tokens=4000",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())
    assert metrics["valid.ppl"]["values"][-1] < 11  # a uniform guess is 12
