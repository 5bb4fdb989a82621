"""`malmm watch`, from options to exit code: check the options, claim the output, load the
model, follow the stream (engine/live.py) and write each window's record as it closes.

How it ends, and its exit code:
- the stream ends (EOF, an HLS playlist's ENDLIST, --duration reached): the last, partial
  window is written; 0;
- the stream is cut and cannot be reopened within --retries seconds: one sentence; 1 (every
  record written so far stays);
- Ctrl-C or SIGTERM: the frames already queued are fed, the current window is answered and
  written; 130 or 143. A second one stops at once (the window is then not written).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from malmm_cli.engine.jobs import MIN_EVERY_SECONDS, build_job, check_options
from malmm_cli.engine.presets import WATCH_EVERY_SECONDS, WATCH_FPS, WATCH_RETRY_SECONDS, WATCH_TASKS, resolve_model
from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.interrupts import Terminated, exit_code, sigterm_as_interrupt
from malmm_cli.messages import error, plural, setup_logging
from malmm_cli.terminal import shown

from .command import CommonOptions, check_environment, load_model


@dataclass(frozen=True)
class WatchOptions:
    """The options of `malmm watch`, as the command line gave them (None: the default)."""

    task: str = "caption"
    questions: tuple[str, ...] = ()
    labels: str | None = None
    label_set: str | None = None
    prompt: str | None = None
    top_k: int | None = None
    every: float | None = None
    cumulative: bool = False
    duration: float | None = None
    retries: float | None = None
    fmt: str | None = None
    common: CommonOptions = field(default_factory=CommonOptions)

    @property
    def fps(self) -> float:
        return self.common.fps if self.common.fps is not None else WATCH_FPS

    @property
    def window(self) -> float:
        return self.every if self.every is not None else WATCH_EVERY_SECONDS

    @property
    def retry_seconds(self) -> float:
        return self.retries if self.retries is not None else WATCH_RETRY_SECONDS


def validate(opts: WatchOptions) -> None:
    """The options within bounds and consistent, before anything loads (a UsageError)."""
    c = opts.common
    check_options(fps=c.fps, memory=c.memory, beams=c.beams, max_tokens=c.max_tokens)
    if opts.task not in WATCH_TASKS:
        raise UsageError(f"--task must be one of {', '.join(WATCH_TASKS)}.")
    if opts.task == "ask" and not opts.questions:
        raise UsageError("--task ask needs a question: -Q \"what is happening?\" (repeatable).")
    if opts.task != "ask" and opts.questions:
        raise UsageError("-Q goes with --task ask.")
    if opts.task != "classify" and (opts.labels or opts.label_set or opts.top_k is not None):
        raise UsageError("--labels, --label-set and --top-k go with --task classify.")
    every = opts.window
    if not (math.isfinite(every) and every >= MIN_EVERY_SECONDS):
        raise UsageError(f"--every must be at least {MIN_EVERY_SECONDS:g} s: each window is answered by the LLM.")
    if every * opts.fps < 1 - 1e-9:
        raise UsageError(f"--every {every:g} s holds no sampled frame at --fps {opts.fps:g}; give a window of at "
                         f"least {1 / opts.fps:g} s or a higher --fps.")
    if opts.duration is not None and not (math.isfinite(opts.duration) and opts.duration > 0):
        raise UsageError("--duration must be a positive time.")
    if not (math.isfinite(opts.retry_seconds) and opts.retry_seconds >= 0):
        raise UsageError("--retries must be 0 or more seconds.")
    if c.overwrite and c.output is None:
        raise UsageError("--overwrite needs --output (the file whose records to replace).")
    if c.resume:
        raise UsageError("--resume does not apply to a live stream; use --overwrite, or another -o file.")
    if c.json_ and opts.fmt not in (None, "jsonl"):
        raise UsageError(f"--json and --format {opts.fmt} disagree; use one.")


def _job(opts: WatchOptions, label: str):
    c = opts.common
    args = dict(fps=opts.fps, memory=c.memory, beams=c.beams, max_tokens=c.max_tokens, prompt=opts.prompt)
    if opts.task == "ask":
        args["questions"] = list(opts.questions)
    if opts.task == "classify":
        args.update(label_task=opts.label_set, labels=opts.labels, top_k=opts.top_k)
        if opts.label_set is None and opts.labels is None:
            raise UsageError("--task classify needs --label-set NAME (a built-in set) or --labels FILE|LIST.")
    return build_job(opts.task, label, **args)


def run_watch(source: str, opts: WatchOptions) -> int:
    """Follow `source`; returns the exit code (0 ended, 1 cut or unreadable, 2 usage, 130, 143)."""
    from malmm_cli.results.watch import WatchOutput, choose_format
    from malmm_cli.sources.live import live_spec

    c = opts.common
    setup_logging(c.quiet)
    try:
        validate(opts)
        choice = resolve_model(c.model)
        job = _job(opts, choice.label)
        check_environment(c)
        spec = live_spec(source)
        fmt = choose_format("jsonl" if c.json_ else opts.fmt, c.output)
        output = WatchOutput(c.output, fmt, source, c.overwrite)
    except MalmmError as err:
        error(str(err))
        return err.exit_code
    try:
        output.claim()  # before the model loads: a refusal costs nothing
    except MalmmError as err:
        output.close()  # the lock taken while checking
        error(str(err))
        return err.exit_code
    with sigterm_as_interrupt() as fired:
        events = None
        try:
            session, events = _session(opts)
            if session is None:
                return 1
            output.open()
            watch = session.watch(spec, session.resolve(job), every=opts.window, cumulative=opts.cumulative,
                                  duration=opts.duration, retries=opts.retry_seconds, events=events)
            with _stop_gently(watch) as stopped:
                for record in watch:
                    output.write(record)
            events.close()
            return _ending(watch, output, stopped, c.quiet)
        except MalmmError as err:
            if events is not None:
                events.close()
            error(str(err))
            return err.exit_code
        except KeyboardInterrupt as stop:
            if events is not None:
                events.close()
            where = f" in {shown(str(output.path))}" if output.path else ""
            sys.stderr.write(f"malmm: interrupted; {plural(output.written, 'record')} kept{where}\n")
            return exit_code(stop, fired)
        finally:
            output.close()


def _session(opts: WatchOptions):
    """The session (its model loaded here) and the terminal view; (None, None) when the model
    does not load (said in one sentence)."""
    from malmm_cli.engine.session import Session
    from malmm_cli.results.watch_view import make_watch_events

    c = opts.common
    session = Session(replace(c.session_options(), cache=False))  # no feature cache: live frames are not kept
    if not load_model(session):
        return None, None
    return session, make_watch_events(c.quiet)


@contextlib.contextmanager
def _stop_gently(watch) -> Iterator[list[int]]:
    """While the watch runs, the first Ctrl-C or SIGTERM asks it to stop after writing the
    current window (noted in the list yielded); a second one interrupts at once."""
    stopped: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def on_signal(signum, frame):
        if stopped:
            raise Terminated if stopped[0] == signal.SIGTERM else KeyboardInterrupt
        stopped.append(signum)
        watch.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _ending(watch, output, stopped: list[int], quiet: bool) -> int:
    where = f" to {shown(str(output.path))}" if output.path else ""
    if stopped:
        sys.stderr.write(f"malmm: interrupted; the current window was written, {plural(output.written, 'record')}{where}\n")
        return 143 if stopped[0] == signal.SIGTERM else 130
    if watch.error:
        kept = f"; {plural(output.written, 'record')} written{where}" if output.written else ""
        error(watch.error.rstrip(".") + kept + ".")
        return 1
    if not quiet:
        sys.stderr.write(f"malmm: the stream ended after {watch.end:.1f} s; {plural(output.written, 'record')} written{where}\n")
    return 0
