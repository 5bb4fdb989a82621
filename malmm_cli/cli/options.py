"""Every option of the command line, declared once: each command module imports its options
from here, so a flag means the same thing, with the same help, wherever it appears.

Defaults live in engine/presets.py (one source of truth); help texts say "\\[default: ...]"
(the backslash keeps Rich from taking the bracket for markup). Torch-free: `malmm --help`
imports this module.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from malmm_cli.engine.presets import DEFAULT_MODEL, MODEL_ENV, PRESETS, SUMMARY_EVERY_SECONDS, TASK_DEFAULTS, TOP_K
from malmm_cli.engine.presets import WATCH_EVERY_SECONDS, WATCH_FPS, WATCH_RETRY_SECONDS
from malmm_cli.learn.eval_command import SUMMARY_SUFFIX
from malmm_cli.times import parse_time


class HelpInWords(TyperCommand):
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


class GroupInWords(TyperGroup):
    """The root command and `malmm models`: flags without `<bool>`, and each command's line in
    the list its first paragraph as one sentence, which Rich then wraps to the terminal (a
    docstring's own line breaks would cut it mid-sentence)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None and command.short_help is None and command.help:
            command.short_help = " ".join(command.help.split("\n\n")[0].split())
        return command


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


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class SummaryFormat(str, Enum):
    txt = "txt"
    text = "text"  # the earlier name of txt (whisper calls it txt)
    md = "md"
    srt = "srt"
    vtt = "vtt"
    json = "json"
    html = "html"  # a page to look at: player, chapters, the memory drawn (results/html.py)
    all = "all"  # every format of results/writers.py's registry, one file each, into -o DIRECTORY


class LearnTask(str, Enum):
    """What a labelled data file holds (train, eval)."""

    classify = "classify"
    ask = "ask"
    caption = "caption"


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


# ---- the analysis commands (caption, ask, classify, summarize; eval shares most) -----------------

Inputs = Annotated[list[str], typer.Argument(
    metavar="INPUT", help="Video files, folders, globs, http(s) URLs, or @list.txt.", show_default=False)]
InputArg = Annotated[str, typer.Argument(metavar="INPUT", help="A video file, folder, glob, URL or @list.txt.",
                                         show_default=False)]
QuestionArg = Annotated[str, typer.Argument(metavar="QUESTION", help="The question.", show_default=False)]
MoreQuestionsOpt = Annotated[Optional[list[str]], typer.Option(
    "--question", "-Q", metavar="QUESTION", show_default=False,
    help="Another question (repeatable); all are answered in one pass.")]
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
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    metavar="auto|fp32|bf16", show_default=False,
    help="The model's precision: fp32 or bf16 pin it (the same numbers on every machine); auto takes bf16 where "
    "the hardware runs it fast, else fp32. \\[default: $MALMM_PRECISION, else auto]")]
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
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also say what malmm does and why on stderr: cache hits, threads, decoder retries, a "
    "failed input's traceback.")]
YesOpt = Annotated[bool, typer.Option(
    "--yes", "-y", help="Download the model if it is not here yet, without asking (without this, malmm asks on "
    "a terminal and stops elsewhere).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the vision feature cache.")]
BeamsOpt = Annotated[Optional[int], typer.Option(
    "--beams", metavar="N", help="Beam width for generating text. \\[default: 5, as in the paper]", show_default=False)]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", metavar="N", help="Most new tokens per generated text. \\[default: per task]", show_default=False)]
CaptionPromptOpt = Annotated[Optional[str], typer.Option(metavar="TEXT", show_default=False, help=(
    f"Instruction. \\[default: {TASK_DEFAULTS['caption'].prompt!r}]"))]
SummaryPromptOpt = Annotated[Optional[str], typer.Option(
    metavar="TEXT", show_default=False, help=f"Instruction. \\[default: {TASK_DEFAULTS['summarize'].prompt!r}]")]
MinTokensOpt = Annotated[Optional[int], typer.Option(
    "--min-tokens", metavar="N", show_default=False,
    help="Fewest new tokens per generated text. \\[default: per task: 1; YouCook2 captions 2]")]
