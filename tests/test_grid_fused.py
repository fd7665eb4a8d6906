"""The Grid LSTM's temporal and depth LSTMs on torch's fused LSTM kernel: the same model as
the Python loop and autograd's elementwise depth update (the reference), with the same
parameters, and kept on the reference across a resume of a run it computed."""

import json

import pytest
import torch

from rhn_cli.experiment import recording
from rhn_cli.models import grid_lstm
from rhn_cli.models.grid_lstm import GridLSTMConfig, GridLSTMLanguageModel

V, H, B, T = 30, 12, 3, 7


def _model(**overrides) -> GridLSTMLanguageModel:
    # A large scale: every weight and bias block moves the gates well away from 0.5.
    options = dict(vocab_size=V, hidden_size=H, init_scale=0.5)
    torch.manual_seed(0)
    model = GridLSTMLanguageModel(GridLSTMConfig(**{**options, **overrides})).double()
    with torch.no_grad():  # no two gate blocks alike, biases included (the forget one too)
        for layer in model.layers:
            layer.time_to_time.bias.uniform_(-1.0, 1.0)
    return model


def _run(model, fused, monkeypatch, seed=1):
    """Logits, final state and every parameter's gradient, with the path forced: ``fused``
    for both LSTMs, or (temporal, depth)."""
    temporal, depth = fused if isinstance(fused, tuple) else (fused, fused)
    monkeypatch.setattr(grid_lstm, "USE_FUSED", temporal)
    monkeypatch.setattr(grid_lstm, "USE_FUSED_DEPTH", depth)
    model.zero_grad()
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    shape = (model.config.num_layers, B, H)
    h0 = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    c0 = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    torch.manual_seed(seed)  # the per-step dropout masks: the same draws on both paths
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


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_fused_equals_the_loop_in_eval_mode(monkeypatch, num_layers, tie_weights):
    model = _model(num_layers=num_layers, tie_weights=tie_weights, dropout=0.5)
    model.eval()
    _assert_same(_run(model, True, monkeypatch), _run(model, False, monkeypatch))


@pytest.mark.parametrize("fused", [(True, False), (False, True)], ids=["temporal", "depth"])
def test_each_fused_lstm_alone_equals_the_reference(monkeypatch, fused):
    model = _model(num_layers=2, dropout=0.4)
    model.train()
    _assert_same(_run(model, fused, monkeypatch), _run(model, False, monkeypatch))


@pytest.mark.parametrize("tie_weights", [True, False])
def test_fused_equals_the_loop_in_training_with_dropout(monkeypatch, tie_weights):
    model = _model(num_layers=2, tie_weights=tie_weights, dropout=0.4)
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
    assert len(calls) == 6  # each layer's temporal LSTM and its depth LSTM
    depth_rows = [args[0].shape[:2] for args in calls[1::2]]
    assert depth_rows == [(B * T, 1)] * 3  # one step of B x T rows
    calls.clear()
    _run(model, (True, False), monkeypatch)
    assert len(calls) == 3
    calls.clear()
    _run(model, False, monkeypatch)
    assert calls == []


@pytest.mark.parametrize(
    ("vocab", "hidden", "layers", "count"), [(205, 1000, 3, 32_442_205), (65, 128, 2, 412_993)]
)
def test_parameters_and_their_names_are_unchanged(vocab, hidden, layers, count):
    model = GridLSTMLanguageModel(
        GridLSTMConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers)
    )
    assert sum(p.numel() for p in model.parameters()) == count
    assert list(model.state_dict()) == [
        "embedding.weight",
        *(
            f"layers.{index}.{linear}.{kind}"
            for index in range(layers)
            for linear in ("time_to_time", "depth_to_time", "time_to_depth", "depth_to_depth")
            for kind in ("weight", "bias")
        ),
        "decoder.weight",
        "decoder.bias",
    ]


def test_a_run_records_which_path_computed_it(monkeypatch):
    for temporal, depth in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(grid_lstm, "USE_FUSED", temporal)
        monkeypatch.setattr(grid_lstm, "USE_FUSED_DEPTH", depth)
        facts = recording.kernel_facts()
        assert (facts["grid_lstm_fused"], facts["grid_lstm_depth_fused"]) == (temporal, depth)


BOTH_FUSED = {"grid_lstm_fused": True, "grid_lstm_depth_fused": True}


@pytest.mark.parametrize(
    ("kernels", "fused"),
    [
        ({"native_loop": True, "charrnn_lstm_fused": True, **BOTH_FUSED}, (True, True)),
        ({"native_loop": True, **BOTH_FUSED, "grid_lstm_fused": False}, (False, True)),
        ({"native_loop": True, "grid_lstm_fused": True}, (True, False)),  # before the depth's
        ({"native_loop": True, "charrnn_lstm_fused": True}, (False, False)),  # before both
        (None, (False, False)),  # recorded before rhn kept any kernel facts
    ],
)
def test_pinning_a_run_directory_sets_the_path_its_run_recorded(
    monkeypatch, pin_as_recorded, kernels, fused
):
    monkeypatch.setattr(grid_lstm, "USE_FUSED", not fused[0])
    monkeypatch.setattr(grid_lstm, "USE_FUSED_DEPTH", not fused[1])
    pin_as_recorded(kernels)
    assert (grid_lstm.USE_FUSED, grid_lstm.USE_FUSED_DEPTH) == fused


SMALL_GRID_RUN = [
    "model=grid_lstm",
    "hidden_size=8",
    "num_layers=2",
    "dropout=0.25",
    "max_max_epoch=2",
    "synthetic.train_tokens=6000",
    "synthetic.valid_tokens=2000",
    "synthetic.test_tokens=2000",
]


def test_resuming_a_run_recorded_on_the_loop_trains_on_the_loop(monkeypatch, runner, tmp_path):
    """A run computes with one path throughout: one recorded before the grid's fused kernel
    (no such fact in its info) continues on the loop when resumed, and records so."""
    from rhn_cli.cli import cli

    monkeypatch.setattr(grid_lstm, "USE_FUSED", True)
    stopped = runner.invoke(cli, ["train", "with", *SMALL_GRID_RUN, "max_time=0.001"])
    assert stopped.exit_code == 0 and "TIMEOUT" in stopped.output, stopped.output
    info_path = tmp_path / "runs" / "1" / "info.json"
    info = json.loads(info_path.read_text())
    assert info["kernels"]["grid_lstm_fused"] is info["kernels"]["grid_lstm_depth_fused"] is True
    del info["kernels"]["grid_lstm_fused"], info["kernels"]["grid_lstm_depth_fused"]
    info_path.write_text(json.dumps(info))
    calls = _watch_fused_calls(monkeypatch)
    resumed = runner.invoke(cli, ["train", "--resume", "1", "with", "max_time=None"])
    assert resumed.exit_code == 0 and "run 1 COMPLETED" in resumed.output, resumed.output
    assert calls == [], "the resumed run computed on the fused kernel"
    kernels = json.loads(info_path.read_text())["kernels"]
    assert kernels["grid_lstm_fused"] is kernels["grid_lstm_depth_fused"] is False


def test_a_new_run_computes_on_the_fused_kernel(monkeypatch, runner, tmp_path):
    from rhn_cli.cli import cli

    monkeypatch.setattr(grid_lstm, "USE_FUSED", True)
    calls = _watch_fused_calls(monkeypatch)
    trained = runner.invoke(cli, ["train", "with", *SMALL_GRID_RUN])
    assert trained.exit_code == 0, trained.output
    assert calls  # every layer of every step
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert info["kernels"]["grid_lstm_fused"] is True
