"""watch: follow a live stream, one record per window of stream time (runs/watch.py)."""

from __future__ import annotations

import typer

from typing import Annotated, Optional

from .options import (BeamsOpt, CheckpointOpt, CumulativeOpt, Device, DeviceOpt, DurationOpt, EvalPromptOpt,
                      HelpInWords, JsonOpt, LabelSetOpt, LabelsOpt, MaxTokensOpt, MemoryOpt, ModelOpt, PrecisionOpt,
                      Quant, QuantOpt, QuietOpt, RetriesOpt, SourceArg, WatchEveryOpt, WatchFormatOpt, WatchFpsOpt, WatchOutputOpt,
                      WatchOverwriteOpt, WatchQuestionOpt, WatchTask, WatchTaskOpt, YesOpt, examples)

WatchTopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", "-k", metavar="K", min=1, show_default=False, help="classify: how many labels each record keeps. "
    "\\[default: 5]")]


def register(app: typer.Typer) -> None:
    app.command(cls=HelpInWords, epilog=examples(
        "malmm watch https://example.com/live/index.m3u8 --every 10",
        "malmm watch /dev/video0 --task ask -Q 'is anyone at the door?' --every 5",
        "malmm watch rtsp://192.168.1.20:554/stream --cumulative -o captions.jsonl",
        "malmm watch recording.ts --every 30 --format srt -o recording.srt",
    ))(watch)


def watch(
    source: SourceArg,
    every: WatchEveryOpt = None,
    task: WatchTaskOpt = WatchTask.caption,
    question: WatchQuestionOpt = None,
    label_set: LabelSetOpt = None,
    labels: LabelsOpt = None,
    top_k: WatchTopKOpt = None,
    prompt: EvalPromptOpt = None,
    cumulative: CumulativeOpt = False,
    duration: DurationOpt = None,
    retries: RetriesOpt = None,
    output: WatchOutputOpt = None,
    format: WatchFormatOpt = None,
    json_: JsonOpt = False,
    overwrite: WatchOverwriteOpt = False,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: WatchFpsOpt = None, memory: MemoryOpt = None,
    quant: QuantOpt = Quant.auto, device: DeviceOpt = Device.auto, precision: PrecisionOpt = None,
    quiet: QuietOpt = False, yes: YesOpt = False,
    beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
):
    """Follow a live stream as it plays: a caption (or answers, or labels) for every window of
    stream time, each written as soon as the window closes."""
    from malmm_cli.runs.command import CommonOptions
    from malmm_cli.runs.watch import WatchOptions, run_watch

    opts = WatchOptions(task=task.value, questions=tuple(question or ()), labels=labels, label_set=label_set,
                        prompt=prompt, top_k=top_k, every=every, cumulative=cumulative, duration=duration,
                        retries=retries, fmt=None if format is None else format.value,
                        common=CommonOptions.from_values(locals()))
    raise typer.Exit(run_watch(source, opts))
