"""Finding the run a ``rhn train --resume`` continues, and checking it can be continued."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rhn_cli.experiment.provenance import process_alive
from rhn_cli.experiment.schema import ConfigError, defaults, validate
from rhn_cli.tracking.observers import Continuation

# Keys whose default is not what rhn did before they existed, by model: the value that
# reproduces it, for a config recorded before (the lstm drew its cell biases uniformly).
RECORDED_BEFORE = {"lstm": {"lstm_bias_init": "uniform"}}


def recorded_config(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config, validated, with keys added to rhn since it was recorded taking
    the value that reproduces what rhn did before they existed: their default, or the
    model's RECORDED_BEFORE value."""
    before = RECORDED_BEFORE.get(config.get("model", "rhn"), {})
    return validate({**defaults(), **before, **config})


# Keys that steer how long and how safely a run goes on, not what it computes: a resumed
# run may change them (e.g. more epochs, another job's time budget).
RUN_CONTROL_KEYS = ("max_max_epoch", "max_time", "checkpoint_every", "early_stopping")

# Omniboard calls a RUNNING run dead after two minutes without a heartbeat; so do we.
STALE_HEARTBEAT_S = 120


class ResumeError(ConfigError):
    """The run cannot be resumed (not found, already completed, still running)."""


@dataclass
class ResumePlan:
    """A recorded run to continue: from its last checkpoint (``state``, loaded from
    ``checkpoint_path``), or, for a run killed before its first checkpoint, from the
    beginning (``state`` None: :func:`plan_restart`)."""

    runs_dir: Path  # the file store the run lives in
    run_id: str
    config: dict[str, Any]
    checkpoint_path: Path | None
    state: dict[str, Any] | None = field(repr=False, default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id

    previous_status: str = "RUNNING"  # how the record says the run's last process ended

    @property
    def completed_epochs(self) -> int:
        return 0 if self.state is None else int(self.state["epoch_index"])

    def continuation(self) -> Continuation:
        """Where the run's record continues: at the checkpoint (at the start, with none)."""
        state = self.state
        ended = {"RUNNING": "was killed", "FAILED": "failed"}.get(
            self.previous_status, f"stopped ({self.previous_status})"
        )
        if state is None:
            return Continuation(
                epochs=0,
                metrics=[],
                output_bytes=0,
                note=f"(the process before {ended} before its first checkpoint; "
                "started again from the beginning, with the run's recorded config and seed)",
            )
        where = f"epoch {state['epoch_index'] + 1}, step {state['step']}"
        return Continuation(
            epochs=self.completed_epochs,
            metrics=state.get("metrics"),
            output_bytes=state.get("output_bytes"),
            note=f"(the process before {ended}; resumed at {where} from {self.checkpoint_path})",
        )

    def recorded_info(self) -> dict[str, Any] | None:
        """The run's info as last recorded: a resumed run starts from it (a restarted
        one from nothing), with the process before added to ``earlier_processes``."""
        if self.state is None:
            return None
        try:
            info = json.loads((self.run_dir / "info.json").read_text())
        except (OSError, ValueError):
            info = {}
        earlier = self._process_before()
        if earlier is not None:
            info["earlier_processes"] = [*info.get("earlier_processes", []), earlier]
        return info or None

    def _process_before(self) -> dict[str, Any] | None:
        """What computed the run's epochs so far, as its run.json says: Sacred rewrites
        run.json for each process (code, host, library versions), so a resumed run keeps
        the earlier ones here, each with the epochs it left complete."""
        try:
            run = json.loads((self.run_dir / "run.json").read_text())
        except (OSError, ValueError):
            return None
        experiment, host = run.get("experiment") or {}, run.get("host") or {}
        # run.json keeps the run's first start; each resumption's is in meta.resumed_at.
        starts = [run.get("start_time"), *(run.get("meta") or {}).get("resumed_at", [])]
        return {
            "start_time": starts[-1],
            "stop_time": run.get("stop_time") or run.get("heartbeat"),
            "status": self.previous_status,
            "completed_epochs": self.completed_epochs,
            "step": (self.state or {}).get("step"),
            "repositories": experiment.get("repositories", []),
            "dependencies": experiment.get("dependencies", []),
            "host": {key: host.get(key) for key in ("hostname", "cpu", "python_version")},
        }


def plan_resume(
    target: str, runs_dir: Path, now: datetime | None = None, assume_stopped: bool = False
) -> ResumePlan:
    """The run named by ``target`` (a run id in ``runs_dir``, a run directory or a
    checkpoint file), its recorded config and its last checkpoint, loaded and verified.

    ``assume_stopped``: the caller knows the run's last process is gone (a scheduler
    restarting the job that ran it), so a RUNNING record is not checked for life.
    Raises ResumeError, or CheckpointError for a damaged checkpoint.
    """
    from rhn_cli.engine import checkpoint

    path = Path(target)
    if target.isdigit() and (runs_dir / target).is_dir():
        run_dir, checkpoint_path = runs_dir / target, runs_dir / target / checkpoint.LAST
    elif path.is_file():
        run_dir, checkpoint_path = path.parent, path
    elif path.is_dir():
        run_dir, checkpoint_path = path, path / checkpoint.LAST
    else:
        raise ResumeError(f"--resume {target}: no run {target!r} in {runs_dir} and no such file")
    try:
        run = json.loads((run_dir / "run.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"--resume {target}: {run_dir} holds no readable run record") from error
    status = run.get("status")
    if status == "COMPLETED":
        raise ResumeError(f"--resume {target}: run {run_dir.name} is already COMPLETED")
    if status == "RUNNING" and not assume_stopped:
        _check_not_running(target, run_dir.name, run, now)
    if not checkpoint_path.is_file():
        if checkpoint_path.name == checkpoint.LAST and (run_dir / "config.json").is_file():
            # Killed before its first checkpoint: nothing to continue from, so the run
            # starts again from the beginning, under its id, with its recorded seed.
            return plan_restart(run_dir)
        raise ResumeError(
            f"--resume {target}: run {run_dir.name} has no checkpoint ({checkpoint_path.name}); "
            "it stopped before its first one"
        )
    state = checkpoint.load(checkpoint_path)
    config = recorded_config(config)
    _check_same_model(target, config, state)
    return ResumePlan(
        run_dir.parent, run_dir.name, config, checkpoint_path, state, previous_status=status
    )


def plan_restart(run_dir: Path) -> ResumePlan:
    """A run whose process was killed before its first checkpoint, to run again from the
    beginning under the same id, with its recorded config (seed included): the record
    is rewound to nothing and every step recorded once. Only for a caller that knows
    the run's last process is gone: a scheduler restarting the job that ran it, or
    :func:`plan_resume` once its liveness check has passed."""
    try:
        run = json.loads((run_dir / "run.json").read_text())
        config = recorded_config(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError) as error:
        raise ResumeError(f"{run_dir} holds no readable run record") from error
    status = run.get("status") or "RUNNING"
    return ResumePlan(run_dir.parent, run_dir.name, config, None, None, previous_status=status)


def _check_not_running(target: str, run_id: str, run: dict[str, Any], now) -> None:
    """Refuse to resume a RUNNING run whose process may still be running it: on the same
    host, whether the recorded process is alive; elsewhere, by its heartbeat's age."""
    host = run.get("host") or {}
    process = host.get("rhn") or {}
    alive = process_alive(host.get("hostname"), process.get("pid"), process.get("process_start"))
    if alive is False:
        return  # its process is gone (killed): resume at once
    if alive:
        raise ResumeError(
            f"--resume {target}: run {run_id} is still running (process {process['pid']} on "
            "this host); stop it first (Ctrl-C or kill -TERM checkpoints it)"
        )
    if run.get("heartbeat"):
        age = ((now or datetime.now()) - datetime.fromisoformat(run["heartbeat"])).total_seconds()
        if age < STALE_HEARTBEAT_S:
            raise ResumeError(
                f"--resume {target}: run {run_id} looks alive on {host.get('hostname')} "
                f"(heartbeat {age:.0f} s ago); stop it first, or wait "
                f"{STALE_HEARTBEAT_S} s if it died"
            )


def _check_same_model(target: str, config: dict[str, Any], state: dict[str, Any]) -> None:
    """The checkpoint must have been written by this run's config (a checkpoint copied
    from another run would fail half-way through loading, as a FAILED run)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return
    saved = recorded_config(saved)
    differ = [
        key
        for key in sorted(set(config) | set(saved))
        if key not in RUN_CONTROL_KEYS and config.get(key) != saved.get(key)
    ]
    if differ:
        shown = ", ".join(f"{k}={saved.get(k)!r} (the run: {config.get(k)!r})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ResumeError(
            f"--resume {target}: the checkpoint was written with another config: {shown}{more}"
        )


def with_run_control_updates(plan: ResumePlan, updates: dict[str, Any]) -> dict[str, Any]:
    """The recorded config with ``updates`` applied; only RUN_CONTROL_KEYS may change."""
    for key in updates:
        if key not in RUN_CONTROL_KEYS:
            raise ResumeError(
                f"--resume continues the run with its recorded config; {key!r} cannot change "
                f"(allowed: {', '.join(RUN_CONTROL_KEYS)})"
            )
    return validate({**plan.config, **updates}, dict.fromkeys(updates, "the command line"))


def resolve_checkpoint(target: str, runs_dir: Path, command: str) -> tuple[Path, dict[str, Any]]:
    """(path, loaded checkpoint) of a trained model named by TARGET: a run id in
    ``runs_dir`` or a run directory (its best_model.pt), or a checkpoint file
    (best_model.pt or checkpoint.pt, which carry their training config)."""
    from rhn_cli.engine import checkpoint

    path = Path(target)
    if target.isdigit() and (runs_dir / target).is_dir():
        path = runs_dir / target / checkpoint.BEST
    elif path.is_dir():
        path = path / checkpoint.BEST
    if not path.is_file():
        raise ResumeError(
            f"{command} {target}: no run {target!r} with a {checkpoint.BEST} in {runs_dir}, "
            "and no such checkpoint file"
        )
    return path, checkpoint.load(path)


def plan_evaluation(
    target: str, runs_dir: Path, mc_steps: int
) -> tuple[dict[str, Any], str | None]:
    """(config to evaluate with, evaluated run id or None) for ``rhn evaluate TARGET``
    (TARGET as :func:`resolve_checkpoint` reads it). It runs on the run's device where
    this machine has it, else on 'auto' (:func:`~rhn_cli.engine.device.here_or_auto`)."""
    from rhn_cli.engine.device import here_or_auto

    path, saved = resolve_checkpoint(target, runs_dir, "evaluate")
    evaluated_run = path.parent.name if (path.parent / "run.json").exists() else None
    config = recorded_config({**saved["config"], "load_model": str(path), "mc_steps": mc_steps})
    config["device"] = here_or_auto(config["device"])
    return config, evaluated_run
