"""Finetuning MA-LMM on labelled clips: what `malmm train` runs, usable from Python.

What is trained and how follows the official MA-LMM code (the LAVIS fork): the Q-Former with
its query tokens, the temporal position embedding and the projection to the LLM (and, as an
option, ln_vision), with the LLM's loss on the answer followed by EOS (models/training.py); the
ViT and the LLM frozen; AdamW (weight decay 0.05 on matrices) with a linear warm-up from 1e-8
and a per-epoch cosine decay to 0; the global batches, learning rates and epochs of the run
scripts (recipe.py); shuffled batches with the last incomplete one dropped (LAVIS's training
loader has ``drop_last=True``); the frames and augmentation of the official training data, as
views computed once (clips.py); the best epoch by the validation metric (validate.py) and a
resumable last one (checkpoints.py).

    from malmm_cli.learn.dataset import load_dataset
    from malmm_cli.learn.train import TrainOptions, load_for_training, train

    model = load_for_training("tiny-random")
    items = load_dataset("train.csv", "classify")
    report = train(model, items, TrainOptions(task="classify", epochs=5), output="ckpt.pth")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models import MALMM
from models.training import answer_log_likelihood, freeze_for_training, official_config, save_checkpoint

from malmm_cli.engine.features import FeatureCache
from malmm_cli.engine.session import Session
from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.messages import log

from . import checkpoints
from .checkpoints import TrainState
from .clips import Clip, FeatureStore, prepare_clips
from .dataset import Item
from .recipe import (TRAIN_DEFAULTS, WARMUP_START_LR, TrainOptions, learning_rate, make_optimizer,
                     warmup_iterations)
from .validate import Validation, autocast, clip_tokens, groups, validate

__all__ = ["TrainOptions", "TrainEvents", "EpochStats", "TrainReport", "Interrupted", "train", "load_for_training",
           "learning_rate", "TRAIN_DEFAULTS"]


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
    val_metric: float | None = None  # validate.METRICS[task]: accuracy, exact_match or cider
    metric_name: str | None = None
    seconds: float = 0.0
    best: bool = False  # this epoch is the one -o holds (with --val)
    lr: float = 0.0  # at the end of the epoch

    @property
    def val_accuracy(self) -> float | None:
        """classify's and ask's validation accuracy (None for captions)."""
        return self.val_metric if self.metric_name in ("accuracy", "exact_match") else None

    def to_dict(self) -> dict:
        out = {"epoch": self.epoch, "train_loss": round(self.train_loss, 6), "lr": self.lr,
               "seconds": round(self.seconds, 3)}
        if self.val_loss is not None:
            out.update(val_loss=round(self.val_loss, 6), best=self.best)
        if self.metric_name is not None and self.val_metric is not None:
            out[f"val_{self.metric_name}"] = round(self.val_metric, 6)
        return out


@dataclass
class TrainReport:
    output: Path
    options: TrainOptions
    epochs: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    interrupted: bool = False
    best_epoch: int | None = None  # with validation: the epoch -o holds


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM; the progress so far is saved (when `saved`)."""

    def __init__(self, report: TrainReport, saved: bool, where: str, cause: BaseException):
        super().__init__(where)
        self.report, self.saved, self.where, self.cause = report, saved, where, cause


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
    info: dict  # config["malmm"] but the state
    report: TrainReport
    state: TrainState
    optimizer: torch.optim.Optimizer | None = None
    resume_optimizer: dict | None = None
    at_batch: int = 0  # the batch being worked on (0-based), for where Ctrl-C stopped

    @property
    def with_val(self) -> bool:
        return bool(self.val)