ConcatOpt = Annotated[bool, typer.Option(
    "--concat", help="No memory bank: the paper's baseline. Every frame goes through the Q-Former on its own and "
    "all frames' 32 tokens go to the LLM (frames x 32 tokens: at most about 60 frames for Vicuna).")]
BatchOpt = Annotated[Optional[int], typer.Option(
    "--batch", metavar="N", show_default=False,
    help="Read N videos at once, in lockstep: one batched model step per frame for all of them. More videos "
    "per second, most on a GPU; each keeps its own memory (results as read alone, up to rounding). "
    "\\[default: 1]")]

# classify
LabelTaskOpt = Annotated[Optional[str], typer.Option(
    "--task", metavar="NAME", show_default=False,
    help="Label set: lvu_relationship, lvu_way_speaking, lvu_scene, lvu_director, lvu_genre, lvu_writer, "
    "lvu_year, coin, breakfast.")]
LabelsOpt = Annotated[Optional[str], typer.Option(
    metavar="FILE|LIST", help='Your own labels: a file (one per line, or a JSON list) or "a,b,c".', show_default=False)]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", metavar="K", min=1, show_default=False,
                                      help=f"How many labels to report. \\[default: {TOP_K}]")]
LabelScoreOpt = Annotated[Optional[str], typer.Option(
    "--label-score", metavar="sum|mean", show_default=False,
    help="How a label's likelihood is scored: the sum of its tokens' log-probabilities (the probability of "
    "answering exactly it), or their mean (no head start for short labels). \\[default: sum]")]
ClassifyPromptOpt = Annotated[Optional[str], typer.Option(
    metavar="TEXT", show_default=False,
    help=f"Instruction for --labels. \\[default: {TASK_DEFAULTS['classify'].prompt!r}]")]

# summarize
EveryOpt = Annotated[Optional[float], typer.Option(
    metavar="TIME", parser=_time, show_default=False,
    help=f"Segment length: seconds, MM:SS or HH:MM:SS. \\[default: {SUMMARY_EVERY_SECONDS:g}]")]
ScenesOpt = Annotated[bool, typer.Option("--scenes", help="Cut where the picture changes most instead of every N s.")]
SegmentLabelTaskOpt = Annotated[Optional[str], typer.Option(
    "--task", metavar="NAME", show_default=False,
    help="Also rank each segment's labels from a built-in set (as classify --task); the top 3 are kept.")]
SegmentLabelsOpt = Annotated[Optional[str], typer.Option(
    metavar="FILE|LIST", show_default=False,
    help='Also rank each segment\'s labels from your own set: a file or "a,b,c" (as classify --labels).')]
FormatOpt = Annotated[Optional[SummaryFormat], typer.Option(
    "--format", "-f", metavar="FORMAT", show_default=False,
    help="Output format: txt, md, srt, vtt, json, html, or all. srt has no place for the overall summary (vtt "
    "keeps it in a NOTE); all writes every format, a file each per video, into -o DIRECTORY. "
    "\\[default: txt, or from the -o extension]")]

# Running a batch on Ray (runs/runners.py's OnRay); without --ray nothing of Ray is imported.
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

# ---- eval --------------------------------------------------------------------------------------

EvalDataArg = Annotated[Path, typer.Argument(
    metavar="DATA", show_default=False,
    help="CSV (with a header row) or JSONL: video,label (classify), video,question,answer (ask) or "
    "video,caption (caption). Video paths are relative to DATA's folder.")]
EvalTaskOpt = Annotated[LearnTask, typer.Option(
    "--task", "-t", metavar="classify|ask|caption", show_default=False, help="What DATA holds.")]
EvalLabelsOpt = Annotated[Optional[str], typer.Option(
    metavar="FILE|LIST", show_default=False,
    help='classify: the label set, a file (one per line, or a JSON list) or "a,b,c". '
    "\\[default: the data's labels]")]
