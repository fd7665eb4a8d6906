"""The tutorial GRU's hand-written recurrence: the same model as the autograd loop (the
reference), hard-sigmoid saturation included, and kept on the loop across a resume of a
run the loop computed."""

import json

import pytest
import torch

from rhn_cli.experiment import recording
from rhn_cli.kernels import gru_recurrence
from rhn_cli.models.gru import GRUConfig, GRULanguageModel

V, H = 30, 12


def _model(num_layers=2, **overrides) -> GRULanguageModel:
    torch.manual_seed(0)
    config = GRUConfig(vocab_size=V, hidden_size=H, num_layers=num_layers, **overrides)
    model = GRULanguageModel(config).double()
    with torch.no_grad():  # pre-activations well past +-2.5: many gates clip at 0 or 1
        for layer in model.layers:
            layer.W.mul_(4.0)
            layer.U.mul_(4.0)
            layer.b.uniform_(-3.0, 3.0)
    return model


def _run(model, recurrence: bool, monkeypatch, B, T):
    """Logits, final state and the gradients of the initial state and every parameter."""
    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", recurrence)
    model.zero_grad()
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, V, (B, T), generator=generator)
    s0 = torch.rand((model.config.num_layers, B, H), generator=generator, dtype=torch.float64)
    s0 = (s0 - 0.5).requires_grad_()
    logits, state = model(tokens, s0)
    (logits.sin().sum() + 2 * state.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), state.detach(), s0.grad, grads


@pytest.mark.parametrize(("num_layers", "B", "T"), [(2, 1, 22), (1, 3, 5), (2, 2, 1)])
def test_the_recurrence_equals_the_autograd_loop(monkeypatch, num_layers, B, T):
    model = _model(num_layers)
    fast = _run(model, True, monkeypatch, B, T)
    loop = _run(model, False, monkeypatch, B, T)
    for x, y in zip(fast[:3], loop[:3], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert fast[3].keys() == loop[3].keys()
    for name in fast[3]:
        torch.testing.assert_close(fast[3][name], loop[3][name], rtol=1e-12, atol=1e-12, msg=name)


def test_without_gradients_the_loop_keeps_nothing(monkeypatch):
    model = _model(2).eval()
    tokens = torch.randint(0, V, (2, 5))
    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", True)
    with torch.no_grad():
        fast, fast_state = model(tokens, model.initial_state(2))
    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", False)
    with torch.no_grad():
        loop, loop_state = model(tokens, model.initial_state(2))
    assert fast.grad_fn is None
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_state, loop_state, rtol=1e-12, atol=1e-12)


def _watch_recurrences(monkeypatch) -> list:
    """The list each call of the hand-written recurrence is appended to from now on."""
    calls = []
    recurrence = gru_recurrence.recurrence

    def counted(*args):
        calls.append(args)
        return recurrence(*args)

    monkeypatch.setattr(gru_recurrence, "recurrence", counted)
    return calls


def test_the_switch_and_zoneout_run_the_autograd_loop(monkeypatch):
    calls = _watch_recurrences(monkeypatch)
    _run(_model(2), True, monkeypatch, 1, 4)
    assert len(calls) == 2  # every layer
    calls.clear()
    _run(_model(2), False, monkeypatch, 1, 4)
    assert calls == []
    _run(_model(2, z_states=0.2), True, monkeypatch, 1, 4)  # zoneout: the loop's draws
    assert calls == []


def test_a_run_records_which_path_computed_it(monkeypatch):
    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", True)
    assert recording.kernel_facts()["gru_recurrence"] is True
    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", False)
    assert recording.kernel_facts()["gru_recurrence"] is False


@pytest.mark.parametrize(
    ("kernels", "fast"),
    [
        ({"native_loop": True, "gru_recurrence": True}, True),
        ({"native_loop": True, "gru_recurrence": False}, False),
        ({"native_loop": True, "charrnn_lstm_fused": True}, False),  # before the recurrence
        (None, False),  # recorded before rhn kept any kernel facts
    ],
)
def test_pinning_a_run_directory_sets_the_path_its_run_recorded(
    monkeypatch, pin_as_recorded, kernels, fast
):
    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", not fast)
    pin_as_recorded(kernels)
    assert gru_recurrence.USE_RECURRENCE is fast


SMALL_GRU_RUN = [
    "model=gru",
    "gru_variant=tutorial",
    "hidden_size=8",
    "num_layers=2",
    "max_max_epoch=2",
    "synthetic.train_tokens=6000",
    "synthetic.valid_tokens=2000",
    "synthetic.test_tokens=2000",
]


def test_resuming_a_run_recorded_on_the_loop_trains_on_the_loop(monkeypatch, runner, tmp_path):
    """A run computes with one path throughout: one recorded before the recurrence (no such
    fact in its info) continues on the autograd loop when resumed, and records so."""
    from rhn_cli.cli import cli

    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", True)
    stopped = runner.invoke(cli, ["train", "with", *SMALL_GRU_RUN, "max_time=0.001"])
    assert stopped.exit_code == 0 and "TIMEOUT" in stopped.output, stopped.output
    info_path = tmp_path / "runs" / "1" / "info.json"
    info = json.loads(info_path.read_text())
    assert info["kernels"]["gru_recurrence"] is True
    del info["kernels"]["gru_recurrence"]
    info_path.write_text(json.dumps(info))
    calls = _watch_recurrences(monkeypatch)
    resumed = runner.invoke(cli, ["train", "--resume", "1", "with", "max_time=None"])
    assert resumed.exit_code == 0 and "run 1 COMPLETED" in resumed.output, resumed.output
    assert calls == [], "the resumed run computed on the hand-written recurrence"
    assert json.loads(info_path.read_text())["kernels"]["gru_recurrence"] is False


def test_a_new_run_computes_on_the_recurrence(monkeypatch, runner, tmp_path):
    from rhn_cli.cli import cli

    monkeypatch.setattr(gru_recurrence, "USE_RECURRENCE", True)
    calls = _watch_recurrences(monkeypatch)
    trained = runner.invoke(cli, ["train", "with", *SMALL_GRU_RUN])
    assert trained.exit_code == 0, trained.output
    assert calls
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert info["kernels"]["gru_recurrence"] is True