def _batches(run: _Run, epoch: int) -> list[np.ndarray]:
    """This epoch's batches: a permutation drawn from the seed and the epoch alone (a resumed
    run takes the same ones), cut into batches of the step size; the last incomplete batch is
    dropped (LAVIS: drop_last=True), unless the data holds less than one batch."""
    n = len(run.clips)
    order = np.random.default_rng([run.options.seed, epoch]).permutation(n)
    size = min(run.options.batch_size, n)
    return [order[i * size : (i + 1) * size] for i in range(n // size)]


def _micro_loss(run: _Run, clips: Sequence[Clip], epoch: int) -> torch.Tensor:
    """Mean negative log-likelihood per target token over `clips` (LAVIS's LLM loss), each clip
    read in the view this epoch trains on."""
    model, opts = run.model, run.options
    views = [c.view(epoch, opts.seed) for c in clips]
    total, tokens = 0.0, 0
    for group in groups(clips, views):
        chosen = [clips[i] for i in group]
        with autocast(model):
            visual = clip_tokens(model, run.store, chosen, [views[i] for i in group], opts)
            ll, n = answer_log_likelihood(model, visual, [c.prompt for c in chosen], [c.target for c in chosen])
        total, tokens = total + ll.sum(), tokens + int(n.sum())
    return -total / tokens


def _train_epoch(run: _Run, epoch: int) -> tuple[float, float]:
    """One epoch from run.state.step on (a resumed epoch skips the steps already taken);
    returns (mean loss, last learning rate)."""
    model, opts = run.model, run.options
    batches = _batches(run, epoch)
    warmup = warmup_iterations(opts, len(batches) * len(batches[0]))
    iteration = opts.defaults.iteration
    run.events.epoch_started(epoch, opts.epochs, len(batches))
    losses, lr = [], WARMUP_START_LR
    for i in range(run.state.step, len(batches)):
        run.at_batch = i
        run.optimizer.zero_grad(set_to_none=True)
        seen, step_loss = i * len(batches[i]), 0.0
        for micro in np.array_split(batches[i], opts.accum):  # accum_grad_iters: gradients add up
            # LAVIS steps its schedule every iteration, a micro-batch included: by clips seen here.
            lr = learning_rate(epoch, seen / iteration, lr=opts.lr, epochs=opts.epochs, warmup_steps=warmup,
                               min_lr=opts.min_lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss = _micro_loss(run, [run.clips[j] for j in micro], epoch) / opts.accum
            loss.backward()
            seen, step_loss = seen + len(micro), step_loss + float(loss.detach())
        run.optimizer.step()
        run.state.step, run.state.steps = i + 1, run.state.steps + 1
        run.report.steps = run.state.steps
        losses.append(step_loss)
        run.events.step(i + 1, step_loss, lr)
    return float(np.mean(losses)) if losses else float("nan"), lr


def _config(run: _Run) -> dict:
    model, opts = run.model, run.options
    frames = max((c.frames for c in run.clips), default=opts.frames or 0)
    sched = {"task": opts.task, "lr_sched": "linear_warmup_cosine_lr", "init_lr": opts.lr, "min_lr": opts.min_lr,
             "warmup_lr": WARMUP_START_LR, "warmup_steps": opts.warmup_steps, "weight_decay": opts.weight_decay,
             "max_epoch": opts.epochs, "batch_size_train": opts.batch_size, "accum_grad_iters": opts.accum,
             "seed": opts.seed, "amp": model.device.type == "cuda"}
    extra = {**run.info, "state": run.state.to_dict()}
    return official_config(model, num_frames=frames, memory_bank_length=0 if opts.concat else opts.memory, run=sched,
                           extra=extra)


def _save(run: _Run, path: Path, **more) -> None:
    config = _config(run)
    config["malmm"].update(more)

    # ln_vision goes in when trained, and when the starting checkpoint overlaid it (an official
    # one): the result then stands alone, as the weights it was trained with.
    from malmm_cli.engine.loader import overlays_vision

    ln_vision = run.options.ln_vision or overlays_vision(run.model)

    def write(tmp: Path) -> None:
        save_checkpoint(tmp, run.model, config=config, optimizer=run.optimizer, epoch=max(run.state.epoch - 1, 0),
                        ln_vision=ln_vision)

    checkpoints.save(path, write)


def _finish_epoch(run: _Run, epoch: int, loss: float, lr: float, seconds: float) -> EpochStats:
    """Validate, keep the best (-o) and the last (.last.pth), write the metrics log."""
    val: Validation | None = None
    if run.with_val:
        val = validate(run.model, run.store, run.val, run.options, run.labels)
    best = val is not None and (run.state.best_score is None or val.score > run.state.best_score)
    stats = EpochStats(epoch + 1, run.options.epochs, loss, val.loss if val else None, val.metric if val else None,
                       val.name if val else None, seconds, best, lr)
    run.state.epoch, run.state.step = epoch + 1, 0
    run.state.history.append(stats.to_dict())
    if best:
        run.state.best_epoch, run.state.best_score = epoch + 1, val.score
    run.report.best_epoch = run.state.best_epoch
    _save(run, checkpoints.last_path(run.output) if run.with_val else run.output, epochs_done=epoch + 1)
    if best:
        _save(run, run.output, epochs_done=epoch + 1)
    checkpoints.write_metrics(checkpoints.metrics_path(run.output), run.state.history)
    return stats


def _loop(run: _Run) -> TrainReport:
    model, opts = run.model, run.options
    trained = freeze_for_training(model, ln_vision=opts.ln_vision)
    run.optimizer = make_optimizer(trained, opts)
    if run.resume_optimizer is not None:
        run.optimizer.load_state_dict(run.resume_optimizer)
    for epoch in range(run.state.epoch, opts.epochs):
        torch.manual_seed(opts.seed * 1000 + epoch)  # dropout: as reproducible as the batches
        t0 = time.perf_counter()
        loss, lr = _train_epoch(run, epoch)
        stats = _finish_epoch(run, epoch, loss, lr, time.perf_counter() - t0)
        run.report.epochs.append(stats)
        run.events.epoch_finished(stats)
    return run.report


def train(model: MALMM, items: Sequence[Item], options: TrainOptions, output: str | Path, *,
          val_items: Sequence[Item] | None = None, cache: FeatureCache | None = None, model_id: str | None = None,
          events: TrainEvents | None = None, run_info: dict | None = None, resume: dict | None = None) -> TrainReport:
    """Finetune `model` on `items` and write the checkpoint to `output` (after every epoch,
    atomically; with `val_items`, `output` keeps the best epoch and CKPT.last.pth the last).
    Raises :class:`Interrupted` on Ctrl-C, with the progress so far saved.

    `model_id` identifies the vision path for the feature cache (the CLI's
    ``loader.model_id``); without it the cache is not used. `run_info` goes into the
    checkpoint's ``config["malmm"]``. `resume`: {"state": TrainState, "optimizer": its state
    dict}, from a checkpoint of this run (checkpoints.read_resume).
    """
    with _thread_team(model):
        return _train(model, items, options, output, val_items=val_items, cache=cache, model_id=model_id,
                      events=events, run_info=run_info, resume=resume)


def _train(model, items, options: TrainOptions, output, *, val_items, cache, model_id, events, run_info,
           resume) -> TrainReport:
    options = options.resolved(model.trained_config)
    if not items:
        raise UsageError("There is nothing to train on: the data has no items.")
    items, val_items, labels, prompt = _labels(options, list(items), list(val_items or ()))
    options = replace(options, prompt=prompt)
    model.max_text_tokens = options.defaults.max_text_tokens  # LAVIS max_txt_len (classify configs: 30)
    cache = cache if model_id is not None else None
    session = Session.from_model(model, model_id=model_id, cache=cache)
    if labels:  # the labels are scored whole for the validation accuracy
        session.check_labels(labels, "The data's label set")
    events = events or TrainEvents()
    output = Path(output)
    store = FeatureStore(cache.scratch_dir() if cache is not None else None)
    report = TrainReport(output, options)
    state = resume["state"] if resume else TrainState()
    run = None
    try:
        total = len(items) + len(val_items)
        clips = prepare_clips(session, items, options, store, train=True,
                              progress=lambda done: events.features(done, total))
        val = prepare_clips(session, val_items, options, store, train=False,
                            progress=lambda done: events.features(len(items) + done, total))
        info = _run_info(options, labels, clips, run_info)
        run = _Run(model, options, output, store, clips, val, labels, events, info, report, state,
                   resume_optimizer=resume["optimizer"] if resume else None)
        report.steps = state.steps
        return _loop(run)
    except KeyboardInterrupt as stop:
        raise _interrupted(run, report, stop) from None
    finally:
        _settle(model, options, store, events, run)


def _labels(options: TrainOptions, items: list[Item], val_items: list[Item]):
    """classify's labels and prompt: a --label-set's (every target must be one of its labels,
    spelled as the set spells it), else the data's own labels; (items, val_items, labels, prompt)."""
    if options.task != "classify":
        if options.label_set is not None:
            raise UsageError("--label-set goes with --task classify.")
        return items, val_items, None, options.prompt
    if options.label_set is None:
        return items, val_items, sorted({i.target for i in items + val_items}), options.prompt
    from malmm_cli.engine.tasks import LABEL_SET_NAMES, load_label_set

    if options.label_set not in LABEL_SET_NAMES:
        raise UsageError(f"Unknown --label-set '{options.label_set}': choose one of {', '.join(LABEL_SET_NAMES)}.")
    chosen = load_label_set(options.label_set)
    if options.prompt not in (None, chosen.prompt):  # (a resumed run's options name the set's own)
        raise UsageError("--prompt goes without --label-set: a built-in label set trains with the paper's prompt.")
    spelled = {label.casefold(): label for label in chosen.labels}

    def aligned(rows: list[Item]) -> list[Item]:
        out = []
        for item in rows:
            label = item.target if item.target in chosen.labels else spelled.get(item.target.casefold())
            if label is None:
                raise UsageError(f"{item.where or f'row {item.index + 1}'}: the label {item.target!r} is not in "
                                 f"the label set {options.label_set}.")
            out.append(replace(item, target=label))
        return out

    return aligned(items), aligned(val_items), list(chosen.labels), chosen.prompt


def _run_info(options: TrainOptions, labels, clips: Sequence[Clip], run_info: dict | None) -> dict:
    """config["malmm"]: what the model was trained to answer, and the run (for --resume)."""
    prompt = clips[0].prompt if options.task != "ask" else "Question: {question} Short answer:"
    return {"task": options.task, "prompt": prompt, "label_set": options.label_set, "labels": labels,
            "concat": options.concat, "fps": options.fps, "train_items": len(clips),
            "options": options.summary(), **(run_info or {})}


def _settle(model: MALMM, options: TrainOptions, store: FeatureStore, events: TrainEvents, run) -> None:
    """After training (or its interruption): the model in memory is its last checkpoint, and
    runs as inference does (eval mode; ln_vision back in the ViT's dtype)."""
    events.close()
    store.close()
    if run is not None:
        model.trained_frames = max(c.frames for c in run.clips)
        model.memory_bank_length = options.memory
    if options.ln_vision:
        model.vision_model.post_layernorm.to(model.vision_dtype)
    model.eval()


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
    """Ctrl-C: save what the steps so far made of the weights (where --resume continues), and
    say where training stopped."""
    report.interrupted = True
    if run is None or run.optimizer is None or run.state.steps == 0:
        return Interrupted(report, False, "before the first training step", stop)
    epoch = run.state.epoch
    where = f"epoch {epoch + 1}/{run.options.epochs}, batch {run.at_batch + 1}"
    path = checkpoints.last_path(run.output) if run.with_val else run.output
    try:
        _save(run, path, epochs_done=epoch, interrupted_at={"epoch": epoch + 1, "batch": run.at_batch + 1})
    except MalmmError as err:
        log.warning("%s", err)
        return Interrupted(report, False, where, stop)
    return Interrupted(report, True, where, stop)


def load_for_training(source: str = "tiny-random", *, checkpoint: str | Path | None = None,
                      device: str | None = None) -> MALMM:
    """A model ready for :func:`train`: the ViT and LLM in the device's fast dtype, the trained
    parts in float32 from the start (not rounded through bf16)."""
    from models.loading import default_dtype, resolve_device

    dev = resolve_device(device)
    return MALMM.from_pretrained(source, checkpoint=checkpoint, dtype=default_dtype(dev), device=dev,
                                 qformer_dtype=torch.float32)
