"""char-rnn's stacked LSTM on torch's fused LSTM kernel: the same model as the Python loop
(the reference), with the same parameters, and kept on the loop across a resume of a run
the loop computed."""

import json

import pytest
import torch

from rhn_cli.experiment import recording
from rhn_cli.models import charrnn_lstm
from rhn_cli.models.charrnn_lstm import CharRNNLSTMConfig, CharRNNLSTMLanguageModel

V, H, B, T = 30, 12, 3, 7


def _model(**overrides) -> CharRNNLSTMLanguageModel:
    # A large scale: every weight and bias block moves the gates well away from 0.5.
    options = dict(vocab_size=V, hidden_size=H, init_scale=0.5)
    torch.manual_seed(0)
    model = CharRNNLSTMLanguageModel(CharRNNLSTMConfig(**{**options, **overrides})).double()
    with torch.no_grad():  # no two gate blocks alike, biases included (the forget one too)
        for layer in model.layers:
            layer.i2h.bias.uniform_(-1.0, 1.0)
    return model


def _run(model, fused: bool, monkeypatch, seed=1):
    """Logits, final state and every parameter's gradient, with the path forced."""
    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", fused)
    model.zero_grad()
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    shape = (model.config.num_layers, B, H)
    h0 = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    c0 = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    torch.manual_seed(seed)  # char-rnn's per-step masks: the same draws on both paths
    logits, (h, c) = model(tokens, (h0, c0))
    (logits.sin().sum() + h.sum() + 2 * c.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), h.detach(), c.detach(), grads


def _assert_same(a, b):
    for x, y in zip(a[:3], b[:3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_fused_equals_the_loop_in_eval_mode(monkeypatch, num_layers):
    model = _model(num_layers=num_layers, dropout=0.5)
    model.eval()
    _assert_same(_run(model, True, monkeypatch), _run(model, False, monkeypatch))


def test_fused_equals_the_loop_in_training_with_dropout(monkeypatch):
    model = _model(num_layers=3, dropout=0.4)
    model.train()
    fused = _run(model, True, monkeypatch)
    loop = _run(model, False, monkeypatch)
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


@pytest.mark.parametrize("training", [True, False])
def test_the_fused_kernel_runs_every_layer_and_the_switch_forces_the_loop(monkeypatch, training):
    model = _model(num_layers=3, dropout=0.25)
    model.train(training)
    calls = _watch_fused_calls(monkeypatch)
    _run(model, True, monkeypatch)
    assert len(calls) == 3
    calls.clear()
    _run(model, False, monkeypatch)
    assert calls == []


def test_parameters_their_names_and_initialisation_are_unchanged():
    model = CharRNNLSTMLanguageModel(
        CharRNNLSTMConfig(vocab_size=205, hidden_size=1000, num_layers=3)
    )
    assert sum(p.numel() for p in model.parameters()) == 24_434_205
    assert list(model.state_dict()) == [
        "embedding.weight",
        *(
            f"layers.{index}.{linear}.{kind}"
            for index in range(3)
            for linear in ("i2h", "h2h")
            for kind in ("weight", "bias")
        ),
        "decoder.weight",
        "decoder.bias",
    ]
    # char-rnn's initialisation: U(+-0.08) everywhere but the forget block of each i2h bias.
    small = CharRNNLSTMLanguageModel(CharRNNLSTMConfig(vocab_size=V, hidden_size=H))
    for name, p in small.named_parameters():
        drawn = torch.cat((p.flatten()[:H], p.flatten()[2 * H :])) if "i2h.b" in name else p
        assert drawn.abs().max() <= 0.08 and drawn.std() > 0.03, name
        if "i2h.b" in name:
            assert torch.equal(p[H : 2 * H], torch.ones(H)), name


def test_a_run_records_which_path_computed_it(monkeypatch):
    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", True)
    assert recording.kernel_facts()["charrnn_lstm_fused"] is True
    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", False)
    assert recording.kernel_facts()["charrnn_lstm_fused"] is False


@pytest.mark.parametrize(
    ("kernels", "fused"),
    [
        ({"native_loop": True, "lstm_fused": True, "charrnn_lstm_fused": True}, True),
        ({"native_loop": True, "lstm_fused": True, "charrnn_lstm_fused": False}, False),
        ({"native_loop": True, "lstm_fused": True}, False),  # before charrnn's fused kernel
        (None, False),  # recorded before rhn kept any kernel facts
    ],
)
def test_pinning_a_run_directory_sets_the_path_its_run_recorded(
    monkeypatch, tmp_path, kernels, fused
):
    info = {"kernels": kernels} if kernels is not None else {"checkpoint": "x"}
    (tmp_path / "info.json").write_text(json.dumps(info))
    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", not fused)
    recording.pin_recorded_decisions(tmp_path)
    assert charrnn_lstm.USE_FUSED is fused


def test_a_checkpoint_outside_a_run_directory_keeps_the_fused_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", True)
    recording.pin_recorded_decisions(tmp_path)  # no info.json: nothing recorded
    assert charrnn_lstm.USE_FUSED is True


SMALL_CHARRNN_RUN = [
    "model=charrnn_lstm",
    "hidden_size=8",
    "num_layers=2",
    "dropout=0.25",
    "max_max_epoch=2",
    "synthetic.train_tokens=6000",
    "synthetic.valid_tokens=2000",
    "synthetic.test_tokens=2000",
]


def test_resuming_a_run_recorded_on_the_loop_trains_on_the_loop(monkeypatch, runner, tmp_path):
    """A run computes with one path throughout: one recorded before char-rnn's fused kernel
    (no such fact in its info) continues on the loop when resumed, and records so."""
    from rhn_cli.cli import cli

    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", True)
    stopped = runner.invoke(cli, ["train", "with", *SMALL_CHARRNN_RUN, "max_time=0.001"])
    assert stopped.exit_code == 0 and "TIMEOUT" in stopped.output, stopped.output
    info_path = tmp_path / "runs" / "1" / "info.json"
    info = json.loads(info_path.read_text())
    assert info["kernels"]["charrnn_lstm_fused"] is True
    del info["kernels"]["charrnn_lstm_fused"]
    info_path.write_text(json.dumps(info))
    calls = _watch_fused_calls(monkeypatch)
    resumed = runner.invoke(cli, ["train", "--resume", "1", "with", "max_time=None"])
    assert resumed.exit_code == 0 and "run 1 COMPLETED" in resumed.output, resumed.output
    assert calls == [], "the resumed run computed on the fused kernel"
    assert json.loads(info_path.read_text())["kernels"]["charrnn_lstm_fused"] is False


def test_a_new_run_computes_on_the_fused_kernel(monkeypatch, runner, tmp_path):
    from rhn_cli.cli import cli

    monkeypatch.setattr(charrnn_lstm, "USE_FUSED", True)
    calls = _watch_fused_calls(monkeypatch)
    trained = runner.invoke(cli, ["train", "with", *SMALL_CHARRNN_RUN])
    assert trained.exit_code == 0, trained.output
    assert calls  # every layer of every step
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert info["kernels"]["charrnn_lstm_fused"] is True
