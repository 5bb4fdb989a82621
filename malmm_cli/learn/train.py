"""Finetuning MA-LMM on labelled clips: what `malmm train` runs, usable from Python.

What is trained and how follows the official MA-LMM code (the LAVIS fork): the Q-Former with
its query tokens, the temporal position embedding and the projection to the LLM, with the
LLM's loss on the answer followed by EOS (models/training.py); the ViT and the LLM frozen;
AdamW (weight decay 0.05 on matrices, none on biases and norms) with a linear warm-up from
1e-8 and a per-epoch cosine decay to 0 (``LinearWarmupCosineLRScheduler``); learning rate,
epochs and batch size per task from ``run_scripts/``.

The ViT runs once per video, through the feature cache; the features of the whole data set
are then kept in one temporary file (constant RAM whatever its size), so an epoch costs the
Q-Former and the LLM only.

    from malmm_cli.learn.dataset import load_dataset
    from malmm_cli.learn.train import TrainOptions, load_for_training, train

    model = load_for_training("tiny-random")
    items = load_dataset("train.csv", "classify")
    report = train(model, items, TrainOptions(task="classify", epochs=5), output="ckpt.pth")
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models import MALMM
from models.training import (answer_log_likelihood, candidate_log_likelihoods, freeze_for_training,
                             official_config, save_checkpoint, tokenize_instructions, visual_tokens)

from malmm_cli.engine.features import FeatureCache, FrameStore
from malmm_cli.engine.presets import TASK_DEFAULTS
from malmm_cli.engine.session import Session
from malmm_cli.engine.tasks import question_prompt
from malmm_cli.errors import MalmmError, UsageError, write_failure
from malmm_cli.messages import log
from malmm_cli.results.written import replace_file

from .dataset import Item

# ---- defaults (the official run scripts and configs) -------------------------------------------


@dataclass(frozen=True)
class TrainDefaults:
    lr: float
    epochs: int
    batch_size: int  # per step, as one GPU of the paper's 4 had it


TRAIN_DEFAULTS = {
    # run_scripts/{lvu,breakfast,coin}/train.sh: init_lr 1e-4, 20 epochs, batch 16
    "classify": TrainDefaults(lr=1e-4, epochs=20, batch_size=16),
    # run_scripts/{msrvtt,msvd,activitynet}/train_qa.sh: 1e-4, 5 epochs, batch 32
    "ask": TrainDefaults(lr=1e-4, epochs=5, batch_size=32),
    # run_scripts/{msrvtt,msvd}/train_cap.sh: 1e-5, 10 epochs, batch 16
    "caption": TrainDefaults(lr=1e-5, epochs=10, batch_size=16),
}
WARMUP_STEPS = 1000  # configs: warmup_steps 1000 from warmup_lr 1e-8 ...
WARMUP_START_LR = 1e-8
MIN_LR = 0.0  # ... and a cosine down to min_lr 0
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class TrainOptions:
    """A training run. None means the task's default (TRAIN_DEFAULTS, TASK_DEFAULTS)."""

    task: str
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    frames: int | None = None  # frames per clip, spread evenly (the paper's sampling)
    fps: float | None = None  # or a rate instead
    memory: int | None = None  # memory bank length M; 0 = no memory
    prompt: str | None = None  # the instruction for classify and caption (ask: from each question)
    warmup_steps: int = WARMUP_STEPS
    weight_decay: float = WEIGHT_DECAY
    min_lr: float = MIN_LR
    seed: int = 42

    def resolved(self, trained=None) -> TrainOptions:
        """Every None filled in: the options, else a starting checkpoint's own frames and
        memory (``model.trained_config``), else the task defaults."""
        if self.task not in TRAIN_DEFAULTS:
            raise UsageError(f"Unknown task '{self.task}'; use one of: {', '.join(TRAIN_DEFAULTS)}.")
        run, task = TRAIN_DEFAULTS[self.task], TASK_DEFAULTS[self.task]
        frames, memory = self.frames, self.memory
        if frames is None and self.fps is None:
            frames = (trained.num_frames if trained and trained.num_frames else None) or task.frames
        if memory is None:
            memory = trained.memory_bank_length if trained and trained.memory_bank_length is not None else task.memory
        return replace(self, epochs=self.epochs or run.epochs, lr=self.lr or run.lr,
                       batch_size=self.batch_size or run.batch_size, frames=frames, memory=memory)


def training_prompt(task: str, item: Item, prompt: str | None = None) -> str:
    """The instruction for an item (Q-Former instruction and LLM prompt), exactly the one the
    matching command uses at inference: classify and caption the task's prompt (or
    ``prompt``), ask the question in the paper's QA template."""
    if task == "ask":
        return question_prompt(item.question or "")
    return (prompt or TASK_DEFAULTS[task].prompt).strip()


