"""The hand-written LSTM recurrence (rhn_cli/kernels/lstm_recurrence.py) computes what each
model's autograd loop computes: outputs, final state and every parameter's gradient, in
float64, train and eval mode, with the same random draws for the same seed; it is the
path a model takes unless switched off, and a run keeps the path it was recorded with."""

import json

import pytest
import torch

from rhn_cli.experiment import recording
from rhn_cli.kernels import lstm_recurrence, projection
from rhn_cli.models import lstm
from rhn_cli.models.lstm import LSTMConfig, LSTMLanguageModel
from rhn_cli.models.zoneout_lstm import ZoneoutLSTMConfig, ZoneoutLSTMLanguageModel

V, H, B, T = 11, 8, 3, 6
TOL = dict(rtol=1e-12, atol=1e-12)


def _zoneout_model(**overrides) -> ZoneoutLSTMLanguageModel:
    options = dict(vocab_size=V, hidden_size=H, num_layers=2, forget_bias=1.0)
    torch.manual_seed(0)
    model = ZoneoutLSTMLanguageModel(ZoneoutLSTMConfig(**{**options, **overrides})).double()
    with torch.no_grad():  # the learned initial state and biases start at 0: make them count
        for layer in model.layers:
            for p in (layer.initial_h, layer.initial_c, layer.input_bias):
                p.uniform_(-0.5, 0.5)
    return model


def _gal_model(**overrides) -> LSTMLanguageModel:
    options = dict(vocab_size=V, hidden_size=H, init_scale=0.5, bias_init="uniform")
    options.update(dict(drop_x=0.2, drop_i=0.3, drop_h=0.4, drop_o=0.3, forget_bias=1.0))
    torch.manual_seed(0)
    return LSTMLanguageModel(LSTMConfig(**{**options, **overrides})).double()


def _run(model, recurrence: bool, monkeypatch, state=None, masks=None, seed=1):
    """Logits, final state and every parameter's gradient, with the path forced."""
    monkeypatch.setattr(lstm_recurrence, "USE_RECURRENCE", recurrence)
    model.zero_grad()
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    if state is None:
        state = model.initial_state(B)
    torch.manual_seed(seed)  # the per-step draws: the same on both paths
    logits, (h, c) = model(tokens, state, masks)
    (logits.sin().sum() + h.sum() + 2 * c.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), h.detach(), c.detach(), grads


def _assert_same(a, b):
    for x, y in zip(a[:3], b[:3], strict=True):
        torch.testing.assert_close(x, y, **TOL)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], **TOL, msg=name)


ZONEOUT_SETTINGS = [
    dict(),
    dict(z_cells=0.5, z_states=0.05),
    dict(z_cells=0.3, z_states=0.4, drop_igates=0.3),
    dict(drop_igates=0.5, forget_bias=0.0),
]


@pytest.mark.parametrize("settings", ZONEOUT_SETTINGS)
@pytest.mark.parametrize("training", [True, False])
def test_zoneout_recurrence_equals_the_loop(monkeypatch, settings, training):
    model = _zoneout_model(**settings)
    model.train(training)
    fast, loop = _run(model, True, monkeypatch), _run(model, False, monkeypatch)
    _assert_same(fast, loop)
    # every parameter got a gradient, the learned initial state included
    assert fast[3].keys() == dict(model.named_parameters()).keys()
    assert fast[3]["layers.0.initial_h"].abs().sum() > 0
    assert fast[3]["layers.1.initial_c"].abs().sum() > 0


@pytest.mark.parametrize("settings", ZONEOUT_SETTINGS[1:])
def test_zoneout_masks_act_and_follow_the_seed(monkeypatch, settings):
    model = _zoneout_model(**settings)
    model.train()
    first = _run(model, True, monkeypatch, seed=1)
    _assert_same(first, _run(model, True, monkeypatch, seed=1))
    other_draws = _run(model, True, monkeypatch, seed=2)
    assert not torch.allclose(first[0], other_draws[0])
    model.eval()  # the expectation, not a draw
    assert not torch.allclose(first[0], _run(model, True, monkeypatch, seed=1)[0])


