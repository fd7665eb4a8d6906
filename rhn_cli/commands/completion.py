"""Shell completion (bash, zsh, fish) through click's own machinery, and ``rhn completion``.

The callbacks complete what click cannot know by itself: after ``with``, named configs
and config keys (``depth=``, ``synthetic.order=``) and the values of keys with a fixed
set of them (``model=lstm``); run ids and sweep names from the file store. They run on
every Tab press, so they read directory names and the config tables only: no torch, no
Sacred, no run records. Importing this module imports click alone.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from click.shell_completion import (
    BashComplete,
    CompletionItem,
    add_completion_class,
    get_completion_class,
)

SHELLS = ("bash", "zsh", "fish")
PROG_NAME = "rhn"
COMPLETE_VAR = "_RHN_COMPLETE"
RUNS_DIR_ENV = "RHN_RUNS_DIR"


def _runs_dir(ctx: click.Context) -> Path:
    """The file store the command line names so far (--runs-dir, RHN_RUNS_DIR, 'runs')."""
    return Path(ctx.params.get("runs_dir") or os.environ.get(RUNS_DIR_ENV) or "runs")


def _subdirectories(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries if entry.is_dir()]
    except OSError:  # no store yet, or unreadable: nothing to offer
        return []


def run_ids(runs_dir: Path) -> list[str]:
    """The run ids in a file store, numeric ones in numeric order; ``_sources``,
    ``_sweeps`` and other ``_``/``.`` directories are not runs."""
    names = [n for n in _subdirectories(runs_dir) if not n.startswith(("_", "."))]
    return sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))


def complete_run_ids(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    """Run ids of --runs-dir for commands taking several (those given are left out)."""
    given = set(ctx.params.get(param.name) or ())
    return [
        CompletionItem(run_id)
        for run_id in run_ids(_runs_dir(ctx))
        if run_id.startswith(incomplete) and run_id not in given
    ]


def complete_run_target(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    """RUN_ID|CHECKPOINT: run ids, and paths unless the word can only be a run id."""
    ids = [CompletionItem(i) for i in run_ids(_runs_dir(ctx)) if i.startswith(incomplete)]
    if ids and incomplete.isdigit():
        return ids
    # Bash offers files only when no plain item is left, so the ids come first there.
    return [CompletionItem(incomplete, type="file"), *ids]


def complete_sweep_names(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    """The sweeps recorded in --runs-dir (RUNS_DIR/_sweeps/NAME/sweep.json)."""
    root = _runs_dir(ctx) / "_sweeps"
    names = sorted(n for n in _subdirectories(root) if (root / n / "sweep.json").is_file())
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def complete_updates(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    """Sacred's ``with`` tokens: 'with' first, then named configs, ``key=`` (dotted for
    nested keys, only those the chosen model reads) and, after ``key=``, its values."""
    given = list(ctx.params.get(param.name) or ())
    if not given and "with".startswith(incomplete):
        return [CompletionItem("with")]
    if "=" in incomplete:
        key, _, prefix = incomplete.partition("=")
        return [CompletionItem(f"{key}={v}") for v in _values(key) if v.startswith(prefix)]
    named = _named_configs()
    items = [
        CompletionItem(name, help=config.description)
        for name, config in sorted(named.items())
        if name.startswith(incomplete)
    ]
    for key, doc in _keys_for(_chosen_model(given, named)):
        if key.startswith(incomplete):
            items.append(CompletionItem(f"{key}=", help=doc))
    return items


def complete_sweep_updates(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    """``rhn sweep``'s tokens, as ``rhn train``'s; first, also its other commands
    (``rhn sweep status``), since a word that is none of them starts ``rhn sweep run``."""
    items = complete_updates(ctx, param, incomplete)
    group = ctx.parent.command if ctx.parent is not None else None
    if ctx.params.get(param.name) or not isinstance(group, click.Group):
        return items
    others = [
        CompletionItem(name, help=group.commands[name].get_short_help_str())
        for name in group.list_commands(ctx.parent)
        if name != ctx.info_name and name.startswith(incomplete)
    ]
    return [*others, *items]


def _named_configs() -> dict:
    from rhn_cli.experiment.resolve import discover

    return discover()


def _chosen_model(tokens: Iterable[str], named: Mapping[str, Any]) -> str:
    """The model the tokens so far choose: a ``model=`` update, else the last named
    config that sets one, else the default. Unreadable named configs are passed over:
    completing must never fail."""
    from rhn_cli.experiment.schema import SCHEMA, ConfigError

    model = SCHEMA["model"].default
    update = None
    for token in tokens:
        if token.startswith("model="):
            update = token.partition("=")[2].strip("'\"")
        elif token in named:
            try:
                model = named[token].load().get("model", model)
            except ConfigError:
                pass
    return update or model


def _keys_for(model: str) -> list[tuple[str, str]]:
    """(dotted key, doc) of every settable key that ``model`` reads (seed included)."""
    from rhn_cli.experiment.schema import USED_BY, all_keys, doc

    return [
        (key, doc(key))
        for key in all_keys()
        if _option(key) is not None and model in USED_BY.get(key, (model,))
    ]


def _option(key: str):
    """The declaration of a dotted key; None for an unknown key or a group of keys."""
    from rhn_cli.experiment.schema import SCHEMA
    from rhn_cli.models.option import Option

    node: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Option) else None


def _values(key: str) -> tuple[str, ...]:
    """The values of a key that takes a fixed set: True/False, or the names its check
    lists ("one of 'sgd', 'adam'"), read from the check itself so new choices show up."""
    option = _option(key)
    if option is None:
        return ()
    if option.kind is bool:
        return ("True", "False")
    if option.kind is not str or option.check is None:
        return ()
    allowed = option.check("\0")  # no key takes a NUL: the check says what it allows
    if not allowed or not allowed.startswith("one of "):
        return ()
    try:
        choices = ast.literal_eval(f"({allowed.removeprefix('one of ')},)")
    except (ValueError, SyntaxError):
        return ()
    return tuple(choice for choice in choices if isinstance(choice, str))


class _BashComplete(BashComplete):
    """Bash splits words at '=' (COMP_WORDBREAKS), so ``model=ls`` reaches click as
    ``model``, ``=``, ``ls``. The words are joined again here, so the callbacks see a
    ``key=value`` token as zsh and fish give it; the replies drop the part before the
    '=', which bash keeps; and a reply ending in '=' (``depth=``) gets no space after it."""

    source_template = BashComplete.source_template.replace(
        "COMPREPLY+=($value)",
        "COMPREPLY+=($value)\n            [[ $value == *= ]] && compopt -o nospace",
    )
    _kept = ""

    def get_completion_args(self) -> tuple[list[str], str]:
        args, incomplete = super().get_completion_args()
        words = _join_at_equals([*args, incomplete])
        incomplete = words.pop()
        self._kept = incomplete[: incomplete.rfind("=") + 1]
        return words, incomplete

    def format_completion(self, item: CompletionItem) -> str:
        if self._kept and item.type == "plain" and item.value.startswith(self._kept):
            item = CompletionItem(item.value[len(self._kept) :], item.type, item.help)
        return super().format_completion(item)


def _join_at_equals(words: list[str]) -> list[str]:
    """``['with', 'model', '=', 'ls']`` -> ``['with', 'model=ls']``."""
    joined: list[str] = []
    glue = False
    for word in words:
        if word == "=" and joined:
            joined[-1] += word
            glue = True
        elif glue:
            joined[-1] += word
            glue = False
        else:
            joined.append(word)
    return joined


add_completion_class(_BashComplete, "bash")


@click.command(name="completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the Tab-completion script for SHELL (bash, zsh, fish).

    It completes commands, options, named configs and config keys after 'with'
    (depth=, synthetic.order=, model=lstm), run ids and sweep names.

    \b
    Install it (then open a new shell):
      bash: echo 'eval "$(rhn completion bash)"' >> ~/.bashrc
      zsh:  echo 'eval "$(rhn completion zsh)"' >> ~/.zshrc
      fish: rhn completion fish > ~/.config/fish/completions/rhn.fish
    """
    shell_class = get_completion_class(shell)
    root = ctx.find_root().command
    click.echo(shell_class(root, {}, PROG_NAME, COMPLETE_VAR).source())
