"""A real one-node Slurm cluster on 127.0.0.1 for the tests: install, start, inspect, stop.

Used by the session fixture `slurm_cluster` in tests/conftest.py. Everything the cluster writes
lives in one temporary directory; the daemons are found by their pid files there and by the
SLURM_CONF of that directory in their environment, so a cluster someone else runs on the same
machine (another slurm.conf, other ports) is never touched.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
# A non-interactive CI shell may not have the sbin directories on PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 30
PARTITION = "debug"
URGENT_PARTITION = "urgent"  # its jobs pre-empt those of PARTITION
MUNGE_PID_FILE = Path("/run/munge/munged.pid")


class SlurmUnavailable(Exception):
    """Slurm cannot be had here (not Linux, not root, no apt-get, the install failed)."""


def find_program(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if find_program(name) is None]


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_in_own_group(command: list[str], timeout_s: float, env: dict) -> tuple[int, str]:
    """Run `command`; on timeout kill it with its children (apt-get runs dpkg) and raise."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, output


def ensure_installed(timeout_s: float = INSTALL_TIMEOUT_S) -> None:
    """apt-get install the Slurm packages if any program is missing; SlurmUnavailable if not."""
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable(f"a Slurm cluster needs Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        # Also with Slurm installed: munged, slurmd and slurmctld as configured need root.
        raise SlurmUnavailable("a Slurm cluster (and installing it) needs root")
    missing = missing_programs()
    if not missing:
        return
    wanted = f"{' '.join(missing)} missing"
    apt_get = find_program("apt-get")
    if apt_get is None:
        raise SlurmUnavailable(f"{wanted}, and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout_s
    for command in ([apt_get, "update", "-qq"], [apt_get, "install", "-y", "-qq", *PACKAGES]):
        try:
            code, output = run_in_own_group(command, max(1.0, deadline - time.monotonic()), env)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(command)} ran over {timeout_s:.0f} s") from None
        if code != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed (exit {code}):\n{tail(output)}")
    if missing_programs():
        raise SlurmUnavailable(f"still missing after apt-get install: {missing_programs()}")


def free_ports(count: int) -> list[int]:
    """Random free TCP ports below the kernel's ephemeral range, so no client takes them."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 30999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    # slurmd drains a node that reports less memory than configured: leave it room.
    return max(1, total_kb // 1024 - 512)


def process_state(pid: int) -> str | None:
    """The state letter of `pid` (None: gone). A zombie counts as gone: an orphaned daemon's
    parent may be a container's PID 1 that never reaps."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state == "Z" else state


def processes_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def processes_with_env(variable: str, value: str) -> list[int]:
    """Processes started with `variable=value` in their environment (root can read them all)."""
    wanted = f"{variable}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def terminate(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if `pid` is still there after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while process_state(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_state(pid) is None:
            return


def start_munged() -> int | None:
    """Start munged unless one runs already; return the pid of the one started here."""
    if processes_named("munged"):
        return None
    munge = pwd.getpwnam("munge")
    run_dir = MUNGE_PID_FILE.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chown(run_dir, munge.pw_uid, munge.pw_gid)
    result = subprocess.run(
        [find_program("munged")], user="munge", group="munge", capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"munged failed (exit {result.returncode}): {result.stderr.strip()}")
    return int(MUNGE_PID_FILE.read_text())


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`Key=value Key=value ...` of `scontrol show -o`; a value may hold spaces (Command=)."""
    fields = re.split(r"\s+(?=[A-Za-z/:_]+=)", line.strip())
    return dict(field.split("=", 1) for field in fields if "=" in field)


def slurm_conf(directory: Path, hostname: str, cpus: int, ports: list[int]) -> str:
    """The cluster's slurm.conf; every path absolute, since the daemons chdir."""
    return f"""\
ClusterName=rhntest
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd.log
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Pending jobs start within seconds, not at the default 60 s scheduling pass.
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=30
# Finished jobs stay visible to squeue and scontrol for 10 minutes.
MinJobAge=600
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb()} State=UNKNOWN
# A job of the urgent partition pre-empts the default partition's jobs: they get SIGTERM,
# and 30 s of grace before Slurm requeues them (PreemptMode=REQUEUE).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName={PARTITION} Nodes={hostname} Default=YES State=UP PriorityTier=1 GraceTime=30
PartitionName={URGENT_PARTITION} Nodes={hostname} State=UP PriorityTier=2
"""


class SlurmCluster:
    """slurmctld + slurmd of one node, this machine, with their files in a fresh /tmp directory
    (short: slurmd's step sockets there must fit the 108-byte socket path limit)."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="rhn-slurm-", dir="/tmp"))
        self.conf = self.directory / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.partition = PARTITION
        self.urgent_partition = URGENT_PARTITION  # pre-empts jobs of the partition above
        # slurmd finds its node by the short host name.
        self.hostname = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))
        self.logs = [self.directory / "log" / f"{name}.log" for name in ("slurmctld", "slurmd")]
        self._munged_pid: int | None = None

    def command(self, *args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess:
        """A Slurm program run against this cluster (text output captured, never raises)."""
        return subprocess.run(
            [find_program(args[0]), *args[1:]],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start munged (if none runs), slurmctld and slurmd; return once the node is idle.
        RuntimeError, with the daemon logs, if it does not come up: nothing is left running."""
        for sub in ("state", "spool", "log"):
            (self.directory / sub).mkdir()
        self.conf.write_text(slurm_conf(self.directory, self.hostname, self.cpus, free_ports(2)))
        try:
            self._munged_pid = start_munged()
            for daemon in ("slurmctld", "slurmd"):
                result = self.command(daemon, "-f", str(self.conf))
                if result.returncode != 0:
                    raise RuntimeError(f"{daemon} exited {result.returncode}: {result.stderr}")
            self._wait_until_idle(timeout_s)
        except BaseException as error:
            self.stop(remove_directory=False)  # its logs and slurm.conf, to look into
            if isinstance(error, RuntimeError):
                message = f"Slurm cluster in {self.directory} did not start: {error}"
                raise RuntimeError(f"{message}\n{self.log_tail()}") from None
            raise

    def _wait_until_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.command(
                "sinfo", "-h", "-N", "-n", self.hostname, "-p", PARTITION, "-o", "%t"
            )
            if result.stdout.strip() == "idle":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node {self.hostname} not idle after {timeout_s:.0f} s: "
                    f"sinfo said {(result.stdout + result.stderr).strip()!r}"
                )
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the slurmctld and slurmd logs, for failure messages."""
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"==> {log} <==\n{tail(text, lines)}")
        return "\n".join(parts)

    def squeue(self, job_id: int | str) -> dict | None:
        """The job as slurmctld knows it: {"state", "reason", "restarts", "fields"}; None if
        it does not know the job (any more)."""
        result = self.command("scontrol", "show", "job", "-o", str(job_id))
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return None
            raise RuntimeError(f"scontrol show job {job_id}: {result.stderr.strip()}")
        fields = parse_scontrol_record(result.stdout.splitlines()[0])
        return {
            "state": fields["JobState"],
            "reason": fields.get("Reason"),
            "restarts": int(fields.get("Restarts", 0)),
            "fields": fields,
        }

    def wait_for(
        self,
        job_id: int | str,
        states: str | tuple[str, ...],
        timeout: float = 30.0,
        restarts: int | None = None,
    ) -> dict:
        """Poll until the job is in one of `states` (with `restarts` requeues, if given);
        return its squeue() dict. AssertionError with the job and the daemon logs on timeout."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.squeue(job_id)
            if job and job["state"] in states and restarts in (None, job["restarts"]):
                return job
            if time.monotonic() > deadline:
                shown = self.command("scontrol", "show", "job", str(job_id))
                raise AssertionError(
                    f"job {job_id} not in {states} (restarts={restarts}) after {timeout} s:\n"
                    f"{shown.stdout}{shown.stderr}\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, remove_directory: bool = True) -> None:
        """Cancel every job, stop the daemons and whatever they left, and munged if started
        here; then remove the cluster's directory."""
        if self._pid("slurmctld"):
            self._cancel_all_jobs()
        for daemon in ("slurmd", "slurmctld"):
            pid = self._pid(daemon)
            if pid:
                terminate(pid)
        # Job steps, slurmscriptd: all were started with this cluster's SLURM_CONF.
        for pid in processes_with_env("SLURM_CONF", str(self.conf)):
            terminate(pid, grace_s=2.0)
        if self._munged_pid:
            terminate(self._munged_pid)
            self._munged_pid = None
        if remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _pid(self, daemon: str) -> int | None:
        """The daemon's pid from its pid file, if that process is this cluster's daemon."""
        try:
            pid = int((self.directory / f"{daemon}.pid").read_text())
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        alive = process_state(pid) is not None
        return pid if alive and str(self.conf).encode() in command_line else None

    def _cancel_all_jobs(self) -> None:
        """scancel (SIGTERM); jobs still there after 5 s get SIGKILL (KillWait is 30 s)."""
        for signal_options in ([], ["--full", "--signal=KILL"]):
            self.command("scancel", "--partition", PARTITION, *signal_options)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if not self.command("squeue", "-h", "-o", "%i").stdout.strip():
                    return
                time.sleep(0.5)
