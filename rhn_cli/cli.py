"""The ``rhn`` command line: parsing and printing only.

Everything heavy (Sacred, torch) is imported inside the commands, so ``rhn --help``
answers at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from rhn_cli import __version__
from rhn_cli.commands.completion import complete_run_target, complete_updates
from rhn_cli.commands.launch import launcher_options
from rhn_cli.commands.messages import fail as _fail
from rhn_cli.commands.messages import stderr as _stderr
from rhn_cli.commands.options import mongo_option, runs_dir_option
from rhn_cli.commands.sacred_flags import sacred_run_options

WITH_HELP = """
Config updates use Sacred's syntax: after the word 'with', give named configs
(see 'rhn configs') or YAML files, and key=value pairs, applied in that order.
Values are Python literals: depth=20, learning_rate=1e-3, tied=False,
dataset="synthetic"; nested keys use dots: synthetic.order=3.
"""


def _resolve(updates: tuple[str, ...], extra: dict | None = None, force: bool = False):
    from rhn_cli.experiment.resolve import resolve
    from rhn_cli.experiment.schema import ConfigError

    try:
        return resolve(updates, extra, force=force)
    except ConfigError as error:
        _fail(str(error))


def _echo_config(resolved) -> None:
    """What 'rhn print-config' prints: the config, changed values marked."""
    from rhn_cli.experiment.render import config_lines, header

    click.echo(header(resolved))
    for line, changed in config_lines(resolved):
        click.secho(line, fg="blue" if changed else None)


@click.group(name="rhn", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rhn")
def cli() -> None:
    """Train and compare Recurrent Highway Networks and their peers.

    Every training run is a Sacred run, recorded in a local file store (./runs) and,
    given --mongo or RHN_MONGO_URL, in MongoDB for Omniboard.

    \b
    Examples:
      rhn train                          # the built-in quickstart (synthetic data)
      rhn train with depth=3 hidden_size=64
      rhn print-config with depth=5      # what a run would use, changes marked
      rhn configs                        # the named configs
    """


@cli.command(epilog=WITH_HELP)
@click.argument(
    "updates",
    nargs=-1,
    metavar="[with] [NAMED_CONFIG|FILE.yaml|KEY=VALUE]...",
    shell_complete=complete_updates,
)
@click.option("-n", "--name", help="Name of the run (recorded as the experiment name).")
@click.option("-c", "--comment", help="A note stored with the run (Omniboard shows it as Notes).")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TEXT",
    help="Tag the run (repeat for several): recorded in its meta.tags and shown by "
    "Omniboard; 'rhn runs ls --tag TEXT' finds it. 'rhn sweep' tags runs with its name.",
)
@click.option("--seed", type=int, help="Random seed (default: drawn at random and recorded).")
@runs_dir_option
@mongo_option
@click.option("-u", "--unobserved", is_flag=True, help="Record nothing (a quick try).")
@click.option(
    "--resume",
    "resume_target",
    metavar="RUN_ID|PATH",
    help="Continue a stopped run (a run id in --runs-dir, its directory, or a checkpoint "
    "file) from its last checkpoint, under the same run id and with its recorded config.",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Only deterministic torch kernels (reproducible GPU runs; sets deterministic=True).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    metavar="N",
    help="Train data-parallel on N local processes (torchrun --standalone --nproc-per-node "
    "N): each takes batch_size/N of the streams; the run is the same experiment, recorded "
    "once. OMP_NUM_THREADS defaults to cores/N. Several machines: see docs/distributed.md.",
)
@sacred_run_options
@launcher_options
@click.pass_context
def train(
    ctx,
    updates,
    name,
    comment,
    tags,
    seed,
    runs_dir,
    mongo_url,
    unobserved,
    resume_target,
    deterministic,
    nproc,
    launcher,
    sacred_flags,
    **slurm,
) -> None:
    """Train a model; per epoch, print and record train/valid perplexity and bits.

    With no arguments it trains the quickstart: a small RHN on the built-in
    synthetic corpus, whose true entropy rate is printed for comparison.

    Before a run is recorded, the config is checked against this machine and the data
    (device, load_model, the dataset's files, vocab_size, splits that fill a minibatch):
    one that cannot run stops with one line and exit code 2.

    Checkpoints are written into the run directory at every epoch end, every
    checkpoint_every minutes, and on Ctrl-C or SIGTERM (which stop after the current
    step; press Ctrl-C twice to stop at once). Continue with --resume RUN_ID.

    On the CPU the RHN's time loop runs in C++, compiled for the machine on first use
    (about a minute, once) into the user cache; RHN_NATIVE=0 runs the Python loop instead.

    With --launcher slurm the run is submitted as a Slurm job instead, and the command
    returns at once: see docs/cluster.md.

    Sacred's flags mean what they mean in Sacred: -n, -c, -u, -F, -m, -p, -l, -d, -D, -f
    (see docs/tracking.md#sacreds-flags).
    """
    from rhn_cli.commands.launch import check_local_options
    from rhn_cli.commands.sacred_flags import check_flag_combinations, reject_sacred_command
    from rhn_cli.engine.distributed import env_rank
    from rhn_cli.experiment.sacred_app import RunFlags, RunLabels

    reject_sacred_command(updates)
    check_local_options(ctx, launcher)
    check_flag_combinations(sacred_flags, launcher, nproc, resuming=resume_target is not None)
    labels = RunLabels(name, comment, _check_tags(tags))
    control = {"seed": seed, "deterministic": deterministic, "unobserved": unobserved}
    resolved, plan = _training_config(updates, runs_dir, resume_target, control, sacred_flags)
    rank = env_rank()  # under torchrun: only rank 0 speaks
    if rank == 0 and nproc is None:  # with --nproc, the processes' rank 0 speaks
        _announce_config(resolved, sacred_flags)
    if launcher == "slurm":
        fields = {"seed": seed, "deterministic": deterministic, "resume_target": resume_target}
        _submit_training(resolved.config, (updates, labels, fields), runs_dir, mongo_url, slurm)
        return
    if nproc is not None:
        _launch_processes(nproc, resolved.config, resuming=plan is not None)
        return
    if rank == 0:  # at once: importing torch and Sacred's run machinery takes seconds
        config, what = resolved.config, "resuming" if plan is not None else "training"
        click.echo(
            f"rhn train: {what} {config['model']} on {config['dataset']}, "
            f"{config['max_max_epoch']} epochs; loading torch and the data..."
        )
    corpus = _preflight(resolved.config, resuming=plan is not None, quiet=rank != 0)
    flags = RunFlags(unobserved, sacred_flags.sacred_options())
    where = {"runs_dir": runs_dir, "mongo_url": mongo_url}
    _train_here(resolved, plan, where, (labels, flags, corpus), sacred_flags)


def _training_config(updates, runs_dir: str, resume_target, control: dict, sacred_flags):
    """(resolved config, resume plan or None) of ``rhn train``: the recorded config of
    the run --resume continues, else the updates with --seed/--deterministic (and
    --force's unchecked keys)."""
    if resume_target is None:
        extra = _run_control(control["seed"], control["deterministic"])
        return _resolve(updates, extra, sacred_flags.force), None
    if control["seed"] is not None or control["deterministic"] or control["unobserved"]:
        _fail(
            f"--resume {resume_target} continues the run with its recorded config; "
            "drop --seed, --deterministic and --unobserved"
        )
    return _plan_resume(resume_target, runs_dir, updates)


def _train_here(resolved, plan, where: dict, run: tuple, sacred_flags) -> None:
    """Train in this process (one rank of a job under torchrun): ``where`` the run is
    recorded (runs_dir, mongo_url), ``run`` its (labels, flags, corpus)."""
    from rhn_cli.engine.distributed import env_rank
    from rhn_cli.experiment.sacred_app import RunFailed, RunInterrupted, run_training

    labels, flags, corpus = run
    rank = env_rank()
    try:
        outcome = run_training(
            resolved,
            **where,
            flags=flags,
            labels=labels,
            resume=plan,
            warn=_warn,
            corpus=corpus,
        )
    except RunInterrupted as stop:
        if rank != 0:
            sys.exit(128 + (stop.signal_number or 2) if stop.status != "TIMEOUT" else 0)
        _report_stop(stop)
    except RunFailed as failure:
        from rhn_cli.commands.sacred_flags import debug_failure

        debug_failure(sacred_flags, failure.cause)
        where = f" (traceback recorded in {failure.run_dir}/run.json)" if failure.run_dir else ""
        _fail(f"{'' if rank == 0 else f'rank {rank}: '}{failure.cause}{where}", code=1)
    if rank == 0:
        _report_training(outcome)


def _warn(message: str) -> None:
    _stderr(f"Warning: {message}", "yellow")


def _announce_config(resolved, flags) -> None:
    """Before training: the keys -f/--force let through unchecked, and with -p the config
    (then a rule, as Sacred prints it)."""
    if resolved.unchecked:
        keys = ", ".join(resolved.unchecked)
        _warn(
            f"-f/--force: not rhn config keys, recorded unchecked and ignored by training: {keys}"
        )
    if flags.print_config:
        _echo_config(resolved)
        click.echo("-" * 79)


def _submit_training(config: dict, what: tuple, runs_dir: str, mongo_url, slurm: dict) -> None:
    """``rhn train --launcher slurm``: one job, then where to follow it. ``what``: the
    ``with`` tokens, the run's labels, and its seed, --deterministic and --resume."""
    from rhn_cli.cluster.job import TrainRequest
    from rhn_cli.commands.launch import (
        absolute_updates,
        echo_submitted,
        prepare_submission,
        slurm_options,
        submit_jobs,
    )
    from rhn_cli.engine.distributed import DistributedError, Shard

    options = slurm_options(slurm)
    try:
        Shard(world_size=options.tasks).check_config(config)
    except DistributedError as error:
        _fail(f"{options.tasks} tasks: {error}")
    root = prepare_submission(runs_dir, config)
    updates, labels, fields = what
    tokens = absolute_updates(tuple(u for u in updates if u != "with"))
    request = TrainRequest(
        tokens, str(root), labels.name, labels.comment, tuple(labels.tags), **fields
    )
    if request.resume_target:
        title = f"rhn train --resume {request.resume_target}"
    else:
        title = " ".join(["rhn train", *(["with", *tokens] if tokens else [])])
    submitted = submit_jobs([(title, request)], options, labels.name or "rhn-train", mongo_url)
    echo_submitted(submitted, options, root)


def _run_control(seed: int | None, deterministic: bool) -> dict:
    """The config updates that --seed and --deterministic stand for."""
    extra: dict = {"seed": seed} if seed is not None else {}
    if deterministic:
        extra["deterministic"] = True
    return extra


def _report_training(outcome) -> None:
    """The last line of a completed training run: where it is recorded, and its result."""
    result = f"result (best valid ppl) {outcome.result:g}"
    if outcome.run_id is None:
        click.echo(f"{outcome.status} (unobserved: not recorded); {result}")
        return
    where = f" in {outcome.run_dir}" if outcome.run_dir else ""
    if outcome.mongo_url:
        where += f" and in MongoDB {outcome.mongo_url}"
    click.echo(f"run {outcome.run_id} {outcome.status}{where}; {result}")


def _launch_processes(nproc: int, config: dict, resuming: bool) -> None:
    """``rhn train --nproc N``: this same command line, without --nproc, on N local
    processes under torchrun; a failed rank is named, and the exit code is non-zero.
    The config is checked here first, so a bad one starts no process."""
    from rhn_cli.engine.distributed import DistributedError, Shard, launch_local, launched

    if launched():
        _fail("--nproc starts its own processes, and this one is already one of a job; drop it")
    try:
        Shard(world_size=nproc).check_config(config)
    except DistributedError as error:
        _fail(f"--nproc {nproc}: {error}")
    _preflight(config, resuming=resuming)  # prepares the data once, for every rank
    argv = sys.argv[1:]
    if "train" not in argv:
        _fail("--nproc relaunches the 'rhn train' command line, and it cannot be found")
    args, rest = [], iter(argv[argv.index("train") + 1 :])
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)
        elif not arg.startswith("--nproc="):
            args.append(arg)
    outcome = launch_local(nproc, ["train", *args])
    if outcome.exit_code and not outcome.interrupted:
        _fail(outcome.describe(), code=outcome.exit_code)
    sys.exit(outcome.exit_code)


def _preflight(
    config: dict, *, resuming: bool = False, quiet: bool = False, evaluation: bool = False
):
    """The corpus to train on, after the checks of :mod:`rhn_cli.experiment.preflight`
    (``evaluation``: the device and the data only): a config this machine or the data
    cannot run stops here (exit 2), before any run is recorded; data that cannot be
    obtained (a failed download, a full disk) exits 1."""
    from rhn_cli.data.errors import DatasetError
    from rhn_cli.experiment.preflight import preflight_evaluation, preflight_training
    from rhn_cli.experiment.schema import ConfigError

    echo = (lambda message: None) if quiet else click.echo
    progress = None if quiet else _terminal_stderr()
    try:
        if evaluation:
            return preflight_evaluation(config, echo=echo, progress=progress)
        return preflight_training(config, resuming=resuming, echo=echo, progress=progress)
    except ConfigError as error:
        _fail(str(error))
    except (DatasetError, OSError) as error:
        _fail(f"dataset={config['dataset']!r} cannot be loaded: {error}", code=1)


def _check_tags(tags: tuple[str, ...]) -> list[str]:
    """The --tag values, each once, in order; an empty or multi-line tag is an error."""
    from rhn_cli.tracking.records import check_tag

    checked: list[str] = []
    for tag in tags:
        text = check_tag(tag)
        if text is None:
            _fail(f"--tag {tag!r}: expected a non-empty tag on one line")
        if text not in checked:
            checked.append(text)
    return checked


def _plan_resume(target: str, runs_dir: str, updates: tuple[str, ...]):
    from rhn_cli.engine.checkpoint import CheckpointError
    from rhn_cli.experiment.resolve import ResolvedConfig, parse_with
    from rhn_cli.experiment.resume import ResumeError, plan_resume, with_run_control_updates
    from rhn_cli.experiment.schema import ConfigError

    try:
        plan = plan_resume(target, Path(runs_dir))
        overrides, named = parse_with(updates)
        if named:
            raise ResumeError(f"--resume takes no named configs ({', '.join(named)})")
        config = with_run_control_updates(plan, overrides)
    except ConfigError as error:
        _fail(str(error))
    except CheckpointError as error:
        _fail(str(error), code=1)
    return ResolvedConfig(config, updates=config), plan


def _report_stop(stop) -> None:
    """Say where training stopped and how to continue; exit 128+signal (0 for max_time)."""
    import signal

    what = "Stopped" if stop.status == "TIMEOUT" else "Interrupted"
    message = f"{what} ({stop.status})"
    if stop.where:
        message += f": {stop.where}"
    if stop.checkpoint_path:
        message += f"; checkpoint saved in {stop.checkpoint_path}"
    _stderr(message, "yellow")
    if stop.run_dir is not None and (stop.run_dir / "checkpoint.pt").exists():
        runs_dir = stop.run_dir.parent
        option = "" if runs_dir == Path("runs") else f" --runs-dir {runs_dir}"
        from rhn_cli.engine.distributed import launched

        resume = f"--resume {stop.run_dir.name}{option}"
        if launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A checkpoint resumes on any number of processes; suggest the same ones.
            local = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
            _stderr(
                f"Resume with: rhn train --nproc {local} {resume} "
                f"(or the same torchrun command with rhn_cli train {resume})"
            )
        else:
            _stderr(f"Resume with: rhn train {resume}")
    if stop.status == "TIMEOUT":
        sys.exit(0)
    sys.exit(128 + (stop.signal_number or signal.SIGINT))


@cli.command()
@click.argument("target", metavar="RUN_ID|CHECKPOINT", shell_complete=complete_run_target)
@click.option(
    "--split",
    type=click.Choice(["valid", "test", "both"]),
    default="both",
    show_default=True,
    help="Which split(s) to evaluate.",
)
@click.option(
    "--mc-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="MC-dropout samples (the reference evaluate_mc); 0 for none.",
)
@runs_dir_option
@mongo_option
def evaluate(target, split, mc_steps, runs_dir, mongo_url) -> None:
    """Evaluate a run's best model: batched and full (B = 1) perplexity, MC dropout.

    TARGET is a run id (its best_model.pt), a run directory or a checkpoint file.
    The evaluation is recorded as a run of its own, linked to the evaluated run.
    """
    from rhn_cli.engine.checkpoint import CheckpointError
    from rhn_cli.experiment.resolve import ResolvedConfig
    from rhn_cli.experiment.resume import plan_evaluation
    from rhn_cli.experiment.sacred_app import RunFailed, RunInterrupted, run_evaluation
    from rhn_cli.experiment.schema import ConfigError

    try:
        config, evaluated_run = plan_evaluation(target, Path(runs_dir), mc_steps)
    except ConfigError as error:
        _fail(str(error))
    except CheckpointError as error:
        _fail(str(error), code=1)
    corpus = _preflight(config, evaluation=True)
    splits = ("valid", "test") if split == "both" else (split,)
    try:
        outcome = run_evaluation(
            ResolvedConfig(config, updates=config),
            splits,
            evaluated_run,
            runs_dir=runs_dir,
            mongo_url=mongo_url,
            warn=_warn,
            corpus=corpus,
        )
    except RunInterrupted as stop:
        _report_stop(stop)
    except RunFailed as failure:
        _fail(f"{failure.cause}", code=1)
    click.echo(f"run {outcome.run_id} {outcome.status} in {outcome.run_dir}")


@cli.command()
@click.argument("target", metavar="RUN_ID|CHECKPOINT", shell_complete=complete_run_target)
@click.option("--prime", default="", help="Text to start from (fed to the model first).")
@click.option(
    "--length",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Tokens to generate (characters or words).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Divide the logits by this: below 1 is more conservative.",
)
@click.option("--argmax", is_flag=True, help="Always take the most likely token (no sampling).")
@click.option("--seed", type=int, default=None, help="Seed of the sampler (random if not given).")
@runs_dir_option
def sample(target, prime, length, temperature, argmax, seed, runs_dir) -> None:
    """Generate text from a trained model (its best weights).

    TARGET is a run id, a run directory or a checkpoint file. Word models read
    --prime as words and print words; character models read and print characters.
    The prime is printed first, then the generated text.

    \b
    Examples:
      rhn sample 3 --prime "the meaning of" --length 50
      rhn sample runs/7/best_model.pt --temperature 0.7 --seed 1
    """
    from rhn_cli.data.errors import DatasetError
    from rhn_cli.engine.checkpoint import CheckpointError
    from rhn_cli.experiment.sampling import sample_text
    from rhn_cli.experiment.schema import ConfigError

    try:
        result = sample_text(
            target,
            Path(runs_dir),
            prime=prime,
            length=length,
            temperature=temperature,
            argmax=argmax,
            seed=seed,
            echo=lambda message: _stderr(message),
        )
    except ConfigError as error:
        _fail(str(error))
    except (CheckpointError, DatasetError) as error:
        _fail(str(error), code=1)
    click.echo(result.text)


@cli.command("print-config", epilog=WITH_HELP)
@click.argument(
    "updates",
    nargs=-1,
    metavar="[with] [NAMED_CONFIG|FILE.yaml|KEY=VALUE]...",
    shell_complete=complete_updates,
)
def print_config(updates) -> None:
    """Show the config a run would use, marking what named configs and updates changed.

    'rhn train -p ...' prints the same, then trains."""
    _echo_config(_resolve(updates))


@cli.command()
def configs() -> None:
    """List the named configs, each with its one-line description.

    Named configs are YAML files shipped with rhn plus any found in the directories of
    RHN_CONFIG_PATH (separated by ':'), which take precedence. A file there that cannot
    be read as a named config is listed as unusable, and the exit code is 2.
    """
    from rhn_cli.experiment.resolve import CONFIG_PATH_ENV, discover

    found = discover()
    if not found:
        click.echo("No named configs found.")
        return
    width = max(len(name) for name in found)
    problems = {name: named.problem() for name, named in found.items() if not named.shipped}
    for name in sorted(found):
        named = found[name]
        origin = "" if named.shipped else f"  [{named.path.parent}]"
        text = "(unusable: the error says why)" if problems.get(name) else named.description
        click.echo(f"{name:<{width}}  {text or '(no description)'}{origin}")
    if not os.environ.get(CONFIG_PATH_ENV):
        click.echo(
            f"\nAdd your own: put NAME.yaml files in a directory listed in {CONFIG_PATH_ENV}."
        )
    unusable = [problem for problem in problems.values() if problem]
    if unusable:
        _fail(f"{CONFIG_PATH_ENV}: fix or remove each unusable file: {'; '.join(unusable)}")


@cli.group()
def data() -> None:
    """Fetch, check and remove the datasets rhn trains on.

    Datasets are downloaded, verified against their published checksums and
    tokenised once, into RHN_DATA_DIR (default ./data); 'rhn train with
    dataset=NAME' fetches a missing one itself. Offline, point --from at a copy.

    \b
    Examples:
      rhn data ls                                  # every dataset and its statistics
      rhn data fetch ptb                           # download, verify, prepare
      rhn data fetch ptb --from simple-examples.tgz
      rhn data fetch ptb_char --from /mnt/ptb/     # a directory of the raw files
      rhn data verify ptb                          # re-check checksums and statistics
    """


@contextlib.contextmanager
def _dataset_errors() -> Iterator[None]:
    """Data errors as one line on stderr: exit 2 for an unknown name, else 1."""
    from rhn_cli.data.errors import DatasetError, UnknownDatasetError

    try:
        yield
    except UnknownDatasetError as error:
        _fail(str(error), code=2)
    except DatasetError as error:
        _fail(str(error), code=1)


def _terminal_stderr():
    """stderr when it is a terminal (for progress bars), else None."""
    return sys.stderr if sys.stderr.isatty() else None


def _human_size(size: int) -> str:
    if size <= 0:
        return "-"
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


@data.command()
@click.argument("name")
@click.option(
    "--from",
    "source",
    metavar="PATH_OR_URL",
    help="Where to get it instead of the published URL: the archive (e.g. "
    "simple-examples.tgz, enwik8.zip), a directory holding the raw files or the "
    "archive, or a mirror URL (a directory URL ends in '/'). Checked all the same.",
)
@click.option("--force", is_flag=True, help="Prepare it again even if the cache is complete.")
def fetch(name, source, force) -> None:
    """Download (or copy), verify and prepare dataset NAME."""
    from rhn_cli.data.store import fetch_dataset

    with _dataset_errors():
        outcome = fetch_dataset(name, source, force, echo=click.echo, progress=_terminal_stderr())
    if not outcome.prepared:
        click.echo(
            f"{outcome.name} is already prepared in {outcome.directory} "
            "('rhn data verify' checks it, --force prepares it again)"
        )


@data.command("ls")
def list_datasets() -> None:
    """List every dataset: cached or not, size on disk, split statistics."""
    from rhn_cli.data.cache import data_dir
    from rhn_cli.data.store import dataset_rows

    rows = dataset_rows()
    header = ("DATASET", "LEVEL", "STATUS", "ON DISK", "TRAIN", "VALID", "TEST", "VOCAB")
    table = []
    for row in rows:
        numbers = [*(row.tokens or ()), row.vocab] if row.tokens else [None] * 4
        shown = ["" if n is None else (f"({n:,})" if row.published else f"{n:,}") for n in numbers]
        table.append((row.name, row.level, row.status, _human_size(row.size), *shown))
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    click.echo(f"Cache: {data_dir().absolute()} (RHN_DATA_DIR)")
    for line in [header, *table]:
        left = [cell.ljust(width) for cell, width in zip(line[:3], widths[:3], strict=True)]
        right = [cell.rjust(width) for cell, width in zip(line[3:], widths[3:], strict=True)]
        click.echo("  ".join(left + right).rstrip())
    for row in rows:
        if row.reason:
            click.echo(f"{row.name}: {row.reason}; 'rhn data fetch {row.name}' rebuilds it")
    if any(row.published for row in rows):
        click.echo("(n): the published statistics; 'rhn data fetch NAME' prepares the dataset")


@data.command()
@click.argument("name")
def verify(name) -> None:
    """Re-check dataset NAME's checksums and statistics.

    Checks the arrays and the vocabulary against the checksums recorded when they were
    written, recomputes the statistics from the arrays and compares them with
    meta.json and the published ones, and compares the source checksums recorded at
    fetch time with the published ones (the raw files are not kept).
    """
    from rhn_cli.data.store import verify_dataset

    with _dataset_errors():
        results = verify_dataset(name, echo=click.echo)
    failed = 0
    for result in results:
        click.echo(f"{result.name}: {result.directory}")
        for check in result.checks:
            mark = "ok  " if check.ok else "FAIL"
            click.secho(f"  {mark}  {check.what}", fg=None if check.ok else "red")
        failed += sum(not check.ok for check in result.checks)
    total = sum(len(result.checks) for result in results)
    if failed:
        _fail(f"{name}: {failed} of {total} checks failed", code=1)
    click.echo(f"{name}: verified ({total} checks passed)")


@data.command()
@click.argument("name")
def path(name) -> None:
    """Print the cache directory of dataset NAME."""
    from rhn_cli.data.store import dataset_path

    with _dataset_errors():
        click.echo(dataset_path(name).absolute())


@data.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(name, yes) -> None:
    """Delete the cached dataset NAME (it can be fetched again)."""
    from rhn_cli.data.store import cached_size, dataset_path, remove_dataset

    with _dataset_errors():
        directory = dataset_path(name)
        if not directory.exists():
            click.echo(f"{name} is not in the cache ({directory}); nothing to remove")
            return
        if not yes:
            click.confirm(f"Remove {directory} ({_human_size(cached_size(name))})?", abort=True)
        freed = remove_dataset(name, echo=click.echo)
    click.echo(f"removed {directory} ({_human_size(freed)})")


def _register_command_modules() -> None:
    from rhn_cli.commands.board import board
    from rhn_cli.commands.completion import completion
    from rhn_cli.commands.kernels import kernels
    from rhn_cli.commands.runs import runs
    from rhn_cli.commands.sweep import sweep
    from rhn_cli.commands.sync import sync

    runs.add_command(sync)
    cli.add_command(runs)
    cli.add_command(board)
    cli.add_command(sweep)
    cli.add_command(completion)
    cli.add_command(kernels)


_register_command_modules()


def main() -> None:
    cli(prog_name="rhn")
