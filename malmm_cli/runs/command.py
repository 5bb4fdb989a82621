"""One batch command (caption, ask, classify, summarize), from options to exit code: check the
options, build the job, claim the output, run the inputs with a runner, write the records.

A batch goes on past a bad input (an error record, exit code 1 at the end); every record is
written and flushed as soon as its input finishes, so an interrupted run (Ctrl-C, or SIGTERM,
taken the same way) keeps everything done so far and `--resume` picks up where it stopped.
What may be written where, and how, is results/outputs.py's business; how the inputs are run
(one by one, --batch, --ray) is the runner's (runners.py).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from malmm_cli.engine.jobs import build_job, check_options
from malmm_cli.engine.presets import LOCKSTEP_TASKS, resolve_model
from malmm_cli.engine.session import Session, SessionOptions, Unit
from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.interrupts import exit_code, sigterm_as_interrupt
from malmm_cli.messages import error, log, note, plural, setup_logging
from malmm_cli.results.outputs import Output
from malmm_cli.results.records import ErrorResult
from malmm_cli.terminal import shown

from .runners import Lockstep, OneByOne, OnRay, Runner

MAX_WORKERS = 10_000  # each loads its own copy of the model
MAX_BATCH = 64  # videos in lockstep: each holds its banks (~115 MB at InstructBLIP size, M=20) and a decoder


@dataclass(frozen=True)
class CommonOptions:
    """The options the analysis commands (and eval) share, as the command line gave them."""

    model: str | None = None
    checkpoint: Path | None = None
    fps: float | None = None
    frames: int | None = None
    start: float | None = None
    end: float | None = None
    memory: int | None = None
    quant: object = "auto"
    device: object = "auto"
    json_: bool = False
    output: Path | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    no_cache: bool = False
    beams: int | None = None  # generation overrides (caption, ask, summarize)
    max_tokens: int | None = None
    ray: str | None = None  # run on Ray: local, auto or HOST:PORT (runners.OnRay)
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    batch: int | None = None  # videos read in lockstep through one batched step (runners.Lockstep)
    min_tokens: int | None = None  # generation override: fewest new tokens
    concat: bool = False  # the paper's no-memory baseline (every frame's query tokens to the LLM)
    precision: object = None  # auto | fp32 | bf16; None: $MALMM_PRECISION, else auto
    yes: bool = False  # fetch a model that is not downloaded yet without asking
    verbose: bool = False  # say on stderr what malmm does and why (the malmm logger at DEBUG)

    @classmethod
    def from_values(cls, values: dict) -> CommonOptions:
        """The shared options among a command's parameters (its locals())."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def job_options(self) -> dict:
        """What engine.jobs.build_job takes of them."""
        return dict(fps=self.fps, frames=self.frames, start=self.start, end=self.end, memory=self.memory,
                    beams=self.beams, max_tokens=self.max_tokens, min_tokens=self.min_tokens, concat=self.concat,
                    checkpoint=self.checkpoint is not None)

    def session_options(self) -> SessionOptions:
        precision = None if self.precision is None else str(getattr(self.precision, "value", self.precision))
        return SessionOptions(self.model, self.checkpoint, str(getattr(self.device, "value", self.device)),
                              str(getattr(self.quant, "value", self.quant)), not self.no_cache, self.quiet, precision,
                              confirm_download=not self.yes)

    def runner(self) -> Runner:
        if self.ray is not None:
            return OnRay(self.ray, self.workers, self.cpus_per_worker, self.gpus_per_worker, quiet=self.quiet)
        if (self.batch or 1) > 1:
            return Lockstep(self.batch)
        return OneByOne()


def validate(opts: CommonOptions) -> None:
    """Every option within its bounds and consistent with the others, before anything loads."""
    check_options(**opts.job_options())
    if opts.quiet and opts.verbose:
        raise UsageError("Use either --quiet or --verbose, not both.")
    if opts.resume and opts.output is None:
        raise UsageError("--resume needs --output (the file whose recorded inputs to skip).")
    if opts.overwrite and opts.output is None:
        raise UsageError("--overwrite needs --output (the file or directory whose results to replace).")
    if opts.resume and opts.overwrite:
        raise UsageError("Use either --resume (add to the output) or --overwrite (replace it), not both.")
    if opts.batch is not None:
        if not 1 <= opts.batch <= MAX_BATCH:
            raise UsageError(f"--batch must be from 1 to {MAX_BATCH} videos (each keeps its own memory bank "
                             "and decoder while the batch runs).")
        if opts.ray is not None and opts.batch > 1:
            raise UsageError("--batch goes without --ray: each Ray worker reads one video at a time.")
    _validate_ray(opts)


