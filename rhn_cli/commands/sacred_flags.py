"""Sacred's run flags on ``rhn train``: -p, -l, -d, -D and -f, with Sacred's meanings.

(-n, -c, -u, -F and -m are rhn's own --name, --comment, --unobserved, --runs-dir and
--mongo under Sacred's names.) Kept apart from :mod:`rhn_cli.cli` so the train command
stays readable; nothing here imports Sacred or torch.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import click

from rhn_cli.commands.messages import fail as _fail

# What Sacred's logging accepts (logging's names, here in any case), as numbers.
LOG_LEVELS = {
    "CRITICAL": 50,
    "FATAL": 50,
    "ERROR": 40,
    "WARNING": 30,
    "WARN": 30,
    "INFO": 20,
    "DEBUG": 10,
    "NOTSET": 0,
}

# Sacred's commands that a Sacred user may type after 'rhn train', and rhn's own.
SACRED_COMMANDS = {
    "print_config": "rhn print-config",
    "print-config": "rhn print-config",
    "print_named_configs": "rhn configs",
}


@dataclass(frozen=True)
class SacredFlags:
    print_config: bool = False
    loglevel: int | None = None
    debug: bool = False
    pdb: bool = False
    force: bool = False

    def sacred_options(self) -> dict:
        """The flags as Sacred's command-line options: Sacred applies them to the run
        and records them in its meta.options."""
        options: dict = {}
        if self.loglevel is not None:
            options["--loglevel"] = self.loglevel
        for flag, given in (("--debug", self.debug), ("--pdb", self.pdb), ("--force", self.force)):
            if given:
                options[flag] = True
        return options


def _log_level(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if text.upper() in LOG_LEVELS:
        return LOG_LEVELS[text.upper()]
    if text.isdigit() and int(text) <= 50:
        return int(text)
    problem = click.ClickException(
        f"--loglevel {value!r}: expected DEBUG, INFO, WARNING, ERROR, CRITICAL or a number "
        "from 0 to 50"
    )
    problem.exit_code = 2
    raise problem


_OPTIONS = (
    click.option(
        "-p",
        "--print-config",
        "print_config",
        is_flag=True,
        help="Print the config first (what 'rhn print-config' prints), then train.",
    ),
    click.option(
        "-l",
        "--loglevel",
        metavar="LEVEL",
        callback=_log_level,
        help="Level of the run's log (Sacred's logger): DEBUG, INFO, WARNING (the default), "
        "ERROR, CRITICAL or 0-50. INFO adds Sacred's lines (Started run with ID, Result, "
        "Completed after), which the run's output records too.",
    ),
    click.option(
        "-d",
        "--debug",
        is_flag=True,
        help="Debug mode: a failed run prints its whole traceback, not one line.",
    ),
    click.option(
        "-D",
        "--pdb",
        is_flag=True,
        help="If training fails, enter pdb post mortem where it failed (the run is already "
        "recorded FAILED); the exit code is 1 when pdb is left.",
    ),
    click.option(
        "-f",
        "--force",
        is_flag=True,
        help="Let config keys rhn does not know through (Sacred's 'suspicious changes'), "
        "unchecked: they are recorded in the config and listed in the run's info as "
        "unchecked_config_keys; training ignores them. Known keys are checked all the same.",
    ),
)
_FIELDS = ("print_config", "loglevel", "debug", "pdb", "force")


def sacred_run_options(command):
    """Adds -p, -l, -d, -D and -f to ``command``, which receives them together as its
    ``sacred_flags`` argument (a :class:`SacredFlags`)."""

    @functools.wraps(command)
    def packed(*args, **kwargs):
        flags = SacredFlags(**{name: kwargs.pop(name) for name in _FIELDS})
        return command(*args, sacred_flags=flags, **kwargs)

    for option in reversed(_OPTIONS):
        packed = option(packed)
    return packed


def reject_sacred_command(updates: tuple[str, ...]) -> None:
    """``rhn train print_config with ...``: Sacred's command, rhn's is its own (exit 2)."""
    command = next((token for token in updates if token in SACRED_COMMANDS), None)
    if command is None:
        return
    rest = [token for token in updates if token != command]
    instead = " ".join([SACRED_COMMANDS[command], *rest])
    also = " ('rhn train -p ...' prints it, then trains)" if "print" in command else ""
    _fail(f"'{command}' is a command (Sacred's), not a config: run '{instead}'{also}")


def check_flag_combinations(flags: SacredFlags, launcher: str, nproc, resuming: bool) -> None:
    """The flags that cannot apply to how the run is launched: one line, exit 2."""
    if launcher == "slurm":
        given = [f for f, on in (("-l", flags.loglevel is not None), ("-d", flags.debug)) if on]
        given += [f for f, on in (("-D", flags.pdb), ("-f", flags.force)) if on]
        if given:
            _fail(
                f"--launcher slurm: drop {', '.join(given)} (they apply to a run in this "
                "process; the job's run is recorded with its traceback)"
            )
    if nproc is not None and flags.pdb:
        _fail("-D/--pdb debugs this process, and --nproc trains in others: drop one of them")
    if resuming and flags.force:
        _fail("-f/--force lets new config keys into a new run; --resume keeps the run's config")


def debug_failure(flags: SacredFlags, cause: BaseException) -> None:
    """-d: the whole traceback; -D: the traceback, then pdb post mortem where it failed
    (as Sacred does, once the run is recorded)."""
    if not (flags.debug or flags.pdb):
        return
    import traceback

    traceback.print_exception(cause, file=sys.stderr)
    if flags.pdb:
        import pdb

        pdb.post_mortem(cause.__traceback__)
