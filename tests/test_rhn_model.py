"""Independent checks of the RHN language model against the reference spec.

Reference: ``/work/shared/spec/rhn_reference.md`` (behaviour of the TF code in
jzilly/RecurrentHighwayNetworks). Section numbers in the docstrings below refer to it.

Expectations are computed without the implementation's code path: the cell equations are
re-derived in NumPy (float64) from spec §2.2, parameter counts from the §6.3 formula and
the literal numbers of §6.1/§6.3, and the dropout semantics (§2.4) are pinned through
observable behaviour rather than by reading the implementation's tensors back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.func import functional_call

import rhn_cli.models.rhn as rhn_module
from rhn_cli.models.dropout import variational_mask, word_type_mask
from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel

TOL = 1e-10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    np.random.seed(1234)


# --------------------------------------------------------------------------------------
# Helpers (independent of the implementation)
# --------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _np_params(model: RHNLanguageModel) -> dict[str, np.ndarray]:
    return {
        name: p.detach().cpu().numpy().astype(np.float64) for name, p in model.named_parameters()
    }


def reference_forward(
    params: dict[str, np.ndarray],
    *,
    hidden_size: int,
    depth: int,
    num_layers: int,
    tied: bool,
    tokens: np.ndarray,
    state: np.ndarray,
    masks: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Step-by-step NumPy forward pass written from spec §2.1/§2.2.

    ``masks`` holds NumPy arrays: "x" [B, T, 1], "i"/"h" lists (one per layer) of [B, in]
    / [B, H], "o" [B, H]. Micro-layer 0 uses the TF form: one matrix on the concatenation
    ``[x*m_i, s*m_h]`` per transform, with W^{H_0} / W^{T_0} of shape [(in + H), H] built
    from the implementation's documented parameter layout (input_weight rows 0:H = H
    transform, rows H:2H = T transform; recurrent_weight[i] likewise).
    """
    H, D = hidden_size, depth
    E = params["embedding.weight"]  # [V, in]
    B, T = tokens.shape
    x = E[tokens] * masks["x"]  # whole word vectors dropped: [B, T, in] * [B, T, 1]
    final_states = []
    for layer in range(num_layers):
        Wx = params[f"layers.{layer}.input_weight"]  # [2H, in]
        R = params[f"layers.{layer}.recurrent_weight"]  # [D, 2H, H]
        b = params[f"layers.{layer}.bias"]  # [D, 2H]
        in_size = Wx.shape[1]
        # TF Linear on concat([x, s]): Matrix [(in + H), H], one Bias [H] per transform.
        W_H0 = np.concatenate([Wx[:H].T, R[0, :H].T], axis=0)
        W_T0 = np.concatenate([Wx[H:].T, R[0, H:].T], axis=0)
        assert W_H0.shape == W_T0.shape == (in_size + H, H)
        m_i, m_h = masks["i"][layer], masks["h"][layer]
        # Shared masks are [B, w]; separate ones (tied_noise=False) [B, 2, w]: H then T.
        m_iH, m_iT = (m_i[:, 0], m_i[:, 1]) if m_i.ndim == 3 else (m_i, m_i)
        m_hH, m_hT = (m_h[:, 0], m_h[:, 1]) if m_h.ndim == 3 else (m_h, m_h)
        s = state[layer].copy()
        outputs = []
        for t in range(T):
            for i in range(D):
                # only the copies that feed the matmuls are dropped
                s_H, s_T = s * m_hH, s * m_hT
                if i == 0:
                    z_H = np.concatenate([x[:, t, :] * m_iH, s_H], axis=1)
                    z_T = np.concatenate([x[:, t, :] * m_iT, s_T], axis=1)
                    h = np.tanh(z_H @ W_H0 + b[0, :H])
                    g = _sigmoid(z_T @ W_T0 + b[0, H:])
                else:
                    h = np.tanh(s_H @ R[i, :H].T + b[i, :H])
                    g = _sigmoid(s_T @ R[i, H:].T + b[i, H:])
                s = h * g + s * (1.0 - g)  # coupled carry gate, undropped s on the carry
            outputs.append(s)
        x = np.stack(outputs, axis=1)  # [B, T, H]: next layer's input
        final_states.append(s)
    y = x * masks["o"][:, None, :]
    W_out = E.T if tied else params["output_weight"].T  # [H, V]
    logits = y @ W_out + params["output_bias"]
    return logits, np.stack(final_states)


def _inverted_dropout(rng: np.random.Generator, shape, drop: float) -> np.ndarray:
    keep = 1.0 - drop
    return (rng.random(shape) < keep).astype(np.float64) / keep


