"""``--launcher slurm`` without a cluster: the options, their checks (one line, exit 2,
nothing queued or written), what reaches sbatch (a fake one on PATH records it), and
the reading of squeue for ``rhn sweep status``. The real cluster: tests/test_cluster.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from rhn_cli.cli import cli
from rhn_cli.cluster.options import SlurmOptionError, build_options, parse_slurm_args, parse_time
from rhn_cli.cluster.status import JobState, parse_squeue, point_status
from rhn_cli.experiment.sweep import expand

RUN = ["with", "depth=2", "hidden_size=8", "max_max_epoch=1", "synthetic.train_tokens=5000"]
SECRET = "s3cr3t-pw"

FAKE_SBATCH = """#!/bin/sh
# Records what it was given, as sbatch would receive it, and "queues" job 4242.
n=$(ls "$RECORD_DIR" | wc -l)
{ echo "ARGS: $*"; echo "MONGO: $RHN_MONGO_URL"; echo "DATA: $RHN_DATA_DIR"; cat "$1"; } \\
    > "$RECORD_DIR/call-$n.txt"
echo "Submitted batch job $((4242 + n))"
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that records its arguments, environment and script."""
    bin_dir, record = tmp_path / "fakebin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):
        script = bin_dir / name  # submitit wants an srun on PATH too; the job would use it
        script.write_text(text)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD_DIR", str(record))
    return record


def calls(record: Path) -> list[str]:
    return [p.read_text() for p in sorted(record.iterdir())]


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("30", 30), ("90:30", 91), ("1:00:00", 60), ("2-00:00:00", 2880), ("1-12", 2160)],
)
def test_slurm_time_forms(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["0", "abc", "1:2:3:4", "-5", "1-"])
def test_bad_time_names_the_forms(text):
    with pytest.raises(SlurmOptionError, match="expected a Slurm time limit"):
        parse_time(text)


def test_command_line_over_settings_over_defaults():
    settings = {
        "slurm": {
            "partition": "gpu",
            "time": "2-00:00:00",
            "mem": "64G",
            "slurm_args": {"constraint": "a100"},
        }
    }
    options = build_options({"partition": "debug", "slurm_args": {"qos": "low"}}, settings, "cfg")
    assert options.partition == "debug" and options.time_minutes == 2880
    assert options.mem == "64G" and options.warning_seconds == 120
    assert options.slurm_args == {"constraint": "a100", "qos": "low"}


def test_unknown_settings_key_is_named():
    with pytest.raises(SlurmOptionError, match="slurm option 'gpu' is not known"):
        build_options({}, {"slurm": {"gpu": 1}}, "cfg")


def test_slurm_arg_needs_key_and_value():
    assert parse_slurm_args(["constraint=a100", "--exclude=node7"]) == {
        "constraint": "a100",
        "exclude": "node7",
    }
    with pytest.raises(SlurmOptionError, match="expected KEY=VALUE"):
        parse_slurm_args(["a100"])


# -- bad input: one line, exit 2, nothing queued or written -----------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--partition", "gpu"], "--partition only apply with --launcher slurm"),
        (["--launcher", "slurm", "--nproc", "2"], "--launcher slurm: drop --nproc"),
        (["--launcher", "slurm", "--time", "soon"], "--time 'soon': expected a Slurm time"),
        (["--launcher", "slurm", "--mem", "lots"], "--mem 'lots': expected a size"),
        (["--launcher", "slurm", "--time", "2"], "--time '2' is not longer than the"),
        (["--launcher", "slurm", "--tasks-per-node", "3"], "3 tasks: batch_size=20 cannot"),
        (["--launcher", "slurm", "--slurm-arg", "a100"], "--slurm-arg 'a100': expected"),
    ],
)
def test_bad_slurm_options_stop_before_anything_is_queued(
    runner, fake_sbatch, tmp_path, arguments, message
):
    result = runner.invoke(cli, ["train", *arguments, *RUN, "batch_size=20"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert calls(fake_sbatch) == [] and not (tmp_path / "runs").exists()


def test_a_bad_config_is_refused_before_submission(runner, fake_sbatch, tmp_path):
    result = runner.invoke(cli, ["train", "--launcher", "slurm", "with", "depth=0"])
    assert result.exit_code == 2 and "depth" in result.output
    assert calls(fake_sbatch) == [] and not (tmp_path / "runs").exists()


def test_data_must_be_where_the_nodes_can_read_it(runner, fake_sbatch, tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n" * 500)
    monkeypatch.setenv("RHN_DATA_DIR", str(tmp_path / "no-such-dir"))
    result = runner.invoke(
        cli, ["train", "--launcher", "slurm", *RUN, "dataset='textfile'", f"data_path='{text}'"]
    )
    assert result.exit_code == 2
    assert "data directory" in result.output and "does not exist" in result.output
    assert calls(fake_sbatch) == []


def test_without_sbatch_the_submission_fails_in_one_line(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = runner.invoke(cli, ["train", "--launcher", "slurm", *RUN])
    assert result.exit_code == 1
    assert "Slurm did not accept the job: sbatch is not installed here" in result.output
    assert not (tmp_path / "runs" / "_slurm").exists()  # nothing half-written


# -- what reaches sbatch -----------------------------------------------------------------


def test_train_submits_one_requeueable_warned_job(runner, fake_sbatch, tmp_path, monkeypatch):
    monkeypatch.setenv("RHN_MONGO_URL", f"mongodb://rhn:{SECRET}@127.0.0.1:9/rhn")
    arguments = ["train", "--launcher", "slurm", "--partition", "gpu", "--time", "1-00:00:00"]
    arguments += ["--gpus-per-node", "2", "--slurm-arg", "constraint=a100", "--tag", "x"]
    result = runner.invoke(cli, [*arguments, *RUN])
    assert result.exit_code == 0, result.output
    assert "submitted job 4242: rhn train with depth=2" in result.output
    assert "Follow with: squeue -j 4242" in result.output
    assert "(partition gpu, 1 node(s) x 2 task(s), 2 GPU(s) per node, time limit 1-00:00:00;" in (
        result.output
    )
    (call,) = calls(fake_sbatch)
    for line in (
        "--partition=gpu",
        "--time=1440",
        "--requeue",
        "--signal=USR2@120",
        "--gpus-per-node=2",
        "--ntasks-per-node=2",
        "--constraint=a100",
        "--open-mode=append",
    ):
        assert f"#SBATCH {line}" in call, line
    assert f"DATA: {tmp_path / 'data'}" in call  # made absolute for the nodes
    # The MongoDB URL reaches the job in its environment, and nowhere else.
    assert f"MONGO: mongodb://rhn:{SECRET}@127.0.0.1:9/rhn" in call
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert written and all(SECRET.encode() not in p.read_bytes() for p in written)
    assert SECRET not in call.split("MONGO:")[0] + call.split("\n", 2)[2]
    assert SECRET not in result.output
    assert os.environ["RHN_MONGO_URL"].endswith("/rhn")  # the submitting process: restored


def test_sweep_submits_an_array_records_it_and_never_twice(
    runner, fake_sbatch, tmp_path, monkeypatch
):
    queued: dict = {}
    monkeypatch.setattr("rhn_cli.cluster.status.job_states", lambda: queued)
    sweep = ["sweep", "--launcher", "slurm", "--name", "grid", *RUN, "learning_rate=[0.1,0.2]"]
    result = runner.invoke(cli, sweep)
    assert result.exit_code == 0, result.output
    assert "submitted job 4242_0: point 1/2 learning_rate=0.1" in result.output
    assert "submitted job 4242_1: point 2/2 learning_rate=0.2" in result.output
    (call,) = calls(fake_sbatch)
    assert "#SBATCH --array=0-1%2" in call and "#SBATCH --job-name=grid" in call
    manifest = json.loads((tmp_path / "runs" / "_sweeps" / "grid" / "sweep.json").read_text())
    assert [(j["point"], j["job"]) for j in manifest["jobs"]] == [(1, "4242_0"), (2, "4242_1")]
    # While Slurm has them queued, submitting the sweep again queues nothing.
    queued.update(
        {"4242_0": JobState("PENDING", "Priority", 0), "4242_1": JobState("RUNNING", "None", 0)}
    )
    again = runner.invoke(cli, sweep)
    assert again.exit_code == 0 and "nothing to submit" in again.output
    assert "point 1/2 learning_rate=0.1: already queued as job 4242_0" in again.output
    status = runner.invoke(cli, ["sweep", "status", "grid"])
    assert "point 1/2 learning_rate=0.1: pending job 4242_0 (Priority); no run recorded" in (
        status.output
    )
    assert status.output.rstrip().endswith("sweep grid: 2 points: 1 pending, 1 running")
    # Gone from the queue without a run (failed at start): submitted again.
    queued["4242_0"] = JobState("FAILED", "NonZeroExitCode", 0)
    third = runner.invoke(cli, sweep)
    assert "submitted job 4243: point 1/2 learning_rate=0.1" in third.output
    assert len(calls(fake_sbatch)) == 2


def test_status_of_an_unknown_sweep_names_the_known_ones(runner, fake_sbatch):
    monkey_sweep = ["sweep", "--launcher", "slurm", "--name", "known", *RUN, "seed=[1,2]"]
    assert runner.invoke(cli, monkey_sweep).exit_code == 0
    result = runner.invoke(cli, ["sweep", "status", "nope"])
    assert result.exit_code == 2
    assert "no sweep 'nope' in runs (known: known)" in result.output


# -- squeue, and what status makes of it ------------------------------------------------


def test_squeue_lines_become_job_states():
    text = "77|0|78|PENDING|Priority|0|\n77|1|79|RUNNING|None|2|\n80|N/A|80|FAILED|None|0|\n"
    assert parse_squeue(text) == {
        "77_0": JobState("PENDING", "Priority", 0),
        "77_1": JobState("RUNNING", "None", 2),
        "80": JobState("FAILED", "None", 0),
    }


class _Record:
    def __init__(self, status, epoch=None, requeues=0, result=None):
        self.key, self.status, self.result = "12", status, result
        self.config = {"max_max_epoch": 4}
        self.info = {"slurm": {"requeues": requeues}, **({"epoch_nr": epoch} if epoch else {})}


def test_point_states_read_as_a_user_would():
    (point,) = expand(["depth=2", "hidden_size=[8]"]).points
    pending = point_status(
        point, _Record("INTERRUPTED", 2, 1), "9_0", JobState("PENDING", "BeginTime", 1)
    )
    assert (pending.state, pending.details) == (
        "pending",
        "job 9_0, requeued 1 time (BeginTime); run 12 INTERRUPTED at 2/4 epochs done",
    )
    running = point_status(point, _Record("RUNNING", 3, 2), "9_0", JobState("RUNNING", "None", 2))
    assert (running.state, running.details) == (
        "running",
        "as run 12, 3/4 epochs done; job 9_0, requeued 2 times",
    )
    done = point_status(point, _Record("COMPLETED", 4, 2, 3.5), "9_0", None)
    assert done.state == "completed" and done.details.startswith("as run 12, best valid ppl 3.5")
    failed = point_status(point, None, "9_0", JobState("FAILED", "None", 0))
    assert (failed.state, failed.details) == ("failed", "job 9_0 FAILED; no run recorded yet")


def test_status_of_a_job_slurm_forgot_reads_its_output(runner, fake_sbatch, tmp_path, monkeypatch):
    """Minutes after a job ends Slurm forgets it; one that recorded no run (it failed at
    the start) is then known by its output file's last line."""
    queued: dict = {}
    monkeypatch.setattr("rhn_cli.cluster.status.job_states", lambda: queued)
    sweep = ["sweep", "--launcher", "slurm", "--name", "gone", *RUN, "learning_rate=[0.1,0.2]"]
    assert runner.invoke(cli, sweep).exit_code == 0
    output = tmp_path / "runs" / "_slurm" / "4242_0" / "4242_0_0_log.out"
    output.parent.mkdir(parents=True, exist_ok=True)  # submitit made it
    output.write_text("starting\nrhn_cli.experiment.schema.ConfigError: data_path='x.txt': bad\n")
    status = runner.invoke(cli, ["sweep", "status", "gone"]).output
    assert (
        "point 1/2 learning_rate=0.1: ended job 4242_0 ended without recording a run; "
        "its output ends: rhn_cli.experiment.schema.ConfigError: data_path='x.txt': bad"
    ) in status, status
    assert "point 2/2 learning_rate=0.2: submitted job 4242_1" in status  # no output yet
