"""Independent checks of the WildML tutorial GRU and the Zaremba / Gal LSTM language models.

References: ``/work/shared/spec/peers_zoneout_grid_gru.md`` §3.2 (dennybritz/rnn-tutorial-
gru-lstm ``gru_theano.py``), the torch.nn.GRU equations, TF's ``BasicLSTMCell`` as used by
the TF PTB tutorial (Zaremba et al. 2014) and Gal & Ghahramani's variational dropout.

Expectations are computed without the implementation's code path: the cells are
re-derived step by step in float64 NumPy (time outer, layers inner, as the references
run them), parameter counts are literals of the TF model, and the dropout semantics are
pinned through observable behaviour (masks recovered from a layer's inputs and outputs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rhn_cli.models.gru import GRUConfig, GRULanguageModel
from rhn_cli.models.gru import build as build_gru
from rhn_cli.models.lstm import LSTMConfig, LSTMLanguageModel
from rhn_cli.models.lstm import build as build_lstm

TOL = 1e-10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _theano_hard_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


def _np_params(model) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().astype(np.float64) for name, p in model.named_parameters()}


def _randomise(model, rng: np.random.Generator, std: float) -> None:
    """Overwrite every parameter with N(0, std^2) so that every term matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(0.0, std, size=tuple(p.shape))))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# --------------------------------------------------------------------------------------
# GRU: NumPy references
# --------------------------------------------------------------------------------------


def reference_tutorial_gru(
    params,
    tokens,
    state,
    num_layers,
    *,
    z_states=0.0,
    gate=_theano_hard_sigmoid,
    reset_before_product=True,
):
    """Spec §3.2 step by step, with zoneout's eval expectation. ``gate`` and
    ``reset_before_product`` exist only to show the test would see other choices.

    Returns logits [B, T, V], final state [L, B, H] and all gate pre-activations.
    """
    E = params["embedding.weight"]  # [V, H]: row w is the reference's E[:, w]
    B, T = tokens.shape
    s = [state[layer].copy() for layer in range(num_layers)]
    tops, pre_gates = [], []
    for t in range(T):
        x = E[tokens[:, t]]
        for layer in range(num_layers):
            U = params[f"layers.{layer}.U"]
            W = params[f"layers.{layer}.W"]
            b = params[f"layers.{layer}.b"]
            prev = s[layer]
            a_z = x @ U[0].T + prev @ W[0].T + b[0]
            a_r = x @ U[1].T + prev @ W[1].T + b[1]
            pre_gates += [a_z, a_r]
            z, r = gate(a_z), gate(a_r)
            if reset_before_product:
                c = np.tanh(x @ U[2].T + (prev * r) @ W[2].T + b[2])
            else:
                c = np.tanh(x @ U[2].T + r * (prev @ W[2].T) + b[2])
            new = (1.0 - z) * c + z * prev
            s[layer] = z_states * prev + (1.0 - z_states) * new
            x = s[layer]
        tops.append(x)
    y = np.stack(tops, axis=1)
    logits = y @ params["output_weight"].T + params["output_bias"]
    return logits, np.stack(s), np.concatenate(pre_gates)


def _standard_gru_step(params, layer, x, prev):
    """torch.nn.GRU equations (gate rows r, z, n); returns the un-zoned new state."""
    W_i = params[f"layers.{layer}.gru.weight_ih_l0"]
    W_h = params[f"layers.{layer}.gru.weight_hh_l0"]
    b_i = params[f"layers.{layer}.gru.bias_ih_l0"]
    b_h = params[f"layers.{layer}.gru.bias_hh_l0"]
    H = prev.shape[1]
    W_ir, W_iz, W_in = W_i[:H], W_i[H : 2 * H], W_i[2 * H :]
    W_hr, W_hz, W_hn = W_h[:H], W_h[H : 2 * H], W_h[2 * H :]
    r = _sigmoid(x @ W_ir.T + b_i[:H] + prev @ W_hr.T + b_h[:H])
    z = _sigmoid(x @ W_iz.T + b_i[H : 2 * H] + prev @ W_hz.T + b_h[H : 2 * H])
    n = np.tanh(x @ W_in.T + b_i[2 * H :] + r * (prev @ W_hn.T + b_h[2 * H :]))
    return (1.0 - z) * n + z * prev


