"""The root of the `malmm` command line: the Typer app, its commands gathered from the command
modules, `--version`, and main(), the console entry point.

Only typer and torch-free modules are imported at the top, so `malmm --help` and argument
errors are instant; models, video decoding and torch load inside the commands.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import typer

from malmm_cli import __version__
from malmm_cli.errors import MalmmError
from malmm_cli.terminal import error_line, shown

from .analysis import GLOB_HINT
from .analysis import register as register_analysis
from .cache import register as register_cache
from .chat import register as register_chat
from .eval import register as register_eval
from .models import register as register_models
from .options import GroupInWords
from .serve import register as register_serve
from .train import register as register_train
from .watch import register as register_watch

app = typer.Typer(
    name="malmm",
    cls=GroupInWords,
    help="Understand long videos with MA-LMM: caption, ask, classify and summarize files, folders and URLs; "
    "chat about a video read once, serve the model over HTTP, or watch a live stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(cls=GroupInWords, help="Model presets: what exists, what is downloaded, where.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

register_analysis(app)  # caption, ask, classify, summarize: in this order in `malmm --help`
register_models(app, models_app)  # models list|download|path, doctor
register_train(app)
register_eval(app)
register_chat(app)  # after the batch commands in `malmm --help`
register_serve(app)  # the model behind an OpenAI-compatible HTTP API
register_watch(app)  # a live stream
register_cache(app)  # malmm cache [clear|prune]


def _version(value: bool):
    if value:
        typer.echo(f"malmm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False):
    """Understand long videos with MA-LMM."""


def _click_error(err: Exception) -> int | None:
    """Report what Click stopped on and return the exit code, or None if it is not Click's.

    Typer bundles its own Click, whose exception classes are private, so they are recognised
    by their Click class names: a command-line mistake (an unknown option, a value that is not
    a number) is one sentence, exit 2; `malmm` alone shows the help; Abort is Click's form of
    a Ctrl-C outside a batch."""
    names = {c.__name__ for c in type(err).__mro__}
    if "Abort" in names:
        typer.echo("malmm: interrupted", err=True)
        return 130
    if "NoArgsIsHelpError" in names:
        typer.echo(err.ctx.get_help(), err=True)
        return 2
    if "ClickException" not in names:
        return None
    message = shown(" ".join(err.format_message().split()))
    ctx = getattr(err, "ctx", None)
    if "UsageError" in names and ctx is not None and ctx.command.name == "ask" and "extra argument" in message:
        extra = message[message.rfind(" (") + 2 : message.rfind(")")]  # Click's "... argument(s) (b.mp4 why?)"
        message = f"More arguments than ask takes ({extra}). {GLOB_HINT}"
    elif "UsageError" in names and ctx is not None:
        message += f" (see: {ctx.command_path} --help)"
    typer.echo(f"malmm: error: {message}", err=True)
    return getattr(err, "exit_code", 2)


def main() -> None:
    """Console entry point: user errors become one sentence on stderr and a non-zero exit."""
    _occupy_closed_std_fds()
    try:
        code = app(standalone_mode=False)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a failure is one sentence, not at exit
    except MalmmError as err:
        typer.echo(error_line(err), err=True, nl=False)
        code = err.exit_code
    except KeyboardInterrupt:
        typer.echo("malmm: interrupted", err=True)
        code = 130
    except BrokenPipeError:
        code = _reader_gone()
    except OSError as err:
        code = _stdout_failed(err)
        if code is None:
            raise
    except Exception as err:
        code = _click_error(err)
        if code is None:
            raise
    sys.exit(code or 0)


def _occupy_closed_std_fds() -> None:
    """Started with stdin, stdout or stderr closed (`>&-`), the next file opened would take its
    number, and whatever is written to "stdout" would land in it (a results file, a
    checkpoint). /dev/null takes the number instead; sys.stdout stays None, so the commands
    that print results say that stdout is closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)


def _reader_gone() -> int:
    """The reader of stdout left (`malmm ... | head -1`): stop quietly, as Unix tools do, exit 1
    (as Typer does when that happens inside a command)."""
    from malmm_cli.results.results_file import silence_stdout

    silence_stdout()  # what is still buffered goes nowhere, and the flush at exit raises nothing
    return 1


def _stdout_failed(err: OSError) -> int | None:
    """A write that failed for want of room, or on a device that refuses it (`> /dev/full`): one
    sentence, exit 1. The commands catch what their own files raise (each names its file): an
    error of this kind without a file name that reaches here is a print to stdout. None for
    any other OSError (a bug: its traceback is wanted)."""
    from malmm_cli.results.results_file import silence_stdout

    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) or err.filename is not None:
        return None
    silence_stdout()  # what is still buffered goes nowhere, and the flush at exit raises nothing
    reason = (err.strerror or type(err).__name__).lower()
    typer.echo(f"malmm: error: Cannot write to standard output ({reason}).", err=True)
    return 1
