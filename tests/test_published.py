"""Published targets beside every result (issue 20, item 3): the shipped named configs'
published figures, the rule that gives a run them only when its config is the paper's,
their recording in ``info.published`` by a real ``rhn train``, and ``rhn runs ls``,
``show``, ``compare`` and ``plot`` showing the run's result beside them.

Real paper runs take days, so the recorded runs here are of ``tiny`` with figures for it
added to the table for the test (the rule and the recording are the real ones)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.experiment import published as paper
from rhn_cli.experiment.published import (
    PUBLISHED,
    Published,
    targets_for_config,
    with_published,
)
from rhn_cli.experiment.resolve import discover, resolve
from tests.test_runs_cli import CLEAN_ENV, _runner, ok, rhn, table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY_FIGURES = {"valid.ppl": 5.0, "test.ppl": 4.0}


def _targets(*tokens: str) -> dict | None:
    resolved = resolve(["with", *tokens])
    return targets_for_config(resolved.config, [n.name for n in resolved.named])


# --------------------------------------------------------------------------------------
# The figures and the rule
# --------------------------------------------------------------------------------------


def test_every_figure_is_the_one_its_named_config_states():
    """The table and each shipped config's first comment lines say the same numbers."""
    shipped = discover()
    for name, entries in PUBLISHED.items():
        assert shipped[name].shipped, name
        head = "".join(shipped[name].path.read_text().splitlines(keepends=True)[:2])
        for entry in entries:
            for metric, value in entry.figures.items():
                shown = f"{value:.2f}" if metric.endswith("bpc") else f"{value:.1f}"
                assert shown in head, (name, metric, value)
    assert PUBLISHED["ptb_sota"][0].figures == {"valid.ppl": 67.9, "test.ppl": 65.4}
    assert PUBLISHED["enwik8_sota"][0].figures == {"test.bpc": 1.27}


@pytest.mark.parametrize(
    ("tokens", "figures"),
    [
        (["ptb_sota"], {"valid.ppl": 67.9, "test.ppl": 65.4}),
        # Neutral keys and a shortened run keep the paper's config.
        (["ptb_sota", "seed=3", "device=cpu", "max_time=2h"], {"valid.ppl": 67.9}),
        (["ptb_sota", "max_max_epoch=3", "checkpoint_every=0"], {"test.ppl": 65.4}),
        (["ptb_depth3"], {"valid.ppl": 75.0, "test.ppl": 72.6}),
        (["ptb_depth3", "tied=True"], {"valid.ppl": 72.7, "test.ppl": 70.6}),
        (["enwik8_sota"], {"test.bpc": 1.27}),
        (["zoneout_text8"], {"test.bpc": 1.36}),
        (["ptb_lstm_small"], {"valid.ppl": 120.7, "test.ppl": 114.5}),
        (["ptb_lstm_medium", "max_max_epoch=10"], {"valid.ppl": 86.2, "test.ppl": 82.7}),
        (["ptb_lstm_large"], {"valid.ppl": 82.2, "test.ppl": 78.4}),
        # Derived configs are not the paper's.
        (["ptb_sota", "depth=5"], None),
        (["ptb_sota", "hidden_size=800"], None),
        (["ptb_sota", "learning_rate=0.1"], None),
        (["ptb_sota", "max_max_epoch=600"], None),
        (["ptb_depth3", "drop_x=0.1"], None),
        (["ptb_lstm_large", "lstm_bias_init='uniform'"], None),
        # Configs without figures (unverified or none published).
        (["tiny"], None),
        (["ptb_variational_lstm"], None),
        (["wiki_grid3"], None),
    ],
)
def test_a_run_gets_targets_only_with_the_papers_config(tokens, figures):
    targets = _targets(*tokens)
    if figures is None:
        assert targets is None
        return
    assert targets is not None and figures.items() <= targets.items()
    assert targets["config"].split()[0] == tokens[0] and targets["source"]
    assert targets["epochs"] == resolve(["with", tokens[0]]).config["max_max_epoch"]


