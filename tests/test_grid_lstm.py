"""Independent checks of the 2D Grid LSTM and the char-rnn stacked LSTM.

Reference: ``/work/shared/spec/peers_zoneout_grid_gru.md`` §2.2 (the Grid LSTM block of
coreylynch/grid-lstm ``model/GridLSTM.lua`` and the char-rnn ``-model lstm`` baseline),
§2.3 Init (U(-0.08, 0.08), forget bias 1 on the Linears annotated "i2h") and §2.7.

Expectations are computed without the implementation's code path: the step-by-step
equations are re-derived in NumPy (float64, time step outer, layer inner, as the Lua
graph runs), parameter counts come from the formula written out in each test and from
literal numbers, and dropout placement is pinned through observable behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rhn_cli.models import build_model
from rhn_cli.models.charrnn_lstm import CharRNNLSTMLanguageModel
from rhn_cli.models.grid_lstm import GridLSTMLanguageModel

TOL = 1e-10
V, H, L, B, T = 6, 4, 3, 2, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)


def _grid(tie_weights=True, dropout=0.0, num_layers=L, hidden_size=H, init_scale=0.08):
    config = dict(
        model="grid_lstm",
        hidden_size=hidden_size,
        num_layers=num_layers,
        dropout=dropout,
        init_scale=init_scale,
        tie_weights=tie_weights,
    )
    return build_model(config, V)


def _charrnn(dropout=0.0, num_layers=L, hidden_size=H, init_scale=0.08):
    config = dict(
        model="charrnn_lstm",
        hidden_size=hidden_size,
        num_layers=num_layers,
        dropout=dropout,
        init_scale=init_scale,
    )
    return build_model(config, V)


def _tokens(batch=B, steps=T):
    return torch.randint(0, V, (batch, steps))


def _random_state(num_layers=L):
    return (
        torch.randn(num_layers, B, H, dtype=torch.float64) * 0.5,
        torch.randn(num_layers, B, H, dtype=torch.float64) * 0.5,
    )


# --------------------------------------------------------------------------------------
# NumPy references (spec §2.2), independent of the implementation
# --------------------------------------------------------------------------------------


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_params(model):
    # state_dict lists shared (tied) parameters under every layer's name
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _linear(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _np_lstm(a, c_prev):
    """The shared update: blocks [i, f, o, g]; returns (c, h)."""
    n = c_prev.shape[-1]
    i, f, o, g = a[:, :n], a[:, n : 2 * n], a[:, 2 * n : 3 * n], a[:, 3 * n :]
    c = _sigmoid(f) * c_prev + _sigmoid(i) * np.tanh(g)
    return c, _sigmoid(o) * np.tanh(c)


def grid_reference(p, tokens, state, *, num_layers, tied, drop_scale=1.0):
    """Grid LSTM, one step and one layer at a time (spec §2.2).

    ``drop_scale`` multiplies every dropped connection (h_d^{L-1} for L >= 2 and the
    decoder input): 1 is eval mode, 1/(1-p) a training draw that keeps every unit.
    With ``tied`` the depth Linears of layer 1 serve every layer.
    """
    tokens = tokens.numpy()
    h_t = [state[0][k].numpy().copy() for k in range(num_layers)]
    c_t = [state[1][k].numpy().copy() for k in range(num_layers)]
    logits, top = [], []
    for t in range(tokens.shape[1]):
        h_d = p["embedding.weight"][tokens[:, t]]
        c_d = np.zeros_like(h_d)
        for k in range(num_layers):
            if k > 0:
                h_d = h_d * drop_scale
            depth = 0 if tied else k
            a_t = _linear(p, f"layers.{k}.time_to_time", h_t[k]) + _linear(
                p, f"layers.{k}.depth_to_time", h_d
            )
            c_t[k], h_t[k] = _np_lstm(a_t, c_t[k])
            a_d = _linear(p, f"layers.{depth}.time_to_depth", h_t[k]) + _linear(
                p, f"layers.{depth}.depth_to_depth", h_d
            )
            c_d, h_d = _np_lstm(a_d, c_d)
        top.append(h_d)
        logits.append(_linear(p, "decoder", h_d * drop_scale))
    state = (np.stack(h_t), np.stack(c_t))
    return np.stack(logits, 1), state, np.stack(top, 1)


def charrnn_reference(p, tokens, state, *, num_layers, drop_scale=1.0):
    """char-rnn stacked LSTM, one step and one layer at a time (spec §2.2 last bullet)."""
    tokens = tokens.numpy()
    h = [state[0][k].numpy().copy() for k in range(num_layers)]
    c = [state[1][k].numpy().copy() for k in range(num_layers)]
    logits, top = [], []
    for t in range(tokens.shape[1]):
        x = p["embedding.weight"][tokens[:, t]]
        for k in range(num_layers):
            if k > 0:
                x = x * drop_scale
            a = _linear(p, f"layers.{k}.i2h", x) + _linear(p, f"layers.{k}.h2h", h[k])
            c[k], h[k] = _np_lstm(a, c[k])
            x = h[k]
        top.append(x)
        logits.append(_linear(p, "decoder", x * drop_scale))
    return np.stack(logits, 1), (np.stack(h), np.stack(c)), np.stack(top, 1)


def _assert_close(actual, expected):
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=0, atol=TOL)


# --------------------------------------------------------------------------------------
# 1. Grid LSTM forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_grid_eval_forward_matches_numpy(tied):
    model = _grid(tie_weights=tied).double().eval()
    assert isinstance(model, GridLSTMLanguageModel)
    tokens, state = _tokens(), _random_state()
    logits, (h, c), hidden = model(tokens, state, return_hidden=True)
    ref_logits, (ref_h, ref_c), ref_top = grid_reference(
        _np_params(model), tokens, state, num_layers=L, tied=tied
    )
    assert logits.shape == (B, T, V) and h.shape == c.shape == (L, B, H)
    _assert_close(logits, ref_logits)
    _assert_close(h, ref_h)
    _assert_close(c, ref_c)
    _assert_close(hidden, ref_top)


def test_grid_initial_state_is_zero_and_state_carries_over_chunks():
    model = _grid().double().eval()
    h0, c0 = model.initial_state(B)
    assert h0.shape == c0.shape == (L, B, H) and h0.dtype == torch.float64
    assert not h0.any() and not c0.any()
    tokens = _tokens(steps=6)
    whole, whole_state = model(tokens, (h0, c0))
    first, state = model(tokens[:, :2], (h0, c0))
    second, state = model(tokens[:, 2:], state)
    _assert_close(torch.cat([first, second], 1), whole.detach().numpy())
    _assert_close(state[0], whole_state[0].detach().numpy())
    _assert_close(state[1], whole_state[1].detach().numpy())


def test_grid_describe():
    assert _grid(True).describe() == "Grid LSTM 3 x 4 units (tied depth weights)"
    assert _grid(False).describe().startswith("Grid LSTM 3 x 4 units (untied depth weights)")


# --------------------------------------------------------------------------------------
# 2. Tied depth weights: sharing, parameter count, gradients
# --------------------------------------------------------------------------------------


def _grid_param_formula(vocab, hidden, layers, tied):
    linear_pair = 2 * (4 * hidden * hidden + 4 * hidden)  # two nn.Linear(H, 4H) with bias
    embedding = vocab * hidden
    temporal = layers * linear_pair  # W_TT^L, W_DT^L per layer
    depth = (1 if tied else layers) * linear_pair  # W_TD, W_DD
    decoder = hidden * vocab + vocab
    return embedding + temporal + depth + decoder


def test_tied_depth_linears_are_shared_objects():
    tied, untied = _grid(True), _grid(False)
    for name in ("time_to_depth", "depth_to_depth"):
        for part in ("weight", "bias"):
            tied_params = [getattr(getattr(layer, name), part) for layer in tied.layers]
            assert all(p is tied_params[0] for p in tied_params)
            untied_params = [getattr(getattr(layer, name), part) for layer in untied.layers]
            assert len({id(p) for p in untied_params}) == L
    # temporal weights are per layer in both
    assert tied.layers[0].time_to_time.weight is not tied.layers[1].time_to_time.weight
    assert tied.layers[0].depth_to_time.weight is not tied.layers[1].depth_to_time.weight


def test_grid_parameter_counts():
    # V=6, H=4, L=3: embedding 24, linear pair 2*(64+16)=160, temporal 3*160, decoder 30
    assert _grid_param_formula(V, H, L, True) == 24 + 480 + 160 + 30 == 694
    assert _grid_param_formula(V, H, L, False) == 24 + 480 + 480 + 30 == 1014
    assert _grid(True).num_parameters() == 694
    assert _grid(False).num_parameters() == 1014
    # the optimiser sees each shared tensor once
    assert sum(p.numel() for p in _grid(True).parameters()) == 694


@pytest.mark.parametrize(
    ("vocab", "hidden", "layers", "tied", "expected"),
    [
        (205, 1000, 3, True, 32_442_205),  # README enwik8 3-layer grid
        (205, 1000, 6, True, 56_466_205),  # README enwik8 6-layer grid
        (65, 128, 2, True, 412_993),  # tiny Shakespeare defaults
        (205, 1000, 3, False, 48_458_205),
    ],
)
def test_grid_parameter_count_of_reference_configs(vocab, hidden, layers, tied, expected):
    assert _grid_param_formula(vocab, hidden, layers, tied) == expected
    config = dict(
        hidden_size=hidden, num_layers=layers, dropout=0.25, init_scale=0.08, tie_weights=tied
    )
    with torch.device("meta"):  # count without allocating
        model = build_model({"model": "grid_lstm", **config}, vocab)
    assert model.num_parameters() == expected


def _loss(logits, state, weights):
    return (
        (logits * weights[0]).sum() + (state[0] * weights[1]).sum() + (state[1] * weights[2]).sum()
    )


def test_tied_depth_gradients_accumulate_over_layers():
    tied = _grid(True).double()
    untied = _grid(False).double()
    # the untied model with every layer's depth pair equal to the tied one: the tied
    # state_dict names the shared pair under every layer
    untied.load_state_dict(tied.state_dict())
    untied_params = dict(untied.named_parameters())
    tied.eval()
    untied.eval()
    tokens, state = _tokens(), _random_state()
    weights = (
        torch.randn(B, T, V, dtype=torch.float64),
        torch.randn(L, B, H, dtype=torch.float64),
        torch.randn(L, B, H, dtype=torch.float64),
    )
    loss_tied = _loss(*tied(tokens, state), weights)
    loss_untied = _loss(*untied(tokens, state), weights)
    assert abs(loss_tied.item() - loss_untied.item()) < TOL
    loss_tied.backward()
    loss_untied.backward()
    for name in ("time_to_depth", "depth_to_depth"):
        for part in ("weight", "bias"):
            shared_grad = getattr(getattr(tied.layers[0], name), part).grad
            per_layer = [getattr(getattr(layer, name), part).grad for layer in untied.layers]
            assert all(g.abs().sum() > 0 for g in per_layer)  # every layer contributes
            _assert_close(shared_grad, sum(per_layer).numpy())
    # non-shared parameters: the same gradient in both models
    for name, p in tied.named_parameters():
        if "_to_depth" not in name:
            _assert_close(p.grad, untied_params[name].grad.numpy())

    # finite differences of the NumPy reference on one shared depth weight entry
    p = _np_params(tied)
    eps = 1e-6
    np_weights = [w.numpy() for w in weights]

    def np_loss(params):
        logits, (h, c), _ = grid_reference(params, tokens, state, num_layers=L, tied=True)
        return (
            (logits * np_weights[0]).sum() + (h * np_weights[1]).sum() + (c * np_weights[2]).sum()
        )

    for name, index in (
        ("layers.0.time_to_depth.weight", (5, 2)),
        ("layers.0.depth_to_depth.bias", (9,)),
    ):
        plus, minus = dict(p), dict(p)
        plus[name] = p[name].copy()
        minus[name] = p[name].copy()
        plus[name][index] += eps
        minus[name][index] -= eps
        numeric = (np_loss(plus) - np_loss(minus)) / (2 * eps)
        grad = dict(tied.named_parameters())[name].grad[index].item()
        assert abs(numeric - grad) < 1e-6 * max(1.0, abs(grad))

    # one SGD step moves the single shared tensor, and every layer still sees it
    before = tied.layers[0].time_to_depth.weight.detach().clone()
    with torch.no_grad():
        for param in tied.parameters():
            param -= 0.1 * param.grad
    expected = before - 0.1 * sum(layer.time_to_depth.weight.grad for layer in untied.layers)
    for layer in tied.layers:
        _assert_close(layer.time_to_depth.weight, expected.numpy())


# --------------------------------------------------------------------------------------
# 3. Initialisation: U(-s, s) and forget bias 1 on the "i2h" Linears
# --------------------------------------------------------------------------------------


def _check_uniform_except(model, scale, forget_one):
    """Every parameter in [-s, s] except the forget blocks of ``forget_one`` biases (== 1)."""
    hidden = model.config.hidden_size
    forget_one_ids = {id(b) for b in forget_one}
    seen_extreme = 0.0
    for name, p in model.named_parameters():
        values = p.detach()
        if id(p) in forget_one_ids:
            block = values[hidden : 2 * hidden]
            assert torch.equal(block, torch.ones_like(block)), name
            values = torch.cat([values[:hidden], values[2 * hidden :]])
        assert values.abs().max() <= scale, name
        seen_extreme = max(seen_extreme, values.abs().max().item())
    assert seen_extreme > 0.9 * scale  # really drawn from the whole interval


@pytest.mark.parametrize("tied", [True, False])
def test_grid_forget_bias_init(tied):
    scale = 0.08
    model = _grid(tie_weights=tied, hidden_size=16, init_scale=scale)
    # §2.3 Init: the temporal W_TT^L and the depth W_TD are the nodes annotated "i2h_L"
    i2h = [layer.time_to_time.bias for layer in model.layers]
    i2h += [layer.time_to_depth.bias for layer in model.layers]
    _check_uniform_except(model, scale, i2h)
    # and the other Linear of each LSTM keeps a uniform forget block
    for layer in model.layers:
        for linear in (layer.depth_to_time, layer.depth_to_depth):
            assert linear.bias[16:32].abs().max() <= scale


def test_charrnn_forget_bias_init():
    scale = 0.05
    model = _charrnn(hidden_size=16, init_scale=scale)
    _check_uniform_except(model, scale, [layer.i2h.bias for layer in model.layers])
    for layer in model.layers:
        assert layer.h2h.bias[16:32].abs().max() <= scale


# --------------------------------------------------------------------------------------
# 4. char-rnn stacked LSTM
# --------------------------------------------------------------------------------------


def test_charrnn_eval_forward_matches_numpy():
    model = _charrnn().double().eval()
    assert isinstance(model, CharRNNLSTMLanguageModel)
    tokens, state = _tokens(), _random_state()
    logits, (h, c), hidden = model(tokens, state, return_hidden=True)
    ref_logits, (ref_h, ref_c), ref_top = charrnn_reference(
        _np_params(model), tokens, state, num_layers=L
    )
    _assert_close(logits, ref_logits)
    _assert_close(h, ref_h)
    _assert_close(c, ref_c)
    _assert_close(hidden, ref_top)
    zeros = model.initial_state(B)
    assert zeros[0].shape == zeros[1].shape == (L, B, H) and not zeros[0].any()
    assert model.describe() == "char-rnn LSTM 3 x 4 units"


def _charrnn_param_formula(vocab, hidden, layers):
    embedding = vocab * hidden
    per_layer = 2 * (4 * hidden * hidden + 4 * hidden)  # i2h (H -> 4H) and h2h, with bias
    decoder = hidden * vocab + vocab
    return embedding + layers * per_layer + decoder


def test_charrnn_parameter_counts():
    assert _charrnn_param_formula(V, H, L) == 24 + 3 * 160 + 30 == 534
    assert _charrnn().num_parameters() == 534
    assert _charrnn_param_formula(205, 1000, 3) == 24_434_205  # README enwik8 stacked 3
    assert _charrnn_param_formula(65, 128, 2) == 280_897  # tiny Shakespeare defaults
    for vocab, hidden, layers, expected in [(205, 1000, 3, 24_434_205), (65, 128, 2, 280_897)]:
        config = dict(model="charrnn_lstm", hidden_size=hidden, num_layers=layers)
        with torch.device("meta"):
            model = build_model({**config, "dropout": 0.0, "init_scale": 0.08}, vocab)
        assert model.num_parameters() == expected


@pytest.mark.parametrize("make", [_grid, _charrnn])
def test_gradients_reach_every_parameter(make):
    model = make().double().train()
    tokens = torch.arange(V).repeat(B, 1)  # every embedding row is used
    logits, state = model(tokens, model.initial_state(B))
    (logits.logsumexp(-1).sum() - logits[..., 0].sum() + state[0].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------
# 5. Dropout: train vs eval, and where it applies
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_grid, _charrnn])
def test_dropout_train_is_random_and_eval_deterministic(make):
    model = make(dropout=0.5).double()
    tokens, state = _tokens(), _random_state()
    model.train()
    a, _ = model(tokens, state)
    b, _ = model(tokens, state)
    assert not torch.allclose(a, b)
    model.eval()
    c, _ = model(tokens, state)
    d, _ = model(tokens, state)
    assert torch.equal(c, d)


@pytest.mark.parametrize("make", [_grid, _charrnn])
def test_no_dropout_train_equals_eval(make):
    model = make(dropout=0.0).double()
    tokens, state = _tokens(), _random_state()
    model.train()
    train_logits, train_state, train_hidden = model(tokens, state, return_hidden=True)
    model.eval()
    eval_logits, eval_state, eval_hidden = model(tokens, state, return_hidden=True)
    assert torch.equal(train_logits, eval_logits)
    assert torch.equal(train_state[0], eval_state[0]) and torch.equal(train_hidden, eval_hidden)


@pytest.mark.parametrize("make", [_grid, _charrnn])
def test_single_layer_drops_only_the_decoder_input(make):
    """With one layer nothing recurrent or below the decoder is dropped (not the embedding)."""
    model = make(dropout=0.5, num_layers=1).double()
    tokens, state = _tokens(), _random_state(num_layers=1)
    model.eval()
    eval_logits, eval_state, eval_hidden = model(tokens, state, return_hidden=True)
    model.train()
    logits, train_state, hidden = model(tokens, state, return_hidden=True)
    assert torch.equal(train_state[0], eval_state[0]) and torch.equal(train_state[1], eval_state[1])
    assert torch.equal(hidden, eval_hidden)
    assert not torch.allclose(logits, eval_logits)


def _keep_all_dropout(x, p=0.5, training=True, inplace=False):
    """A legitimate inverted-dropout draw in which every unit is kept: x / (1 - p)."""
    return x / (1.0 - p) if training and p > 0 else x


@pytest.mark.parametrize("tied", [True, False])
def test_grid_dropout_placement(monkeypatch, tied):
    """Dropout hits h_d^{L-1} (L >= 2, not c_d) and the decoder input, nothing else."""
    monkeypatch.setattr(F, "dropout", _keep_all_dropout)
    rate = 0.2
    model = _grid(tie_weights=tied, dropout=rate).double().train()
    tokens, state = _tokens(), _random_state()
    logits, (h, c), hidden = model(tokens, state, return_hidden=True)
    ref_logits, (ref_h, ref_c), ref_top = grid_reference(
        _np_params(model), tokens, state, num_layers=L, tied=tied, drop_scale=1 / (1 - rate)
    )
    _assert_close(logits, ref_logits)
    _assert_close(h, ref_h)
    _assert_close(c, ref_c)
    _assert_close(hidden, ref_top)
    decoded = (hidden / (1 - rate)) @ model.decoder.weight.t() + model.decoder.bias
    _assert_close(logits, decoded.detach().numpy())


def test_charrnn_dropout_placement(monkeypatch):
    """Dropout hits the inputs of layers >= 2 and the decoder input, nothing else."""
    monkeypatch.setattr(F, "dropout", _keep_all_dropout)
    rate = 0.2
    model = _charrnn(dropout=rate).double().train()
    tokens, state = _tokens(), _random_state()
    logits, (h, c), hidden = model(tokens, state, return_hidden=True)
    ref_logits, (ref_h, ref_c), ref_top = charrnn_reference(
        _np_params(model), tokens, state, num_layers=L, drop_scale=1 / (1 - rate)
    )
    _assert_close(logits, ref_logits)
    _assert_close(h, ref_h)
    _assert_close(c, ref_c)
    _assert_close(hidden, ref_top)
    decoded = (hidden / (1 - rate)) @ model.decoder.weight.t() + model.decoder.bias
    _assert_close(logits, decoded.detach().numpy())


# --------------------------------------------------------------------------------------
# 6. return_hidden: the top recurrent output before the decoder's dropout
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_grid, _charrnn])
def test_return_hidden_is_top_output_before_dropout(make):
    model = make(dropout=0.5).double()
    tokens, state = _tokens(), _random_state()
    weight, bias = model.decoder.weight, model.decoder.bias
    model.eval()
    logits, new_state, hidden = model(tokens, state, return_hidden=True)
    assert hidden.shape == (B, T, H)
    plain_logits, plain_state = model(tokens, state)
    assert torch.equal(logits, plain_logits) and torch.equal(new_state[0], plain_state[0])
    _assert_close(logits, (hidden @ weight.t() + bias).detach().numpy())
    # the top layer's final h is the hidden output at the last step
    if isinstance(model, CharRNNLSTMLanguageModel):
        _assert_close(hidden[:, -1], new_state[0][-1].detach().numpy())
    # in training mode hidden is taken before the decoder's dropout (pinned with a
    # deterministic draw in the placement tests); here: it is a differentiable output
    model.train()
    _, _, hidden = model(tokens, state, return_hidden=True)
    assert hidden.shape == (B, T, H) and hidden.requires_grad