LabelSetOpt = Annotated[Optional[str], typer.Option(
    "--label-set", metavar="NAME", show_default=False,
    help="classify: a built-in label set: lvu_relationship, lvu_way_speaking, lvu_scene, lvu_director, "
    "lvu_genre, lvu_writer, lvu_year, coin, breakfast.")]
EvalPromptOpt = Annotated[Optional[str], typer.Option(
    metavar="TEXT", show_default=False, help="Instruction for caption, or for classify with your labels. "
    "\\[default: per task]")]
ScoringOpt = Annotated[Optional[str], typer.Option(
    "--scoring", metavar="likelihood|generate", show_default=False,
    help="classify: rank every label by its likelihood, or generate 5 beams and match the label exactly, as "
    "the official eval does (top-1: beam 0; top-5: any beam). \\[default: likelihood]")]
EvalPresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", metavar="youcook2", show_default=False,
    help="caption: a data set's official decoding (youcook2: 30 tokens at most, 2 at least).")]
EvalJsonOpt = Annotated[bool, typer.Option("--json", help="Print the final record as one JSON line.")]
EvalOutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="FILE", show_default=False,
    help=f"Write each prediction to FILE (JSON Lines) as it finishes, and the final record to FILE "
    f"with the suffix {SUMMARY_SUFFIX}.")]
EvalResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Skip the items already predicted in the --output file with the same data, options "
    "and model.")]

# ---- train -------------------------------------------------------------------------------------

TrainDataArg = Annotated[Path, typer.Argument(
    metavar="DATA", show_default=False,
    help="CSV or JSONL: video,label (classify), video,question,answer (ask) or video,caption (caption); "
    "video paths relative to the file.")]
TrainTaskOpt = Annotated[LearnTask, typer.Option(metavar="classify|ask|caption", show_default=False,
                                                 help="What the model learns to answer.")]
CheckpointOutOpt = Annotated[Path, typer.Option("--output", "-o", metavar="CKPT", show_default=False,
                                                help="Checkpoint file to write (.pth), saved after every epoch.")]
ValOpt = Annotated[Optional[Path], typer.Option(
    metavar="FILE", show_default=False, help="Validation data (same columns), after every epoch: the loss and "
    "the task metric (classify accuracy, ask exact match, caption CIDEr); -o then keeps the best epoch, "
    "CKPT's .last.pth the last.")]
EpochsOpt = Annotated[Optional[int], typer.Option(
    metavar="N", show_default=False, help="Passes over the data. \\[default: per task, as the paper: 20, 5, 10]")]
LrOpt = Annotated[Optional[float], typer.Option(
    metavar="LR", show_default=False, help="Peak learning rate. \\[default: 1e-4; caption 1e-5]")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", metavar="N", show_default=False,
    help="Clips per optimizer step, as the paper's 4 GPUs together. \\[default: 64; ask and caption 128]")]
AccumOpt = Annotated[Optional[int], typer.Option(
    "--accum", metavar="K", show_default=False,
    help="Split each step into K micro-batches (less memory, the same step). \\[default: 1; caption 2]")]
TrainPromptOpt = Annotated[Optional[str], typer.Option(
    metavar="TEXT", show_default=False, help="Instruction for classify and caption. \\[default: the task's, or "
    "the --label-set's]")]
TrainLabelSetOpt = Annotated[Optional[str], typer.Option(
    "--label-set", metavar="NAME", show_default=False,
    help="classify: train with a built-in label set's prompt (lvu_genre, coin, breakfast, ...); every label of "
    "DATA must be in it.")]
AugmentOpt = Annotated[Optional[bool], typer.Option(
    "--augment/--no-augment", help="The official training sampling: a random frame per segment, one random "
    "crop and flip per clip. \\[default: on]", show_default=False)]
ViewsOpt = Annotated[Optional[int], typer.Option(
    "--views", metavar="K", show_default=False,
    help="Augmented views per clip, computed once: the vision encoder runs K x frames times per clip; each "
    "epoch trains on one view. \\[default: 4]")]