def _hand_masks(rng, cfg: RHNConfig, B: int, T: int) -> dict:
    """Random inverted-dropout masks with the §2.4 shapes, as NumPy arrays."""
    return {
        "x": _inverted_dropout(rng, (B, T, 1), 0.3),
        "i": [
            _inverted_dropout(rng, (B, cfg.in_size if layer == 0 else cfg.hidden_size), 0.5)
            for layer in range(cfg.num_layers)
        ],
        "h": [_inverted_dropout(rng, (B, cfg.hidden_size), 0.4) for _ in range(cfg.num_layers)],
        "o": _inverted_dropout(rng, (B, cfg.hidden_size), 0.5),
    }


def _to_torch(masks: dict) -> dict:
    def conv(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    return {
        "x": conv(masks["x"]),
        "i": [conv(a) for a in masks["i"]],
        "h": [conv(a) for a in masks["h"]],
        "o": conv(masks["o"]),
    }


def _ones_masks(cfg: RHNConfig, B: int, T: int) -> dict:
    return {
        "x": np.ones((B, T, 1)),
        "i": [
            np.ones((B, cfg.in_size if layer == 0 else cfg.hidden_size))
            for layer in range(cfg.num_layers)
        ],
        "h": [np.ones((B, cfg.hidden_size)) for _ in range(cfg.num_layers)],
        "o": np.ones((B, cfg.hidden_size)),
    }


def _make_model(cfg: RHNConfig) -> RHNLanguageModel:
    torch.manual_seed(0)
    return RHNLanguageModel(cfg).double()


def reference_param_count(V: int, H: int, D: int, tied: bool) -> int:
    """Spec §6.3 (TF ``nvars``, num_layers = 1)."""
    in_size = V if (V < H and not tied) else H
    embedding = V * in_size
    micro0 = 2 * ((in_size + H) * H + H)
    micro_rest = 2 * (D - 1) * (H * H + H)
    softmax_w = 0 if tied else H * V
    softmax_b = V
    return embedding + micro0 + micro_rest + softmax_w + softmax_b


# --------------------------------------------------------------------------------------
# 1. Cell and language model equations (§2.1, §2.2)
# --------------------------------------------------------------------------------------

EQUATION_CASES = [
    pytest.param(dict(vocab_size=7, hidden_size=5, depth=3, num_layers=1, tied=True), id="L1-tied"),
    pytest.param(
        dict(vocab_size=7, hidden_size=5, depth=3, num_layers=1, tied=False), id="L1-untied"
    ),
    pytest.param(dict(vocab_size=7, hidden_size=5, depth=3, num_layers=2, tied=True), id="L2-tied"),
    pytest.param(
        dict(vocab_size=7, hidden_size=5, depth=3, num_layers=2, tied=False), id="L2-untied"
    ),
    # Untied with V < H: embedding width in_size = V (§1.1), layer 1 input width H.
    pytest.param(
        dict(vocab_size=4, hidden_size=6, depth=3, num_layers=1, tied=False),
        id="L1-untied-V<H",
    ),
    pytest.param(
        dict(vocab_size=4, hidden_size=6, depth=3, num_layers=2, tied=False),
        id="L2-untied-V<H",
    ),
]


@pytest.mark.parametrize("kwargs", EQUATION_CASES)
def test_cell_matches_reference_equations(kwargs):
    """Logits and final state equal a NumPy step-by-step evaluation of spec §2.2.

    Pins: input only in micro-layer 0 via one [(in+H), H] matrix per transform on
    ``[x*m_i, s*m_h]`` with one bias; micro-layers >= 1 use ``(s*m_h) R + b``; coupled
    update ``s = h*t + s*(1-t)`` with the undropped s on the carry path; the same m_i /
    m_h for both transforms, all micro-layers and all steps; whole-word embedding mask
    [B,T,1]; output mask [B,H] reused at every step; tied output = embedding^T plus a
    separate output bias; per-layer state carried to the final state; and the parameter
    layout documented in the module (rows 0:H = H transform, H:2H = T transform).
    """
    cfg = RHNConfig(**kwargs)
    if kwargs["vocab_size"] < kwargs["hidden_size"] and not kwargs["tied"]:
        assert cfg.in_size == kwargs["vocab_size"]
    model = _make_model(cfg)
    # Make the T biases non-degenerate so the gates are neither ~0 nor ~1, and make the
    # weights large enough that every term (incl. dropped units) matters numerically.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
        for layer in model.layers:
            layer.bias[:, cfg.hidden_size :].uniform_(-1.0, 1.0)
    model.train()

    rng = np.random.default_rng(42)
    B, T = 3, 4
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
    state = rng.uniform(-1.0, 1.0, size=(cfg.num_layers, B, cfg.hidden_size))
    masks = _hand_masks(rng, cfg, B, T)
    # Guarantee every mask has both dropped and kept entries.
    masks["h"][0][0, 0], masks["h"][0][0, 1] = 0.0, 1.0 / 0.6
    masks["i"][0][1, 0], masks["i"][0][1, 1] = 0.0, 2.0

    logits, final = model(
        torch.from_numpy(tokens), torch.from_numpy(state.copy()), _to_torch(masks)
    )
    ref_logits, ref_final = reference_forward(
        _np_params(model),
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_layers=cfg.num_layers,
        tied=cfg.tied,
        tokens=tokens,
        state=state,
        masks=masks,
    )
    assert logits.dtype == torch.float64
    assert logits.shape == (B, T, cfg.vocab_size)
    assert final.shape == (cfg.num_layers, B, cfg.hidden_size)
    np.testing.assert_allclose(logits.detach().numpy(), ref_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(final.detach().numpy(), ref_final, rtol=0, atol=TOL)

    # Every mask matters: applying only that mask changes the output relative to no
    # dropout, so the comparison above really exercised each of them.
    def run_both(m):
        ref, _ = reference_forward(
            _np_params(model),
            hidden_size=cfg.hidden_size,
            depth=cfg.depth,
            num_layers=cfg.num_layers,
            tied=cfg.tied,
            tokens=tokens,
            state=state,
            masks=m,
        )
        got, _ = model(torch.from_numpy(tokens), torch.from_numpy(state.copy()), _to_torch(m))
        np.testing.assert_allclose(got.detach().numpy(), ref, rtol=0, atol=TOL)
        return ref

    ones = _ones_masks(cfg, B, T)
    ref_ones = run_both(ones)
    for key in ("x", "i", "h", "o"):
        assert not np.allclose(run_both(dict(ones, **{key: masks[key]})), ref_ones), key


def test_eval_matches_reference_without_dropout():
    """In eval mode the model equals the §2.2 equations with all-ones masks (§2.4)."""
    cfg = RHNConfig(
        7, 5, 3, num_layers=2, tied=False, drop_x=0.25, drop_i=0.75, drop_h=0.25, drop_o=0.75
    )
    model = _make_model(cfg).eval()
    rng = np.random.default_rng(7)
    B, T = 2, 5
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
    state = rng.uniform(-1.0, 1.0, size=(cfg.num_layers, B, cfg.hidden_size))
    logits, final = model(torch.from_numpy(tokens), torch.from_numpy(state.copy()))
    ref_logits, ref_final = reference_forward(
        _np_params(model),
        hidden_size=5,
        depth=3,
        num_layers=2,
        tied=False,
        tokens=tokens,
        state=state,
        masks=_ones_masks(cfg, B, T),
    )
    np.testing.assert_allclose(logits.detach().numpy(), ref_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(final.detach().numpy(), ref_final, rtol=0, atol=TOL)


def test_state_carry_over_between_windows():
    """Truncated BPTT (§3.3): running T steps at once equals running them in two windows,
    feeding the first window's final state as the second's initial state, with the same
    masks (i, h, o constant in time; x sliced per window)."""
    cfg = RHNConfig(9, 6, 2, num_layers=2, tied=True)
    model = _make_model(cfg).train()
    rng = np.random.default_rng(3)
    B, T = 2, 6
    tokens = torch.from_numpy(rng.integers(0, 9, size=(B, T)))
    state = torch.from_numpy(rng.uniform(-1, 1, size=(2, B, 6)))
    masks = _to_torch(_hand_masks(rng, cfg, B, T))
    full, full_state = model(tokens, state, masks)
    first = dict(masks, x=masks["x"][:, :3])
    second = dict(masks, x=masks["x"][:, 3:])
    a, mid = model(tokens[:, :3], state, first)
    b, end = model(tokens[:, 3:], mid, second)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=0, atol=TOL)
    torch.testing.assert_close(end, full_state, rtol=0, atol=TOL)


# --------------------------------------------------------------------------------------
# 2. Parameter counts (§6.1, §6.3)
# --------------------------------------------------------------------------------------


def _count(V: int, H: int, D: int, tied: bool) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = RHNLanguageModel(RHNConfig(V, H, D, tied=tied))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("V", "H", "D", "tied", "expected"),
    [
        pytest.param(10000, 830, 10, True, 23_482_400, id="ptb_sota"),
        pytest.param(205, 1500, 10, False, 45_994_730, id="enwik8_sota"),
        pytest.param(27, 1500, 10, False, 45_152_256, id="text8_sota"),
        # §6.1 depth sweep (PTB, V = 10000)
        pytest.param(10000, 1275, 1, False, 32_015_050, id="depth1-untied"),
        pytest.param(10000, 1275, 1, True, 19_265_050, id="depth1-WT"),
        pytest.param(10000, 1050, 4, True, 21_543_400, id="depth4-WT"),
        pytest.param(10000, 890, 8, False, 32_082_040, id="depth8-untied"),
        pytest.param(10000, 830, 10, False, 31_782_400, id="depth10-untied"),
        # §6.3 other configurations
        pytest.param(10000, 1000, 4, True, 20_018_000, id="default-config"),
        pytest.param(205, 1500, 5, False, 23_479_730, id="orig-enwik8_sota"),
    ],
)
def test_ptb_sota_parameter_count(V, H, D, tied, expected):
    """Parameter count equals the TF ``nvars`` of spec §6.3 (formula and literal value)."""
    assert reference_param_count(V, H, D, tied) == expected
    assert _count(V, H, D, tied) == expected


def test_parameter_shapes_ptb_sota_and_num_parameters():
    """Per-tensor sizes for ptb_sota map onto the TF variables of §2.2/§6.3, and
    ``num_parameters()`` agrees with the sum."""
    V, H, D = 10000, 830, 10
    with torch.device("meta"):
        model = RHNLanguageModel(RHNConfig(V, H, D, tied=True))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "embedding.weight": (V, H),
        "layers.0.input_weight": (2 * H, H),
        "layers.0.recurrent_weight": (D, 2 * H, H),
        "layers.0.bias": (D, 2 * H),
        "output_bias": (V,),
    }
    assert model.output_weight is None
    # TF: h_0 and t_0 Matrix [(in+H), H] + Bias [H]; h_i, t_i Matrix [H, H] + Bias [H].
    tf_total = V * H + 2 * ((H + H) * H + H) + 2 * (D - 1) * (H * H + H) + V
    assert model.num_parameters() == tf_total == 23_482_400


