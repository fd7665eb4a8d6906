"""``make bench``'s peer rows (benchmarks/peers.py, issue 21 item 3): one row per peer
family at its named config's shape beside nn.LSTM, with its target and PASS/MISS."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rhn_cli.models import build_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # peers.py imports its neighbours, as the suite runs it
_spec = importlib.util.spec_from_file_location("peers", BENCHMARKS / "peers.py")
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers"] = peers  # dataclasses look their module up there
_spec.loader.exec_module(peers)

TARGETS = {
    "ptb_lstm_medium": 0.95,
    "wiki_stacked3": 0.95,
    "zoneout_char_ptb": 0.7,
    "ptb_variational_lstm": 0.7,
    "wiki_grid3": 0.7,
    "gru_tutorial": 0.7,
}


def test_each_peer_is_measured_at_its_named_config_shape():
    shapes = {name: peers.peer_shape(name, None, {}) for name in TARGETS}
    described = {name: shape.describe for name, shape in shapes.items()}
    assert described == {
        "ptb_lstm_medium": "2 x 650, B 20, T 35",
        "wiki_stacked3": "3 x 1000, B 50, T 50",
        "zoneout_char_ptb": "1 x 1000, B 32, T 99",
        "ptb_variational_lstm": "2 x 1500, B 20, T 35",
        "wiki_grid3": "3 x 1000, B 50, T 50",
        "gru_tutorial": "2 x 128, B 1, T 22",  # one sentence per update, PTB's mean length
    }
    assert peers.peer_shape("wiki_stacked3", 10, {}).T == 10  # --quick


def test_the_peer_table_prints_a_row_and_a_verdict_per_family(capsys, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CUDA call while measuring on the CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    cpu = torch.device("cpu")
    rows = peers.peer_rows(rounds=2, quick=True, device=cpu, overrides={"hidden_size": 8})
    printed = capsys.readouterr().out
    assert [row["config"] for row in rows] == list(TARGETS)
    lines = {line.split()[0]: line for line in printed.splitlines()[3:] if line.strip()}
    for row in rows:
        assert row["target"] == TARGETS[row["config"]]
        assert len(row["step_seconds"]["peer"]) == len(row["step_seconds"]["lstm"]) == 2
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["pass"] == (row["ratio"] >= row["target"])
        line = lines[row["config"]]
        assert f"{row['ratio']:.2f}x" in line and line.endswith("PASS" if row["pass"] else "MISS")
    assert "2 x 8, B 1, T 10" in lines["gru_tutorial"]
    checks = peers.peer_checks(rows)
    assert [(what, ok) for what, _, ok in checks] == [
        (f"peer {row['config']} >= {row['target']:g}x nn.LSTM", row["pass"]) for row in rows
    ]
    # The Grid LSTM's ceiling: nn.LSTM's step over that step plus the depth products.
    grid = next(row for row in rows if row["config"] == "wiki_grid3")
    assert [row["config"] for row in rows if "ceiling" in row] == ["wiki_grid3"]
    assert 0 < grid["ceiling"] < 1 and grid["depth_gflops"] > 0
    after_grid = printed.splitlines()[printed.splitlines().index(lines["wiki_grid3"]) + 1]
    assert f"ceiling {grid['ceiling']:.2f}x" in after_grid
    assert dict((what, figure) for what, figure, _ in checks)[
        "peer wiki_grid3 >= 0.7x nn.LSTM"
    ] == (f"{grid['ratio']:.2f}x (ceiling {grid['ceiling']:.2f}x)")


def test_the_grid_ceiling_counts_the_depth_lstms_products():
    """wiki_grid3's depth LSTMs: per layer a [2500, 2000] x [2000, 4000] product forward
    and its input and weight gradients: 360 GFLOP a step."""
    shape = peers.peer_shape("wiki_grid3", None, {"hidden_size": 8})
    assert peers.DepthProducts(shape, torch.device("cpu")).flops == 3 * 3 * 2 * 2500 * 16 * 32
    assert peers.DepthProducts(shape, torch.device("cpu")).seconds() > 0
    full = peers.peer_shape("wiki_grid3", None, {})
    assert peers.DepthProducts(full, torch.device("cpu")).flops == 360e9


class _DroppedElements(TorchDispatchMode):
    """Counts the elements that dropout masks are drawn for (aten's bernoulli_, also
    inside nn.LSTM's C++ between its layers)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "bernoulli" in str(func):
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def test_the_nn_lstm_model_beside_a_peer_drops_what_the_peer_drops():
    """The comparison is the LSTM's: the nn.LSTM model draws dropout masks for as many
    elements per step as the peer does with its config's ``dropout`` (Zaremba's on the
    embedding, between layers and on the output; char-rnn's and the grid's between
    layers and on the output), and none beside the peers without it."""
    cpu = torch.device("cpu")
    for name in TARGETS:
        shape = peers.peer_shape(name, 4, {"hidden_size": 8})
        dropped = []
        for model in (
            build_model(shape.config, shape.config["vocab_size"]),
            peers.FusedLSTMLanguageModel(shape),
        ):
            with _DroppedElements() as counted:
                peers.PeerTrainee(model, shape, cpu).step()
            dropped.append(counted.elements)
        if shape.config["dropout"]:
            assert dropped[0] == dropped[1] > 0, (name, dropped)
        else:  # Gal's variational masks and zoneout are the peer's own work
            assert dropped[1] == 0, (name, dropped)