@pytest.mark.parametrize(
    ("name", "hidden", "epochs", "dropout", "init_scale", "steps", "clip"),
    [
        ("ptb_lstm_small", 200, 13, 0.0, 0.1, 20, 5.0),
        ("ptb_lstm_medium", 650, 39, 0.5, 0.05, 35, 5.0),
        ("ptb_lstm_large", 1500, 55, 0.65, 0.04, 35, 10.0),
    ],
)
def test_zaremba_figures_belong_to_the_papers_setups(
    name, hidden, epochs, dropout, init_scale, steps, clip
):
    """Table 1's three LSTMs: 2 layers on word-level PTB, batch 20, SGD from lr 1."""
    config = resolve(["with", name]).config
    assert (config["model"], config["dataset"], config["vocab_size"]) == ("lstm", "ptb", 10000)
    assert (config["num_layers"], config["hidden_size"], config["max_max_epoch"]) == (
        2,
        hidden,
        epochs,
    )
    assert (config["dropout"], config["init_scale"], config["num_steps"]) == (
        dropout,
        init_scale,
        steps,
    )
    assert (config["max_grad_norm"], config["batch_size"], config["learning_rate"]) == (
        clip,
        20,
        1.0,
    )
    assert PUBLISHED[name][0].source.startswith("Zaremba et al. 2014, Table 1")


def test_the_last_named_config_with_figures_decides():
    assert _targets("ptb_depth10", "ptb_sota")["config"] == "ptb_sota"
    assert _targets("ptb_sota", "ptb_depth10")["config"] == "ptb_depth10"


def test_a_config_equal_to_another_papers_gets_its_figures():
    """The depth-table sweep of docs/experiments.md: ptb_sota untied at depth 8 is
    ptb_depth8's config, tied it is the depth table's weight-tied row."""
    untied = _targets("ptb_sota", "tied=False", "depth=8", "hidden_size=890")
    assert untied["config"] == "ptb_depth8" and untied["test.ppl"] == 68.5
    tied = _targets("ptb_sota", "depth=8", "hidden_size=890")
    assert tied["config"] == "ptb_depth8 tied=True" and tied["test.ppl"] == 66.1


def test_a_resumed_runs_info_keeps_targets_only_if_its_config_is_the_papers():
    stale = {"published": {"valid.ppl": 1.0}, "slurm": {"job": "7"}}
    derived = resolve(["with", "ptb_sota", "depth=5"])
    assert with_published(stale, derived.config, ["ptb_sota"]) == {"slurm": {"job": "7"}}
    assert with_published(None, derived.config, ["ptb_sota"]) is None
    assert with_published({"published": {}}, derived.config, ["ptb_sota"]) == {}
    same = resolve(["with", "ptb_sota"])
    info = with_published(stale, same.config, ["ptb_sota"])
    assert info["published"]["valid.ppl"] == 67.9 and info["slurm"] == {"job": "7"}


# --------------------------------------------------------------------------------------
# Recorded by real runs; shown by rhn runs
# --------------------------------------------------------------------------------------


def _train(runs_dir: Path, *tokens: str) -> None:
    result = _runner().invoke(
        cli, ["train", "with", *tokens, "--runs-dir", str(runs_dir)], env=CLEAN_ENV
    )
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory) -> Path:
    """runs/1: tiny as shipped, with figures for tiny in the table; runs/2: tiny with a
    changed model key (depth=3). Both real ``rhn train`` runs."""
    import torch

    runs_dir = tmp_path_factory.mktemp("published") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    entry = Published(dict(TINY_FIGURES), "a test figure")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(paper.PUBLISHED, "tiny", [entry])
            _train(runs_dir, "tiny", "--name", "paper")
            _train(runs_dir, "tiny", "depth=3", "--name", "derived")
    finally:
        torch.set_num_threads(threads)
    return runs_dir


def _json(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name).read_text())


def _run_values(run_dir: Path) -> tuple[float, float]:
    """(best valid.ppl, final non-batched test ppl) of a recorded run."""
    metrics = _json(run_dir, "metrics.json")
    return min(metrics["valid.ppl"]["values"]), metrics["full_test.ppl"]["values"][-1]


def _gap(value: float, published: float) -> str:
    return f"{(value / published - 1) * 100:+.1f}%"


def test_a_run_of_the_papers_config_records_its_targets(paper_runs):
    info = _json(paper_runs / "1", "info.json")
    assert info["published"] == {
        **TINY_FIGURES,
        "source": "a test figure",
        "config": "tiny",
        "epochs": 2,
    }
    assert "published" not in _json(paper_runs / "2", "info.json")
    assert "source_entropy_bits" in info  # tiny trains on synthetic data


def test_ls_shows_the_gap_to_the_published_test_figure(paper_runs):
    _, test = _run_values(paper_runs / "1")
    rows = table(ok(rhn("ls", runs_dir=paper_runs)))
    assert rows["1"]["vs paper"] == _gap(test, 4.0)
    assert rows["2"]["vs paper"] == "-"


def test_ls_leaves_the_gap_out_last_to_fit_the_width(paper_runs):
    narrow = ok(rhn("ls", runs_dir=paper_runs, env={"COLUMNS": "80"}))
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "vs paper" in narrow.splitlines()[0]  # the start and config gave way first
    assert "start" in narrow.split("left out to fit")[1]
    narrowest = ok(rhn("ls", runs_dir=paper_runs, env={"COLUMNS": "60"}))
    assert "vs paper" not in narrowest.splitlines()[0]
    assert "vs paper" in narrowest.split("left out to fit")[1]


