"""Running one command over many inputs: options -> job, model, outputs, errors, resume, Ctrl-C.

A batch goes on past a bad input (an error record, exit code 1 at the end); every record is
written and flushed as soon as its input finishes, so an interrupted run (Ctrl-C, or SIGTERM,
taken the same way) keeps everything done so far and `--resume` picks up where it stopped.
What may be written where, and how, is outputs.py's business.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import MalmmError, UsageError
from .presets import LOCKSTEP_TASKS, SUMMARY_EVERY_SECONDS, TASK_DEFAULTS, resolve_model
from .outputs import Output
from .results import ErrorResult
from .terminal import ShownFormatter, error_line, shown

log = logging.getLogger("malmm")


@dataclass(frozen=True)
class CommonOptions:
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
    ray: str | None = None  # run on Ray: local, auto or HOST:PORT (ray_batch.py)
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    batch: int | None = None  # videos read in lockstep through one batched step (analyze.Analyzer.run_batch)


# Bounds checked before any model loads, each with the reason a user can act on.
MAX_MEMORY = 256  # slots: at InstructBLIP size each holds ~5 MB of banked keys/values; the paper uses <= 40
MAX_FPS = 1000.0  # no camera records faster; a typo (or inf) otherwise samples without end
MAX_FRAMES = 1_000_000  # each frame costs a ViT pass (~1 s on a CPU)
MAX_BEAMS = 16  # every beam holds its own LLM cache; the paper uses 5
MAX_NEW_TOKENS = 1024  # Vicuna's context is 2,048 tokens
MIN_EVERY_SECONDS = 0.5  # summary segments: shorter ones hold at most a frame or two


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, not {value}.")


def validate(opts: CommonOptions) -> None:
    for name, value in (("--fps", opts.fps), ("--start", opts.start), ("--end", opts.end)):
        _finite(name, value)
    if opts.fps is not None and opts.frames is not None:
        raise UsageError("Use either --fps or --frames, not both.")
    if opts.fps is not None and not 0 < opts.fps <= MAX_FPS:
        raise UsageError(f"--fps must be above 0 and at most {MAX_FPS:g} frames per second.")
    if opts.frames is not None and not 1 <= opts.frames <= MAX_FRAMES:
        raise UsageError(f"--frames must be from 1 to {MAX_FRAMES:,} (each frame costs a pass of the vision encoder).")
    if opts.memory is not None and not 0 <= opts.memory <= MAX_MEMORY:
        raise UsageError(f"--memory must be from 0 (no memory) to {MAX_MEMORY}: each slot holds the keys and values "
                         "of a frame, about 5 MB at InstructBLIP size (the paper uses 10 to 40).")
    if opts.beams is not None and not 1 <= opts.beams <= MAX_BEAMS:
        raise UsageError(f"--beams must be from 1 to {MAX_BEAMS} (each beam keeps its own LLM cache; the paper uses 5).")
    if opts.max_tokens is not None and not 1 <= opts.max_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-tokens must be from 1 to {MAX_NEW_TOKENS} (the LLM's context is 2,048 tokens).")
    if opts.start is not None and opts.start < 0:
        raise UsageError("--start must be 0 or more seconds.")
    if opts.end is not None and opts.end <= 0:
        raise UsageError("--end must be after 0 seconds.")
    if opts.start is not None and opts.end is not None and opts.end <= opts.start:
        raise UsageError(f"--end ({opts.end:g} s) must be after --start ({opts.start:g} s).")
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


MAX_WORKERS = 10_000  # each loads its own copy of the model
MAX_BATCH = 64  # videos in lockstep: each holds its banks (~115 MB at InstructBLIP size, M=20) and a decoder


def _validate_ray(opts: CommonOptions) -> None:
    given = [name for name, value in (("--workers", opts.workers), ("--cpus-per-worker", opts.cpus_per_worker),
                                      ("--gpus-per-worker", opts.gpus_per_worker)) if value is not None]
    if opts.ray is None:
        if given:
            raise UsageError(f"{given[0]} goes with --ray (or {_ray_env()}): without Ray there is one process.")
        return
    from .ray_exec import check_address

    check_address(opts.ray)
    if opts.workers is not None and not 1 <= opts.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be from 1 to {MAX_WORKERS:,} (each worker loads its own model).")
    for name, value, low in (("--cpus-per-worker", opts.cpus_per_worker, "above 0"),
                             ("--gpus-per-worker", opts.gpus_per_worker, "0 or more")):
        if value is not None and not (math.isfinite(value) and (value > 0 if low == "above 0" else value >= 0)):
            raise UsageError(f"{name} must be a number {low}, not {value:g}.")


def _ray_env() -> str:
    from .ray_exec import RAY_ENV

    return RAY_ENV


def build_job(task: str, opts: CommonOptions, model_label: str, **args):
    """Task defaults (presets.py) overridden by the options: the one place they are combined."""
    from .tasks import Job, custom_label_set, load_label_set, question_prompt

    defaults = TASK_DEFAULTS[task]
    if opts.fps is None and opts.frames is None:
        fps, frames = defaults.fps, defaults.frames
    else:
        fps, frames = opts.fps, opts.frames
    generation = defaults.generation
    if generation is not None:
        overrides = {"num_beams": opts.beams, "max_new_tokens": opts.max_tokens}
        generation = replace(generation, **{k: v for k, v in overrides.items() if v is not None})
    elif opts.beams is not None or opts.max_tokens is not None:
        raise UsageError(f"--beams and --max-tokens set how text is generated; {task} scores labels instead.")
    common = dict(task=task, model_label=model_label, memory=defaults.memory if opts.memory is None else opts.memory,
                  generation=generation, fps=fps, frames=frames, start=opts.start, end=opts.end)
    if task in ("caption", "summarize"):
        prompt = (args.get("prompt") or defaults.prompt).strip()
        if not prompt:
            raise UsageError("--prompt is empty.")
        extra = {}
        if task == "summarize":
            if args.get("scenes") and args.get("every") is not None:
                raise UsageError("Use either --every or --scenes, not both.")
            every = args.get("every") if args.get("every") is not None else SUMMARY_EVERY_SECONDS
            if not (math.isfinite(every) and every >= MIN_EVERY_SECONDS):
                raise UsageError(f"--every must be at least {MIN_EVERY_SECONDS:g} s: each segment gets its own "
                                 "caption from the LLM.")
            extra = dict(every=every, scenes=bool(args.get("scenes")))
        return Job(prompts=(prompt,), **common, **extra)
    if task == "ask":
        questions = tuple(q.strip() for q in args["questions"])
        return Job(prompts=tuple(question_prompt(q) for q in questions), questions=questions, **common)
    # classify
    if (args.get("label_task") is None) == (args.get("labels") is None):
        raise UsageError("Give exactly one of --task (a built-in label set) or --labels (your own).")
    if args.get("label_task") is not None:
        if args.get("prompt"):
            raise UsageError("--prompt goes with --labels; built-in label sets use the paper's prompt.")
        label_set = load_label_set(args["label_task"])
    else:
        label_set = custom_label_set(args["labels"], args.get("prompt"))
    return Job(label_set=label_set, top_k=args.get("top_k") or 5, **common)


# ---- the batch ---------------------------------------------------------------------------------


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShownFormatter("malmm: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.propagate = False
    # Third-party chatter that says nothing actionable to a user of this tool.
    for name in ("bitsandbytes", "yt_dlp", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _error(spec: str, message: str) -> None:
    # Error sentences name their input already ("clip.mp4 does not exist.").
    sys.stderr.write(error_line(message if spec in message else f"{spec}: {message}"))
    sys.stderr.flush()


def run_command(task: str, inputs: list[str], opts: CommonOptions, **args) -> int:
    """Run `task` over `inputs`; returns the exit code (0 ok, 1 some input failed, 2 usage,
    130 interrupted by Ctrl-C, 143 by SIGTERM)."""
    _setup_logging(opts.quiet)
    try:
        validate(opts)
        choice = resolve_model(opts.model)
        job = build_job(task, opts, choice.label, **args)
        if (opts.batch or 1) > 1 and task not in LOCKSTEP_TASKS:
            raise UsageError(f"--batch reads whole videos in lockstep: {', '.join(LOCKSTEP_TASKS)} only.")
        _check_environment(opts)
        from .inputs import expand_inputs

        specs = expand_inputs(inputs)
        output = Output(task, opts.output, args.get("fmt"), opts.json_, specs)
    except MalmmError as err:
        sys.stderr.write(error_line(err))
        return err.exit_code
    with _sigterm_as_interrupt() as fired:
        try:
            return _claim_and_run(choice, job, specs, output, opts)
        except MalmmError as err:
            sys.stderr.write(error_line(err))
            return err.exit_code
        except KeyboardInterrupt as stop:
            where = f" in {shown(str(output.path))}" if output.path else ""
            sys.stderr.write(f"malmm: interrupted; {output.written} result(s) kept{where}\n")
            # Ray's ray.wait turns any exception from a signal handler into a plain
            # KeyboardInterrupt: whether SIGTERM fired says which it was.
            return 143 if isinstance(stop, Terminated) or fired else 130
        finally:
            output.close()  # releases the output's lock


def _check_environment(opts: CommonOptions) -> None:
    """Bad environment values are usage errors before any model loads, not failures later."""
    from .download import download_limits
    from .inputs import cache_root
    from .threads import configured_threads

    cache_root()  # MALMM_CACHE_DIR
    download_limits()  # MALMM_DOWNLOAD_STALL_S, MALMM_DOWNLOAD_DEADLINE_S
    configured_threads()  # MALMM_THREADS
    if not opts.no_cache:
        from .features import cache_limit_from_env

        cache_limit_from_env()  # MALMM_FEATURE_CACHE_GB


def _claim_and_run(choice, job, specs: list[str], output: Output, opts: CommonOptions) -> int:
    """Check and lock the output (before the model loads: a refusal costs nothing), then run."""
    from .jobkey import job_key

    mode = "resume" if opts.resume else "overwrite" if opts.overwrite else "new"
    # Whether the checkpoint's trained frames and memory may replace the task defaults:
    # part of the job key (taken before the model loads), and applied once it has loaded.
    given = dict(frames_set=opts.fps is not None or opts.frames is not None, memory_set=opts.memory is not None)
    try:
        done = output.claim(mode, job_key(job, choice, opts.checkpoint, **given))
    except OSError as err:  # a name the system refuses (over 255 bytes), a loop of links
        from .errors import os_error_sentence

        raise UsageError(os_error_sentence(err)) from None
    todo = [s for s in specs if s not in done]
    other = output.other_work_note(todo)
    if (len(todo) < len(specs) or other) and not opts.quiet:
        sys.stderr.write(f"malmm: --resume: {len(specs) - len(todo)} input(s) already done, {len(todo)} to go"
                         + (f" ({shown(other)})" if other else "") + "\n")
    if not todo:
        return 0
    if opts.ray is not None:
        from .ray_batch import run_on_ray

        return run_on_ray(choice, job, todo, output, opts, given)
    loaded = load_analyzer(choice, job, opts, len(todo), given)
    if loaded is None:
        return 1
    analyzer, job = loaded
    return _run_batch(analyzer, job, todo, output, opts)


def load_analyzer(choice, job, opts: CommonOptions, n_inputs: int, given: dict):
    """(analyzer, job with the checkpoint's trained frames and memory where the user gave
    none), or None when the model does not load (said in one sentence on stderr)."""
    from models import ModelError

    from .tasks import label_set_name, with_trained_defaults
    from .textfiles import check_label_tokens

    try:
        analyzer = _analyzer(choice, opts, n_inputs)
    except ModelError as err:
        sys.stderr.write(error_line(err))
        return None
    if job.label_set is not None:  # the labels' length in this model's tokens, before any video
        try:
            check_label_tokens(analyzer.model.tokenizer, job.label_set.labels, label_set_name(job.label_set))
        except MalmmError:
            analyzer.events.close()
            raise
    return analyzer, with_trained_defaults(job, analyzer.model.trained_config, **given)


def input_errors() -> tuple[type[BaseException], ...]:
    """What a failing input may raise: reported as its error record, and the batch goes on."""
    from models import ModelError

    return (MalmmError, ModelError, RuntimeError, ValueError, OSError)


def _run_batch(analyzer, job, todo: list[str], output: Output, opts: CommonOptions) -> int:
    from .inputs import open_source

    failures = 0
    output.open()
    try:
        if (opts.batch or 1) > 1:
            for start in range(0, len(todo), opts.batch):
                failures += _run_lockstep(analyzer, job, todo[start : start + opts.batch], output)
        else:
            for spec in todo:
                try:
                    result = analyzer.run(open_source(spec), job)
                except input_errors() as err:
                    result = _error_result(analyzer, spec, err)
                failures += record(output, spec, result)
    except KeyboardInterrupt:
        analyzer.events.close()
        raise
    report_end(output, failures, opts)
    return 1 if failures else 0


def _error_result(analyzer, spec: str, err: BaseException) -> ErrorResult:
    _reraise_interrupt(err)
    analyzer.events.close()
    return ErrorResult(spec, _failure(err))


def _run_lockstep(analyzer, job, group: list[str], output: Output) -> int:
    """One group of --batch videos, read in lockstep; each record is written as it comes (a
    video that fails early, then the answers). Returns the number of failed inputs."""
    return sum(record(output, group[i], outcome) for i, outcome in lockstep_outcomes(analyzer, job, group))


def lockstep_outcomes(analyzer, job, specs: list[str]):
    """Open each input and read those that open in lockstep (Analyzer.run_batch; `job`: one,
    or one per input). Yields (i, Result or ErrorResult) for specs[i] as each comes, exactly
    once per input: an error of the whole batch's step fails those it left without one."""
    from .inputs import open_source

    jobs = [job] * len(specs) if not isinstance(job, (list, tuple)) else list(job)
    opened = []  # positions in specs of the inputs that open, and their sources
    for i, spec in enumerate(specs):  # downloads and missing files fail here, each on its own
        try:
            opened.append((i, open_source(spec)))
        except input_errors() as err:
            yield i, _error_result(analyzer, spec, err)
    given: set[int] = set()
    try:
        outcomes = analyzer.run_batch([source for _, source in opened], [jobs[i] for i, _ in opened], input_errors())
        for k, outcome in outcomes:
            i = opened[k][0]
            given.add(i)
            yield i, _error_result(analyzer, specs[i], outcome) if isinstance(outcome, BaseException) else outcome
    except input_errors() as err:
        for i, _ in opened:
            if i not in given:
                yield i, _error_result(analyzer, specs[i], err)


