"""A plain (non-editable) install must ship the named configs and the native kernels' C++
sources inside the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_contains_the_named_configs_the_native_source_and_the_console_script(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("rhn_cli", "named_configs"):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("rhn-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    shipped = {p.name for p in (REPO / "named_configs").glob("*.yaml")}
    assert shipped, "the repository ships at least one named config"
    assert {f"rhn_cli/named_configs/{name}" for name in shipped} <= names
    assert "rhn = rhn_cli.cli:main" in scripts
    # The native kernels are built on first use from the install: every source ships.
    csrc = REPO / "rhn_cli" / "kernels" / "csrc"
    sources = {f"rhn_cli/kernels/csrc/{path.name}" for path in csrc.iterdir()}
    assert {".cpp", ".h"} == {Path(name).suffix for name in sources}
    assert sources <= names
