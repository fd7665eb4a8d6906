"""``make reproduce-small`` (benchmarks/reproduce_small.py, issue 22 item 2): what it prints
about a run and how it exits: PASS (exit 0) only for a completed run of ptb_lstm_small's
own config that trained all 13 epochs with test perplexity <= 116, else MISS (exit 1).

The real reproduction takes an hour; the runs here are real ``rhn train`` runs of
ptb_lstm_small's own config, trained in seconds on a stand-in for PTB: a small generated
corpus in PTB's file layout, registered as 'ptb' under its own checksums (the registry
entry is the test's; fetching, training, recording and the report are rhn's own). The
figures differ from PTB's, not what the report decides from them.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.data.registry import DATASETS, PTB_WORDS
from rhn_cli.data.spec import Expected
from tests.fakedata import sha256
from tests.test_runs_cli import CLEAN_ENV, _runner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_spec = importlib.util.spec_from_file_location(
    "reproduce_small", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_small.py"
)
reproduce_small = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce_small)

RUNS = "runs"
SPLIT_SENTENCES = {"ptb.train.txt": 160, "ptb.valid.txt": 70, "ptb.test.txt": 70}


def _stand_in_ptb(directory: Path, words: int, monkeypatch) -> Path:
    """ptb.{train,valid,test}.txt of random sentences over ``words`` words (each in the
    training text), registered as 'ptb' with their checksums and statistics. Sentences
    of 6 words plus <eos>: each split fills at least one 20 x 20 minibatch."""
    rng = random.Random(words)
    vocabulary = [f"w{i}" for i in range(words)]
    texts, tokens = {}, {}
    for name, count in SPLIT_SENTENCES.items():
        sentences = [rng.choices(vocabulary, k=6) for _ in range(count)]
        if name == "ptb.train.txt":  # every word once at least, as PTB's train has
            sentences += [vocabulary[i : i + 6] for i in range(0, words, 6)]
        texts[name] = "".join(" " + " ".join(s) + " \n" for s in sentences)
        tokens[name.split(".")[1]] = sum(len(s) + 1 for s in sentences)  # + <eos> each
    directory.mkdir()
    files = []
    for source in PTB_WORDS.files:
        (directory / source.name).write_text(texts[source.name])
        data = texts[source.name].encode()
        files.append(replace(source, hash=f"sha256:{sha256(data)}", size=len(data)))
    spec = replace(
        PTB_WORDS, files=tuple(files), file_urls=(), expected=Expected(tokens, words + 1)
    )
    monkeypatch.setitem(DATASETS, "ptb", spec)
    return directory


def _train(*updates: str) -> str:
    """A real ``rhn train`` of ptb_lstm_small (plus updates) on the registered 'ptb';
    the new run's id. vocab_size is a key that keeps a paper's config the paper's."""
    result = _runner().invoke(
        cli,
        ["train", "--name", "reproduce-small", "--runs-dir", RUNS, "with", "ptb_lstm_small"]
        + ["vocab_size=None", *updates],
        env=CLEAN_ENV,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return re.search(r"run (\d+) COMPLETED", result.output).group(1)


@pytest.fixture
def ptb(tmp_path, monkeypatch):
    """A factory: the stand-in PTB with N words, fetched into the cache as a user would.
    Training on one thread: two threads on a busy 2-core host take four times as long."""
    import torch

    def fetched(words: int) -> None:
        source = _stand_in_ptb(tmp_path / f"ptb-{words}", words, monkeypatch)
        result = _runner().invoke(cli, ["data", "fetch", "ptb", "--force", "--from", source])
        assert result.exit_code == 0, result.output

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield fetched
    torch.set_num_threads(threads)


def _report(run_id: str, capsys) -> tuple[int, list[str]]:
    code = reproduce_small.main(["--report", run_id, "--runs-dir", RUNS])
    return code, capsys.readouterr().out.strip().splitlines()


def _cells(line: str) -> list[str]:
    """A table line's cells (two spaces or more apart)."""
    return re.split(r"\s{2,}", line.strip())


def _recorded(run_id: str, metric: str) -> list[float]:
    metrics = json.loads((Path(RUNS) / run_id / "metrics.json").read_text())
    return metrics[metric]["values"]


def test_a_whole_run_of_the_config_under_116_passes_beside_the_published_figures(ptb, capsys):
    ptb(20)  # 20 words: any model's test perplexity is near 20
    code, lines = _report(_train(), capsys)
    test = _recorded("1", "full_test.ppl")[-1]
    valid = min(_recorded("1", "valid.ppl"))
    assert code == 0
    assert lines[-1] == f"PASS (test perplexity {test:.3f} <= 116)"
    assert "ptb_lstm_small reproduction: run 1 (runs/1), COMPLETED, 13 of 13 epochs" in lines
    rows = {cells[0]: cells[1:] for cells in map(_cells, lines)}
    assert rows["this run"] == [f"{valid:.3f}", f"{test:.3f}"]
    for label, (valid_figure, test_figure) in (
        ("Zaremba et al. 2014, Table 1", (120.7, 114.5)),
        ("TF tutorial, ptb_word_lm.py", (121.39, 115.91)),
    ):
        assert rows[label] == [
            f"{valid_figure:g} ({(valid / valid_figure - 1) * 100:+.1f}%)",
            f"{test_figure:g} ({(test / test_figure - 1) * 100:+.1f}%)",
        ]


def test_a_whole_run_above_116_misses(ptb, capsys):
    ptb(300)  # 300 words drawn uniformly: no model gets below about 300
    code, lines = _report(_train(), capsys)
    test = _recorded("1", "full_test.ppl")[-1]
    assert test > 116
    assert (code, lines[-1]) == (1, f"MISS (test perplexity {test:.3f} > 116)")


def test_a_partial_run_never_passes_however_low_its_perplexity(ptb, capsys):
    ptb(20)
    code, lines = _report(_train("max_max_epoch=1"), capsys)
    test = _recorded("1", "full_test.ppl")[-1]
    assert test <= 116
    assert code == 1
    assert lines[-1] == f"MISS (partial: 1 of 13 epochs, COMPLETED; test perplexity {test:.3f})"


def test_a_run_of_another_config_misses_naming_what_differs(ptb, capsys):
    ptb(20)
    code, lines = _report(_train("hidden_size=16", "max_max_epoch=1"), capsys)
    assert code == 1
    assert lines[-1] == "MISS (not ptb_lstm_small's config: hidden_size=16 (ptb_lstm_small: 200))"


def test_an_unknown_run_exits_2_with_one_line(capsys):
    code = reproduce_small.main(["--report", "4", "--runs-dir", RUNS])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("Error: ") and captured.err.count("\n") == 1


def test_a_dataset_that_cannot_be_fetched_stops_it_before_any_training(tmp_path, capfd):
    """The real command line (rhn in a subprocess): rhn data fetch's exit code and line,
    and no run recorded."""
    code = reproduce_small.main(["--ptb-from", str(tmp_path / "no-such-dir"), "--runs-dir", RUNS])
    captured = capfd.readouterr()
    assert code == 1
    assert "Error: ptb: --from" in captured.err and "no such file or directory" in captured.err
    assert "rhn train" not in captured.out
    assert not (tmp_path / RUNS).exists()


def test_a_resumed_run_names_the_commit_of_each_process(ptb, capsys):
    ptb(20)
    base = ["train", "--name", "reproduce-small", "--runs-dir", RUNS]
    stopped = _runner().invoke(
        cli, [*base, "with", "ptb_lstm_small", "vocab_size=None", "max_time=0.001"], env=CLEAN_ENV
    )
    assert "TIMEOUT" in stopped.output, stopped.output
    resumed = _runner().invoke(
        cli, [*base, "--resume", "1", "with", "max_time=None"], env=CLEAN_ENV
    )
    assert "run 1 COMPLETED" in resumed.output, resumed.output
    run = json.loads((Path(RUNS) / "1" / "run.json").read_text())
    repository = (run["experiment"]["repositories"] or [None])[0]  # none outside a checkout
    commit = "unknown" if repository is None else repository["commit"][:7]
    commit += " + changes" if repository and repository["dirty"] else ""
    code, lines = _report("1", capsys)
    assert lines[1].startswith(f"  commits {commit} to epoch 0, {commit} from there, CPU (")