LnVisionOpt = Annotated[bool, typer.Option(
    "--train-ln-vision", help="Train the vision encoder's last LayerNorm too, as the official code does (saved "
    "as ln_vision.*).")]
TrainPresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", metavar="youcook2", show_default=False,
    help="caption: a data set's official settings (youcook2: lr 1e-4; decoding 2 to 30 tokens).")]
TrainResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue the training that wrote CKPT (its last epoch's weights, optimizer and place).")]
StartFromOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", metavar="FILE", show_default=False, help="Start from these MA-LMM weights (.pth).")]
SeedOpt = Annotated[Optional[int], typer.Option(
    metavar="N", show_default=False, help="Seed for shuffling, augmentation and dropout. \\[default: 42]")]
# Training takes any torch device name (cuda:1 on a machine with several GPUs), not only the three choices.
TrainDeviceOpt = Annotated[str, typer.Option(metavar="auto|cpu|cuda", help="Where to train.")]
ReplaceCheckpointOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing CKPT.")]

# ---- models ------------------------------------------------------------------------------------

ModelNameArg = Annotated[str, typer.Argument(metavar="MODEL", help="Preset name or hub id.", show_default=False)]
ModelPathArg = Annotated[Optional[str], typer.Argument(
    metavar="MODEL", help="Preset name or hub id; without it, where malmm and Hugging Face keep things.",
    show_default=False)]
ListJsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per model (one per line).")]

# ---- watch (a live stream) ---------------------------------------------------------------------


class WatchTask(str, Enum):
    caption = "caption"
    ask = "ask"
    classify = "classify"


class WatchFormat(str, Enum):
    jsonl = "jsonl"
    srt = "srt"
    vtt = "vtt"
    txt = "txt"


SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", show_default=False,
    help="A stream: http(s) URL (MPEG-TS, HLS .m3u8, or a page yt-dlp resolves), rtsp://, rtmp://, a camera "
    "(/dev/video0), a file (read as it grows) or - (standard input).")]
WatchEveryOpt = Annotated[Optional[float], typer.Option(
    metavar="TIME", parser=_time, show_default=False,
    help=f"One record per TIME of stream time: seconds, MM:SS or HH:MM:SS. \\[default: {WATCH_EVERY_SECONDS:g}]")]
WatchTaskOpt = Annotated[WatchTask, typer.Option(
    "--task", metavar="caption|ask|classify", show_default=False,
    help="What each record says: a caption, answers to -Q, or labels. \\[default: caption]")]
WatchQuestionOpt = Annotated[Optional[list[str]], typer.Option(
    "--question", "-Q", metavar="QUESTION", show_default=False,
    help="A question for --task ask (repeatable); all are answered in each window.")]
WatchFpsOpt = Annotated[Optional[float], typer.Option(
    metavar="FPS", show_default=False, help=f"Sample this many frames per second of stream time. \\[default: {WATCH_FPS:g}]")]
CumulativeOpt = Annotated[bool, typer.Option(
    "--cumulative", help="Answer each window over everything seen so far (the memory bank keeps the whole "
    "stream, in constant memory), not over the window alone.")]
DurationOpt = Annotated[Optional[float], typer.Option(
    metavar="TIME", parser=_time, show_default=False, help="Stop after TIME of stream time. \\[default: until it ends]")]
RetriesOpt = Annotated[Optional[float], typer.Option(
    "--retries", metavar="SECONDS", show_default=False,
    help=f"A cut stream is reopened, with backoff, for this long before giving up; a file is awaited this long "
    f"to grow. \\[default: {WATCH_RETRY_SECONDS:g}]")]
WatchFormatOpt = Annotated[Optional[WatchFormat], typer.Option(
    "--format", "-f", metavar="jsonl|srt|vtt|txt", show_default=False,
    help="Record format. \\[default: from the -o extension, else txt]")]
WatchOutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="FILE", show_default=False,
    help="Write the records to FILE (each flushed as its window closes) instead of standard output.")]
WatchOverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the records already in the --output file (a file malmm wrote).")]
