"""What a run records and reads back: Sacred observers (file store, MongoDB), value
cleaning, run records and reports, MongoDB sync and the settings file.

Never imports models, the CLI or :mod:`rhn_cli.board` (``rhn board``'s servers, which
read runs through this package).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_sacred_import() -> Iterator[None]:
    """Import Sacred without its pkg_resources deprecation warning on every command."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        yield