@pytest.mark.parametrize(
    ("V", "H", "tied", "in_size"),
    [
        (10000, 830, True, 830),
        (205, 1500, False, 205),
        (27, 1500, False, 27),
        (205, 1500, True, 1500),
        (10000, 830, False, 830),
    ],
)
def test_in_size_rule(V, H, tied, in_size):
    """Embedding width: V if V < H and untied, else H (§1.1)."""
    assert RHNConfig(V, H, 2, tied=tied).in_size == in_size
    with torch.device("meta"):
        model = RHNLanguageModel(RHNConfig(V, H, 2, tied=tied))
    assert tuple(model.embedding.weight.shape) == (V, in_size)
    assert tuple(model.layers[0].input_weight.shape) == (2 * H, in_size)


# --------------------------------------------------------------------------------------
# 3. Initialisation (§2.3)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tied", "init_scale", "init_bias"),
    [(True, 0.04, -2.0), (False, 0.04, -4.0), (False, 0.1, -2.0)],
)
def test_initialisation(tied, init_scale, init_bias):
    """Everything is U(-init_scale, init_scale) (incl. embedding, softmax_w, H biases and
    softmax_b) except the T biases, which are exactly ``init_bias`` at every micro-layer,
    micro-layer 0 included. PyTorch's default inits (e.g. N(0,1) embedding) are overridden.
    """
    cfg = RHNConfig(60, 40, 4, num_layers=2, tied=tied, init_scale=init_scale, init_bias=init_bias)
    torch.manual_seed(5)
    model = RHNLanguageModel(cfg)
    H = cfg.hidden_size

    uniform = {
        "embedding.weight": model.embedding.weight,
        "output_bias": model.output_bias,
    }
    if not tied:
        assert model.output_weight is not None
        uniform["output_weight"] = model.output_weight
    else:
        assert model.output_weight is None
    for k, layer in enumerate(model.layers):
        uniform[f"layers.{k}.input_weight"] = layer.input_weight
        uniform[f"layers.{k}.recurrent_weight"] = layer.recurrent_weight
        uniform[f"layers.{k}.H_bias"] = layer.bias[:, :H]

    for name, p in uniform.items():
        v = p.detach().double()
        assert v.abs().max().item() <= init_scale, name
        assert v.std().item() > 0.0, name
        assert v.unique().numel() > v.numel() // 2, name  # not a constant / few values
        if v.numel() >= 1000:  # U(-a, a): mean 0, std a / sqrt(3)
            assert abs(v.mean().item()) < 0.1 * init_scale, name
            assert v.std().item() == pytest.approx(init_scale / 3**0.5, rel=0.1), name

    for k, layer in enumerate(model.layers):
        t_bias = layer.bias[:, H:].detach()
        h_bias = layer.bias[:, :H].detach()
        assert t_bias.shape == (cfg.depth, H)
        assert torch.all(t_bias == init_bias), f"layer {k}: T biases must equal init_bias"
        assert torch.all(t_bias[0] == init_bias)  # micro-layer 0 included
        assert not torch.any(h_bias == init_bias), f"layer {k}: H biases are uniform"
        for i in range(cfg.depth):  # every micro-layer's H bias is random, not constant
            assert h_bias[i].std().item() > 0.0


