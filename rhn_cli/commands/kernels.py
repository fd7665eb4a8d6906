"""``rhn kernels``: build or check the native (C++) kernels for this machine (parsing and
printing only; the work is :mod:`rhn_cli.kernels.native`, which imports torch lazily)."""

from __future__ import annotations

import sys

import click

from rhn_cli.commands.messages import fail

SWITCHED_OFF = "RHN_NATIVE=0 switches the native kernels off: runs use the Python loop"


@click.group()
def kernels() -> None:
    """Build or check the native (C++) kernels.

    On the CPU, the RHN's time loop, the training loss and the SGD step run in C++,
    compiled for this machine, its torch and its Python (about a minute) into the user
    cache (~/.cache/rhn/extensions on Linux). 'make install' builds them; after a pip
    install, run 'rhn kernels build'. A run that finds no build makes it before its
    clock starts, so no epoch's tokens/s counts it. Every build says why it is made
    (first on this machine, sources, torch, Python or CPU changed, an earlier build
    that did not finish). Where they cannot be built, runs use the Python loop (the
    same model, slower); RHN_NATIVE=0 switches them off.

    \b
    Examples:
      rhn kernels build     # build now, or say they are up to date
      rhn kernels status    # built or not, and why a build is due; builds nothing
    """


@kernels.command()
def build() -> None:
    """Build the native kernels for this machine, or say they are up to date.

    Exit status: 0 when they are built (or switched off by RHN_NATIVE=0), 1 when they
    cannot be built (runs then use the Python loop)."""
    from rhn_cli.kernels import native

    if not native.enabled():
        click.echo(f"{SWITCHED_OFF}; nothing built")
        return
    outcome = native.attempt()
    if outcome.module is None:
        fail(
            f"the native kernels could not be built: {outcome.error}; runs will use the "
            "Python loop (same results, slower)",
            code=1,
        )
    library = outcome.target.library
    if outcome.reason is None:
        click.echo(f"native kernels up to date: {library}")
    else:
        click.echo(f"native kernels built in {outcome.seconds:.0f} s ({outcome.reason}): {library}")


@kernels.command()
def status() -> None:
    """Say whether the native kernels are built for this machine, and if not, why a build
    is due. Builds and loads nothing.

    Exit status: 0 when they are built (or switched off), 1 when a build is due."""
    from rhn_cli.kernels import native

    if not native.enabled():
        click.echo(SWITCHED_OFF)
        return
    aim = native.target()
    reason = native.why_build(aim)
    if reason is None:
        facts = aim.facts
        click.echo(
            f"built: {aim.library} (torch {facts['torch']}, {facts['python']}, "
            f"{facts['capability']})"
        )
        return
    click.echo(
        f"not built ({reason}): 'rhn kernels build' builds them (about a minute); "
        "else the first CPU run does, before its clock starts"
    )
    sys.exit(1)
