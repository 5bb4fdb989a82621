"""The `malmm` command line: each command is a thin typed function over the batch runner.

Only typer and the torch-free modules are imported at the top, so `malmm --help` and
argument errors are instant; models, video decoding and torch load inside the commands.
"""

from __future__ import annotations

import errno
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand

from . import __version__
from .errors import MalmmError
from .presets import DEFAULT_MODEL, MODEL_ENV, PRESETS, SUMMARY_EVERY_SECONDS, TASK_DEFAULTS, TOP_K
from .terminal import error_line, shown
from .times import parse_time

class _HelpInWords(TyperCommand):
    """Help pages in words rather than Python types: `INPUT...` not `{inputs}...` or
    `<list[str]>`, and flags without `<bool>`. Typer shows types for arguments whatever their
    metavar, so here an argument's type column is left empty and the usage line built from
    metavars."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = _no_type  # the metavar in the name column says it
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def _no_type(ctx) -> None:
    return None


app = typer.Typer(
    name="malmm",
    help="Understand long videos with MA-LMM: caption, ask, classify and summarize files, folders and URLs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Model presets: what exists, what is downloaded, where.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def examples(*lines: str) -> str:
    """An epilog of runnable examples, one per line (a test runs each as printed)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


class Quant(str, Enum):
    auto = "auto"
    none = "none"
    bit8 = "8bit"
    bit4 = "4bit"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class SummaryFormat(str, Enum):
    txt = "txt"
    text = "text"  # the earlier name of txt (whisper calls it txt)
    md = "md"
    srt = "srt"
    vtt = "vtt"
    json = "json"


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


# ---- options shared by the analysis commands (defaults live in presets.py) -------------------
# Help texts say "\\[default: ...]": the backslash keeps Rich from taking the bracket for markup.

Inputs = Annotated[list[str], typer.Argument(
    metavar="INPUT", help="Video files, folders, globs, http(s) URLs, or @list.txt.", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="MODEL", show_default=False,
    help=f"Preset ({', '.join(PRESETS)}), local directory or hub id. \\[default: ${MODEL_ENV}, else {DEFAULT_MODEL}]")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    metavar="FILE", help="MA-LMM finetuned checkpoint (.pth) to overlay on the model.", show_default=False)]
FpsOpt = Annotated[Optional[float], typer.Option(
    metavar="FPS", help="Sample this many frames per second. \\[default: per task]", show_default=False)]
FramesOpt = Annotated[Optional[int], typer.Option(
    "--frames", metavar="N", help="Sample N frames spread evenly, as in the paper. \\[default: per task]",
    show_default=False)]
StartOpt = Annotated[Optional[float], typer.Option(
    metavar="TIME", parser=_time, help="Start at TIME: seconds, MM:SS or HH:MM:SS. \\[default: 0]", show_default=False)]
EndOpt = Annotated[Optional[float], typer.Option(
    metavar="TIME", parser=_time, help="End at TIME (past the end of a video: its end). \\[default: the end]",
    show_default=False)]
MemoryOpt = Annotated[Optional[int], typer.Option(
    "--memory", metavar="M", help="Memory bank length; 0 = no memory. \\[default: per task]", show_default=False)]
QuantOpt = Annotated[Quant, typer.Option(
    metavar="auto|none|8bit|4bit", help="LLM precision: auto picks what is fastest here and fits. \\[default: auto]",
    show_default=False)]
DeviceOpt = Annotated[Device, typer.Option(
    metavar="auto|cpu|cuda", help="Where to run the model. \\[default: auto]", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON records (one line per input).")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="PATH", help="Write results to the file PATH (format from --format/--json or the "
    "extension) or, for per-video formats with several inputs, into the directory PATH.", show_default=False)]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Skip inputs already done in the --output file by the same task and options.")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the results already in the --output file or directory (without this or "
    "--resume, existing results are never touched).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the vision feature cache.")]
BeamsOpt = Annotated[Optional[int], typer.Option(
    "--beams", metavar="N", help="Beam width for generating text. \\[default: 5, as in the paper]", show_default=False)]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", metavar="N", help="Most new tokens per generated text. \\[default: per task]", show_default=False)]
PromptOpt = Annotated[Optional[str], typer.Option(metavar="TEXT", show_default=False, help=(
    f"Instruction. \\[default: {TASK_DEFAULTS['caption'].prompt!r}]"))]

BatchOpt = Annotated[Optional[int], typer.Option(
    "--batch", metavar="N", show_default=False,
    help="Read N videos at once, in lockstep: one batched model step per frame for all of them. More videos "
    "per second, most on a GPU; each keeps its own memory (results as read alone, up to rounding). "
    "\\[default: 1]")]