def record(output: Output, spec: str, outcome) -> bool:
    """Write one input's Result or ErrorResult (saying so on stderr); True if it failed."""
    if isinstance(outcome, ErrorResult):
        _error(spec, outcome.error)
        output.write_error(outcome)
        return True
    for warning in outcome.warnings:
        log.warning("%s: %s", spec, warning)
    output.write(outcome)
    return False


def report_end(output: Output, failures: int, opts: CommonOptions) -> None:
    if output.path is not None and not opts.quiet:
        sys.stderr.write(f"malmm: wrote {output.written} result(s) to {shown(str(output.path))}"
                         + (f"; {failures} input(s) failed" if failures else "") + "\n")


def _failure(err: Exception) -> str:
    """The sentence for a failed input."""
    from models import ModelError

    if isinstance(err, (MalmmError, ModelError)):
        return str(err)
    log.debug("%s", traceback.format_exc())  # a bug or a resource problem: reported, the batch goes on
    return f"unexpected {type(err).__name__}: {err}"


def _reraise_interrupt(err: BaseException) -> None:
    """An error raised while an interrupt was being handled (cleanup that could not finish) is
    the interrupt's doing, not the input's: the batch stops as the interrupt asked."""
    seen: set[int] = set()
    cause = err.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        seen.add(id(cause))
        cause = cause.__context__


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken down the same path as Ctrl-C: records kept, lock released, exit 143."""


@contextmanager
def _sigterm_as_interrupt():
    """While a command runs, SIGTERM raises Terminated (and is noted in the list yielded); the
    previous handler comes back after.
    A second SIGTERM during the clean-up is ignored, so it is not cut short (SIGKILL still works)."""
    fired: list[int] = []  # yielded: SIGTERM's number once it came
    if threading.current_thread() is not threading.main_thread():
        yield fired  # handlers can only be set from the main thread
        return

    def on_sigterm(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield fired
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _analyzer(choice, opts: CommonOptions, n_inputs: int):
    from .loader import load_model, model_id
    from .live import make_events
    from .analyze import Analyzer
    from .features import FeatureCache
    from .inputs import cache_root

    model = load_model(choice, opts)
    cache = None if opts.no_cache else FeatureCache(cache_root() / "features")
    events = make_events(opts.quiet, n_inputs)
    return Analyzer(model, model_id(choice, opts, model), cache=cache, events=events)
