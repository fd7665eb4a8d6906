"""Run tracking: Sacred observers and what they record. Never imports models or the CLI."""

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
