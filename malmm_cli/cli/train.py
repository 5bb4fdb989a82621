"""`malmm train`: finetune on a labelled data file (the run: learn/train_command.py)."""

from __future__ import annotations

import typer

from .options import (AccumOpt, AugmentOpt, BatchSizeOpt, CheckpointOutOpt, ConcatOpt, EpochsOpt, FpsOpt, FramesOpt,
                      HelpInWords, LearnTask, LnVisionOpt, LrOpt, MemoryOpt, ModelOpt, NoCacheOpt, QuietOpt,
                      ReplaceCheckpointOpt, SeedOpt, StartFromOpt, TrainDataArg, TrainDeviceOpt, TrainLabelSetOpt,
                      TrainPresetOpt, TrainPromptOpt, TrainResumeOpt, TrainTaskOpt, ValOpt, ViewsOpt, examples)


def register(app: typer.Typer) -> None:
    app.command("train", cls=HelpInWords, epilog=examples(
        "malmm train train.csv --task classify --epochs 5 -o ckpt.pth",
        "malmm train train.csv --task classify --val val.csv --epochs 5 -o ckpt2.pth",
        "malmm train train.csv --task classify --epochs 6 -o ckpt.pth --resume",
        "malmm train qa.jsonl --task ask --frames 20 --memory 10 -o qa.pth",
    ))(train)


def train(
    data: TrainDataArg,
    task: TrainTaskOpt,
    output: CheckpointOutOpt,
    val: ValOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchSizeOpt = None,
    accum: AccumOpt = None,
    frames: FramesOpt = None,
    fps: FpsOpt = None,
    memory: MemoryOpt = None,
    concat: ConcatOpt = False,
    prompt: TrainPromptOpt = None,
    label_set: TrainLabelSetOpt = None,
    augment: AugmentOpt = None,
    views: ViewsOpt = None,
    train_ln_vision: LnVisionOpt = False,
    preset: TrainPresetOpt = None,
    model: ModelOpt = None,
    checkpoint: StartFromOpt = None,
    seed: SeedOpt = None,
    device: TrainDeviceOpt = "auto",
    resume: TrainResumeOpt = False,
    overwrite: ReplaceCheckpointOpt = False,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
):
    """Finetune the Q-Former, query tokens, temporal embedding and projection on your clips
    (ViT and LLM frozen), as MA-LMM trains; write a checkpoint for --checkpoint."""
    from malmm_cli.learn.train_command import run_train

    options = dict(locals())
    options["task"] = task.value if isinstance(task, LearnTask) else task
    raise typer.Exit(run_train(options))
