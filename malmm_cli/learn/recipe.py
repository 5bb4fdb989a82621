"""How `malmm train` trains, as the official MA-LMM run scripts and configs do: the defaults per
task, the options of a run, the learning-rate schedule and the optimizer. Torch is imported only
by make_optimizer's caller; this module is plain data and arithmetic.

The official runs (``run_scripts/*/train.sh``) use ``torchrun --nproc_per_node=4``: each step
sees 4 GPUs' batches. Per GPU 16 clips (classify), 32 (QA), and 16 with ``accum_grad_iters 2``
(captions), so a step sees 64, 128 and 128 clips. Those global batches are the defaults here;
``accum`` splits a step into micro-batches whose gradients add up, as ``accum_grad_iters`` does.
LAVIS steps its schedule once per *iteration* (one batch on each GPU, i.e. 64 clips for
classify and captions, 128 for QA), and warms up over 1,000 of them: the warm-up here is
counted in those iterations, by the clips seen, whatever batch size a run takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from malmm_cli.engine.presets import TASK_DEFAULTS, Generation
from malmm_cli.errors import UsageError

GPUS = 4  # torchrun --nproc_per_node=4 in every official run script


@dataclass(frozen=True)
class TrainDefaults:
    lr: float
    epochs: int
    per_gpu: int  # run.batch_size_train of the run script
    accum: int  # run.accum_grad_iters
    max_text_tokens: int = 128  # model.max_txt_len of the config (LAVIS default 128)

    @property
    def batch_size(self) -> int:
        """Clips per optimizer step: GPUs x per-GPU batch x accumulation."""
        return GPUS * self.per_gpu * self.accum

    @property
    def iteration(self) -> int:
        """Clips per official iteration (one batch on every GPU): what LAVIS's schedule counts."""
        return GPUS * self.per_gpu


TRAIN_DEFAULTS = {
    # run_scripts/{lvu,breakfast,coin}/train.sh: init_lr 1e-4, 20 epochs, 16 per GPU; cls_*.yaml: max_txt_len 30
    "classify": TrainDefaults(lr=1e-4, epochs=20, per_gpu=16, accum=1, max_text_tokens=30),
    # run_scripts/{msrvtt,msvd,activitynet}/train_qa.sh: 1e-4, 5 epochs, 32 per GPU
    "ask": TrainDefaults(lr=1e-4, epochs=5, per_gpu=32, accum=1),
    # run_scripts/{msrvtt,msvd}/train_cap.sh: 1e-5, 10 epochs, 16 per GPU, accum_grad_iters 2
    "caption": TrainDefaults(lr=1e-5, epochs=10, per_gpu=16, accum=2),
}


@dataclass(frozen=True)
class CaptionPreset:
    """A captioning data set's own settings (run script and config) where they differ."""

    lr: float
    generation: Generation


# run_scripts/youcook2/train.sh: init_lr 1e-4; cap_youcook2.yaml: max_len 30, min_len 2 (MSRVTT, MSVD: the defaults)
CAPTION_PRESETS = {
    "msrvtt": CaptionPreset(1e-5, TASK_DEFAULTS["caption"].generation),
    "msvd": CaptionPreset(1e-5, TASK_DEFAULTS["caption"].generation),
    "youcook2": CaptionPreset(1e-4, Generation(max_new_tokens=30, min_new_tokens=2)),
}

WARMUP_STEPS = 1000  # configs: warmup_steps 1000 (official iterations) from warmup_lr 1e-8 ...
WARMUP_START_LR = 1e-8
MIN_LR = 0.0  # ... and a cosine down to min_lr 0
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.999)
DEFAULT_VIEWS = 4  # augmented views of each clip, computed once (the ViT runs views x frames times per clip)