# ---- the learning rate ---------------------------------------------------------------------------


def learning_rate(epoch: int, step: int, *, lr: float, epochs: int, warmup_steps: int, min_lr: float = MIN_LR,
                  warmup_start: float = WARMUP_START_LR) -> float:
    """LAVIS's LinearWarmupCosineLRScheduler: in epoch 0 a linear warm-up over `warmup_steps`
    steps (then flat), from epoch 1 on the cosine of the epoch."""
    if epoch == 0:
        return min(lr, warmup_start + (lr - warmup_start) * step / max(warmup_steps, 1))
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr


def make_optimizer(model: MALMM, trained, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW as the LAVIS runner builds it: weight decay on matrices only (not on biases,
    norms or any 1-d tensor)."""
    decay = [p for n, p in trained if p.ndim >= 2 and "bias" not in n]
    ids = {id(p) for p in decay}
    rest = [p for _, p in trained if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay, betas=BETAS)


# ---- clips -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One example: where its features are in the store, and what to ask and answer."""

    item: Item
    prompt: str
    target: str
    start: int  # first row in the FeatureStore
    frames: int


class FeatureStore:
    """Every clip's features in one temporary file: read back per batch, never all in RAM."""

    def __init__(self, directory: Path | None = None):
        self.store = FrameStore(directory)
        self.directory = directory

    def add(self, features: torch.Tensor) -> tuple[int, int]:
        start = self.store.count
        try:
            self.store.append(features)
        except OSError as err:  # a full temporary folder: one sentence, not a traceback
            import tempfile

            where = self.directory or tempfile.gettempdir()
            raise MalmmError(f"The clips' vision features do not fit in the temporary folder {where} "
                             f"({write_failure(err, where)}); free some space there, or set TMPDIR to a folder "
                             "with room.") from None
        return start, features.shape[0]

    def read(self, clip: Clip) -> torch.Tensor:
        return self.store.read(clip.start, clip.start + clip.frames)

    def close(self) -> None:
        self.store.close()


# ---- the loop ------------------------------------------------------------------------------------


class TrainEvents:
    """Progress callbacks (the CLI shows them; the default does nothing)."""

    def features(self, done: int, total: int) -> None: ...

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None: ...

    def step(self, done: int, loss: float, lr: float) -> None: ...

    def epoch_finished(self, stats: EpochStats) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    epochs: int
    train_loss: float
    val_loss: float | None = None
    val_accuracy: float | None = None  # classify only: the top label by likelihood is the target
    seconds: float = 0.0


@dataclass
class TrainReport:
    output: Path
    options: TrainOptions
    epochs: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    interrupted: bool = False


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM; the progress so far is in `report.output` (when saved)."""

    def __init__(self, report: TrainReport, saved: bool, where: str, cause: BaseException):
        super().__init__(where)
        self.report, self.saved, self.where, self.cause = report, saved, where, cause


def _autocast(model: MALMM):
    """bf16 autocast on a GPU (the trained weights and the AdamW state stay float32)."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _groups(clips: Sequence[Clip]) -> list[list[Clip]]:
    """Clips of equal frame counts together: each group runs as one batch."""
    return [[c for c in clips if c.frames == n] for n in sorted({c.frames for c in clips})]


def _visual(model: MALMM, store: FeatureStore, group: Sequence[Clip], memory: int) -> torch.Tensor:
    feats = torch.stack([store.read(c) for c in group]).to(model.device)  # [B, T, P, C]
    return visual_tokens(model, feats, tokenize_instructions(model, [c.prompt for c in group]), memory)


def _log_likelihood(model: MALMM, store: FeatureStore, clips: Sequence[Clip], memory: int):
    """(summed log-likelihood of the targets, target tokens) over clips."""
    total, tokens = 0.0, 0
    for group in _groups(clips):
        with _autocast(model):
            visual = _visual(model, store, group, memory)
            ll, n = answer_log_likelihood(model, visual, [c.prompt for c in group], [c.target for c in group])
        total, tokens = total + ll.sum(), tokens + int(n.sum())
    return total, tokens


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate(model: MALMM, store: FeatureStore, clips: Sequence[Clip], memory: int, *, batch_size: int,
             labels: Sequence[str] | None = None) -> tuple[float, float | None]:
    """(loss per target token, accuracy or None): with `labels` (classify), a clip counts as
    right when its label is the candidate with the highest likelihood, as `malmm classify`
    ranks them."""
    was_training = model.qformer.training
    model.qformer.eval()
    try:
        total, tokens, right = 0.0, 0, 0
        for start in range(0, len(clips), batch_size):
            for group in _groups(clips[start : start + batch_size]):
                with _autocast(model):
                    visual = _visual(model, store, group, memory)
                    prompts = [c.prompt for c in group]
                    ll, n = answer_log_likelihood(model, visual, prompts, [c.target for c in group])
                    if labels:
                        best = candidate_log_likelihoods(model, visual, prompts, labels).argmax(dim=1)
                        right += sum(labels[int(k)] == c.target for k, c in zip(best, group))
                total, tokens = total + float(ll.sum()), tokens + int(n.sum())
        return -total / max(tokens, 1), (right / len(clips) if labels else None)
    finally:
        model.qformer.train(was_training)


@dataclass
class _Run:
    model: MALMM
    options: TrainOptions
    output: Path
    store: FeatureStore
    clips: list[Clip]
    val: list[Clip]
    labels: list[str] | None
    events: TrainEvents
    config: Callable[..., dict]
    report: TrainReport
    optimizer: torch.optim.Optimizer | None = None
    epoch: int = 0
    step_in_epoch: int = 0


def _train_epoch(run: _Run, trained, rng: np.random.Generator, warmup: int) -> float:
    model, opts = run.model, run.options
    batches = _batches(len(run.clips), opts.batch_size, rng)
    run.events.epoch_started(run.epoch, opts.epochs, len(batches))
    losses = []
    for i, batch in enumerate(batches):
        run.step_in_epoch = i
        lr = learning_rate(run.epoch, i, lr=opts.lr, epochs=opts.epochs, warmup_steps=warmup, min_lr=opts.min_lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        total, tokens = _log_likelihood(model, run.store, [run.clips[j] for j in batch], opts.memory)
        loss = -total / tokens
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.report.steps += 1
        losses.append(float(loss.detach()))
        run.events.step(i + 1, losses[-1], lr)
    return float(np.mean(losses))


def _save(run: _Run, **state) -> None:
    """Write the checkpoint atomically, its content recorded (written.py): the file malmm
    wrote is the one `malmm train -o ... --overwrite` may replace later, and no other. A write
    that fails (a full disk) leaves the previous checkpoint in place and is one sentence."""

    def write(path: Path) -> None:
        save_checkpoint(path, run.model, config=run.config(**state), optimizer=run.optimizer, epoch=run.epoch)

    try:
        replace_file(run.output, write, "checkpoint")
    except (OSError, RuntimeError) as err:  # torch reports a short write as RuntimeError
        kept = "the previous one is kept" if run.output.exists() else "nothing was written"
        raise MalmmError(f"The checkpoint could not be written to {run.output} "
                         f"({write_failure(err, run.output.parent)}); {kept}.") from None


def _loop(run: _Run) -> TrainReport:
    model, opts = run.model, run.options
    trained = freeze_for_training(model)
    run.optimizer = make_optimizer(model, trained, opts)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    steps_per_epoch = math.ceil(len(run.clips) / opts.batch_size)
    # LAVIS warms up in epoch 0 only; on a small data set, over that epoch rather than never
    # reaching the learning rate before the cosine takes over.
    warmup = min(opts.warmup_steps, steps_per_epoch)
    for run.epoch in range(opts.epochs):
        t0 = time.perf_counter()
        train_loss = _train_epoch(run, trained, rng, warmup)
        val_loss = val_acc = None
        if run.val:
            val_loss, val_acc = evaluate(model, run.store, run.val, opts.memory, batch_size=opts.batch_size,
                                         labels=run.labels)
        stats = EpochStats(run.epoch + 1, opts.epochs, train_loss, val_loss, val_acc, time.perf_counter() - t0)
        run.report.epochs.append(stats)
        _save(run, epochs_done=run.epoch + 1)
        run.events.epoch_finished(stats)
    # The model in memory now is the checkpoint: its streams use what it was trained with.
    model.trained_frames = max(c.frames for c in run.clips)
    model.memory_bank_length = opts.memory
    model.eval()
    return run.report


def prepare_clips(session: Session, items: Sequence[Item], options: TrainOptions, store: FeatureStore,
                  progress: Callable[[int], None] | None = None) -> list[Clip]:
    """Features of every item into `store` (the ViT once per video, through the session's
    feature path: the cache entries `malmm eval` and the other commands use), as Clips."""
    clips = []
    for i, item in enumerate(items):
        feats = session.features(item.video, frames=options.frames, fps=options.fps)
        start, count = store.add(feats)
        clips.append(Clip(item, training_prompt(options.task, item, options.prompt), item.target, start, count))
        if progress is not None:
            progress(i + 1)
    return clips


def train(model: MALMM, items: Sequence[Item], options: TrainOptions, output: str | Path, *,
          val_items: Sequence[Item] | None = None, cache: FeatureCache | None = None, model_id: str | None = None,
          events: TrainEvents | None = None, run_info: dict | None = None) -> TrainReport:
    """Finetune `model` on `items` and write the checkpoint to `output` (after every epoch,
    atomically). Raises :class:`Interrupted` on Ctrl-C, with the progress so far saved.

    `model_id` identifies the vision path for the feature cache (the CLI's
    ``loader.model_id``); without it the cache is not used. `run_info` goes into the
    checkpoint's ``config["malmm"]``.
    """
    with _thread_team(model):
        return _train(model, items, options, output, val_items=val_items, cache=cache, model_id=model_id,
                      events=events, run_info=run_info)


def _train(model: MALMM, items: Sequence[Item], options: TrainOptions, output: str | Path, *, val_items, cache,
           model_id, events, run_info) -> TrainReport:
    options = options.resolved(model.trained_config)
    if not items:
        raise UsageError("There is nothing to train on: the data has no items.")
    cache = cache if model_id is not None else None
    session = Session.from_model(model, model_id=model_id, cache=cache)
    if options.task == "classify":  # the labels are scored whole for the validation accuracy
        session.check_labels(dict.fromkeys(i.target for i in [*items, *(val_items or ())]), "The data's label set")
    events = events or TrainEvents()
    output = Path(output)
    store = FeatureStore(cache.scratch_dir() if cache is not None else None)
    report = TrainReport(output, options)
    run = None
    try:
        every = list(items) + list(val_items or [])
        clips = prepare_clips(session, every, options, store, progress=lambda done: events.features(done, len(every)))
        train_clips, val_clips = clips[: len(items)], clips[len(items) :]
        labels = list(dict.fromkeys(c.target for c in clips)) if options.task == "classify" else None

        def config(**state) -> dict:
            return _checkpoint_config(model, options, labels, train_clips, run_info, **state)

        run = _Run(model, options, output, store, train_clips, val_clips, labels, events, config, report)
        return _loop(run)
    except KeyboardInterrupt as stop:
        raise _interrupted(run, report, stop) from None
    finally:
        events.close()
        store.close()


def _thread_team(model: MALMM):
    """On a CPU, torch's thread team sized as the batch commands size it (threads.py): a small
    model on the cores other processes leave free (on a busy 2-core machine, 2 threads made a
    tiny-random training 13x slower than 1), a real-size one on all of them (large GEMMs)."""
    if model.device.type != "cpu":
        return contextlib.nullcontext()
    from malmm_cli.engine.threads import plan_threads, torch_threads

    large = model.vision_model.config.hidden_size >= 1024  # ViT-g: 1408; tiny-random: 32
    plan = plan_threads(large)
    return torch_threads(plan.heavy if large else plan.light)


def _interrupted(run: _Run | None, report: TrainReport, stop: BaseException) -> Interrupted:
    """Ctrl-C: save what the steps so far made of the weights, and say where training stopped."""
    report.interrupted = True
    if run is None or run.optimizer is None or report.steps == 0:
        return Interrupted(report, False, "before the first training step", stop)
    where = f"epoch {run.epoch + 1}/{run.options.epochs}, batch {run.step_in_epoch + 1}"
    run.model.eval()
    try:
        _save(run, epochs_done=run.epoch, interrupted_at={"epoch": run.epoch + 1, "batch": run.step_in_epoch + 1})
    except MalmmError as err:
        log.warning("%s", err)
        return Interrupted(report, False, where, stop)
    return Interrupted(report, True, where, stop)


def _checkpoint_config(model: MALMM, options: TrainOptions, labels, clips: Sequence[Clip], run_info: dict | None,
                       **state) -> dict:
    frames = max((c.frames for c in clips), default=options.frames or 0)
    run = {"task": options.task, "lr_sched": "linear_warmup_cosine_lr", "init_lr": options.lr,
           "min_lr": options.min_lr, "warmup_lr": WARMUP_START_LR, "warmup_steps": options.warmup_steps,
           "weight_decay": options.weight_decay, "max_epoch": options.epochs, "batch_size_train": options.batch_size,
           "seed": options.seed, "amp": model.device.type == "cuda"}
    extra = {"task": options.task, "prompt": options.prompt, "fps": options.fps, "labels": labels,
             "train_items": len(clips), **(run_info or {}), **state}
    return official_config(model, num_frames=frames, memory_bank_length=options.memory, run=run, extra=extra)


def load_for_training(source: str = "tiny-random", *, checkpoint: str | Path | None = None,
                      device: str | None = None) -> MALMM:
    """A model ready for :func:`train`: the ViT and LLM in the device's fast dtype, the trained
    parts in float32 from the start (not rounded through bf16)."""
    from models.loading import default_dtype, resolve_device

    dev = resolve_device(device)
    return MALMM.from_pretrained(source, checkpoint=checkpoint, dtype=default_dtype(dev), device=dev,
                                 qformer_dtype=torch.float32)


def options_summary(options: TrainOptions) -> dict:
    return {k: v for k, v in asdict(options).items() if v is not None}
