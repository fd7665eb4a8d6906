"""The Zaremba LSTM on torch's fused LSTM kernel: the same model as the Python loop (the
reference), taken only where the math is a standard LSTM, and kept across a resume."""

import json

import pytest
import torch

from rhn_cli.experiment import recording
from rhn_cli.models import lstm
from rhn_cli.models.lstm import LSTMConfig, LSTMLanguageModel

V, H, B, T = 50, 16, 3, 7


def _model(**overrides) -> LSTMLanguageModel:
    # Uniform cell biases and a larger scale: every weight and bias block matters.
    options = dict(vocab_size=V, hidden_size=H, init_scale=0.5, bias_init="uniform")
    torch.manual_seed(0)
    return LSTMLanguageModel(LSTMConfig(**{**options, **overrides})).double()


def _run(model, fused: bool, monkeypatch, masks=None, seed=1):
    """Logits, final state and every parameter's gradient, with the path forced."""
    monkeypatch.setattr(lstm, "USE_FUSED", fused)
    model.zero_grad()
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    h0 = torch.rand(model.config.num_layers, B, H, generator=generator, dtype=torch.float64)
    c0 = torch.rand(model.config.num_layers, B, H, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)  # Zaremba's per-step masks: the same draws on both paths
    logits, (h, c) = model(tokens, (h0, c0), masks)
    (logits.sin().sum() + h.sum() + 2 * c.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), h.detach(), c.detach(), grads


