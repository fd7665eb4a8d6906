"""How the LSTM family starts (issue 22, item 1): the cell biases at zero as the TF PTB
tutorial's cells create them (``ptb_lstm_*``), or U(-init_scale, init_scale) as the Lua
code of Zaremba and Gal draws them (``lstm_bias_init=uniform``, ``ptb_variational_lstm``);
every other parameter U(-init_scale, init_scale) either way.

The models are the named configs' own, as ``rhn train`` builds them (V = 10000)."""

from __future__ import annotations

import json

import pytest
import torch

from rhn_cli.cli import cli
from rhn_cli.engine import checkpoint
from rhn_cli.experiment.resolve import resolve
from rhn_cli.models import build_model
from rhn_cli.models.lstm import LSTMConfig

VOCAB = 10_000


def _model(*tokens: str, seed: int = 0):
    config = resolve(["with", *tokens]).config
    torch.manual_seed(seed)
    return build_model(config, VOCAB), config["init_scale"]


def _is_cell_bias(name: str) -> bool:
    return name.startswith("layers.") and name.endswith(".bias")


def _assert_uniform(name: str, values: torch.Tensor, scale: float) -> None:
    """U(-scale, scale): within the bounds, reaching near them, mean |x| = scale / 2."""
    magnitude = values.abs()
    assert magnitude.max() <= scale, name
    assert magnitude.max() > 0.95 * scale, name
    assert 0.4 * scale < magnitude.mean() < 0.6 * scale, name
    assert abs(values.mean()) < 0.1 * scale, name


@pytest.mark.parametrize("name", ["ptb_lstm_small", "ptb_lstm_medium", "ptb_lstm_large"])
def test_zaremba_configs_start_their_cell_biases_at_zero(name):
    config = resolve(["with", name]).config
    assert config["lstm_bias_init"] == "zeros"
    with torch.device("meta"):  # the large model's 66 M parameters: only the count here
        assert (
            build_model(config, VOCAB).num_parameters()
            == {
                "ptb_lstm_small": 4_651_600,
                "ptb_lstm_medium": 19_775_200,
                "ptb_lstm_large": 66_022_000,
            }[name]
        )


def test_tf_tutorial_init_zero_cell_biases_and_everything_else_uniform():
    model, scale = _model("ptb_lstm_small")
    biases = {name for name, _ in model.named_parameters() if _is_cell_bias(name)}
    assert biases == {"layers.0.bias", "layers.1.bias"}
    for name, p in model.named_parameters():
        if name in biases:
            assert not p.detach().any(), name  # exactly 0, as TF's zeros initializer
        else:  # embedding, cell weights, softmax weight and softmax bias
            _assert_uniform(name, p.detach(), scale)


def test_lua_init_draws_the_cell_biases_uniform_too():
    model, scale = _model("ptb_lstm_small", "lstm_bias_init='uniform'")
    for name, p in model.named_parameters():
        _assert_uniform(name, p.detach(), scale)


def test_the_bias_option_changes_nothing_but_the_cell_biases():
    """One seed, both options: the same weights (drawn before the biases are set)."""
    zeros, _ = _model("ptb_lstm_small", seed=3)
    uniform, _ = _model("ptb_lstm_small", "lstm_bias_init='uniform'", seed=3)
    drawn = dict(uniform.named_parameters())
    for name, p in zeros.named_parameters():
        if _is_cell_bias(name):
            assert not p.any() and drawn[name].any(), name
        else:
            assert torch.equal(p, drawn[name]), name


def test_variational_lstm_draws_every_parameter_uniform_as_gals_code():
    config = resolve(["with", "ptb_variational_lstm"]).config
    assert config["lstm_bias_init"] == "uniform"
    model, scale = _model("ptb_variational_lstm", "hidden_size=200")
    assert scale == 0.04
    for name, p in model.named_parameters():
        _assert_uniform(name, p.detach(), scale)


def test_the_model_refuses_an_unknown_bias_init():
    with pytest.raises(ValueError, match="bias_init must be one of"):
        LSTMConfig(10, 4, bias_init="normal")


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            ["ptb_lstm_small", "lstm_bias_init='normal'"],
            "lstm_bias_init='normal' (from the command line): expected one of 'zeros', 'uniform'",
        ),
        (
            ["ptb_sota", "lstm_bias_init='uniform'"],
            "lstm_bias_init='uniform' (from the command line) has no effect on model='rhn'",
        ),
    ],
)
def test_a_bad_bias_init_is_refused_before_any_run(runner, tmp_path, tokens, message):
    result = runner.invoke(cli, ["train", "with", *tokens, "--runs-dir", "runs"])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def _drop_key(path, key: str) -> None:
    """Rewrite a run's checkpoint as one saved before ``key`` existed."""
    state = checkpoint.load(path)
    state["config"].pop(key)
    checkpoint.save(path, state)


def test_a_run_recorded_before_the_option_still_evaluates_and_samples(runner, tmp_path):
    tiny = ["model=lstm", "hidden_size=8", "max_max_epoch=1", "synthetic.train_tokens=4000"]
    assert runner.invoke(cli, ["train", "with", *tiny]).exit_code == 0
    run_dir = tmp_path / "runs" / "1"
    config = json.loads((run_dir / "config.json").read_text())
    del config["lstm_bias_init"]
    (run_dir / "config.json").write_text(json.dumps(config))
    for name in (checkpoint.BEST, checkpoint.LAST):
        if (run_dir / name).exists():
            _drop_key(run_dir / name, "lstm_bias_init")
    evaluated = runner.invoke(cli, ["evaluate", "1", "--split", "valid"])
    assert evaluated.exit_code == 0, evaluated.output
    sampled = runner.invoke(cli, ["sample", "1", "--length", "5", "--seed", "1"])
    assert sampled.exit_code == 0, sampled.output


def test_a_config_recorded_before_the_option_keeps_its_uniform_biases():
    """An lstm run recorded before lstm_bias_init drew its cell biases U: rebuilt from its
    record (a restart, a sweep matching it to a point) it still does; other models'
    configs take the key's default."""
    from rhn_cli.experiment.resume import recorded_config

    for name, expected in (("ptb_lstm_small", "uniform"), ("tiny", "zeros")):
        config = resolve(["with", name]).config
        del config["lstm_bias_init"]
        assert recorded_config(config)["lstm_bias_init"] == expected, name
    current = resolve(["with", "ptb_lstm_small"]).config
    assert recorded_config(current)["lstm_bias_init"] == "zeros"  # recorded: kept