def reference_standard_gru(params, tokens, state, num_layers, *, z_states=0.0):
    E = params["embedding.weight"]
    B, T = tokens.shape
    s = [state[layer].copy() for layer in range(num_layers)]
    tops = []
    for t in range(T):
        x = E[tokens[:, t]]
        for layer in range(num_layers):
            new = _standard_gru_step(params, layer, x, s[layer])
            s[layer] = z_states * s[layer] + (1.0 - z_states) * new
            x = s[layer]
        tops.append(x)
    logits = np.stack(tops, axis=1) @ params["output_weight"].T + params["output_bias"]
    return logits, np.stack(s)


def _gru(V=7, H=4, L=2, variant="tutorial", z_states=0.0) -> GRULanguageModel:
    return GRULanguageModel(
        GRUConfig(V, H, num_layers=L, gru_variant=variant, z_states=z_states)
    ).double()


# --------------------------------------------------------------------------------------
# GRU tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("z_states", [0.0, 0.3])
def test_tutorial_gru_matches_reference(z_states):
    """Hard sigmoid clip(0.2x + 0.5, 0, 1) in and out of its linear range, the reset gate
    applied to s_{t-1} before W_2, s = (1-z) c + z s_{t-1}, two stacked layers, the
    output layer on the top state; with z_states, eval uses the zoneout expectation."""
    rng = np.random.default_rng(0)
    model = _gru(z_states=z_states).eval()
    _randomise(model, rng, 1.5)
    B, T = 3, 6
    tokens = rng.integers(0, 7, size=(B, T))
    state = rng.uniform(-1, 1, size=(2, B, 4))
    logits, final, hidden = model(
        torch.from_numpy(tokens), torch.from_numpy(state.copy()), return_hidden=True
    )
    params = _np_params(model)
    ref_logits, ref_final, pre = reference_tutorial_gru(params, tokens, state, 2, z_states=z_states)
    np.testing.assert_allclose(_np(logits), ref_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(_np(final), ref_final, rtol=0, atol=TOL)
    assert hidden.shape == (B, T, 4)
    np.testing.assert_allclose(_np(hidden[:, -1]), ref_final[-1], rtol=0, atol=TOL)
    # The inputs exercise both the saturated and the linear part of the hard sigmoid.
    saturated = np.mean(np.abs(pre) >= 2.5)
    assert 0.1 < saturated < 0.9
    # ... so the comparison tells apart the neighbouring choices.
    for other in (
        dict(gate=_sigmoid),
        dict(gate=lambda a: np.clip(a / 6.0 + 0.5, 0.0, 1.0)),  # torch's F.hardsigmoid
        dict(reset_before_product=False),
    ):
        alt, _, _ = reference_tutorial_gru(params, tokens, state, 2, z_states=z_states, **other)
        assert np.abs(alt - ref_logits).max() > 1e-3


@pytest.mark.parametrize("z_states", [0.0, 0.4], ids=["nn.GRU", "stepwise"])
def test_standard_gru_matches_torch_equations(z_states):
    """The 'standard' variant: logistic gates, reset after the recurrent product, two
    biases (nn.GRU without zoneout, the same equations step by step with it)."""
    rng = np.random.default_rng(1)
    model = _gru(variant="standard", z_states=z_states).eval()
    _randomise(model, rng, 1.0)
    B, T = 2, 5
    tokens = rng.integers(0, 7, size=(B, T))
    state = rng.uniform(-1, 1, size=(2, B, 4))
    logits, final = model(torch.from_numpy(tokens), torch.from_numpy(state.copy()))
    ref_logits, ref_final = reference_standard_gru(
        _np_params(model), tokens, state, 2, z_states=z_states
    )
    np.testing.assert_allclose(_np(logits), ref_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(_np(final), ref_final, rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", ["tutorial", "standard"])
def test_gru_zoneout_train_keeps_old_or_takes_new(variant):
    """Train-mode zoneout: every unit of s_t is either s_{t-1} or the cell's new value
    (a fresh choice per unit and step), both happen, about z of the time the old one."""
    rng = np.random.default_rng(2)
    z = 0.5
    model = _gru(V=5, H=6, L=1, variant=variant, z_states=z).train()
    _randomise(model, rng, 1.0)
    B, T = 4, 12
    tokens = rng.integers(0, 5, size=(B, T))
    state = rng.uniform(-1, 1, size=(1, B, 6))
    _, final, hidden = model(
        torch.from_numpy(tokens), torch.from_numpy(state.copy()), return_hidden=True
    )
    params = _np_params(model)
    observed = _np(hidden)
    prev = state[0]
    kept_counts = []
    for t in range(T):
        x = params["embedding.weight"][tokens[:, t]]
        if variant == "tutorial":
            _, new, _ = reference_tutorial_gru(params, tokens[:, t : t + 1], prev[None], 1)
            new = new[0]
        else:
            new = _standard_gru_step(params, 0, x, prev)
        s = observed[:, t]
        is_old = np.isclose(s, prev, rtol=0, atol=TOL)
        is_new = np.isclose(s, new, rtol=0, atol=TOL)
        assert np.all(is_old | is_new)
        kept_counts.append(is_old.mean())
        prev = s
    assert 0.3 < np.mean(kept_counts) < 0.7
    np.testing.assert_allclose(_np(final[0]), observed[:, -1], rtol=0, atol=0)


def test_gru_gradients_state_and_describe():
    model = _gru(variant="tutorial", z_states=0.1).train()
    tokens = torch.randint(0, 7, (2, 5))
    state = model.initial_state(2)
    assert state.shape == (2, 2, 4) and not state.any()
    logits, final = model(tokens, state)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.describe() == "GRU 2 x 4 units (hard-sigmoid gates, zoneout 0.1)"


@pytest.mark.parametrize(
    ("variant", "expected"), [("tutorial", 2_253_376), ("standard", 2_254_144)]
)
def test_gru_parameter_count_and_build(variant, expected):
    """V=8000, H=128, 2 layers: E and V 8000*128 each, c 8000; per layer U, W 3*128*128
    each and b 3*128 (tutorial) or two biases of 3*128 (nn.GRU)."""
    config = {"hidden_size": 128, "num_layers": 2, "gru_variant": variant, "z_states": 0.0}
    with torch.device("meta"):
        model = build_gru(config, 8000)
    assert model.num_parameters() == expected
    assert model.embedding.weight.shape == (8000, 128)


def test_gru_initialisation():
    """E ~ U(+-sqrt(1/V)); U, W, output weight ~ U(+-sqrt(1/H)); every bias 0."""
    V, H = 400, 25
    for variant in ("tutorial", "standard"):
        model = GRULanguageModel(GRUConfig(V, H, gru_variant=variant))
        for name, p in model.named_parameters():
            values = p.detach().abs()
            if name == "embedding.weight":
                bound = (1.0 / V) ** 0.5
            elif name.endswith(".b") or "bias" in name:
                assert not values.any(), name
                continue
            else:
                bound = (1.0 / H) ** 0.5
            assert values.max() <= bound and values.max() > 0.95 * bound, name
            assert 0.4 * bound < values.mean() < 0.6 * bound, name  # uniform: mean |x| = b/2


def test_gru_rejects_unknown_variant():
    with pytest.raises(ValueError, match="gru_variant"):
        GRUConfig(10, 4, gru_variant="cudnn")


# --------------------------------------------------------------------------------------
# LSTM: NumPy reference (TF BasicLSTMCell)
# --------------------------------------------------------------------------------------


def _lstm_cell(W, b, x, h, c, forget_bias):
    """TF BasicLSTMCell: [x, h] W + b split into i, j, f, o."""
    a = np.concatenate([x, h], axis=1) @ W + b
    i, j, f, o = np.split(a, 4, axis=1)
    c = c * _sigmoid(f + forget_bias) + _sigmoid(i) * np.tanh(j)
    h = np.tanh(c) * _sigmoid(o)
    return h, c


def reference_lstm(params, tokens, state, *, num_layers, tied, forget_bias, masks=None):
    """Step by step; ``masks`` (NumPy, the draw_masks layout) are reused at every step."""
    E = params["embedding.weight"]
    B, T = tokens.shape
    H = E.shape[1]
    if masks is None:
        ones = np.ones((B, H))
        masks = {"x": np.ones((B, T, 1)), "i": [ones] * num_layers, "h": [ones] * num_layers}
        masks["o"] = ones
    h = [state[0][layer].copy() for layer in range(num_layers)]
    c = [state[1][layer].copy() for layer in range(num_layers)]
    tops = []
    for t in range(T):
        x = E[tokens[:, t]] * masks["x"][:, t]
        for layer in range(num_layers):
            W, b = params[f"layers.{layer}.weight"], params[f"layers.{layer}.bias"]
            h[layer], c[layer] = _lstm_cell(
                W,
                b,
                x * masks["i"][layer],
                h[layer] * masks["h"][layer],  # only the copy feeding the product
                c[layer],
                forget_bias,
            )
            x = h[layer]
        tops.append(x * masks["o"])
    W_out = E if tied else params["output_weight"]
    logits = np.stack(tops, axis=1) @ W_out.T + params["output_bias"]
    return logits, (np.stack(h), np.stack(c))


def _lstm(tied=False, forget_bias=0.0, L=2, V=7, H=4, **drops) -> LSTMLanguageModel:
    # Uniform cell biases, not the default zeros: the comparisons must exercise the bias.
    cfg = LSTMConfig(
        V, H, num_layers=L, tied=tied, init_scale=0.5, forget_bias=forget_bias, bias_init="uniform"
    )
    cfg = LSTMConfig(**{**cfg.__dict__, **drops})
    return LSTMLanguageModel(cfg).double()


def _random_state(rng, L, B, H):
    return rng.uniform(-1, 1, size=(L, B, H)), rng.uniform(-1, 1, size=(L, B, H))


def _torch_state(state):
    return tuple(torch.from_numpy(s.copy()) for s in state)


def _inverted(rng, shape, drop):
    return (rng.random(shape) >= drop).astype(np.float64) / (1.0 - drop)


def _hand_masks(rng, B, T, H, L):
    return {
        "x": _inverted(rng, (B, T, 1), 0.3),
        "i": [_inverted(rng, (B, H), 0.5) for _ in range(L)],
        "h": [_inverted(rng, (B, H), 0.4) for _ in range(L)],
        "o": _inverted(rng, (B, H), 0.5),
    }


def _masks_to_torch(masks):
    return {
        "x": torch.from_numpy(masks["x"]),
        "i": [torch.from_numpy(m) for m in masks["i"]],
        "h": [torch.from_numpy(m) for m in masks["h"]],
        "o": torch.from_numpy(masks["o"]),
    }


# --------------------------------------------------------------------------------------
# LSTM tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("forget_bias", [0.0, 1.0])
def test_lstm_eval_matches_tf_basic_lstm_cell(tied, forget_bias):
    """One [in+H, 4H] weight and one bias per layer, gates i, j, f, o, forget_bias added
    to f; tied output = embedding^T plus a bias. Eval mode ignores every dropout."""
    rng = np.random.default_rng(3)
    model = _lstm(
        tied, forget_bias, dropout=0.5, drop_x=0.3, drop_i=0.5, drop_h=0.3, drop_o=0.5
    ).eval()
    _randomise(model, rng, 1.0)
    B, T = 3, 5
    tokens = rng.integers(0, 7, size=(B, T))
    state = _random_state(rng, 2, B, 4)
    logits, (h, c), hidden = model(
        torch.from_numpy(tokens), _torch_state(state), return_hidden=True
    )
    params = _np_params(model)
    assert ("output_weight" in params) == (not tied)
    ref_logits, (ref_h, ref_c) = reference_lstm(
        params, tokens, state, num_layers=2, tied=tied, forget_bias=forget_bias
    )
    np.testing.assert_allclose(_np(logits), ref_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(_np(h), ref_h, rtol=0, atol=TOL)
    np.testing.assert_allclose(_np(c), ref_c, rtol=0, atol=TOL)
    np.testing.assert_allclose(_np(hidden[:, -1]), ref_h[-1], rtol=0, atol=TOL)
    # Deterministic, and the other forget bias would have been visible.
    again, _ = model(torch.from_numpy(tokens), _torch_state(state))
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    other, _ = reference_lstm(
        params, tokens, state, num_layers=2, tied=tied, forget_bias=1.0 - forget_bias
    )
    assert np.abs(other - ref_logits).max() > 1e-3


def test_lstm_variational_masks_are_reused_at_every_step():
    """Given masks (the draw_masks layout), train mode equals the reference with those
    masks held fixed over time: x per step row, i on each layer's input, h on the
    h_{t-1} feeding the product only, o on the top output. Each mask matters."""
    rng = np.random.default_rng(4)
    model = _lstm(drop_x=0.3, drop_i=0.5, drop_h=0.4, drop_o=0.5).train()
    _randomise(model, rng, 1.0)
    B, T, H = 3, 6, 4
    tokens = rng.integers(0, 7, size=(B, T))
    state = _random_state(rng, 2, B, H)
    masks = _hand_masks(rng, B, T, H, 2)
    for layer in range(2):  # both dropped and kept entries in every layer mask
        masks["h"][layer][0, :2] = [0.0, 1.0 / 0.6]
        masks["i"][layer][1, :2] = [0.0, 2.0]
    params = _np_params(model)

    def run(m):
        got, (h, c) = model(torch.from_numpy(tokens), _torch_state(state), _masks_to_torch(m))
        ref, (ref_h, ref_c) = reference_lstm(
            params, tokens, state, num_layers=2, tied=False, forget_bias=0.0, masks=m
        )
        np.testing.assert_allclose(_np(got), ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(_np(h), ref_h, rtol=0, atol=TOL)
        np.testing.assert_allclose(_np(c), ref_c, rtol=0, atol=TOL)
        return ref

    ref = run(masks)
    ones = {
        "x": np.ones((B, T, 1)),
        "i": [np.ones((B, H))] * 2,
        "h": [np.ones((B, H))] * 2,
        "o": np.ones((B, H)),
    }
    ref_ones = run(ones)
    assert not np.allclose(ref, ref_ones)
    for key in ("x", "i", "h", "o"):
        assert not np.allclose(run({**ones, key: masks[key]}), ref_ones), key


def test_lstm_draw_masks_layout_and_use():
    """draw_masks returns the RHN layout; forward(masks=None) in train mode draws them
    once through draw_masks; the embedding mask is tied per word type within a row."""
    model = _lstm(drop_x=0.5, drop_i=0.75, drop_h=0.0, drop_o=0.25).train()
    tokens = torch.tensor([[1, 2, 1, 3, 1, 2], [4, 4, 4, 4, 0, 0]])
    masks = model.draw_masks(tokens)
    assert set(masks) == {"x", "i", "h", "o"}
    assert masks["x"].shape == (2, 6, 1)
    assert len(masks["i"]) == len(masks["h"]) == 2
    assert all(m.shape == (2, 4) for m in masks["i"])
    assert masks["h"] == [None, None]  # drop_h = 0: nothing to multiply
    assert masks["o"].shape == (2, 4)
    for m, keep in ((masks["x"], 0.5), (masks["i"][0], 0.25), (masks["o"], 0.75)):
        assert set(np.unique(_np(m))) <= {0.0, 1.0 / keep}
    x = _np(masks["x"])[..., 0]
    for row in range(2):
        for token in np.unique(_np(tokens[row])):
            assert np.unique(x[row][_np(tokens[row]) == token]).size == 1

    state = model.initial_state(2)
    torch.manual_seed(7)
    drawn, _ = model(tokens, state)
    torch.manual_seed(7)
    given, _ = model(tokens, state, model.draw_masks(tokens))
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)

    quiet = _lstm().train()
    assert quiet.draw_masks(tokens) == {"x": None, "i": [None, None], "h": [None, None], "o": None}


def test_lstm_zaremba_dropout_fresh_per_step_never_recurrent():
    """Zaremba dropout, recovered from what each layer receives and returns: the
    embedding output, the layer-1 -> layer-2 connection and the top output are each
    multiplied by {0, 1/keep} masks that change from step to step (constant input);
    each layer's outputs and the final state follow the cell with the UNdropped h_{t-1}
    and c_{t-1}, so the recurrent path is never dropped."""
    rng = np.random.default_rng(5)
    V, H, L, B, T, drop = 6, 4, 2, 3, 10, 0.5
    model = _lstm(V=V, H=H, L=L, dropout=drop).train()
    _randomise(model, rng, 1.0)
    params = _np_params(model)
    tokens = np.full((B, T), 2)
    state = _random_state(rng, L, B, H)
    seen = {}

    def capture(index):
        def hook(module, args, output):
            seen[index] = (_np(args[0]), args[3], _np(output[0]))

        return hook

    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(model.layers)]
    try:
        logits, (h, c), hidden = model(
            torch.from_numpy(tokens), _torch_state(state), return_hidden=True
        )
    finally:
        for handle in handles:
            handle.remove()

    def check_mask(dropped, undropped):
        ratio = dropped / undropped
        is_zero = np.isclose(ratio, 0.0, atol=1e-9)
        is_kept = np.isclose(ratio, 1.0 / (1.0 - drop), atol=1e-9)
        assert np.all(is_zero | is_kept)
        assert 0.3 < is_zero.mean() < 0.7
        for row in range(B):  # a fresh mask per step: the rows over time differ
            assert np.unique(is_zero[row], axis=0).shape[0] > 1
        return is_zero

    embedded = params["embedding.weight"][tokens]
    check_mask(seen[0][0], embedded)
    check_mask(seen[1][0], seen[0][2])
    # Top output: logits - b = (hidden * m) W_out^T, W_out [V, H] with V > H.
    y = np.linalg.lstsq(
        params["output_weight"], (_np(logits) - params["output_bias"]).reshape(-1, V).T, rcond=None
    )[0].T.reshape(B, T, H)
    check_mask(y, _np(hidden))
    np.testing.assert_allclose(_np(hidden), seen[1][2], rtol=0, atol=0)

    # Recurrence from the captured (dropped) inputs with the undropped state.
    for layer in range(L):
        inputs, state_mask, outputs = seen[layer]
        assert state_mask is None
        hl, cl = state[0][layer], state[1][layer]
        W, b = params[f"layers.{layer}.weight"], params[f"layers.{layer}.bias"]
        for t in range(T):
            hl, cl = _lstm_cell(W, b, inputs[:, t], hl, cl, 0.0)
            np.testing.assert_allclose(outputs[:, t], hl, rtol=0, atol=TOL)
        np.testing.assert_allclose(_np(h[layer]), hl, rtol=0, atol=TOL)
        np.testing.assert_allclose(_np(c[layer]), cl, rtol=0, atol=TOL)


def test_lstm_both_dropouts_train_and_gradients():
    """Both kinds at once run, change the output, and every parameter gets a gradient."""
    model = _lstm(tied=True, dropout=0.3, drop_x=0.2, drop_i=0.3, drop_h=0.2, drop_o=0.3)
    tokens = torch.randint(0, 7, (3, 5))
    model.eval()
    clean, _ = model(tokens, model.initial_state(3))
    model.train()
    logits, (h, c) = model(tokens, model.initial_state(3))
    assert not torch.allclose(clean, logits)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.describe() == (
        "LSTM 2 x 4 units, tied, dropout 0.3, variational dropout x/i/h/o 0.2/0.3/0.2/0.3"
    )


def test_lstm_state_carries_between_windows():
    """Truncated BPTT: two windows with the carried state equal one long window."""
    model = _lstm().eval()
    tokens = torch.randint(0, 7, (2, 8))
    state = model.initial_state(2)
    assert all(s.shape == (2, 2, 4) and not s.any() for s in state)
    full, (h, c) = model(tokens, state)
    first, mid = model(tokens[:, :3], state)
    second, (h2, c2) = model(tokens[:, 3:], mid)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=TOL)
    torch.testing.assert_close((h2, c2), (h, c), rtol=0, atol=TOL)


@pytest.mark.parametrize(
    ("H", "expected"),
    [(200, 4_651_600), (650, 19_775_200), (1500, 66_022_000)],
    ids=["small", "medium", "large"],
)
def test_lstm_parameter_count_matches_tf(H, expected):
    """V=10000, 2 layers, untied: the TF PTB tutorial's variable sizes."""
    config = {
        "hidden_size": H,
        "num_layers": 2,
        "tied": False,
        "init_scale": 0.05,
        "forget_bias": None,
        "lstm_bias_init": "zeros",
        "dropout": 0.5,
        "drop_x": 0.0,
        "drop_i": 0.0,
        "drop_h": 0.0,
        "drop_o": 0.0,
    }
    with torch.device("meta"):
        model = build_lstm(config, 10000)
        tied = build_lstm({**config, "tied": True}, 10000)
    assert model.num_parameters() == expected
    assert tied.num_parameters() == expected - 10000 * H
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["layers.0.weight"] == (2 * H, 4 * H)
    assert shapes["layers.1.bias"] == (4 * H,)
    assert model.config.forget_bias == 0.0  # None: the TF tutorial's
