"""What made a run: its code, the libraries, and the machine facts that change numbers.

Recorded through Sacred's own fields, so the file store, MongoDB and Omniboard show them
where they show any Sacred run's: every source file of the ``rhn_cli`` package that ran
(the C++ kernels included) in ``experiment.sources``; the install requirements with
their versions, and rhn's own, in ``experiment.dependencies``; the git commit and a
dirty flag in ``experiment.repositories`` when rhn runs from a checkout; and in the host
info the CPU capability torch dispatches to, its thread count, whether the native RHN
loop is enabled, the CUDA device, and the process (id and start time, so that a resume
can tell a dead run from a live one).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import rhn_cli

PACKAGE_DIR = Path(rhn_cli.__file__).resolve().parent
SOURCE_SUFFIXES = (".py", ".cpp", ".h")
# Packages rhn records besides its install requirements: what computes a run's numbers.
ALWAYS_RECORDED = ("rhn", "torch", "numpy", "sacred")


def package_sources() -> list[Path]:
    """Every source file of the installed rhn_cli package, sorted."""
    return sorted(
        path
        for path in PACKAGE_DIR.rglob("*")
        if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts
    )


@cache
def dependency_versions() -> dict[str, str]:
    """{distribution name: installed version} of rhn and everything it requires."""
    names = list(ALWAYS_RECORDED)
    try:
        requirements = metadata.requires("rhn") or []
    except metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        if "extra ==" in requirement:  # test and board extras are not what ran
            continue
        name = re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]
        if name and name not in names:
            names.append(name)
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "rhn":  # run from a source tree that was never installed
                versions[name] = rhn_cli.__version__
    return versions


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _without_credentials(url: str) -> str:
    """A remote URL with any user:password@ (or token@) taken out: records are shared."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", url, flags=re.IGNORECASE)


@cache
def git_state() -> dict[str, Any] | None:
    """{url, commit, dirty} of the git checkout rhn runs from; None for an installed copy.

    ``dirty`` means tracked files differ from the commit (untracked files do not count,
    as in Sacred's own repository record)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or not (PACKAGE_DIR.is_relative_to(Path(top).resolve())):
        return None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    remote = _git("config", "--get", "remote.origin.url")
    return {
        "url": _without_credentials(remote) if remote else top,
        "commit": commit,
        "dirty": bool(status) if status is not None else True,
    }


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None elsewhere or
    if there is no such process. With the pid it names one process: pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name, which may itself hold spaces or ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(host: str | None, pid: int | None, start_ticks: int | None) -> bool | None:
    """Whether the process that recorded a run is still running: True or False when that
    can be told from here (same host, its pid recorded), else None."""
    if not pid or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process by that pid: it exists
    if start_ticks is not None and process_start_ticks(pid) not in (None, start_ticks):
        return False  # the pid now belongs to a later process
    return True


def host_facts() -> dict[str, Any]:
    """Machine facts that change a run's numbers, and the process that records it."""
    import torch

    from rhn_cli.kernels import native

    facts: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "native_loop": "enabled" if native.enabled() else "off (RHN_NATIVE=0)",
        "onednn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "pid": os.getpid(),
        "process_start": process_start_ticks(os.getpid()),
    }
    if torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name()
        facts["cuda_version"] = torch.version.cuda
    return facts


def record_in(experiment) -> None:
    """Add the sources, dependencies, repository and host facts to a Sacred experiment."""
    from sacred.dependencies import PackageDependency, Source, get_digest
    from sacred.host_info import HostInfoGetter

    experiment.additional_host_info.append(HostInfoGetter(host_facts, "rhn"))
    for path in package_sources():
        # Directly: Sacred's add_source_file takes Python files only (not the C++).
        experiment.sources.add(Source(str(path), get_digest(str(path)), None, None, None))
    for name, version in dependency_versions().items():
        # Directly: Sacred's add_package_dependency refuses local versions (2.13.0+cpu).
        experiment.dependencies.add(PackageDependency(name, version))
    base_info = experiment.get_experiment_info

    def experiment_info() -> dict[str, Any]:
        info = base_info()
        repository = git_state()
        info["repositories"] = [repository] if repository else []
        return info

    experiment.get_experiment_info = experiment_info