# --------------------------------------------------------------------------------------
# 4. Dropout-mask semantics (§2.4)
# --------------------------------------------------------------------------------------


def _dropout_cfg(**kw) -> RHNConfig:
    base = dict(
        vocab_size=11,
        hidden_size=6,
        depth=3,
        num_layers=2,
        tied=True,
        drop_x=0.25,
        drop_i=0.5,
        drop_h=0.25,
        drop_o=0.5,
    )
    base.update(kw)
    return RHNConfig(**base)


def test_masks_drawn_once_per_minibatch(monkeypatch):
    """Masks are drawn once per forward call (= per minibatch), not per time step or per
    micro-layer: the number of draws is independent of T and D, none of the drawn masks
    has a time axis except m_x [B,T,1], and passing a masks dict draws nothing."""
    calls: list[tuple[str, tuple]] = []
    orig_var, orig_word = rhn_module.variational_mask, rhn_module.word_type_mask

    def spy_var(shape, drop, *, like):
        calls.append(("var", tuple(shape)))
        return orig_var(shape, drop, like=like)

    def spy_word(tokens, vocab_size, drop, *, like):
        calls.append(("word", tuple(tokens.shape)))
        return orig_word(tokens, vocab_size, drop, like=like)

    monkeypatch.setattr(rhn_module, "variational_mask", spy_var)
    monkeypatch.setattr(rhn_module, "word_type_mask", spy_word)

    B = 3
    counts = {}
    for depth in (1, 4):
        cfg = _dropout_cfg(depth=depth)
        model = _make_model(cfg).train()
        for T in (1, 7):
            calls.clear()
            tokens = torch.randint(0, cfg.vocab_size, (B, T))
            model(tokens, model.initial_state(B))
            counts[(depth, T)] = len(calls)
            assert sum(kind == "word" for kind, _ in calls) == 1
            var_shapes = [shape for kind, shape in calls if kind == "var"]
            # one i- and one h-mask per layer, one o-mask; none with a time axis
            assert sorted(var_shapes) == sorted([(B, cfg.hidden_size)] * (2 * cfg.num_layers + 1))

            # draw_masks makes exactly the same draws; a forward given masks makes none.
            calls.clear()
            masks = model.draw_masks(tokens)
            assert len(calls) == counts[(depth, T)]
            calls.clear()
            model(tokens, model.initial_state(B), masks)
            assert calls == [], "a forward with explicit masks must not draw new ones"
    # 2 * num_layers + 1 variational masks + 1 word-type mask, for every T and D
    assert set(counts.values()) == {2 * 2 + 1 + 1}