@dataclass(frozen=True)
class TrainOptions:
    """A training run. None means the task's default (TRAIN_DEFAULTS, TASK_DEFAULTS)."""

    task: str
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None  # clips per optimizer step (the paper's global batch)
    accum: int | None = None  # micro-batches per step (gradient accumulation)
    frames: int | None = None  # frames per clip (one per segment, or spread evenly)
    fps: float | None = None  # or a rate instead (no jitter, no views)
    memory: int | None = None  # memory bank length M; 0 = no memory
    prompt: str | None = None  # the instruction for classify and caption (ask: from each question)
    label_set: str | None = None  # classify: a built-in label set (its prompt; every label must be in it)
    concat: bool = False  # the paper's no-memory baseline: every frame's query tokens to the LLM
    augment: bool = True  # random frame per segment, crop and flip (the official training data)
    views: int | None = None  # augmented views per clip, computed once (default DEFAULT_VIEWS)
    ln_vision: bool = False  # train the ViT's last LayerNorm too, as the official code does
    preset: str | None = None  # caption: a data set's settings (youcook2)
    warmup_steps: int = WARMUP_STEPS  # in official iterations (TrainDefaults.iteration clips each)
    weight_decay: float = WEIGHT_DECAY
    min_lr: float = MIN_LR
    seed: int = 42

    @property
    def defaults(self) -> TrainDefaults:
        return TRAIN_DEFAULTS[self.task]

    def resolved(self, trained=None) -> TrainOptions:
        """Every None filled in: the options, else a starting checkpoint's own frames and
        memory (``model.trained_config``), else the task defaults."""
        if self.task not in TRAIN_DEFAULTS:
            raise UsageError(f"Unknown task '{self.task}'; use one of: {', '.join(TRAIN_DEFAULTS)}.")
        if self.preset is not None and (self.task != "caption" or self.preset not in CAPTION_PRESETS):
            raise UsageError(f"--preset is for --task caption: one of {', '.join(CAPTION_PRESETS)}.")
        run, task = TRAIN_DEFAULTS[self.task], TASK_DEFAULTS[self.task]
        frames, memory = self.frames, self.memory
        if frames is None and self.fps is None:
            frames = (trained.num_frames if trained and trained.num_frames else None) or task.frames
        if self.concat:
            memory = 0
        elif memory is None:
            memory = trained.memory_bank_length if trained and trained.memory_bank_length is not None else task.memory
        lr = self.lr or (CAPTION_PRESETS[self.preset].lr if self.preset else run.lr)
        batch = self.batch_size or run.batch_size
        accum = self.accum or (run.accum if batch % run.accum == 0 else 1)
        if accum > batch:
            raise UsageError(f"--accum {accum} splits a step of {batch} clips into more micro-batches than clips.")
        views = 1 if not self.augment or self.fps is not None else (self.views or DEFAULT_VIEWS)
        return replace(self, epochs=self.epochs or run.epochs, lr=lr, batch_size=batch, accum=accum, frames=frames,
                       memory=memory, views=views)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---- the learning rate ---------------------------------------------------------------------------


def learning_rate(epoch: int, step: float, *, lr: float, epochs: int, warmup_steps: float, min_lr: float = MIN_LR,
                  warmup_start: float = WARMUP_START_LR) -> float:
    """LAVIS's LinearWarmupCosineLRScheduler: in epoch 0 a linear warm-up over `warmup_steps`
    iterations (then flat), from epoch 1 on the cosine of the epoch. `step`: the iteration."""
    if epoch == 0:
        return min(lr, warmup_start + (lr - warmup_start) * step / max(warmup_steps, 1e-9))
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr


def warmup_iterations(options: TrainOptions, clips_per_epoch: int) -> float:
    """The warm-up, in official iterations: LAVIS's 1,000, or the first epoch when that is
    shorter (LAVIS warms up in epoch 0 only; on a small data set it would otherwise never reach
    the learning rate before the cosine takes over)."""
    return min(float(options.warmup_steps), clips_per_epoch / options.defaults.iteration)


def make_optimizer(trained, options: TrainOptions):
    """AdamW as the LAVIS runner builds it (Blip2Base.get_optimizer_params): weight decay on
    matrices only, not on biases or any 1-d tensor (norms)."""
    import torch

    decay = [p for n, p in trained if p.ndim >= 2 and not n.endswith(".bias")]
    ids = {id(p) for p in decay}
    rest = [p for _, p in trained if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay, betas=BETAS)