# Running a batch on Ray (malmm_cli/ray_batch.py); without --ray nothing of Ray is imported.
_RAY_PANEL = "Many machines (Ray)"
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="local|auto|HOST:PORT", envvar="MALMM_RAY", show_envvar=False, show_default=False,
    rich_help_panel=_RAY_PANEL,
    help="Run the batch on Ray workers: local (a private Ray on this machine), auto (the cluster `ray start` "
    "joined here) or the head node's HOST:PORT. \\[default: $MALMM_RAY, else one process]")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", metavar="N", show_default=False, rich_help_panel=_RAY_PANEL,
    help="Ray workers, each loading the model once. \\[default: one per GPU, else one per node]")]
CpusPerWorkerOpt = Annotated[Optional[float], typer.Option(
    "--cpus-per-worker", metavar="N", show_default=False, rich_help_panel=_RAY_PANEL,
    help="CPUs each Ray worker reserves (and its threads). \\[default: a GPU's share of its node, else the node's]")]
GpusPerWorkerOpt = Annotated[Optional[float], typer.Option(
    "--gpus-per-worker", metavar="N", show_default=False, rich_help_panel=_RAY_PANEL,
    help="GPUs each Ray worker reserves (fractions share one). \\[default: 1 where the cluster has GPUs]")]


def _common(values: dict):
    """The shared options among a command's parameters (the fields of CommonOptions)."""
    from dataclasses import fields

    from .runner import CommonOptions

    return CommonOptions(**{f.name: values[f.name] for f in fields(CommonOptions) if f.name in values})


