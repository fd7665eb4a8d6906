"""One model registry: each family declares the config keys its build() reads, and the
config schema (model names, which keys each model reads, MC dropout) follows from it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from rhn_cli.experiment.schema import MC_DROPOUT_MODELS, MODELS, SCHEMA, USED_BY, defaults
from rhn_cli.models import FAMILIES, build_model, family_keys
from rhn_cli.models.base import LanguageModel

REPO = Path(__file__).resolve().parents[1]
GENERAL_KEYS = set(SCHEMA) - set(USED_BY)


class ReadKeys(Mapping):
    """A config that remembers which keys were read."""

    def __init__(self, config: Mapping[str, Any]):
        self.config, self.read = dict(config), set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.config[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.config)

    def __len__(self) -> int:
        return len(self.config)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_build_reads_the_general_keys_and_exactly_the_declared_ones(model):
    config = ReadKeys({**defaults(), "model": model, "hidden_size": 8, "depth": 2})
    build_model(config, vocab_size=11)
    declared = set(family_keys(model).options)
    assert config.read - GENERAL_KEYS == declared, f"{model}: build() and its keys disagree"


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_mc_dropout_is_declared_by_exactly_the_families_that_draw_masks(model):
    built = build_model({**defaults(), "model": model, "hidden_size": 8, "depth": 2}, 11)
    draws_masks = type(built).draw_masks is not LanguageModel.draw_masks
    assert family_keys(model).mc_dropout == draws_masks == (model in MC_DROPOUT_MODELS)


def test_the_schema_follows_the_registry():
    assert MODELS == tuple(FAMILIES)
    for key, users in USED_BY.items():
        assert users == tuple(m for m in FAMILIES if key in family_keys(m).options), key
    assert USED_BY["depth"] == ("rhn",)
    assert USED_BY["dropout"] == ("lstm", "grid_lstm", "charrnn_lstm")


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: the schema is built from the registry when it is
    first imported."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


# A model family as a newcomer adds one: its keys module, its model module (a build()),
# and one line in FAMILIES. Put in sys.modules here instead of files in the package.
NEW_FAMILY = """
import sys, types
import rhn_cli.models as models
from rhn_cli.models.option import FamilyKeys, Option, at_least
from rhn_cli.models.shared_keys import INIT_SCALE

keys = types.ModuleType("rhn_cli.models.toy_keys")
keys.KEYS = FamilyKeys(
    {"width": Option(4, int, "toy: width of the toy", at_least(1)), "init_scale": %s}
)
family = types.ModuleType("rhn_cli.models.toy")
family.build = lambda config, vocab_size: ("toy", config["width"], vocab_size)
sys.modules.update({keys.__name__: keys, family.__name__: family})
models.FAMILIES["toy"] = "toy"
"""


def test_a_new_family_is_its_modules_and_one_registry_line():
    result = _python(
        NEW_FAMILY % "INIT_SCALE"
        + textwrap.dedent("""
        from click.testing import CliRunner
        from rhn_cli.cli import cli
        from rhn_cli.experiment.resolve import resolve
        from rhn_cli.experiment.schema import ConfigError, USED_BY
        from rhn_cli.models import build_model

        config = resolve(["model='toy'", "width=7"]).config
        print(build_model(config, 5))
        print(USED_BY["init_scale"])
        try:
            resolve(["width=7"])
        except ConfigError as error:
            print(error)
        output = CliRunner().invoke(cli, ["print-config", "with", "model='toy'"]).output
        print(next(line for line in output.splitlines() if "width" in line))
        print(next(line for line in output.splitlines() if line[2:].startswith("model =")))
        """)
    )
    assert result.returncode == 0, result.stderr
    built, init_scale_users, error, width_line, model_line = result.stdout.splitlines()
    assert built == "('toy', 7, 5)"
    assert init_scale_users == "('rhn', 'lstm', 'grid_lstm', 'charrnn_lstm', 'toy')"
    assert error == (
        "width=7 (from the command line) has no effect on model='rhn' (used by toy); drop it "
        "or set it back to 4"
    )
    assert width_line.split() == ["width", "=", "4", "#", "toy:", "width", "of", "the", "toy"]
    assert "gru, toy ('rhn configs' shows examples)" in model_line


def test_two_families_may_not_declare_one_key_differently():
    result = _python(
        NEW_FAMILY % 'Option(0.5, float, "another init_scale")'
        + "import rhn_cli.experiment.schema\n"
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "TypeError: models rhn, lstm, grid_lstm, charrnn_lstm and 'toy' declare config key "
        "'init_scale' differently: declare it once, in rhn_cli/models/shared_keys.py"
    )
