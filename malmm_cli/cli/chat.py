"""`malmm chat VIDEO`: read a video once, then answer question after question about it.

The read (decoding and the vision encoder, or the feature cache) happens once, with the live
view; every answer replays the kept features (engine Session.read -> VideoState), so a
question costs the Q-Former and the LLM only, and after the first one at a bank length, the
instruction's part of the Q-Former only (engine/kept.py). Each answer is the record
`malmm ask` (caption, classify, summarize) writes for the same options.

On a terminal: a prompt with line editing and history (prompt_toolkit), commands (/help),
Ctrl-C during an answer cancels that answer, Ctrl-C or Ctrl-D at the prompt ends the chat
(exit 0). With stdin not a terminal it is a filter: each line is a question (or a command)
and each answer one line on stdout, so a script can drive it; Ctrl-C or SIGTERM end it (130,
143) as they end the batch commands.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .options import (BeamsOpt, CheckpointOpt, Device, DeviceOpt, EndOpt, FpsOpt, FramesOpt, HelpInWords, JsonOpt,
                      MaxTokensOpt, MemoryOpt, ModelOpt, NoCacheOpt, PrecisionOpt, Quant, QuantOpt, QuietOpt, StartOpt,
                      VerboseOpt, YesOpt, examples)

VideoArg = Annotated[str, typer.Argument(metavar="VIDEO", help="A video file or an http(s) URL.", show_default=False)]
HISTORY_FILE = "chat_history"  # in the malmm cache folder: the lines typed at the prompt


def register(app: typer.Typer) -> None:
    app.command(cls=HelpInWords, epilog=examples(
        "malmm chat talk.mp4",
        "malmm chat talk.mp4 --frames 40 --memory 20",
        "malmm chat talk.mp4 -q --json < questions.txt",
    ))(chat)


def chat(
    video: VideoArg,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, precision: PrecisionOpt = None, json_: JsonOpt = False, quiet: QuietOpt = False,
    verbose: VerboseOpt = False, yes: YesOpt = False, no_cache: NoCacheOpt = False,
    beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
):
    """Read a video once, then answer question after question about it: no decoding and no
    vision encoder again. Sampling as `malmm ask`'s. Type /help at the prompt for the
    commands (/caption, /classify, /summarize, /save). With stdin not a terminal, each line
    is a question and each answer one line on stdout."""
    from malmm_cli.runs.command import CommonOptions

    raise typer.Exit(run_chat(video, CommonOptions.from_values(locals())))


def run_chat(spec: str, opts, lines=None, interactive: bool | None = None) -> int:
    """The whole chat; returns the exit code. `opts`: runs.command.CommonOptions. For tests:
    `lines` to answer (default: a prompt on a terminal, else stdin's lines) and whether to
    behave as on a terminal (default: whether stdin is one)."""
    from malmm_cli.errors import MalmmError
    from malmm_cli.interrupts import exit_code, sigterm_as_interrupt
    from malmm_cli.messages import error, setup_logging

    setup_logging(opts.quiet, opts.verbose)
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    with sigterm_as_interrupt() as fired:
        try:
            chat_ = Chat.open(spec, opts, interactive)
            if chat_ is None:
                return 1
            with chat_.video:
                return chat_.run(lines if lines is not None else _lines(interactive))
        except MalmmError as err:
            error(str(err))
            return err.exit_code
        except KeyboardInterrupt as stop:  # during the read, or anywhere in a filter
            sys.stderr.write("malmm: interrupted\n")
            return exit_code(stop, fired)


def _lines(interactive: bool):
    if interactive:
        from .chat_prompt import prompt_lines

        return prompt_lines(_history_file())
    return (line for line in sys.stdin)


def _history_file() -> Path | None:
    from malmm_cli.sources.inputs import cache_root

    folder = cache_root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # history is a comfort: without a folder for it, the chat goes on without
    return folder / HISTORY_FILE


class Chat:
    """A video read once and the chat about it: answers, the records kept for /save."""

    def __init__(self, session, video, opts, interactive: bool):
        self.session, self.video, self.opts = session, video, opts
        self.interactive = interactive
        self.records: list = []  # Result and ErrorResult, in order: what /save writes
        self.saved: set[str] = set()  # files this chat wrote (saving again replaces them)
        self.failures = 0

    @classmethod
    def open(cls, spec: str, opts, interactive: bool) -> Chat | None:
        """Check the options, load the model and read the video (the live view on stderr).
        None when the model does not load (said in one sentence)."""
        from malmm_cli.engine.session import Session, failure, input_errors
        from malmm_cli.errors import InputError, MalmmError
        from malmm_cli.results.events import Events
        from malmm_cli.results.progress import make_events
        from malmm_cli.runs.command import check_environment, load_model, validate
        from malmm_cli.sources.inputs import open_source

        validate(opts)  # before anything loads: options out of bounds cost nothing
        check_environment(opts)
        if Path(spec).expanduser().is_dir():
            raise InputError(f"{spec} is a folder; malmm chat reads one video (malmm ask takes folders).")
        source = open_source(spec)
        session = Session(opts.session_options(), events=make_events(opts.quiet, 1))
        if not load_model(session):
            return None
        try:
            video = session.read(source, task="ask", fps=opts.fps, frames=opts.frames, start=opts.start, end=opts.end)
        except MalmmError:
            raise
        except input_errors() as err:  # a file the decoder fails on, a resource problem: one sentence
            raise MalmmError(failure(err)) from None
        finally:
            session.events.close()
        session.events = Events()  # answers show their own, lighter progress (chat_prompt.Thinking)
        chat_ = cls(session, video, opts, interactive)
        chat_.greet()
        return chat_

    def greet(self) -> None:
        """Say what was read (and, on a terminal, what to do next) on stderr."""
        import shutil

        from malmm_cli.messages import log, note
        from malmm_cli.results.progress import shorten_middle
        from malmm_cli.results.writers import short_clock

        video = self.video
        for warning in video.kept.warnings:  # as the batch commands say theirs (none with --quiet)
            log.warning("%s: %s", video.source.input, warning)
        if self.opts.quiet:
            return
        sampling = video.kept.sampling
        rest = (f": {video.frames} frames ({short_clock(sampling.start)}-{short_clock(sampling.end)}) read in "
                f"{video.timings.get('total', 0.0):.1f} s")
        width = shutil.get_terminal_size(fallback=(80, 24)).columns if self.interactive else 10_000
        note(shorten_middle(video.source.input, max(20, width - len("malmm: ") - len(rest) - 1)) + rest)
        if self.interactive:
            sys.stderr.write("Ask a question about the video; /help lists the commands, Ctrl-D leaves.\n")

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, lines) -> int:
        """Answer every line; 0 at the end (on a terminal), or 1 if some line failed (a filter)."""
        for line in lines:
            if not self.take(line):
                break
        return 1 if self.failures and not self.interactive else 0

    def take(self, line: str) -> bool:
        """Answer one line; False when it ends the chat (/quit)."""
        from malmm_cli.errors import MalmmError
        from malmm_cli.interrupts import Terminated

        from .chat_requests import HELP, parse_line

        try:
            request = parse_line(line)
        except MalmmError as err:  # a command misspelt or misused: it may have been meant as a question
            self.fail(str(err), answered=True)
            return True
        if request is None:
            return True
        if request.task == "quit":
            return False
        try:
            if request.task == "help":
                (sys.stdout if self.interactive else sys.stderr).write(HELP + "\n")
            elif request.task == "save":
                self.save(request.args["path"], request.args.get("overwrite", False))
            else:
                self.answer(request)
        except MalmmError as err:
            self.fail(str(err), answered=request.task not in ("help", "save"), recorded=True)
        except KeyboardInterrupt as stop:
            if not self.interactive or isinstance(stop, Terminated):  # SIGTERM ends the chat, as any command
                raise
            sys.stderr.write("malmm: answer cancelled\n")
        return True

    def fail(self, message: str, *, answered: bool, recorded: bool = False) -> None:
        """A line that could not be done: its sentence on stderr. A line that asked for an answer
        still gets its line in a filter (empty, or the error record with --json), so answers stay
        line for line; a question or analysis command that failed is recorded (/save)."""
        from malmm_cli.messages import error
        from malmm_cli.results.records import ErrorResult

        from .chat_requests import show_error

        self.failures += 1
        error(message)
        failed = ErrorResult(self.video.source.input, message)
        if recorded and answered:
            self.records.append(failed)
        if answered and not self.interactive:
            show_error(failed, sys.stdout, json_=self.opts.json_)

    def answer(self, request) -> None:
        """Answer a question or an analysis command, as `malmm TASK` with the chat's options would."""
        from malmm_cli.engine.jobs import build_job
        from malmm_cli.results.jobkey import job_key

        from .chat_prompt import Thinking, show_seconds
        from .chat_requests import show

        session, opts = self.session, self.opts
        generation = {} if request.task == "classify" else dict(beams=opts.beams, max_tokens=opts.max_tokens)
        # ask samples as `malmm ask` does with the chat's options; the others as the read did,
        # given explicitly (their own defaults sample otherwise).
        sampling = dict(fps=opts.fps, frames=opts.frames, start=opts.start, end=opts.end) \
            if request.task == "ask" else self.video.sampling
        job = build_job(request.task, session.label, **sampling, memory=opts.memory, **generation, **request.args)
        with Thinking(self.interactive and not opts.quiet, session):
            result = self.video.answer(session.resolve(job))
        result = replace(result, job=job_key(job, session.choice, opts.checkpoint))
        self.records.append(result)
        show(result, sys.stdout, json_=opts.json_, line=not self.interactive)
        if self.interactive and not opts.quiet:
            show_seconds(result.timings.get("total", 0.0))

    def save(self, path: str, overwrite: bool) -> None:
        """/save FILE: the chat's records so far, as JSON Lines, by -o's rules (results/outputs.py):
        never over an input or a file that is not malmm's; over results only with --overwrite,
        or where this chat saved before (it holds a part of what is saved now)."""
        from malmm_cli.errors import UsageError, os_error_sentence
        from malmm_cli.messages import note, plural
        from malmm_cli.results.outputs import Output
        from malmm_cli.results.writers import EXTENSIONS
        from malmm_cli.terminal import shown

        target = Path(path).expanduser()
        if EXTENSIONS.get(target.suffix.lower(), "json") != "json":  # chat.txt would hold JSON
            raise UsageError(f"/save writes JSON Lines; name the file {target.with_suffix('.jsonl').name}.")
        again = _real(target) in self.saved
        output = None
        try:
            output = Output("ask", target, "json", True, [self.video.source.input])
            output.claim("overwrite" if overwrite or again else "new")
            output.open()
            for record in self.records:
                output.write_record(record.to_record())
        except UsageError as err:  # -o's sentences, said of what the user typed
            raise UsageError(str(err).replace("--output ", "/save ", 1)) from None
        except OSError as err:  # a name the system refuses (over 255 bytes), a loop of links
            raise UsageError(os_error_sentence(err)) from None
        finally:
            if output is not None:
                output.close()
        self.saved.add(_real(target))
        if not self.opts.quiet:
            note(f"saved {plural(len(self.records), 'record')} to {shown(str(target))}")


def _real(path: Path) -> str:
    import os

    return os.path.realpath(path)
