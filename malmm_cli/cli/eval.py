"""`malmm eval`: score the model on a labelled data file (the run: learn/eval_command.py)."""

from __future__ import annotations

import typer

from .options import (BatchOpt, BeamsOpt, CheckpointOpt, ConcatOpt, CpusPerWorkerOpt, Device, DeviceOpt, EvalDataArg,
                      EvalJsonOpt, EvalLabelsOpt, EvalOutputOpt, EvalPresetOpt, EvalPromptOpt, EvalResumeOpt,
                      EvalTaskOpt, FpsOpt, FramesOpt, GpusPerWorkerOpt, HelpInWords, LabelScoreOpt, LabelSetOpt,
                      MaxTokensOpt, MemoryOpt, MinTokensOpt, ModelOpt, NoCacheOpt, OverwriteOpt, Quant, QuantOpt,
                      QuietOpt, RayOpt, ScoringOpt, WorkersOpt, examples)


def register(app: typer.Typer) -> None:
    app.command("eval", cls=HelpInWords, epilog=examples(
        "malmm eval val.csv --task classify",
        "malmm eval qa.jsonl --task ask --json -o qa-preds.jsonl --resume",
        "malmm eval captions.csv --task caption --checkpoint msrvtt_cap.pth",
        "malmm eval val.csv --task classify --checkpoint ckpt.pth --scoring generate",
    ))(eval_command)


def eval_command(
    data: EvalDataArg,
    task: EvalTaskOpt,
    labels: EvalLabelsOpt = None,
    label_set: LabelSetOpt = None,
    prompt: EvalPromptOpt = None,
    scoring: ScoringOpt = None,
    label_score: LabelScoreOpt = None,
    preset: EvalPresetOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, fps: FpsOpt = None, frames: FramesOpt = None,
    memory: MemoryOpt = None, concat: ConcatOpt = False, quant: QuantOpt = Quant.auto, device: DeviceOpt = Device.auto,
    json_: EvalJsonOpt = False,
    output: EvalOutputOpt = None,
    resume: EvalResumeOpt = False,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False,
    no_cache: NoCacheOpt = False, beams: BeamsOpt = None, max_tokens: MaxTokensOpt = None,
    min_tokens: MinTokensOpt = None, batch: BatchOpt = None,
    ray: RayOpt = None, workers: WorkersOpt = None, cpus_per_worker: CpusPerWorkerOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
):
    """Score the model on labelled videos: accuracy (classify, ask) or CIDEr, METEOR, ROUGE-L and BLEU
    (caption)."""
    from malmm_cli.learn.eval_command import run_eval
    from malmm_cli.runs.command import CommonOptions

    opts = CommonOptions.from_values(locals())
    raise typer.Exit(run_eval(data, task.value, opts, labels=labels, label_set=label_set, prompt=prompt,
                              scoring=scoring, label_score=label_score, preset=preset))
