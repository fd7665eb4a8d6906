"""rhn_cli.kernels sits below the models and the engine: it imports nothing of rhn_cli
but its own modules and rhn_cli.atomic, and the engine asks it whether native code is
there through rhn_cli.kernels.native, not through the RHN recurrence."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rhn_cli"


def _rhn_cli_imports(path: Path) -> set[str]:
    """The rhn_cli modules (or names in them) that a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("rhn_cli")}


def test_kernels_import_only_kernels_and_atomic():
    outside = {
        f"{path.name}: {name}"
        for path in (PACKAGE / "kernels").glob("*.py")
        for name in _rhn_cli_imports(path)
        if not name.startswith(("rhn_cli.kernels", "rhn_cli.atomic"))
    }
    assert not outside


def test_the_training_loss_and_step_ask_the_native_loader_not_the_rhn_recurrence():
    for module in ("cross_entropy.py", "optim.py"):
        kernels = {
            name
            for name in _rhn_cli_imports(PACKAGE / "engine" / module)
            if not name.startswith("rhn_cli.engine")
        }
        assert kernels == {"rhn_cli.kernels.native"}, module