def test_masks_reproducible_and_fresh_per_call():
    """A forward with the masks from draw_masks is reproducible with the same dict; two
    train-mode forwards without masks use fresh masks (different outputs); the internal
    draw is the same as draw_masks under the same RNG state."""
    cfg = _dropout_cfg()
    model = _make_model(cfg).train()
    B, T = 4, 6
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    state = torch.randn(cfg.num_layers, B, cfg.hidden_size, dtype=torch.float64)

    masks = model.draw_masks(tokens)
    out1, s1 = model(tokens, state, masks)
    out2, s2 = model(tokens, state, masks)
    assert torch.equal(out1, out2) and torch.equal(s1, s2)

    torch.manual_seed(99)
    masks = model.draw_masks(tokens)
    with_masks, _ = model(tokens, state, masks)
    torch.manual_seed(99)
    internal, _ = model(tokens, state)
    assert torch.equal(with_masks, internal)

    a, _ = model(tokens, state)
    b, _ = model(tokens, state)
    assert not torch.allclose(a, b), "each minibatch must get a new set of masks"


def test_masks_constant_over_time():
    """With one masks dict, running the sequence step by step (T calls of one step each,
    state carried, m_x sliced per step, m_i/m_h/m_o unchanged) equals one T-step call:
    the i, h and o masks are the same at every time step."""
    cfg = _dropout_cfg()
    model = _make_model(cfg).train()
    B, T = 3, 5
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    state = torch.randn(cfg.num_layers, B, cfg.hidden_size, dtype=torch.float64)
    masks = model.draw_masks(tokens)
    assert masks["x"].shape == (B, T, 1)
    full, full_state = model(tokens, state, masks)
    s = state
    steps = []
    for t in range(T):
        out, s = model(tokens[:, t : t + 1], s, dict(masks, x=masks["x"][:, t : t + 1]))
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=TOL)
    torch.testing.assert_close(s, full_state, rtol=0, atol=TOL)


