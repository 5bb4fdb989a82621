"""`malmm eval`: score the model on a labelled data file (the run: learn/eval_command.py)."""

from __future__ import annotations

import typer

from .options import (BatchOpt, BeamsOpt, CheckpointOpt, CpusPerWorkerOpt, Device, DeviceOpt, EvalDataArg,
                      EvalJsonOpt, EvalLabelsOpt, EvalOutputOpt, EvalPromptOpt, EvalResumeOpt, EvalTaskOpt, FpsOpt,
                      FramesOpt, GpusPerWorkerOpt, HelpInWords, LabelSetOpt, MaxTokensOpt, MemoryOpt, ModelOpt,
                      NoCacheOpt, OverwriteOpt, Quant, QuantOpt, QuietOpt, RayOpt, WorkersOpt, examples)


def register(app: typer.Typer) -> None:
    app.command("eval", cls=HelpInWords, epilog=examples(
        "malmm eval val.csv --task classify",
        "malmm eval qa.jsonl --task ask --json -o qa-preds.jsonl --resume",
        "malmm eval captions.csv --task caption --checkpoint msrvtt_cap.pth",
    ))(eval_command)


def eval_command(
    data: EvalDataArg,
    task: EvalTaskOpt,
    labels: EvalLabelsOpt = None,
    label_set: LabelSetOpt = None,
    prompt: EvalPromptOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    memory: MemoryOpt = None, quant: QuantOpt = Quant.auto, device: DeviceOpt = Device.auto,
    json_: EvalJsonOpt = False,
    output: EvalOutputOpt = None,
    resume: EvalResumeOpt = False,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    no_cache: NoCacheOpt = False, beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Score the model on labelled videos: accuracy (classify, ask) or CIDEr and BLEU-4 (caption)."""
    from malmm_cli.learn.eval_command import run_eval
    from malmm_cli.runs.command import CommonOptions

    opts = CommonOptions.from_values(locals())
    raise typer.Exit(run_eval(data, task.value, opts, labels=labels, label_set=label_set, prompt=prompt))
