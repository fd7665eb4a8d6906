"""The native kernels' build as a user meets it: `rhn kernels build` and `status`, every
build announced with its reason, none counted in a run's tokens/s, none made silently.

One real build only (about a minute of CPU): the module-scoped ``first_build``, a
training run in an empty cache. The other tests copy that cache, or fail fast (a
compiler that fails), or rebuild only the link step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.kernels import native
from tests.conftest import FAST_RUN

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the build directory follows XDG_CACHE_HOME"
)

BUILDING_FOR_A_RUN = "rhn: building the native kernels before the run's clock starts ("
TOKENS_PER_S = re.compile(r"  ([\d,]+) tok/s  [\d.]+s$")


def _train(where: Path, cache: Path) -> subprocess.CompletedProcess:
    """`rhn train --seed 1` on the fast config in ``where``, with ``cache`` as the user
    cache (the native build and the library decisions); stdout and stderr in order."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"}
    for name in ("RHN_CACHE_DIR", "RHN_NATIVE", "RHN_RUNS_DIR", "RHN_MONGO_URL", "CXX"):
        env.pop(name, None)
    env["XDG_CONFIG_HOME"] = str(where / ".config")
    return subprocess.run(
        [sys.executable, "-m", "rhn_cli", "train", "--seed", "1", "with", *FAST_RUN],
        cwd=where,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    """(the cache, the run's output) of a training run that found no build of the kernels."""
    where = tmp_path_factory.mktemp("first-build")
    cache = where / "cache"
    cache.mkdir()
    return cache, _train(where, cache)


@pytest.fixture
def built_cache(first_build, tmp_path, monkeypatch):
    """A copy of the first build's cache, as this process's user cache."""
    cache = tmp_path / "cache"
    shutil.copytree(first_build[0], cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("RHN_NATIVE", raising=False)
    return cache


def _library() -> Path:
    return native.target().library


def _epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("epoch ")]


def test_a_run_builds_before_its_clock_starts_and_computes_as_with_an_earlier_build(
    first_build, tmp_path
):
    """The build is announced (why, where) before the run exists; epoch 1's tokens/s is
    the training's alone (within 10x of epoch 2's: a build in it, about a minute against
    a second's epoch, would make it 50x or more slower); and a second run on the built
    kernels, same seed, prints the same perplexities."""
    cache, first = first_build
    assert first.returncode == 0, first.stdout
    epochs = _epoch_lines(first.stdout)
    rates = [float(TOKENS_PER_S.search(line).group(1).replace(",", "")) for line in epochs]
    assert len(rates) == 2 and rates[0] > rates[1] / 10, epochs

    lines = first.stdout.splitlines()
    (announced,) = [i for i, line in enumerate(lines) if line.startswith(BUILDING_FOR_A_RUN)]
    assert "(first build on this machine; about a minute)" in lines[announced]
    assert str(cache) in lines[announced]
    started = next(i for i, line in enumerate(lines) if line.startswith("run 1: recording to"))
    assert announced < started
    assert any(
        line.startswith("rhn: native kernels ready in ") for line in lines[announced:started]
    )

    again = _train(tmp_path, cache)
    assert again.returncode == 0, again.stdout
    assert "building" not in again.stdout
    assert [TOKENS_PER_S.sub("", line) for line in _epoch_lines(again.stdout)] == [
        TOKENS_PER_S.sub("", line) for line in epochs
    ]


def test_kernels_build_and_status_say_up_to_date(runner, built_cache):
    result = runner.invoke(cli, ["kernels", "build"])
    assert result.exit_code == 0, result.output
    assert result.output == f"native kernels up to date: {_library()}\n"

    result = runner.invoke(cli, ["kernels", "status"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"built: {_library()} (torch ")


def test_sources_at_another_path_load_the_build_without_rebuilding_it(
    built_cache, tmp_path, monkeypatch, capfd
):
    """A reinstall elsewhere (the same sources at another path) loads the build as it
    is: no build, announced or silent (the module file is the one built before)."""
    moved = tmp_path / "site-packages" / "csrc"
    shutil.copytree(native.SOURCE_DIR, moved)
    monkeypatch.setattr(native, "SOURCES", tuple(sorted(moved.glob("*.cpp"))))
    monkeypatch.setattr(native, "HEADERS", tuple(sorted(moved.glob("*.h"))))
    before = _library().stat()
    native.load.cache_clear()
    try:
        assert native.load() is not None
    finally:
        native.load.cache_clear()
    after = _library().stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "building" not in capfd.readouterr().err


def test_a_source_change_is_announced_as_the_reason_of_the_build(
    runner, built_cache, tmp_path, monkeypatch
):
    """A changed source builds afresh, saying which file changed; here with a compiler
    that fails at once: exit 1, one line, runs use the Python loop."""
    changed = tmp_path / "csrc"
    shutil.copytree(native.SOURCE_DIR, changed)
    with open(changed / "rhn_forward.cpp", "a") as source:
        source.write("\n// changed\n")
    monkeypatch.setattr(native, "SOURCES", tuple(sorted(changed.glob("*.cpp"))))
    monkeypatch.setattr(native, "HEADERS", tuple(sorted(changed.glob("*.h"))))
    monkeypatch.setenv("CXX", "/bin/false")

    result = runner.invoke(cli, ["kernels", "status"])
    assert result.exit_code == 1
    assert "not built (sources changed since the last build: rhn_forward.cpp)" in result.output

    result = runner.invoke(cli, ["kernels", "build"])
    assert result.exit_code == 1
    assert (
        "rhn: building the native kernels (sources changed since the last build: "
        "rhn_forward.cpp; about a minute)" in result.stderr
    )
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "could not be built" in error and "runs will use the Python loop" in error


def test_a_torch_upgrade_is_the_reason_given(runner, built_cache, monkeypatch):
    import torch

    recorded = torch.__version__
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    result = runner.invoke(cli, ["kernels", "status"])
    assert result.exit_code == 1
    assert f"(torch 9.9.9, the last build was for {recorded})" in result.output


def test_a_damaged_build_is_built_again_and_says_so(runner, built_cache):
    """A module file cut short (as a build killed while linking leaves it, which would
    crash the process loading it) is linked again, with the reason; one gone entirely
    is reported."""
    library = _library()
    library.write_bytes(library.read_bytes()[:4096])
    result = runner.invoke(cli, ["kernels", "build"])
    assert result.exit_code == 0, result.output
    reason = "its module is missing or damaged since it was built"
    assert f"rhn: building the native kernels ({reason}; about a minute)" in result.stderr
    assert re.fullmatch(
        rf"native kernels built in \d+ s \({reason}\): {re.escape(str(library))}\n",
        result.stdout,
    )
    assert library.stat().st_size > 4096

    library.unlink()
    result = runner.invoke(cli, ["kernels", "status"])
    assert result.exit_code == 1
    assert result.output.startswith(f"not built ({reason}): ")


def test_without_a_compiler_kernels_build_exits_1_with_one_line(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CXX", "/bin/false")
    result = runner.invoke(cli, ["kernels", "build"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "(first build on this machine; about a minute)" in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: the native kernels could not be built: ")
    assert error.endswith("runs will use the Python loop (same results, slower)")


def test_rhn_native_0_builds_nothing(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("RHN_NATIVE", "0")
    for command in ("build", "status"):
        result = runner.invoke(cli, ["kernels", command])
        assert result.exit_code == 0
        assert "RHN_NATIVE=0 switches the native kernels off" in result.output
    assert not (tmp_path / "empty").exists()