def test_no_dropout_on_carry_path():
    """m_h only drops the copy of s feeding the matmuls (§2.2, §2.4): where the T gate is
    exactly 0 the state is carried unchanged, bit for bit, whatever m_h is -- even an
    all-zero m_h -- and where the gate is 1 the state becomes h."""
    H = 6
    cfg = RHNConfig(7, H, 3, num_layers=1, tied=True)
    B, T = 3, 4
    tokens = torch.randint(0, 7, (B, T))
    state = torch.rand(1, B, H, dtype=torch.float64) + 0.5  # strictly nonzero
    zero_h = {"x": None, "i": [None], "h": [torch.zeros(B, H, dtype=torch.float64)], "o": None}
    rand_h = {
        "x": None,
        "i": [None],
        "h": [torch.bernoulli(torch.full((B, H), 0.5, dtype=torch.float64)) * 2.0],
        "o": None,
    }

    # (a) gates closed everywhere (T bias -1000 => sigmoid == 0 exactly in float64), with
    #     nonzero recurrent weights: the state never changes.
    model = _make_model(cfg).train()
    with torch.no_grad():
        model.layers[0].bias[:, H:] = -1000.0
    for masks in (zero_h, rand_h, None):
        _, final = model(tokens, state, masks)
        assert torch.equal(final, state), "carried state must not be dropped"

    # (b) recurrent weights zeroed; T gate open (t = 1) on units 0..2, closed on 3..5.
    model = _make_model(cfg).train()
    with torch.no_grad():
        model.layers[0].recurrent_weight.zero_()
        model.layers[0].bias[:, H : H + 3] = 1000.0
        model.layers[0].bias[:, H + 3 :] = -1000.0
    h_last = torch.tanh(model.layers[0].bias[-1, :3].detach())  # last micro-layer: h = tanh(b_H)
    for masks in (zero_h, rand_h, None):
        _, final = model(tokens, state, masks)
        assert torch.equal(final[..., 3:], state[..., 3:])  # t = 0: s_new == s_old exactly
        torch.testing.assert_close(
            final[0, :, :3], h_last.expand(B, 3), rtol=0, atol=1e-12
        )  # t = 1: s_new == h, no trace of s


def test_no_dropout_at_eval():
    """Evaluation applies no dropout (§2.4: eval feeds all-ones masks): eval output is
    deterministic, ignores any masks passed in, and equals a train-mode forward with
    all-ones masks and a train-mode forward of the same weights with drop rates 0."""
    cfg = _dropout_cfg(drop_x=0.25, drop_i=0.75, drop_h=0.25, drop_o=0.75)
    model = _make_model(cfg)
    B, T = 3, 5
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    state = torch.randn(cfg.num_layers, B, cfg.hidden_size, dtype=torch.float64)

    model.eval()
    e1, es1 = model(tokens, state)
    e2, es2 = model(tokens, state)
    assert torch.equal(e1, e2) and torch.equal(es1, es2)
    ones = _to_torch(_ones_masks(cfg, B, T))
    zeros = {
        "x": ones["x"] * 0,
        "i": [m * 0 for m in ones["i"]],
        "h": [m * 0 for m in ones["h"]],
        "o": ones["o"] * 0,
    }
    e3, _ = model(tokens, state, zeros)
    assert torch.equal(e1, e3), "masks must be ignored in eval mode"

    model.train()
    t_ones, ts_ones = model(tokens, state, _to_torch(_ones_masks(cfg, B, T)))
    torch.testing.assert_close(t_ones, e1, rtol=0, atol=TOL)
    torch.testing.assert_close(ts_ones, es1, rtol=0, atol=TOL)
    t_drop, _ = model(tokens, state)
    assert not torch.allclose(t_drop, e1)  # sanity: training does drop

    no_drop = RHNLanguageModel(
        dataclasses.replace(cfg, drop_x=0.0, drop_i=0.0, drop_h=0.0, drop_o=0.0)
    ).double()
    no_drop.load_state_dict(model.state_dict())
    no_drop.train()
    nd, nds = no_drop(tokens, state)
    torch.testing.assert_close(nd, e1, rtol=0, atol=TOL)
    torch.testing.assert_close(nds, es1, rtol=0, atol=TOL)


@pytest.mark.parametrize("drop", [0.75, 0.25, 0.4, 0.1])
def test_variational_mask_inverted_dropout(drop):
    """Masks are Bernoulli(keep)/keep with keep = 1 - drop (§2.4): drop_i = 0.75 keeps a
    quarter of the units and scales them by 4. Values are exactly {0, 1/keep}, the kept
    fraction is ~ keep and the mean is ~ 1."""
    like = torch.zeros((), dtype=torch.float64)
    m = variational_mask((400, 500), drop, like=like)
    keep = 1.0 - drop
    assert m.shape == (400, 500) and m.dtype == torch.float64
    assert set(m.unique().tolist()) == {0.0, 1.0 / keep}
    frac = (m != 0).double().mean().item()
    assert frac == pytest.approx(keep, abs=0.01)  # 200k samples: sd ~ 0.001
    assert m.mean().item() == pytest.approx(1.0, abs=0.01 / keep)
    if drop == 0.75:
        assert set(m.unique().tolist()) == {0.0, 4.0}