def test_show_puts_each_result_beside_its_published_figure(paper_runs):
    valid, test = _run_values(paper_runs / "1")
    output = ok(rhn("show", "1", runs_dir=paper_runs))
    section = output.split("\npublished  ")[1]
    assert section.startswith("tiny: a test figure")
    assert re.search(
        rf"valid\.ppl\s+{valid:.3f} \({re.escape(_gap(valid, 5.0))} vs 5\)\s+best valid", section
    )
    assert re.search(
        rf"test\.ppl\s+{test:.3f} \({re.escape(_gap(test, 4.0))} vs 4\)\s+full test", section
    )
    assert "partial" not in section
    assert "\npublished" not in ok(rhn("show", "2", runs_dir=paper_runs))


def test_a_run_stopped_before_the_papers_epochs_is_shown_as_partial(paper_runs, tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(paper_runs, runs_dir)
    info = _json(runs_dir / "1", "info.json")
    info["published"]["epochs"] = 10
    (runs_dir / "1" / "info.json").write_text(json.dumps(info))
    assert "(partial: 2 of 10 epochs)" in ok(rhn("show", "1", runs_dir=runs_dir))
    # A run with no test value yet: ls gives the gap to the published valid figure.
    metrics = _json(runs_dir / "1", "metrics.json")
    valid = min(metrics["valid.ppl"]["values"])
    kept = {k: v for k, v in metrics.items() if not k.startswith(("test", "full_", "mc_"))}
    (runs_dir / "1" / "metrics.json").write_text(json.dumps(kept))
    info = {k: v for k, v in info.items() if not k.startswith("full_")}
    (runs_dir / "1" / "info.json").write_text(json.dumps(info))
    assert table(ok(rhn("ls", runs_dir=runs_dir)))["1"]["vs paper"] == f"{_gap(valid, 5.0)} valid"


def test_compare_has_a_row_per_published_figure(paper_runs):
    valid, test = _run_values(paper_runs / "1")
    output = ok(rhn("compare", "1", "2", runs_dir=paper_runs))
    rows = {
        cells[0]: cells[1:]
        for cells in (re.split(r"\s{2,}", line.strip()) for line in output.splitlines())
    }
    assert rows["vs paper valid.ppl"] == [f"{_gap(valid, 5.0)} vs 5", "-"]
    assert rows["vs paper test.ppl"] == [f"{_gap(test, 4.0)} vs 4", "-"]
    data = json.loads(ok(rhn("compare", "1", "2", "--json", runs_dir=paper_runs)))
    row = data["metrics"]["vs paper test.ppl"]
    assert row[1] is None and row[0]["published"] == 4.0 and row[0]["value"] == test
    assert math.isclose(row[0]["gap_percent"], (test / 4.0 - 1) * 100)


def test_plot_draws_the_published_figure_and_the_entropy_rate(paper_runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    real_savefig = Figure.savefig

    def keep(figure, *args, **kwargs):
        saved.append(figure)
        return real_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    image = tmp_path / "curves.png"
    args = ["plot", "1", "2", "--metric", "valid.ppl", "--metric", "test.bpc", "-o", str(image)]
    ok(rhn(*args, runs_dir=paper_runs))
    assert image.read_bytes().startswith(b"\x89PNG")
    entropy = _json(paper_runs / "1", "info.json")["source_entropy_bits"]

    def horizontal(ax) -> dict[str, float]:
        lines = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1]
        return {line.get_label(): float(line.get_ydata()[0]) for line in lines}

    ppl_ax, bpc_ax = saved[-1].axes
    ppl_lines = horizontal(ppl_ax)
    assert ppl_lines["published valid.ppl 5 (tiny)"] == 5.0
    entropy_label = next(label for label in ppl_lines if label.startswith("source entropy"))
    assert entropy_label == f"source entropy rate {entropy:.4f} bpc = ppl {2**entropy:.3f}"
    assert math.isclose(ppl_lines[entropy_label], 2**entropy)
    bpc_lines = horizontal(bpc_ax)
    assert math.isclose(bpc_lines["published test.ppl 4 (tiny)"], 2.0)  # log2(4)
    assert math.isclose(bpc_lines[f"source entropy rate {entropy:.4f} bpc"], entropy)
    legend = {text.get_text() for text in ppl_ax.get_legend().get_texts()}
    assert {"published valid.ppl 5 (tiny)", entropy_label} <= legend
