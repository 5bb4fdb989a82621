"""caption, ask, classify, summarize: each a thin typed function over the batch command
driver (runs/command.py)."""

from __future__ import annotations

import typer

from malmm_cli.engine.presets import TOP_K

from .options import (BatchOpt, BeamsOpt, CaptionPromptOpt, CheckpointOpt, ClassifyPromptOpt, ConcatOpt,
                      CpusPerWorkerOpt, Device, DeviceOpt, EndOpt, EveryOpt, FormatOpt, FpsOpt, FramesOpt,
                      GpusPerWorkerOpt, HelpInWords, InputArg, Inputs, JsonOpt, LabelScoreOpt, LabelsOpt, LabelTaskOpt,
                      MaxTokensOpt, MemoryOpt, MinTokensOpt, ModelOpt, MoreQuestionsOpt, NoCacheOpt, OutputOpt,
                      OverwriteOpt, PrecisionOpt, Quant, QuantOpt, QuestionArg, QuietOpt, RayOpt, ResumeOpt, ScenesOpt,
                      StartOpt, SummaryFormat, SummaryPromptOpt, TopKOpt, VerboseOpt, WorkersOpt, YesOpt, examples)
from .options import SegmentLabelsOpt, SegmentLabelTaskOpt


def register(app: typer.Typer) -> None:
    app.command(cls=HelpInWords, epilog=examples(
        "malmm caption movie.mp4",
        "malmm caption videos/ --json -o results.jsonl --resume",
        "malmm caption movie.mp4 --start 1:30 --end 2:00 --fps 2",
        "malmm caption videos/ --batch 8 -o captions.jsonl",
    ))(caption)
    app.command(cls=HelpInWords, epilog=examples(
        'malmm ask video.mp4 "what is the person cooking?"',
        'malmm ask video.mp4 "what is the person cooking?" -Q "where are they?"',
        'malmm ask video.mp4 "who wins?" --json',
    ))(ask)
    app.command(cls=HelpInWords, epilog=examples(
        "malmm classify clip.mp4 --task coin --top-k 3",
        "malmm classify clip.mp4 --labels 'cat,dog,bird'",
        "malmm classify clip.mp4 --task lvu_genre --json",
        "malmm classify clip.mp4 --labels 'cat,dog,bird' --label-score mean",
    ))(classify)
    app.command(cls=HelpInWords, epilog=examples(
        "malmm summarize lecture.mp4 --every 60 --format srt -o lecture.srt",
        "malmm summarize lecture.mp4 --every 2:00",
        "malmm summarize lecture.mp4 --scenes --format md",
        "malmm summarize lecture.mp4 --format html -o lecture.html --task coin",
        "malmm summarize lecture.mp4 --format all -o lecture/",
    ))(summarize)


# `malmm ask *.mp4 "why?"`: the shell hands ask several files where it takes one INPUT.
GLOB_HINT = ("ask takes one INPUT, then the QUESTION: was a glob expanded by the shell? Quote it ('*.mp4'), "
             "or pass a folder or @list.txt.")


def _question_is_a_video(question: str) -> bool:
    """Whether the QUESTION names a video file here (the second file of an expanded glob)."""
    from pathlib import Path

    from malmm_cli.sources.media import VIDEO_EXTENSIONS

    path = Path(question)
    return path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file()


def _run(task: str, inputs: list[str], values: dict, **args) -> int:
    from malmm_cli.runs.command import CommonOptions, run_command

    return run_command(task, inputs, CommonOptions.from_values(values), **args)


def caption(
    inputs: Inputs,
    prompt: CaptionPromptOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, concat: ConcatOpt = False,
    quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, precision: PrecisionOpt = None, json_: JsonOpt = False, output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False, yes: YesOpt = False, no_cache: NoCacheOpt = False,
    beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    min_tokens: MinTokensOpt = None,
    batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Describe what happens in each video."""
    raise typer.Exit(_run("caption", inputs, locals(), prompt=prompt))


def ask(
    input: InputArg,
    question: QuestionArg,
    more: MoreQuestionsOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, concat: ConcatOpt = False,
    quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, precision: PrecisionOpt = None, json_: JsonOpt = False, output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False, yes: YesOpt = False, no_cache: NoCacheOpt = False,
    beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    min_tokens: MinTokensOpt = None,
    batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Answer questions about a video (several questions in one pass). With one question and
    one input, the answer alone goes to stdout."""
    if _question_is_a_video(question):
        from malmm_cli.messages import error

        error(f"The question '{question}' is a video file. {GLOB_HINT}")
        raise typer.Exit(2)
    raise typer.Exit(_run("ask", [input], locals(), questions=[question, *(more or [])]))


def classify(
    inputs: Inputs,
    task: LabelTaskOpt = None,
    labels: LabelsOpt = None,
    top_k: TopKOpt = TOP_K,
    prompt: ClassifyPromptOpt = None,
    label_score: LabelScoreOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, concat: ConcatOpt = False,
    quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, precision: PrecisionOpt = None, json_: JsonOpt = False, output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False, yes: YesOpt = False, no_cache: NoCacheOpt = False,
    batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Rank every label of a set by the model's likelihood; report the top k with probabilities. With
    --checkpoint and no --task or --labels: the label set and prompt it was trained with."""
    raise typer.Exit(_run("classify", inputs, locals(), label_task=task, labels=labels, top_k=top_k, prompt=prompt,
                          label_score=label_score))


def summarize(
    inputs: Inputs,
    every: EveryOpt = None,
    scenes: ScenesOpt = False,
    format: FormatOpt = None,
    prompt: SummaryPromptOpt = None,
    task: SegmentLabelTaskOpt = None,
    labels: SegmentLabelsOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    start: StartOpt = None, end: EndOpt = None, memory: MemoryOpt = None, concat: ConcatOpt = False,
    quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, precision: PrecisionOpt = None, json_: JsonOpt = False, output: OutputOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = False, yes: YesOpt = False, no_cache: NoCacheOpt = False,
    beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    min_tokens: MinTokensOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Timestamped segments with one caption each, plus a summary of the whole video."""
    fmt = None if format is None else "text" if format in (SummaryFormat.txt, SummaryFormat.text) else format.value
    raise typer.Exit(_run("summarize", inputs, locals(), every=every, scenes=scenes, fmt=fmt, prompt=prompt,
                          label_task=task, labels=labels))
