"""Shell completion as the shells drive it: click's completion protocol (the words typed
so far, the one being completed), the bash script itself run by bash, and its cost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.shell_completion import ShellComplete

from rhn_cli.cli import cli


def completions(line: str) -> list[str]:
    """What completing the last word of ``line`` offers (a trailing space: a new word)."""
    words = line.split()
    args, incomplete = (words, "") if line.endswith(" ") else (words[:-1], words[-1])
    complete = ShellComplete(cli, {}, "rhn", "_RHN_COMPLETE")
    return [item.value for item in complete.get_completions(args[1:], incomplete)]


@pytest.fixture
def store(tmp_path) -> Path:
    """A file store with runs 1, 2 and 12, Sacred's _sources and one recorded sweep."""
    runs = tmp_path / "runs"
    for name in ("1", "2", "12", "_sources", "_sweeps/lr-depth", "_sweeps/half-done"):
        (runs / name).mkdir(parents=True)
    (runs / "_sweeps" / "lr-depth" / "sweep.json").write_text(json.dumps({"tokens": []}))
    return runs


def test_commands_and_options_complete():
    assert completions("rhn tr") == ["train"]
    assert "--seed" in completions("rhn train --se")
    assert "completion" in completions("rhn com")


def test_with_comes_first_then_named_configs_and_keys():
    assert completions("rhn train ") == ["with"]
    assert completions("rhn train with ptb_s") == ["ptb_sota"]
    assert completions("rhn print-config with dep") == ["depth="]
    assert completions("rhn train with synthetic.or") == ["synthetic.order="]
    offered = completions("rhn train with ")
    assert {"tiny", "ptb_sota", "hidden_size=", "synthetic.alphabet_size="} <= set(offered)
    assert "synthetic=" not in offered  # a group of keys is set key by key


def test_named_configs_of_rhn_config_path_complete(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "my_experiment.yaml").write_text("# mine\ndepth: 3\n")
    monkeypatch.setenv("RHN_CONFIG_PATH", str(mine))
    assert completions("rhn train with my_") == ["my_experiment"]


def test_only_the_keys_the_chosen_model_reads_are_offered():
    assert completions("rhn train with model=lstm dep") == []
    assert completions("rhn train with ptb_lstm_small dep") == []  # the named config's model
    assert completions("rhn train with model=lstm hidden_s") == ["hidden_size="]


def test_values_of_keys_with_a_fixed_set():
    assert completions("rhn train with model=zon") == ["model=zoneout_lstm"]
    assert completions("rhn train with optimizer=rms") == [
        "optimizer=rmsprop",
        "optimizer=rmsprop_eps_inside",
    ]
    assert completions("rhn train with tied=") == ["tied=True", "tied=False"]
    assert completions("rhn train with depth=") == []


def test_run_ids_come_from_the_runs_dir(store, monkeypatch):
    assert completions("rhn runs show ") == ["1", "2", "12"]
    assert completions("rhn runs compare 1 ") == ["2", "12"]  # those given are left out
    assert completions("rhn runs rm 1") == ["1", "12"]
    assert completions("rhn runs show --runs-dir elsewhere ") == []
    monkeypatch.setenv("RHN_RUNS_DIR", str(store))
    monkeypatch.chdir(store.parent.parent)
    assert completions("rhn runs plot ") == ["1", "2", "12"]


def test_evaluate_and_sample_offer_run_ids_and_files(store):
    assert completions("rhn evaluate 1") == ["1", "12"]
    complete = ShellComplete(cli, {}, "rhn", "_RHN_COMPLETE")
    types = {item.type for item in complete.get_completions(["sample"], "runs/")}
    assert types == {"file"}


def test_sweep_names_complete_after_sweep_status(store):
    assert completions("rhn sweep status ") == ["lr-depth"]  # half-done has no sweep.json
    assert completions("rhn sweep st") == ["status"]
    assert completions("rhn sweep with dep") == ["depth="]


def _bash_complete(words: list[str], cword: int, cwd: Path) -> list[str]:
    env = {**os.environ, "COMP_WORDS": " ".join(words), "COMP_CWORD": str(cword)}
    env["_RHN_COMPLETE"] = "bash_complete"
    out = subprocess.run(
        [sys.executable, "-m", "rhn_cli"], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_bash_protocol_with_words_split_at_equals(store):
    """Bash splits 'model=zon' into 'model', '=', 'zon' and keeps 'model=' itself."""
    assert _bash_complete(["rhn", "train", "with", "model", "=", "zon"], 5, store.parent) == [
        "plain,zoneout_lstm"
    ]
    assert _bash_complete(["rhn", "train", "with", "synthetic.or"], 3, store.parent) == [
        "plain,synthetic.order="
    ]
    assert _bash_complete(["rhn", "runs", "show", ""], 3, store.parent) == [
        "plain,1",
        "plain,2",
        "plain,12",
    ]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_script_rhn_completion_bash_prints_completes_in_bash(store):
    script = subprocess.run(
        [sys.executable, "-m", "rhn_cli", "completion", "bash"], capture_output=True, text=True
    )
    assert script.returncode == 0, script.stderr
    (store.parent / "rhn.bash").write_text(script.stdout)
    bin_dir = store.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "rhn").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m rhn_cli "$@"\n')
    (bin_dir / "rhn").chmod(0o755)
    # compopt only works inside a real completion: this stand-in records what is asked.
    driver = """
source rhn.bash
compopt() { echo "compopt $1 $2"; }
complete_words() { COMPREPLY=(); COMP_CWORD=$1; shift; COMP_WORDS=("$@"); _rhn_completion rhn
                   echo "${COMPREPLY[*]}"; }
complete_words 3 rhn train with dep
complete_words 5 rhn train with model = gr
"""
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "--norc", "-c", driver], env=env, cwd=store.parent, capture_output=True, text=True
    )
    # 'depth=' without a space after it; bash keeps 'model=' and takes the value alone.
    assert out.stdout.splitlines() == ["compopt -o nospace", "depth=", "grid_lstm gru"], out.stderr


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_rhn_completion_prints_the_other_shells_scripts(runner, shell):
    result = runner.invoke(cli, ["completion", shell])
    assert result.exit_code == 0
    assert f"_RHN_COMPLETE={shell}_complete" in result.output


def test_rhn_completion_refuses_an_unknown_shell(runner):
    result = runner.invoke(cli, ["completion", "tcsh"])
    assert result.exit_code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.output


def test_completing_imports_neither_torch_nor_sacred(store):
    """Every Tab press runs rhn: it must not pay for torch or Sacred."""
    code = (
        "import sys\nfrom rhn_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'sacred') if m in sys.modules))"
    )
    for words, cword in ((["rhn", "train", "with", "d"], 3), (["rhn", "runs", "show", ""], 3)):
        env = {**os.environ, "COMP_WORDS": " ".join(words), "COMP_CWORD": str(cword)}
        env["_RHN_COMPLETE"] = "bash_complete"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=store.parent, capture_output=True, text=True
        )
        assert "HEAVY []" in out.stdout, out.stderr
        assert "plain," in out.stdout