@app.command(cls=_HelpInWords, epilog=examples(
    "malmm caption movie.mp4",
    "malmm caption videos/ --json -o results.jsonl --resume",
    "malmm caption movie.mp4 --start 1:30 --end 2:00 --fps 2",
    "malmm caption videos/ --batch 8 -o captions.jsonl",
))
def caption(
    inputs: Inputs,
    prompt: PromptOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, json_: JsonOpt = False, output: OutputOpt = None, resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, no_cache: NoCacheOpt = False, beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Describe what happens in each video."""
    from .runner import run_command

    opts = _common(locals())
    raise typer.Exit(run_command("caption", inputs, opts, prompt=prompt))


@app.command(cls=_HelpInWords, epilog=examples(
    'malmm ask video.mp4 "what is the person cooking?"',
    'malmm ask video.mp4 "what is the person cooking?" -Q "where are they?"',
    'malmm ask video.mp4 "who wins?" --json',
))
def ask(
    input: Annotated[str, typer.Argument(metavar="INPUT", help="A video file, folder, glob, URL or @list.txt.",
                                         show_default=False)],
    question: Annotated[str, typer.Argument(metavar="QUESTION", help="The question.", show_default=False)],
    more: Annotated[Optional[list[str]], typer.Option(
        "--question", "-Q", metavar="QUESTION", show_default=False,
        help="Another question (repeatable); all are answered in one pass.")] = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, json_: JsonOpt = False, output: OutputOpt = None, resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, no_cache: NoCacheOpt = False, beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Answer questions about a video (several questions in one pass). With one question and
    one input, the answer alone goes to stdout."""
    from .runner import run_command

    opts = _common(locals())
    raise typer.Exit(run_command("ask", [input], opts, questions=[question, *(more or [])]))


@app.command(cls=_HelpInWords, epilog=examples(
    "malmm classify clip.mp4 --task coin --top-k 3",
    "malmm classify clip.mp4 --labels 'cat,dog,bird'",
    "malmm classify clip.mp4 --task lvu_genre --json",
))
def classify(
    inputs: Inputs,
    task: Annotated[Optional[str], typer.Option(
        metavar="NAME", show_default=False,
        help="Label set: lvu_relationship, lvu_way_speaking, lvu_scene, lvu_director, lvu_genre, lvu_writer, "
        "lvu_year, coin, breakfast.")] = None,
    labels: Annotated[Optional[str], typer.Option(
        metavar="FILE|LIST", help='Your own labels: a file (one per line, or a JSON list) or "a,b,c".',
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", metavar="K", min=1, show_default=False,
                                       help=f"How many labels to report. \\[default: {TOP_K}]")] = TOP_K,
    prompt: Annotated[Optional[str], typer.Option(
        metavar="TEXT", show_default=False,
        help=f"Instruction for --labels. \\[default: {TASK_DEFAULTS['classify'].prompt!r}]")] = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, json_: JsonOpt = False, output: OutputOpt = None, resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, no_cache: NoCacheOpt = False, batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Rank every label of a set by the model's likelihood; report the top k with probabilities."""
    from .runner import run_command

    opts = _common(locals())
    raise typer.Exit(run_command("classify", inputs, opts, label_task=task, labels=labels, top_k=top_k, prompt=prompt))


@app.command(cls=_HelpInWords, epilog=examples(
    "malmm summarize lecture.mp4 --every 60 --format srt -o lecture.srt",
    "malmm summarize lecture.mp4 --every 2:00",
    "malmm summarize lecture.mp4 --scenes --format md",
))
def summarize(
    inputs: Inputs,
    every: Annotated[Optional[float], typer.Option(
        metavar="TIME", parser=_time, show_default=False,
        help=f"Segment length: seconds, MM:SS or HH:MM:SS. \\[default: {SUMMARY_EVERY_SECONDS:g}]")] = None,
    scenes: Annotated[bool, typer.Option("--scenes", help="Cut where the picture changes most instead of every N s.")]
    = False,
    format: Annotated[Optional[SummaryFormat], typer.Option(
        "--format", "-f", metavar="txt|md|srt|vtt|json", show_default=False,
        help="Output format. \\[default: txt, or from the -o extension]")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        metavar="TEXT", show_default=False,
        help=f"Instruction. \\[default: {TASK_DEFAULTS['summarize'].prompt!r}]")] = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, json_: JsonOpt = False, output: OutputOpt = None, resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, no_cache: NoCacheOpt = False, beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Timestamped segments with one caption each, plus a summary of the whole video."""
    from .runner import run_command

    opts = _common(locals())
    fmt = None if format is None else "text" if format in (SummaryFormat.txt, SummaryFormat.text) else format.value
    raise typer.Exit(run_command("summarize", inputs, opts, every=every, scenes=scenes, fmt=fmt, prompt=prompt))


# ---- models and doctor -------------------------------------------------------------------


@models_app.command("list", cls=_HelpInWords, epilog=examples("malmm models list", "malmm models list --json"))
def models_list(json_: Annotated[bool, typer.Option("--json", help="Print one JSON object per model (one per line).")]
                = False):
    """The model presets, and whether each is downloaded."""
    from .modelcmds import list_models

    raise typer.Exit(list_models(json_))


@models_app.command("download", cls=_HelpInWords, epilog=examples(
    "malmm models download instructblip-vicuna-7b", "malmm models download tiny-random"))
def models_download(name: Annotated[str, typer.Argument(metavar="MODEL", help="Preset name or hub id.",
                                                        show_default=False)]):
    """Download a model into the Hugging Face cache (resumable)."""
    from .modelcmds import download_model

    raise typer.Exit(download_model(name))


@models_app.command("path", cls=_HelpInWords, epilog=examples("malmm models path", "malmm models path tiny-random"))
def models_path(name: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="Preset name or hub id; without it, where malmm and Hugging Face keep things.",
        show_default=False)] = None):
    """Print where a downloaded model lives, or where everything is cached."""
    from .modelcmds import model_path

    raise typer.Exit(model_path(name))


@app.command(cls=_HelpInWords, epilog=examples("malmm doctor"))
def doctor():
    """Check the installation and run tiny-random end to end on a generated video."""
    from .modelcmds import run_doctor

    raise typer.Exit(run_doctor())


# ---- train and eval (their commands live in their own modules) -----------------------------

from .eval_cli import register as _register_eval  # noqa: E402
from .train_cli import register as _register_train  # noqa: E402

_register_train(app, examples=examples, command_class=_HelpInWords)
_register_eval(app, examples=examples, command_class=_HelpInWords)


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
    if "UsageError" in names and ctx is not None:
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
    from .results_file import silence_stdout

    silence_stdout()  # what is still buffered goes nowhere, and the flush at exit raises nothing
    return 1


def _stdout_failed(err: OSError) -> int | None:
    """A write that failed for want of room, or on a device that refuses it (`> /dev/full`): one
    sentence, exit 1. The commands catch what their own files raise (each names its file): an
    error of this kind without a file name that reaches here is a print to stdout. None for
    any other OSError (a bug: its traceback is wanted)."""
    from .results_file import silence_stdout

    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) or err.filename is not None:
        return None
    silence_stdout()  # what is still buffered goes nowhere, and the flush at exit raises nothing
    reason = (err.strerror or type(err).__name__).lower()
    typer.echo(f"malmm: error: Cannot write to standard output ({reason}).", err=True)
    return 1
