"""What a Slurm job asks for: the ``--launcher slurm`` options, with defaults from the
``slurm:`` section of the rhn settings file (``~/.config/rhn/config.yaml``), which a lab
writes once::

    slurm:
      partition: gpu
      time: 2-00:00:00          # per job; a run longer than that is requeued and goes on
      gpus_per_node: 1
      cpus_per_task: 8
      mem: 64G
      account: my-lab
      warning_seconds: 120      # USR2 this long before the time limit: checkpoint, requeue
      slurm_args: {constraint: a100}

The command line overrides the file, key by key. Every value is checked here, once,
so a bad one stops the submission with one line (exit 2) before anything is queued.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

SETTINGS_KEY = "slurm"
DEFAULT_WARNING_S = 120
DEFAULT_TIME_MIN = 60 * 24  # a day; clusters cap it with their partition's MaxTime
# The signal a job gets warning_seconds before its time limit (submitit's choice: NCCL
# may use USR1).
WARNING_SIGNAL = "USR2"
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_TIME_FORMS = "MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS[:MINUTES[:SECONDS]]"


class SlurmOptionError(ValueError):
    """A Slurm option cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks Slurm for (None: the cluster's default)."""

    partition: str | None = None
    time: str | None = None  # as Slurm reads it: minutes, h:m:s, d-h:m:s...
    cpus_per_task: int | None = None
    mem: str | None = None  # 16G, 4000M...
    gpus_per_node: int | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    account: str | None = None
    qos: str | None = None
    warning_seconds: int = DEFAULT_WARNING_S
    slurm_args: dict[str, str] = field(default_factory=dict)  # any other sbatch option

    @property
    def time_minutes(self) -> int:
        return DEFAULT_TIME_MIN if self.time is None else parse_time(self.time)

    @property
    def tasks(self) -> int:
        """Processes of the job: one per rank of a data-parallel run."""
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        """``partition gpu, 2 nodes x 4 tasks, 4 GPUs per node, time 2-00:00:00``."""
        parts = [f"partition {self.partition or '(default)'}"]
        if self.tasks > 1:
            parts.append(f"{self.nodes} node(s) x {self.tasks_per_node} task(s)")
        if self.gpus_per_node:
            parts.append(f"{self.gpus_per_node} GPU(s) per node")
        default = "" if self.time is not None else " (rhn's default)"
        parts.append(f"time limit {format_minutes(self.time_minutes)}{default}")
        return ", ".join(parts)


def format_minutes(minutes: int) -> str:
    """A time limit as Slurm shows it: ``45:00``, ``2:00:00``, ``2-00:00:00``."""
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{mins:02d}:00"
    return f"{hours}:{mins:02d}:00" if hours else f"{mins}:00"


def parse_time(text: str) -> int:
    """Minutes of a Slurm time limit (rounded up, at least 1)."""
    value = str(text).strip()
    days = 0
    if "-" in value:
        head, _, value = value.partition("-")
        days = _number(head, text)
        if value.count(":") > 2 or not value:
            raise _bad_time(text)
        parts = [_number(p, text) for p in value.split(":")]
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    else:
        parts = [_number(p, text) for p in value.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise _bad_time(text)
    total = days * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise _bad_time(text)
    return total


def _number(part: str, text: str) -> int:
    if not part.strip().isdigit():
        raise _bad_time(text)
    return int(part)


def _bad_time(text: str) -> SlurmOptionError:
    return SlurmOptionError(f"--time {text!r}: expected a Slurm time limit ({_TIME_FORMS})")


def parse_slurm_args(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--slurm-arg KEY=VALUE`` (repeatable) as {key: value}; ``constraint=a100``."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not sep or not key or not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise SlurmOptionError(
                f"--slurm-arg {pair!r}: expected KEY=VALUE with an sbatch option name, "
                "e.g. constraint=a100 or exclude=node7"
            )
        parsed[key] = value
    return parsed


def _checked(options: SlurmOptions) -> SlurmOptions:
    for name in ("cpus_per_task", "gpus_per_node", "nodes", "tasks_per_node"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise SlurmOptionError(f"{_flag(name)} {value!r}: expected a whole number >= 1")
    if options.mem is not None and not _MEMORY.match(str(options.mem).upper()):
        raise SlurmOptionError(
            f"--mem {options.mem!r}: expected a size such as 16G, 4000M or 4000 (megabytes)"
        )
    if not isinstance(options.warning_seconds, int) or options.warning_seconds < 10:
        raise SlurmOptionError(
            f"warning_seconds {options.warning_seconds!r}: expected whole seconds >= 10 "
            "(time to finish a step and write a checkpoint before the time limit)"
        )
    minutes = options.time_minutes
    if options.warning_seconds >= minutes * 60:
        raise SlurmOptionError(
            f"--time {options.time!r} is not longer than the warning_seconds "
            f"{options.warning_seconds} s before it; give a longer time limit"
        )
    return options


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings_defaults(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``slurm:`` section of the settings file as SlurmOptions fields; ``source``
    (the file) names it in errors."""
    section = settings.get(SETTINGS_KEY) or {}
    if not isinstance(section, dict):
        raise SlurmOptionError(f"{source}: '{SETTINGS_KEY}:' must be a mapping of options")
    known = {f.name for f in fields(SlurmOptions)}
    values: dict[str, Any] = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name == "ntasks_per_node":
            name = "tasks_per_node"
        if name not in known:
            raise SlurmOptionError(
                f"{source}: slurm option {key!r} is not known (known: {', '.join(sorted(known))};"
                " anything else goes under slurm_args)"
            )
        values[name] = value
    if "slurm_args" in values:
        args = values["slurm_args"]
        if not isinstance(args, dict):
            raise SlurmOptionError(f"{source}: slurm_args must be a mapping such as {{qos: low}}")
        values["slurm_args"] = parse_slurm_args([f"{k}={v}" for k, v in args.items()])
    if "time" in values:
        values["time"] = str(values["time"])
    return values


def build_options(given: dict[str, Any], settings: dict[str, Any], source: str) -> SlurmOptions:
    """The job's options: ``given`` (the command line; None: not given) over the
    settings file's ``slurm:`` section over rhn's defaults, checked."""
    values = settings_defaults(settings, source)
    extra = dict(values.pop("slurm_args", {}))
    options = SlurmOptions(**values)
    chosen = {k: v for k, v in given.items() if v is not None and k != "slurm_args"}
    extra.update(given.get("slurm_args") or {})
    return _checked(replace(options, **chosen, slurm_args=extra))
