"""``rhn board``: Omniboard over the configured MongoDB, or over a local one."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import click

# Same options as `rhn train` (defined here too: rhn_cli.cli imports this module).
RUNS_DIR_HELP = "File store whose runs a local board shows [env: RHN_RUNS_DIR]."


@click.command()
@click.option(
    "--mongo",
    "mongo_url",
    envvar="RHN_MONGO_URL",
    metavar="URL",
    help="MongoDB to browse, e.g. mongodb://host:27017/rhn [env: RHN_MONGO_URL; else "
    "mongo_url in ~/.config/rhn/config.yaml]. Without one (or with --mongo none), a local "
    "MongoDB-compatible server is started on a copy of the file-store runs.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9000,
    show_default=True,
    help="Port for Omniboard (on 127.0.0.1).",
)
@click.option(
    "--runs-dir",
    envvar="RHN_RUNS_DIR",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help=RUNS_DIR_HELP,
)
@click.option("--no-browser", is_flag=True, help="Do not open a web browser.")
def board(mongo_url, port, runs_dir, no_browser) -> None:
    """Browse the recorded runs in Omniboard, in a web browser.

    Omniboard 2.16.1 needs Node.js 18 or newer; it is installed with npm into rhn's
    cache directory the first time (RHN_CACHE_DIR, default ~/.cache/rhn). It runs until
    Ctrl-C and listens on 127.0.0.1 only (from another machine: ssh -L 9000:127.0.0.1:9000).

    With no MongoDB configured it starts a local MongoDB-compatible server (SecantusDB,
    pip install 'rhn[board]') with its data in RUNS_DIR/.board-db, copies the runs of
    the file store into it, and opens Omniboard on that: no set-up needed. While it is
    open, new runs and running runs' metrics, heartbeat and status reach it within a few
    seconds of the file store (Omniboard refreshes its table every 10 s).

    \b
    Examples:
      rhn board                                 # the runs in ./runs
      rhn board --mongo mongodb://db.lab:27017/rhn --port 9001
    """
    from rhn_cli.tracking.settings import SettingsError, resolve_mongo_url

    try:
        setting = resolve_mongo_url(mongo_url)
    except SettingsError as error:
        raise click.ClickException(str(error)) from None

    restore_signals = _stop_on_signals()
    try:
        problem = _serve(setting, runs_dir, port, no_browser)
    finally:
        restore_signals()
    if problem is not None:
        raise click.ClickException(problem)
    click.echo("Stopped.")


def _serve(setting, runs_dir: str, port: int, no_browser: bool) -> str | None:
    """Open the board and keep it open until Ctrl-C (None) or until a server stops (why)."""
    from rhn_cli.board.launch import open_board
    from rhn_cli.board.process import BoardError
    from rhn_cli.tracking.observers import redact

    try:
        running = open_board(setting.url, runs_dir, port=port, echo=click.echo)
    except BoardError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)

    problem = None
    try:
        if running.local_db is not None:
            copy = running.local_db.storage_path
            what = f"the file-store runs in {runs_dir} (copied into {copy})"
        else:
            what = f"MongoDB {redact(running.omniboard.mongo_url)} (from {setting.source})"
        click.echo(f"Omniboard is showing {what}.")
        click.echo(f"Open {running.url}   (Ctrl-C to stop)")
        if not no_browser:
            _open_browser(running.url)
        while (problem := running.problem()) is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        local = " and the local database" if running.local_db is not None else ""
        click.echo(f"\nStopping Omniboard{local}...")
    finally:
        running.stop()
    return problem


def _stop_on_signals():
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so the servers are stopped too;
    returns the function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, interrupt)

    def restore():
        for number, handler in previous.items():
            signal.signal(number, handler)

    return restore


def _open_browser(url: str) -> None:
    """Open ``url`` in a graphical browser if there is one; never block, never fail.

    Without a display Python's webbrowser would start a text browser (lynx, w3m) in the
    terminal and wait for it, so it is not asked at all.
    """
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return
    import webbrowser

    def launch():
        try:
            webbrowser.open(url)
        except Exception:  # a browser is a convenience: the URL is printed anyway
            pass

    threading.Thread(target=launch, name="browser", daemon=True).start()
