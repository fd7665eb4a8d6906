"""Independent checks of the Zoneout LSTM language model against the peers spec.

Reference: ``/work/shared/spec/peers_zoneout_grid_gru.md`` §1.2-1.4 (teganmaharaj/zoneout,
``recurrent.py`` ZoneoutLSTM and ``zoneout_char_ptb.py``). Expectations are float64 NumPy
re-derivations of the cell equations (with a real one-hot matmul for the input layer),
literal parameter counts, and statistics of the train-time masks observed through the
state the model returns after each single-step call.

The tests read the parameters by the model's documented names and orientation:
``layers.{l}.input_weight`` W_in [in, 4H], ``layers.{l}.input_bias`` b_in [4H],
``layers.{l}.state_weight`` W_state [H, 4H], ``layers.{l}.initial_h`` / ``initial_c``
[H], ``output_weight`` W_out [H, V], ``output_bias`` b_out [V]; gate slices of 4H in
the order input, forget, candidate, output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rhn_cli.models.zoneout_lstm import (
    ZoneoutLSTMConfig,
    ZoneoutLSTMLanguageModel,
    block_orthogonal_,
    build,
    fitting_vocab_width,
)

TOL = 1e-10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)


# --------------------------------------------------------------------------------------
# Helpers (independent of the implementation)
# --------------------------------------------------------------------------------------


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _params(model) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().astype(np.float64) for name, p in model.named_parameters()}


def candidate(x_part, h, c, W_state, forget_bias, igate):
    """One un-zoned LSTM step of spec §1.3: (h~, c~). ``igate`` multiplies i."""
    H = h.shape[-1]
    a = x_part + h @ W_state
    i = _sigmoid(a[:, :H]) * igate
    f = _sigmoid(a[:, H : 2 * H] + forget_bias)
    c_new = f * c + i * np.tanh(a[:, 2 * H : 3 * H])
    h_new = _sigmoid(a[:, 3 * H :]) * np.tanh(c_new)
    return h_new, c_new


def layer_input(params, layer, x, vocab_size):
    """x W_in + b_in; the first layer's x is one-hot, as the reference's Linear(V -> 4H)."""
    if layer == 0:
        x = np.eye(vocab_size)[x]
    return x @ params[f"layers.{layer}.input_weight"] + params[f"layers.{layer}.input_bias"]


def reference_expectation(params, tokens, h0, c0, *, vocab_size, num_layers, cfg):
    """Eval-mode forward of spec §1.2/§1.3: zoneout by expectation, i scaled by 1 - drop."""
    x = tokens
    final_h, final_c = [], []
    for layer in range(num_layers):
        projected = layer_input(params, layer, x, vocab_size)
        h, c = h0[layer], c0[layer]
        outputs = []
        for t in range(tokens.shape[1]):
            h_new, c_new = candidate(
                projected[:, t],
                h,
                c,
                params[f"layers.{layer}.state_weight"],
                cfg["forget_bias"],
                1.0 - cfg["drop_igates"],
            )
            c = cfg["z_cells"] * c + (1.0 - cfg["z_cells"]) * c_new
            h = cfg["z_states"] * h + (1.0 - cfg["z_states"]) * h_new
            outputs.append(h)
        x = np.stack(outputs, axis=1)
        final_h.append(h)
        final_c.append(c)
    logits = x @ params["output_weight"] + params["output_bias"]
    return logits, np.stack(final_h), np.stack(final_c), x


def make_model(V=8, H=4, L=1, z_cells=0.0, z_states=0.0, drop_igates=0.0, forget_bias=1.0):
    """A float64 model with random nonzero weights, biases and learned initial states."""
    cfg = ZoneoutLSTMConfig(V, H, L, z_cells, z_states, drop_igates, forget_bias)
    model = ZoneoutLSTMLanguageModel(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.6)
    return model


def _tokens(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def _agreement(a, b):
    return float(np.mean(a == b))


# --------------------------------------------------------------------------------------
# 1. Eval mode: the expectation semantics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
def test_eval_forward_matches_expectation_equations(num_layers):
    cfg = dict(z_cells=0.5, z_states=0.05, drop_igates=0.3, forget_bias=1.0)
    model = make_model(V=8, H=4, L=num_layers, **cfg).eval()
    B, T = 3, 5
    tokens = _tokens(B, T, 8)
    params = _params(model)
    h0 = np.stack([np.tile(params[f"layers.{i}.initial_h"], (B, 1)) for i in range(num_layers)])
    c0 = np.stack([np.tile(params[f"layers.{i}.initial_c"], (B, 1)) for i in range(num_layers)])
    assert np.abs(h0).min() > 0 and np.abs(c0).min() > 0  # the learned start is exercised

    with torch.no_grad():
        logits, (h, c), hidden = model(
            torch.from_numpy(tokens), model.initial_state(B), return_hidden=True
        )
        again, _ = model(torch.from_numpy(tokens), model.initial_state(B))
    want_logits, want_h, want_c, want_hidden = reference_expectation(
        params, tokens, h0, c0, vocab_size=8, num_layers=num_layers, cfg=cfg
    )
    assert logits.shape == (B, T, 8) and h.shape == c.shape == (num_layers, B, 4)
    np.testing.assert_allclose(logits.numpy(), want_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(h.numpy(), want_h, rtol=0, atol=TOL)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=0, atol=TOL)
    np.testing.assert_allclose(hidden.numpy(), want_hidden, rtol=0, atol=TOL)
    assert torch.equal(logits, again)  # eval mode is deterministic


def test_state_carries_across_calls():
    """Two calls of T=2 and T=3, threading the state, equal one call of T=5."""
    model = make_model(z_cells=0.5, z_states=0.05, drop_igates=0.3).eval()
    tokens = torch.from_numpy(_tokens(3, 5, 8))
    with torch.no_grad():
        whole, state_whole = model(tokens, model.initial_state(3))
        first, state = model(tokens[:, :2], model.initial_state(3))
        second, state = model(tokens[:, 2:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=TOL)
    torch.testing.assert_close(state, state_whole, rtol=0, atol=TOL)


# --------------------------------------------------------------------------------------
# 2. Train mode: zoneout keeps the old value per unit, per step, per example
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
def test_train_without_noise_is_the_plain_lstm(num_layers):
    model = make_model(V=8, H=4, L=num_layers).train()
    B, T = 3, 5
    tokens = _tokens(B, T, 8)
    params = _params(model)
    h0, c0 = (s.detach().numpy() for s in model.initial_state(B))
    logits, (h, c) = model(torch.from_numpy(tokens), model.initial_state(B))
    cfg = dict(z_cells=0.0, z_states=0.0, drop_igates=0.0, forget_bias=1.0)
    want_logits, want_h, want_c, _ = reference_expectation(
        params, tokens, h0, c0, vocab_size=8, num_layers=num_layers, cfg=cfg
    )
    np.testing.assert_allclose(logits.detach().numpy(), want_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(h.detach().numpy(), want_h, rtol=0, atol=TOL)
    np.testing.assert_allclose(c.detach().numpy(), want_c, rtol=0, atol=TOL)


def _run_single_steps(model, tokens):
    """States before and after every step, one forward call per step: [(prev, new)]."""
    state = model.initial_state(tokens.shape[0])
    steps = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            _, new = model(torch.from_numpy(tokens[:, t : t + 1]), state)
            steps.append(tuple((p.numpy(), n.numpy()) for p, n in zip(state, new, strict=True)))
            state = new
    return steps


def _kept_or_updated(observed, old, new):
    """Per unit: True where the old value was kept; asserts every unit is old or new."""
    distinguishable = np.abs(new - old) > 1e-8
    assert distinguishable.mean() > 0.999
    kept = observed == old  # a kept unit is copied bit for bit
    updated = np.isclose(observed, new, rtol=0, atol=1e-12)
    assert np.all((kept | updated)[distinguishable]), "a unit is neither its old nor new value"
    return kept[distinguishable], kept


@pytest.mark.parametrize("num_layers", [1, 2])
def test_train_zoneout_keeps_old_or_takes_new_with_probability_z(num_layers):
    z_cells, z_states = 0.5, 0.3
    model = make_model(V=8, H=8, L=num_layers, z_cells=z_cells, z_states=z_states).train()
    B, T = 4000, 3
    tokens = _tokens(B, T, 8, seed=1)
    params = _params(model)
    kept_h_per_step, kept_c_per_step = [], []
    for t, ((h_prev, h_obs), (c_prev, c_obs)) in enumerate(_run_single_steps(model, tokens)):
        x = tokens[:, t]
        for layer in range(num_layers):
            # the layer's input is the zoned-out h of the layer below, as observed
            inputs = x if layer == 0 else h_obs[layer - 1]
            x_part = layer_input(params, layer, inputs, 8)
            h_new, c_new = candidate(
                x_part,
                h_prev[layer],
                c_prev[layer],
                params[f"layers.{layer}.state_weight"],
                1.0,
                1.0,
            )
            # the candidate h~ is computed from the un-zoned c~
            kept_c, c_mask = _kept_or_updated(c_obs[layer], c_prev[layer], c_new)
            kept_h, h_mask = _kept_or_updated(h_obs[layer], h_prev[layer], h_new)
            assert abs(kept_c.mean() - z_cells) < 0.02
            assert abs(kept_h.mean() - z_states) < 0.02
            if layer == 0:
                kept_h_per_step.append(h_mask)
                kept_c_per_step.append(c_mask)
    # Independent masks: two Bernoulli(z) draws agree with probability z^2 + (1 - z)^2.
    same = z_states**2 + (1 - z_states) ** 2
    h1, h2 = kept_h_per_step[0], kept_h_per_step[1]
    assert abs(_agreement(h1, h2) - same) < 0.02  # fresh per time step
    assert abs(_agreement(h1, np.roll(h1, 1, axis=0)) - same) < 0.02  # per example
    assert abs(_agreement(h1, np.roll(h1, 1, axis=1)) - same) < 0.02  # per unit
    # cells and states draw separate masks: 0.3*0.5 + 0.7*0.5 = 0.5 when independent
    cross = z_states * z_cells + (1 - z_states) * (1 - z_cells)
    assert abs(_agreement(h1, kept_c_per_step[0]) - cross) < 0.02


def test_identical_examples_get_different_masks():
    """Same tokens and start state in every row: only the masks make rows differ."""
    model = make_model(V=8, H=8, z_cells=0.5, z_states=0.3).train()
    tokens = torch.full((64, 4), 3, dtype=torch.long)
    with torch.no_grad():
        _, (h, _) = model(tokens, model.initial_state(64))
        model.eval()
        _, (h_eval, _) = model(tokens, model.initial_state(64))
    assert torch.equal(h_eval, h_eval[:, :1].expand_as(h_eval))  # rows identical in eval
    distinct_rows = {tuple(row.tolist()) for row in h[0]}
    assert len(distinct_rows) > 32


# --------------------------------------------------------------------------------------
# 3. Input-gate dropout: Bernoulli(1 - drop) per unit/step/example, not rescaled
# --------------------------------------------------------------------------------------


def test_train_input_gate_dropout_is_not_rescaled():
    drop = 0.4
    model = make_model(V=8, H=8, drop_igates=drop).train()
    B, T = 4000, 2
    tokens = _tokens(B, T, 8, seed=2)
    params = _params(model)
    W_state = params["layers.0.state_weight"]
    dropped_per_step = []
    for t, ((h_prev, h_obs), (c_prev, c_obs)) in enumerate(_run_single_steps(model, tokens)):
        x_part = layer_input(params, 0, tokens[:, t], 8)
        _, c_open = candidate(x_part, h_prev[0], c_prev[0], W_state, 1.0, 1.0)  # i kept as is
        _, c_shut = candidate(x_part, h_prev[0], c_prev[0], W_state, 1.0, 0.0)  # i = 0
        distinguishable = np.abs(c_open - c_shut) > 1e-8
        assert distinguishable.mean() > 0.999
        is_open = np.isclose(c_obs[0], c_open, rtol=0, atol=1e-12)
        is_shut = np.isclose(c_obs[0], c_shut, rtol=0, atol=1e-12)
        # a kept gate is exactly sigmoid(a0): neither 1/(1 - drop) nor (1 - drop) scaling
        assert np.all((is_open | is_shut)[distinguishable])
        dropped = is_shut[distinguishable]
        assert abs(dropped.mean() - drop) < 0.02
        dropped_per_step.append(is_shut)
        # with no zoneout h_t = o * tanh(c_t) of the observed c_t
        a = x_part + h_prev[0] @ W_state
        np.testing.assert_allclose(h_obs[0], _sigmoid(a[:, 24:]) * np.tanh(c_obs[0]), atol=TOL)
    same = drop**2 + (1 - drop) ** 2
    assert abs(_agreement(dropped_per_step[0], dropped_per_step[1]) - same) < 0.02


def test_eval_input_gate_is_scaled_by_keep_rate():
    """One eval step from a zero state: c_1 = (1 - drop) sigmoid(a0) tanh(a2)."""
    drop = 0.3
    model = make_model(V=8, H=4, drop_igates=drop).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.initial_h.zero_()
            layer.initial_c.zero_()
    tokens = _tokens(5, 1, 8)
    params = _params(model)
    with torch.no_grad():
        _, (_, c) = model(torch.from_numpy(tokens), model.initial_state(5))
    a = layer_input(params, 0, tokens[:, 0], 8)
    want = (1 - drop) * _sigmoid(a[:, :4]) * np.tanh(a[:, 8:12])
    np.testing.assert_allclose(c[0].numpy(), want, rtol=0, atol=TOL)


# --------------------------------------------------------------------------------------
# 4. Gradients: learned initial state and every weight
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_gradients_reach_every_parameter_including_initial_state(training):
    cfg = ZoneoutLSTMConfig(8, 4, 2, z_cells=0.5, z_states=0.05, drop_igates=0.3)
    model = ZoneoutLSTMLanguageModel(cfg).double().train(training)  # the real (ortho) init
    tokens = torch.from_numpy(_tokens(3, 6, 8))
    state = model.initial_state(3)
    assert all(s.shape == (2, 3, 4) for s in state)
    logits, _ = model(tokens[:, :-1], state)
    loss = F.cross_entropy(logits.reshape(-1, 8), tokens[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_initial_state_is_the_learned_vectors_broadcast():
    model = make_model(V=8, H=4, L=2)
    h, c = model.initial_state(3)
    params = _params(model)
    for layer in range(2):
        np.testing.assert_array_equal(
            h[layer].detach().numpy(), np.tile(params[f"layers.{layer}.initial_h"], (3, 1))
        )
        np.testing.assert_array_equal(
            c[layer].detach().numpy(), np.tile(params[f"layers.{layer}.initial_c"], (3, 1))
        )


# --------------------------------------------------------------------------------------
# 5. Initialisation, parameter count, forget bias
# --------------------------------------------------------------------------------------


def _assert_block_orthogonal(weight: np.ndarray):
    m, n = weight.shape
    f = np.gcd(m, n)
    blocks = []
    for i in range(m // f):
        for j in range(n // f):
            q = weight[i * f : (i + 1) * f, j * f : (j + 1) * f]
            np.testing.assert_allclose(q.T @ q, np.eye(f), atol=1e-5)
            blocks.append(q)
    for a, b in zip(blocks, blocks[1:], strict=False):
        assert not np.allclose(a, b)  # each block is drawn on its own


@pytest.mark.parametrize("shape", [(8, 32), (4, 16), (16, 4), (5, 5), (3, 12), (50, 4000)])
def test_block_orthogonal_blocks_are_orthogonal(shape):
    weight = block_orthogonal_(torch.empty(shape))
    _assert_block_orthogonal(weight.numpy().astype(np.float64))


def test_block_orthogonal_rejects_incommensurate_shapes():
    """The reference asserts gcd(m, n) in (m, n)."""
    with pytest.raises(ValueError, match="gcd 2"):
        block_orthogonal_(torch.empty(6, 8))


@pytest.mark.parametrize(
    ("V", "H", "width"),
    [(50, 1000, 50), (27, 1000, 40), (7, 4, 8), (12, 16, 16), (10000, 1000, 12000), (4, 4, 4)],
)
def test_fitting_vocab_width(V, H, width):
    assert fitting_vocab_width(V, H) == width


def _assert_orthonormal_pieces(weight: np.ndarray, f: int):
    """Each f x f block (the last ones possibly cut short) has orthonormal rows or columns."""
    m, n = weight.shape
    for i in range(0, m, f):
        for j in range(0, n, f):
            q = weight[i : i + f, j : j + f]
            gram = q.T @ q if q.shape[0] == f else q @ q.T  # cut rows: rows stay orthonormal
            np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-5)


def test_vocabulary_that_does_not_fit_the_blocks_is_sliced_from_a_wider_draw():
    """V=7, H=4: W_in is 7 rows of an (8, 16) draw, W_out 7 columns of a (4, 8) one."""
    model = ZoneoutLSTMLanguageModel(ZoneoutLSTMConfig(7, 4))
    assert model.layers[0].input_weight.shape == (7, 16)
    assert model.output_weight.shape == (4, 7)
    _assert_orthonormal_pieces(model.layers[0].input_weight.detach().double().numpy(), 8)
    _assert_orthonormal_pieces(model.output_weight.detach().double().numpy(), 4)
    _assert_block_orthogonal(model.layers[0].state_weight.detach().double().numpy())
    assert model.num_parameters() == 7 * 16 + 16 + 4 * 16 + 4 + 4 + 4 * 7 + 7


def test_default_init_is_reference_ortho():
    model = ZoneoutLSTMLanguageModel(ZoneoutLSTMConfig(8, 4, 2))
    for name, p in model.named_parameters():
        value = p.detach().numpy().astype(np.float64)
        if p.dim() == 2:
            _assert_block_orthogonal(value)
        else:  # biases, h_0, c_0
            assert np.all(value == 0), name


def test_parameter_count_char_ptb():
    model = build(
        dict(
            hidden_size=1000,
            num_layers=1,
            z_cells=0.5,
            z_states=0.05,
            drop_igates=0.0,
            forget_bias=1.0,
        ),
        vocab_size=50,
    )
    # 50*4000 + 4000 + 1000*4000 + 1000*50 + 50 + 1000 + 1000
    assert model.num_parameters() == 4_256_050
    assert model.describe() == "Zoneout LSTM 1 x 1000 units (z_cells 0.5, z_states 0.05)"


def test_parameter_count_two_layers():
    model = ZoneoutLSTMLanguageModel(ZoneoutLSTMConfig(8, 4, 2))
    # layer 1: 8*16 + 16 + 4*16 + 4 + 4; layer 2: 4*16 + 16 + 4*16 + 4 + 4; out 4*8 + 8
    assert model.num_parameters() == 216 + 152 + 40


@pytest.mark.parametrize(("forget_bias", "gate"), [(None, 1.0), (1.0, 1.0), (0.0, 0.0)])
def test_forget_bias_with_zero_weights(forget_bias, gate):
    """All weights 0 and c_0 = 1: c_1 = sigmoid(forget_bias) * 1 + 0.5 * tanh(0)."""
    keys = dict(hidden_size=4, num_layers=1, z_cells=0.0, z_states=0.0, drop_igates=0.0)
    model = build({**keys, "forget_bias": forget_bias}, vocab_size=8).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.layers[0].initial_c.fill_(1.0)
    with torch.no_grad():
        _, (h, c) = model(torch.zeros(2, 1, dtype=torch.long), model.initial_state(2))
    np.testing.assert_allclose(c.numpy(), np.full((1, 2, 4), _sigmoid(gate)), atol=TOL)
    np.testing.assert_allclose(h.numpy(), 0.5 * np.tanh(c.numpy()), atol=TOL)


# --------------------------------------------------------------------------------------
# 6. return_hidden: the zoned-out top-layer h sequence feeds the output layer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_return_hidden_is_the_zoned_h_sequence(training):
    model = make_model(V=8, H=4, L=2, z_cells=0.5, z_states=0.3, drop_igates=0.3)
    model.train(training)
    tokens = torch.from_numpy(_tokens(3, 5, 8))
    with torch.no_grad():
        logits, (h, _), hidden = model(tokens, model.initial_state(3), return_hidden=True)
    params = _params(model)
    assert hidden.shape == (3, 5, 4)
    want = hidden.numpy() @ params["output_weight"] + params["output_bias"]
    np.testing.assert_allclose(logits.numpy(), want, rtol=0, atol=TOL)
    np.testing.assert_array_equal(hidden[:, -1].numpy(), h[-1].numpy())
    if training:
        # zoned-out, not the candidate: some units repeat the previous step exactly
        assert (hidden[:, 1:] == hidden[:, :-1]).any()


def test_describe_mentions_input_gate_dropout():
    model = ZoneoutLSTMLanguageModel(ZoneoutLSTMConfig(8, 4, 2, 0.5, 0.05, 0.3))
    assert model.describe() == (
        "Zoneout LSTM 2 x 4 units (z_cells 0.5, z_states 0.05, input-gate dropout 0.3)"
    )