def test_zoneout_carried_state(monkeypatch):
    """A state carried from an earlier window (not the learned one) gets the same
    outputs and gradients too."""
    model = _zoneout_model(z_cells=0.5, z_states=0.2)
    model.train()
    generator = torch.Generator().manual_seed(7)
    state = tuple(torch.rand(2, B, H, generator=generator, dtype=torch.float64) for _ in "hc")
    fast = _run(model, True, monkeypatch, state=state)
    _assert_same(fast, _run(model, False, monkeypatch, state=state))
    assert "layers.0.initial_h" not in fast[3]  # a carried state does not reach it


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_gal_recurrence_equals_the_loop(monkeypatch, training, num_layers):
    model = _gal_model(num_layers=num_layers, dropout=0.25)
    model.train(training)
    torch.manual_seed(5)
    masks = model.draw_masks(torch.randint(0, V, (B, T))) if training else None
    generator = torch.Generator().manual_seed(9)
    state = tuple(
        torch.rand(num_layers, B, H, generator=generator, dtype=torch.float64) for _ in "hc"
    )
    fast = _run(model, True, monkeypatch, state=state, masks=masks)
    _assert_same(fast, _run(model, False, monkeypatch, state=state, masks=masks))
    if training:  # the recurrent mask acted: without it the logits differ
        unmasked = {**masks, "h": [None] * num_layers}
        assert not torch.allclose(fast[0], _run(model, False, monkeypatch, state, unmasked)[0])


def _count_calls(monkeypatch, owner, name) -> list:
    """The list each call of owner.name is appended to from now on."""
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_models_use_the_recurrence_unless_switched_off(monkeypatch):
    calls = _count_calls(monkeypatch, lstm_recurrence._Recurrence, "apply")
    zoneout = _zoneout_model(z_cells=0.5)
    gal = _gal_model(num_layers=2)
    gal.train()
    _run(zoneout, True, monkeypatch)
    assert len(calls) == 2  # one per layer
    _run(gal, True, monkeypatch)
    assert len(calls) == 4  # both layers have a recurrent mask
    _run(zoneout, False, monkeypatch)
    _run(gal, False, monkeypatch)
    assert len(calls) == 4
    no_gal_mask = _gal_model(num_layers=2, drop_h=0.0)
    no_gal_mask.train()
    _run(no_gal_mask, True, monkeypatch)
    assert len(calls) == 4  # a standard LSTM layer: torch's fused kernel, as before


def test_without_gradients_nothing_is_kept(monkeypatch):
    """Evaluation (no_grad) runs the same loop without the autograd Function."""
    function_calls = _count_calls(monkeypatch, lstm_recurrence._Recurrence, "apply")
    calls = _count_calls(monkeypatch, lstm_recurrence, "recurrence")
    model = _zoneout_model(z_cells=0.5, z_states=0.05)
    model.eval()
    tokens = torch.randint(0, V, (B, T))
    with torch.no_grad():
        fast = model(tokens, model.initial_state(B))[0]
    assert len(calls) == 2 and function_calls == []
    monkeypatch.setattr(lstm_recurrence, "USE_RECURRENCE", False)
    with torch.no_grad():
        torch.testing.assert_close(fast, model(tokens, model.initial_state(B))[0], **TOL)