def test_variational_mask_no_dropout_is_none_or_ones():
    """drop = 0 means no dropout (eval configs set drop_* = 0 and get all-ones masks)."""
    like = torch.zeros(())
    m = variational_mask((3, 4), 0.0, like=like)
    assert m is None or torch.equal(m, torch.ones(3, 4))


def test_word_type_mask_tied_per_type_within_row():
    """noise_x (§2.4): shape [B,T,1], one value per word type within a batch row, so
    repeated token ids in a row share the mask; values in {0, 1/keep}."""
    drop = 0.5
    B, T, V = 64, 40, 6  # many repeats per row
    tokens = torch.randint(0, V, (B, T))
    like = torch.zeros((), dtype=torch.float64)
    m = word_type_mask(tokens, V, drop, like=like)
    assert m.shape == (B, T, 1)
    assert set(m.unique().tolist()) <= {0.0, 2.0}
    for b in range(B):
        for w in tokens[b].unique().tolist():
            vals = m[b, tokens[b] == w, 0]
            assert torch.all(vals == vals[0]), f"row {b}, token {w}: not tied"
    # Within a row, distinct word types are not forced equal: across rows, rows where the
    # (present) types disagree must occur.
    disagree = sum(int(m[b, :, 0].unique().numel() > 1) for b in range(B))
    assert disagree > B // 2


def test_word_type_mask_independent_rows_and_types():
    """Different batch rows (and different types) get independent masks: with every row
    holding the same token, the per-row drop rate is ~ drop and the fraction of row pairs
    both dropped is ~ drop^2 (not ~ drop, as it would be if the mask were shared)."""
    drop = 0.25
    B, T = 20000, 3
    like = torch.zeros((), dtype=torch.float64)
    tokens = torch.full((B, T), 2, dtype=torch.long)
    m = word_type_mask(tokens, 5, drop, like=like)[:, 0, 0]
    dropped = (m == 0).double()
    assert dropped.mean().item() == pytest.approx(drop, abs=0.015)
    both = (dropped[0::2] * dropped[1::2]).mean().item()
    assert both == pytest.approx(drop**2, abs=0.015)
    # different types within one row: tokens 0..V-1 each once
    V = 50
    tokens = torch.arange(V).repeat(2000, 1)
    mt = word_type_mask(tokens, V, drop, like=like)[..., 0]
    d = (mt == 0).double()
    assert d.mean().item() == pytest.approx(drop, abs=0.01)
    both_types = (d[:, 0] * d[:, 1]).mean().item()
    assert both_types == pytest.approx(drop**2, abs=0.02)


def test_mask_shapes_two_layers_untied_small_vocab():
    """num_layers = 2, untied, V < H: m_i of layer 0 has width in_size = V, of layer 1
    width H; m_h and m_o are [B, H]; m_x is [B, T, 1]; the forward accepts them."""
    cfg = RHNConfig(
        4, 6, 2, num_layers=2, tied=False, drop_x=0.1, drop_i=0.4, drop_h=0.1, drop_o=0.4
    )
    model = _make_model(cfg).train()
    B, T = 5, 3
    tokens = torch.randint(0, 4, (B, T))
    masks = model.draw_masks(tokens)
    assert cfg.in_size == 4
    assert masks["x"].shape == (B, T, 1)
    assert [tuple(m.shape) for m in masks["i"]] == [(B, 4), (B, 6)]
    assert [tuple(m.shape) for m in masks["h"]] == [(B, 6), (B, 6)]
    assert masks["o"].shape == (B, 6)
    assert tuple(model.layers[0].input_weight.shape) == (12, 4)
    assert tuple(model.layers[1].input_weight.shape) == (12, 6)
    assert tuple(model.output_weight.shape) == (4, 6)
    logits, final = model(tokens, model.initial_state(B), masks)
    assert logits.shape == (B, T, 4) and final.shape == (2, B, 6)