def _validate_ray(opts: CommonOptions) -> None:
    from .ray_exec import RAY_ENV, check_address

    given = [name for name, value in (("--workers", opts.workers), ("--cpus-per-worker", opts.cpus_per_worker),
                                      ("--gpus-per-worker", opts.gpus_per_worker)) if value is not None]
    if opts.ray is None:
        if given:
            raise UsageError(f"{given[0]} goes with --ray (or {RAY_ENV}): without Ray there is one process.")
        return
    check_address(opts.ray)
    if opts.workers is not None and not 1 <= opts.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be from 1 to {MAX_WORKERS:,} (each worker loads its own model).")
    for name, value, low in (("--cpus-per-worker", opts.cpus_per_worker, "above 0"),
                             ("--gpus-per-worker", opts.gpus_per_worker, "0 or more")):
        if value is not None and not (math.isfinite(value) and (value > 0 if low == "above 0" else value >= 0)):
            raise UsageError(f"{name} must be a number {low}, not {value:g}.")


def check_environment(opts: CommonOptions) -> None:
    """Bad environment values are usage errors before any model loads, not failures later."""
    from malmm_cli.engine.presets import resolve_precision
    from malmm_cli.engine.threads import configured_threads
    from malmm_cli.sources.download import download_limits
    from malmm_cli.sources.inputs import cache_root

    resolve_precision(opts.precision)  # --precision, MALMM_PRECISION
    cache_root()  # MALMM_CACHE_DIR
    download_limits()  # MALMM_DOWNLOAD_STALL_S, MALMM_DOWNLOAD_DEADLINE_S
    configured_threads()  # MALMM_THREADS
    if not opts.no_cache:
        from malmm_cli.engine.features import cache_limit_from_env

        cache_limit_from_env()  # MALMM_FEATURE_CACHE_GB


def run_command(task: str, inputs: list[str], opts: CommonOptions, *, fmt: str | None = None, **args) -> int:
    """Run `task` over `inputs`; returns the exit code (0 ok, 1 some input failed, 2 usage,
    130 interrupted by Ctrl-C, 143 by SIGTERM). `args`: the task's own options (build_job's);
    `fmt`: the output format (summarize --format)."""
    setup_logging(opts.quiet, opts.verbose)
    try:
        validate(opts)
        choice = resolve_model(opts.model)
        job = build_job(task, choice.label, **opts.job_options(), **args)
        if "labels" in job.trained_defaults:  # the checkpoint's label set: read (or refused) before any load
            _checkpoint_labels(job, opts, choice)
        if (opts.batch or 1) > 1 and task not in LOCKSTEP_TASKS:
            raise UsageError(f"--batch reads whole videos in lockstep: {', '.join(LOCKSTEP_TASKS)} only.")
        check_environment(opts)
        from malmm_cli.sources.inputs import expand_inputs

        specs = expand_inputs(inputs)
        output = Output(task, opts.output, fmt, opts.json_, specs)
    except MalmmError as err:
        error(str(err))
        return err.exit_code
    with sigterm_as_interrupt() as fired:
        try:
            return _claim_and_run(choice, job, specs, output, opts)
        except MalmmError as err:
            error(str(err))
            return err.exit_code
        except KeyboardInterrupt as stop:
            where = f" in {shown(str(output.path))}" if output.path else ""
            sys.stderr.write(f"malmm: interrupted; {plural(output.written, 'result')} kept{where}\n")
            return exit_code(stop, fired)
        finally:
            output.close()  # releases the output's lock


def _checkpoint_labels(job, opts: CommonOptions, choice) -> None:
    """A classify job that takes its labels from --checkpoint: the checkpoint's config is read
    (its weights are not) and names a label set, or this is a usage error before any load."""
    from models import ModelError

    try:
        Session(opts.session_options(), choice=choice).resolve(job)
    except ModelError as err:  # not a readable checkpoint: the same sentence loading would give
        raise UsageError(str(err)) from None