def test_float32_close_to_the_loop(monkeypatch):
    """float32 (oneDNN's products on the CPU) rounds differently, but only by rounding."""
    model = _zoneout_model(z_cells=0.5, z_states=0.05, drop_igates=0.2).float()
    model.train()
    monkeypatch.setattr(lstm_recurrence, "USE_RECURRENCE", True)
    fast = _run(model, True, monkeypatch)
    loop = _run(model, False, monkeypatch)
    for x, y in zip(fast[:3], loop[:3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for name in fast[3]:
        torch.testing.assert_close(fast[3][name], loop[3][name], rtol=1e-3, atol=1e-5)


def _keep_switches(monkeypatch):
    """Restore, after the test, every switch that pinning a run directory sets."""
    from rhn_cli.models import charrnn_lstm, grid_lstm

    monkeypatch.setattr(lstm_recurrence, "USE_RECURRENCE", True)
    for module in (lstm, charrnn_lstm, grid_lstm):
        monkeypatch.setattr(module, "USE_FUSED", module.USE_FUSED)


def test_a_run_keeps_its_recorded_path(tmp_path, monkeypatch):
    _keep_switches(monkeypatch)
    assert recording.kernel_facts()["lstm_recurrence"] is True
    (tmp_path / "info.json").write_text(json.dumps({"kernels": {"lstm_fused": True}}))
    recording.pin_recorded_decisions(tmp_path)  # recorded before the recurrence: the loop
    assert lstm_recurrence.USE_RECURRENCE is False
    assert recording.kernel_facts()["lstm_recurrence"] is False
    facts = {"lstm_fused": True, "lstm_recurrence": True}
    (tmp_path / "info.json").write_text(json.dumps({"kernels": facts}))
    recording.pin_recorded_decisions(tmp_path)
    assert lstm_recurrence.USE_RECURRENCE is True


ZONEOUT_RUN = ["model=zoneout_lstm", "hidden_size=8", "num_layers=1", "z_cells=0.3"]
ZONEOUT_RUN += ["batch_size=4", "num_steps=5", "synthetic.train_tokens=2000"]


@pytest.mark.parametrize("recorded", [True, False])
def test_evaluate_and_resume_compute_on_the_recorded_path(monkeypatch, runner, tmp_path, recorded):
    """A Zoneout LSTM run records the recurrence; one recorded without the fact (before the
    recurrence existed) is evaluated and resumed on the autograd loop, and says so."""
    from rhn_cli.cli import cli

    _keep_switches(monkeypatch)
    run = ["with", *ZONEOUT_RUN, "max_max_epoch=2", "max_time=0.001"]
    stopped = runner.invoke(cli, ["train", *run])
    assert stopped.exit_code == 0 and "TIMEOUT" in stopped.output, stopped.output
    info_path = tmp_path / "runs" / "1" / "info.json"
    info = json.loads(info_path.read_text())
    assert info["kernels"]["lstm_recurrence"] is True
    if not recorded:
        del info["kernels"]["lstm_recurrence"]
        info_path.write_text(json.dumps(info))
    calls = _count_calls(monkeypatch, lstm_recurrence, "recurrence")
    resumed = runner.invoke(cli, ["train", "--resume", "1", "with", "max_time=None"])
    assert resumed.exit_code == 0, resumed.output
    assert bool(calls) is recorded
    assert json.loads(info_path.read_text())["kernels"]["lstm_recurrence"] is recorded
    monkeypatch.setattr(lstm_recurrence, "USE_RECURRENCE", True)  # as a fresh process
    calls.clear()
    evaluated = runner.invoke(cli, ["evaluate", "1", "--split", "valid"])
    assert evaluated.exit_code == 0, evaluated.output
    assert bool(calls) is recorded
    evaluation = json.loads((tmp_path / "runs" / "2" / "info.json").read_text())
    assert evaluation["kernels"]["lstm_recurrence"] is recorded


@pytest.mark.parametrize("gal", [False, True])
def test_runs_on_other_devices_without_host_syncs(gal):
    """Only torch operations on the inputs' device: forward and backward run on the 'meta'
    device, where a NumPy call or a host sync would raise (as CUDA would need them)."""
    meta = dict(device="meta", dtype=torch.float32)
    projected = torch.empty(B, T, 4 * H, requires_grad=True, **meta)
    h, c = (torch.empty(B, H, requires_grad=True, **meta) for _ in "hc")
    weight = torch.empty(H, 4 * H, requires_grad=True, **meta)
    if gal:
        cell, mask = lstm_recurrence.Cell(lstm_recurrence.TF_GATES, 1.0), torch.empty(B, H, **meta)
    else:
        cell, mask = lstm_recurrence.Cell(drop_igates=0.2, z_cells=0.5, z_states=0.1), None
        cell = cell._replace(training=True)
    outputs, h_n, c_n = lstm_recurrence.recurrence(projected, h, c, weight, cell, mask)
    (outputs.sum() + h_n.sum() + c_n.sum()).backward()
    assert outputs.shape == (B, T, H) and outputs.is_contiguous()
    assert projected.grad.shape == projected.shape and weight.grad.shape == weight.shape
    assert h.grad.device.type == "meta" and c.grad.shape == (B, H)


@pytest.mark.parametrize("weight_gradients", ["mkl", "onednn"])
def test_float32_input_projection_on_onednn_is_the_product_to_rounding(
    monkeypatch, weight_gradients
):
    """``input_projection`` in float32 on the CPU: oneDNN's x W + b, and its gradients for x,
    W (in the library the machine's decision names, both tried) and b, equal autograd's
    ATen products to float32 rounding, also for a time-major incoming gradient."""
    from rhn_cli.kernels import onednn, weight_gradient

    if not onednn.applies(torch.float32):
        pytest.skip("this torch build has no oneDNN products")
    monkeypatch.setattr(weight_gradient, "through_onednn", lambda *a: weight_gradients == "onednn")
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(4, 6, 512, generator=generator, requires_grad=True)
    weight = torch.randn(640, 4 * 96, generator=generator)[:512].requires_grad_(True)
    bias = torch.randn(4 * 96, generator=generator, requires_grad=True)
    d_time_major = torch.randn(6, 4, 4 * 96, generator=generator).transpose(0, 1)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(lstm_recurrence, "ONEDNN_PRODUCTS", on)
        for t in (inputs, weight, bias):
            t.grad = None
        projected = lstm_recurrence.input_projection(inputs, weight, bias)
        assert (projected.grad_fn.name() == "_LinearBackward") is on
        projected.backward(d_time_major)
        results[on] = [projected.detach(), inputs.grad, weight.grad, bias.grad]
    assert not torch.equal(results[True][0], results[False][0])  # oneDNN's product was taken
    for got, want in zip(results[True], results[False], strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_a_gal_model_in_float32_on_onednn_rounds_only(monkeypatch):
    """The Gal layers' products through oneDNN (projection, dW): the model's logits, state
    and gradients are the ATen products' to float32 rounding."""
    from rhn_cli.kernels import onednn

    if not onednn.applies(torch.float32):
        pytest.skip("this torch build has no oneDNN products")
    model = _gal_model(hidden_size=96, num_layers=2).float()
    model.train()
    projections = _count_calls(monkeypatch, projection, "linear")
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(lstm_recurrence, "ONEDNN_PRODUCTS", on)
        runs[on] = _run(model, True, monkeypatch)
        assert len(projections) == (2 if on else 0)  # each layer's, with the switch only
        projections.clear()
    for x, y in zip(runs[True][:3], runs[False][:3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for name in runs[False][3]:
        torch.testing.assert_close(runs[True][3][name], runs[False][3][name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("kernels", "on_onednn"),
    [
        ({"lstm_recurrence": True, "lstm_recurrence_onednn": True}, True),
        ({"lstm_recurrence": True, "lstm_recurrence_onednn": False}, False),
        ({"lstm_recurrence": True}, False),  # recorded before the oneDNN products
    ],
)
def test_a_run_keeps_the_products_it_recorded(pin_as_recorded, monkeypatch, kernels, on_onednn):
    _keep_switches(monkeypatch)
    assert recording.kernel_facts()["lstm_recurrence_onednn"] is True  # a new run's
    pin_as_recorded(kernels)
    assert lstm_recurrence.ONEDNN_PRODUCTS is on_onednn
    assert recording.kernel_facts()["lstm_recurrence_onednn"] is on_onednn