def _assert_same(a, b):
    for x, y in zip(a[:3], b[:3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_equals_the_loop_in_eval_mode(monkeypatch, forget_bias, num_layers, tied):
    model = _model(forget_bias=forget_bias, num_layers=num_layers, tied=tied, dropout=0.5)
    model.eval()
    _assert_same(_run(model, True, monkeypatch), _run(model, False, monkeypatch))


@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_fused_equals_the_loop_in_training_with_input_masks(monkeypatch, forget_bias):
    model = _model(forget_bias=forget_bias, dropout=0.3, drop_x=0.2, drop_i=0.4, drop_o=0.3)
    model.train()
    torch.manual_seed(5)
    masks = model.draw_masks(torch.randint(0, V, (B, T)))
    assert masks["x"] is not None and masks["i"][1] is not None and masks["h"][0] is None
    fused = _run(model, True, monkeypatch, masks)
    loop = _run(model, False, monkeypatch, masks)
    _assert_same(fused, loop)
    # The dropout really acted (a model run without it gives other logits).
    model.eval()
    assert not torch.allclose(_run(model, False, monkeypatch)[0], loop[0])


def _watch_fused_calls(monkeypatch) -> list:
    """The list each call of torch's fused LSTM kernel is appended to from now on."""
    calls = []
    fused_lstm = torch.lstm

    def counted(*args):
        calls.append(args)
        return fused_lstm(*args)

    monkeypatch.setattr(torch, "lstm", counted)
    return calls


def _count_fused_calls(monkeypatch, model, use_fused: bool) -> int:
    calls = _watch_fused_calls(monkeypatch)
    _run(model, use_fused, monkeypatch)
    return len(calls)


def test_the_fused_kernel_runs_each_layer_without_drop_h(monkeypatch):
    model = _model(num_layers=2, dropout=0.5, drop_i=0.3)
    model.train()
    assert _count_fused_calls(monkeypatch, model, True) == 2
    assert _count_fused_calls(monkeypatch, model, False) == 0  # the switch forces the loop


def test_a_recurrent_mask_keeps_the_loop(monkeypatch):
    model = _model(num_layers=2, drop_h=0.3)
    model.train()
    assert _count_fused_calls(monkeypatch, model, True) == 0
    model.eval()  # no masks in eval mode: a standard LSTM again
    assert _count_fused_calls(monkeypatch, model, True) == 2


def test_parameters_and_their_names_are_unchanged():
    model = LSTMLanguageModel(LSTMConfig(vocab_size=10000, hidden_size=200, num_layers=2))
    assert sum(p.numel() for p in model.parameters()) == 4_651_600
    assert list(model.state_dict()) == [
        "output_weight",
        "output_bias",
        "embedding.weight",
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]


def test_a_run_records_which_path_computed_it(monkeypatch):
    monkeypatch.setattr(lstm, "USE_FUSED", True)
    assert recording.kernel_facts()["lstm_fused"] is True
    monkeypatch.setattr(lstm, "USE_FUSED", False)
    assert recording.kernel_facts()["lstm_fused"] is False


@pytest.mark.parametrize(
    ("kernels", "fused"),
    [
        ({"native_loop": True, "library_decisions": {}, "lstm_fused": True}, True),
        ({"native_loop": True, "library_decisions": {}, "lstm_fused": False}, False),
        ({"native_loop": True, "library_decisions": {}}, False),  # before the fused kernel
        (None, False),  # recorded before rhn kept any kernel facts
    ],
)
def test_pinning_a_run_directory_sets_the_path_its_run_recorded(
    monkeypatch, tmp_path, kernels, fused
):
    info = {"kernels": kernels} if kernels is not None else {"checkpoint": "x"}
    (tmp_path / "info.json").write_text(json.dumps(info))
    monkeypatch.setattr(lstm, "USE_FUSED", not fused)
    recording.pin_recorded_decisions(tmp_path)
    assert lstm.USE_FUSED is fused


def test_a_checkpoint_outside_a_run_directory_keeps_the_fused_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(lstm, "USE_FUSED", True)
    recording.pin_recorded_decisions(tmp_path)  # no info.json: nothing recorded
    assert lstm.USE_FUSED is True


def _small_word_corpus(config, echo=print, progress=None):
    from rhn_cli.data.corpus import Corpus

    size = config["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    splits = [torch.randint(0, size, (n,), generator=generator).numpy() for n in (6000, 2000, 2000)]
    vocab = ["<eos>"] + [f"w{i}" for i in range(size - 1)]
    return Corpus(config["dataset"], *splits, vocab=vocab, level="word")


def test_evaluating_a_run_recorded_on_the_loop_computes_on_the_loop(monkeypatch, runner, tmp_path):
    import rhn_cli.data.registry as registry
    from rhn_cli.cli import cli

    monkeypatch.setattr(registry, "load_corpus", _small_word_corpus)
    monkeypatch.setattr(lstm, "USE_FUSED", True)
    trained = runner.invoke(
        cli, ["train", "with", "ptb_lstm_small", "hidden_size=8", "max_max_epoch=1"]
    )
    assert trained.exit_code == 0, trained.output
    info_path = tmp_path / "runs" / "1" / "info.json"
    info = json.loads(info_path.read_text())
    assert info["kernels"]["lstm_fused"] is True
    # As a run recorded before the fused kernel existed: no such fact.
    del info["kernels"]["lstm_fused"]
    info_path.write_text(json.dumps(info))
    calls = _watch_fused_calls(monkeypatch)
    evaluated = runner.invoke(cli, ["evaluate", "1", "--split", "valid"])
    assert evaluated.exit_code == 0, evaluated.output
    assert calls == []
    evaluation = json.loads((tmp_path / "runs" / "2" / "info.json").read_text())
    assert evaluation["kernels"]["lstm_fused"] is False


def test_resuming_a_run_recorded_on_the_loop_trains_on_the_loop(monkeypatch, runner, tmp_path):
    """A run computes with one path throughout: one recorded before the fused kernel (no
    such fact in its info) continues on the loop when resumed, and records so."""
    import rhn_cli.data.registry as registry
    from rhn_cli.cli import cli

    monkeypatch.setattr(registry, "load_corpus", _small_word_corpus)
    monkeypatch.setattr(lstm, "USE_FUSED", True)
    run = ["with", "ptb_lstm_small", "hidden_size=8", "max_max_epoch=2", "max_time=0.001"]
    stopped = runner.invoke(cli, ["train", *run])
    assert stopped.exit_code == 0 and "TIMEOUT" in stopped.output, stopped.output
    info_path = tmp_path / "runs" / "1" / "info.json"
    info = json.loads(info_path.read_text())
    del info["kernels"]["lstm_fused"]
    info_path.write_text(json.dumps(info))
    calls = _watch_fused_calls(monkeypatch)
    resumed = runner.invoke(cli, ["train", "--resume", "1", "with", "max_time=None"])
    assert resumed.exit_code == 0 and "run 1 COMPLETED" in resumed.output, resumed.output
    assert calls == [], "the resumed run computed on the fused kernel"
    assert json.loads(info_path.read_text())["kernels"]["lstm_fused"] is False