def _claim_and_run(choice, job, specs: list[str], output: Output, opts: CommonOptions) -> int:
    """Check and lock the output (before the model loads: a refusal costs nothing), then run."""
    from malmm_cli.results.jobkey import job_key

    mode = "resume" if opts.resume else "overwrite" if opts.overwrite else "new"
    key = job_key(job, choice, opts.checkpoint)
    log.debug("job %s: %s of %s with %s", key, job.task, "one input" if len(specs) == 1 else f"{len(specs)} inputs",
              choice.label)
    try:
        done = output.claim(mode, key)
    except OSError as err:  # a name the system refuses (over 255 bytes), a loop of links
        from malmm_cli.errors import os_error_sentence

        raise UsageError(os_error_sentence(err)) from None
    todo = [s for s in specs if s not in done]
    other = output.other_work_note(todo)
    if (len(todo) < len(specs) or other) and not opts.quiet:
        sys.stderr.write(f"malmm: --resume: {plural(len(specs) - len(todo), 'input')} already done, {len(todo)} to go"
                         + (f" ({shown(other)})" if other else "") + "\n")
    if not todo:
        return 0
    session = open_session(opts, len(todo), job, output)
    if session is None:
        return 1
    return write_outcomes(session, [Unit(spec, job) for spec in todo], opts.runner(), output, opts.quiet)


def open_session(opts: CommonOptions, n_inputs: int, job, output: Output | None = None) -> Session | None:
    """The session the command runs in: its model loaded here, unless Ray workers load theirs
    (then this process never loads one). None when the model does not load (said in one
    sentence on stderr). `job` is checked against the loaded model (Session.resolve: a label
    too long in its tokens) before any video: a UsageError. With an `output` that takes a
    summary's segments as they come (Output.streams), they go to it as they come."""
    if not opts.quiet:  # what follows imports torch and transformers: seconds before the next line
        note("starting ...")
    if opts.ray is not None:
        return Session(opts.session_options())
    from malmm_cli.results.events import Fanout
    from malmm_cli.results.outputs import SegmentEcho
    from malmm_cli.results.progress import make_events

    streams = output is not None and output.streams
    # Segments that reach this terminal on stdout are not shown a second time by the progress.
    on_screen = streams and sys.stdout is not None and sys.stdout.isatty()
    view = make_events(opts.quiet, n_inputs, show_segments=not on_screen)
    session = Session(opts.session_options(), events=Fanout(view, SegmentEcho(output, view)) if streams else view)
    if not load_model(session):
        return None
    try:
        session.resolve(job)
    except MalmmError:
        session.events.close()  # the progress view gives the terminal back before the sentence
        raise
    return session


def load_model(session: Session) -> bool:
    """Load the session's model now (every front end does, before its first input); False
    when it does not load, said in one sentence on stderr."""
    from models import ModelError

    try:
        session.model  # noqa: B018 - loads it
    except ModelError as err:
        error(str(err))
        return False
    return True


def write_outcomes(session: Session, units: list[Unit], runner: Runner, output: Output, quiet: bool) -> int:
    """Run the units and write each record as it comes; 1 if some input failed, else 0."""
    failures = 0
    output.open()
    try:
        with contextlib.closing(runner.run(session, units)) as outcomes:
            for i, outcome in outcomes:
                failures += record(output, units[i].input, outcome)
    except KeyboardInterrupt:
        session.events.close()
        raise
    report_end(output, failures, quiet)
    return 1 if failures else 0


def record(output: Output, spec: str, outcome) -> bool:
    """Write one input's Result or ErrorResult (saying so on stderr); True if it failed."""
    if isinstance(outcome, ErrorResult):
        error(outcome.error, about=spec)
        output.write_error(outcome)
        return True
    for warning in outcome.warnings:
        log.warning("%s: %s", spec, warning)
    output.write(outcome)
    return False


def report_end(output: Output, failures: int, quiet: bool) -> None:
    if output.path is None or quiet:
        return
    failed = f"; {plural(failures, 'input')} failed" if failures else ""
    if output.written == 0:  # a file this run created is not left behind empty (Output.close)
        sys.stderr.write(f"malmm: no results, so nothing was written to {shown(str(output.path))}{failed}\n")
        return
    sys.stderr.write(f"malmm: wrote {plural(output.written, 'result')} to {shown(str(output.path))}{failed}\n")