# --------------------------------------------------------------------------------------
# 5. Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=12, hidden_size=6, depth=3, num_layers=1, tied=True),
        dict(vocab_size=12, hidden_size=6, depth=3, num_layers=2, tied=False),
        dict(vocab_size=4, hidden_size=6, depth=2, num_layers=2, tied=False),
    ],
    ids=["tied", "untied", "untied-V<H"],
)
def test_gradients_reach_every_parameter(kwargs):
    """loss.backward() (CE summed over B*T / B, §2.5) yields finite, nonzero gradients for
    every parameter, T biases and the output bias included. When tied, the embedding
    also gets gradient through the output layer (rows of tokens absent from the input)."""
    cfg = RHNConfig(**kwargs, drop_x=0.1, drop_i=0.2, drop_h=0.1, drop_o=0.2)
    model = _make_model(cfg).train()
    B, T = 4, 5
    V = cfg.vocab_size
    tokens = torch.randint(0, V - 1, (B, T))  # token V-1 never appears as input
    targets = torch.randint(0, V, (B, T))
    logits, _ = model(tokens, model.initial_state(B))
    loss = (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), targets.reshape(-1), reduction="sum"
        )
        / B
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum().item() > 0, name
    for layer in model.layers:
        assert layer.bias.grad[:, cfg.hidden_size :].abs().sum().item() > 0  # T biases
    unused_row = model.embedding.weight.grad[V - 1]
    if cfg.tied:
        assert unused_row.abs().sum().item() > 0
    else:
        assert torch.all(unused_row == 0)


def test_gradcheck_small_model():
    """Finite-difference check (float64) of d loss / d params with fixed masks."""
    cfg = RHNConfig(5, 3, 2, num_layers=2, tied=False)
    model = _make_model(cfg).train()
    rng = np.random.default_rng(11)
    B, T = 2, 3
    tokens = torch.from_numpy(rng.integers(0, 5, size=(B, T)))
    targets = torch.from_numpy(rng.integers(0, 5, size=(B, T)))
    state = torch.from_numpy(rng.uniform(-1, 1, size=(2, B, 3)))
    masks = _to_torch(_hand_masks(rng, cfg, B, T))
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def loss_fn(*ps):
        logits, final = functional_call(
            model, dict(zip(names, ps, strict=True)), (tokens, state, masks)
        )
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 5), targets.reshape(-1), reduction="sum"
        )
        return ce / B + final.sum()

    assert torch.autograd.gradcheck(loss_fn, params, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_separate_h_and_t_masks_match_reference_equations(num_layers):
    """tied_noise=False (Torch7, Theano option): H and T each get their own m_i and m_h."""
    cfg = RHNConfig(
        vocab_size=4,
        hidden_size=6,
        depth=3,
        num_layers=num_layers,
        tied=False,
        tied_noise=False,
        drop_x=0.2,
        drop_i=0.4,
        drop_h=0.3,
        drop_o=0.3,
    )
    model = _make_model(cfg).double().train()
    rng = np.random.default_rng(3)
    B, T = 3, 4
    widths = [cfg.in_size] + [cfg.hidden_size] * (num_layers - 1)
    masks = {
        "x": _inverted_dropout(rng, (B, T, 1), 0.2),
        "i": [_inverted_dropout(rng, (B, 2, w), 0.4) for w in widths],
        "h": [_inverted_dropout(rng, (B, 2, cfg.hidden_size), 0.3) for _ in widths],
        "o": _inverted_dropout(rng, (B, cfg.hidden_size), 0.3),
    }
    assert not np.array_equal(masks["h"][0][:, 0], masks["h"][0][:, 1])
    tokens = rng.integers(0, 4, (B, T))
    state = rng.normal(size=(num_layers, B, cfg.hidden_size))
    expected_logits, expected_state = reference_forward(
        _np_params(model),
        hidden_size=6,
        depth=3,
        num_layers=num_layers,
        tied=False,
        tokens=tokens,
        state=state,
        masks=masks,
    )
    logits, final = model(torch.as_tensor(tokens), torch.as_tensor(state), _to_torch(masks))
    np.testing.assert_allclose(logits.detach().numpy(), expected_logits, atol=1e-10)
    np.testing.assert_allclose(final.detach().numpy(), expected_state, atol=1e-10)
    drawn = model.draw_masks(torch.as_tensor(tokens))
    assert [m.shape for m in drawn["i"]] == [(B, 2, w) for w in widths]
    assert drawn["h"][0].shape == (B, 2, cfg.hidden_size)


def test_init_other_bias_sets_every_non_t_bias():
    """Theano's init_other_bias: H biases and the output bias constant, T biases init_bias."""
    model = _make_model(
        RHNConfig(
            vocab_size=9, hidden_size=5, depth=3, tied=True, init_bias=-2.0, init_other_bias=0.0
        )
    )
    bias = model.layers[0].bias.detach()
    assert torch.all(bias[:, :5] == 0.0) and torch.all(bias[:, 5:] == -2.0)
    assert torch.all(model.output_bias.detach() == 0.0)
    assert model.layers[0].recurrent_weight.detach().abs().max() > 0  # weights still uniform
