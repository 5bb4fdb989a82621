"""Validation after every epoch: the loss on the validation clips, and the task metric the
official runner picks the best epoch by (``runner_base.py`` lines 400-409 keep the epoch whose
``agg_metrics`` is highest as ``checkpoint_best.pth``):

- classify: top-1 accuracy, every label ranked by its likelihood (as `malmm classify` does);
- ask: exact match of the generated answer with the raw answer (``vqa.py``), generated with
  the task's decoding (5 beams, at most 10 tokens, length penalty 0);
- caption: CIDEr of the generated captions against the raw captions of each video (the
  official agg_metrics adds BLEU-4, METEOR and ROUGE-L; CIDEr is the one the paper reports
  beside METEOR, and needs no Java). Without pycocoevalcap, the loss decides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from models import MALMM
from models.training import (answer_log_likelihood, apply_ln_vision, candidate_log_likelihoods,
                             tokenize_instructions, visual_tokens)

from malmm_cli.engine.presets import TASK_DEFAULTS, Generation

from .clips import Clip, FeatureStore
from .recipe import CAPTION_PRESETS, TrainOptions

METRICS = {"classify": "accuracy", "ask": "exact_match", "caption": "cider"}


@dataclass(frozen=True)
class Validation:
    loss: float  # per target token
    metric: float | None  # the task metric (METRICS[task]); None: not computable (the loss decides)
    name: str

    @property
    def score(self) -> float:
        """What the best epoch maximises: the metric, else minus the loss."""
        return self.metric if self.metric is not None else -self.loss


def autocast(model: MALMM):
    """bf16 autocast on a GPU (the trained weights and the AdamW state stay float32)."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def groups(clips: Sequence[Clip], views: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Positions of clips whose views have equal frame counts: each group runs as one batch."""
    counts = [v[1] for v in views]
    return [[i for i, n in enumerate(counts) if n == c] for c in sorted(set(counts))]


def clip_tokens(model: MALMM, store: FeatureStore, clips: Sequence[Clip], views: Sequence[tuple[int, int]],
                options: TrainOptions) -> torch.Tensor:
    """[B, 32 (or T * 32), D]: what the LLM sees of each clip (same frame count for all)."""
    feats = torch.stack([store.read(v) for v in views]).to(model.device)  # [B, T, P, C]
    if options.ln_vision:
        feats = apply_ln_vision(model, feats)
    return visual_tokens(model, feats, tokenize_instructions(model, [c.prompt for c in clips]), options.memory,
                         concat=options.concat)


@dataclass
class _Tokens:
    """Visual tokens of a batch of clips, as MALMM.generate takes a stream."""

    instructions: list[str]
    tokens: torch.Tensor

    def visual_tokens(self) -> torch.Tensor:
        return self.tokens


def generation(options: TrainOptions) -> Generation:
    if options.task == "caption" and options.preset:
        return CAPTION_PRESETS[options.preset].generation
    return TASK_DEFAULTS[options.task].generation


@torch.no_grad()
def validate(model: MALMM, store: FeatureStore, clips: Sequence[Clip], options: TrainOptions,
             labels: Sequence[str] | None) -> Validation:
    """The loss and the task metric on `clips` (one view each), in eval mode."""
    was_training = model.qformer.training
    model.qformer.eval()
    total, tokens, right, predictions = 0.0, 0, 0, {}
    try:
        for start in range(0, len(clips), options.batch_size):
            batch = clips[start : start + options.batch_size]
            for group in groups(batch, [c.views[0] for c in batch]):
                chosen = [batch[i] for i in group]
                with autocast(model):
                    visual = clip_tokens(model, store, chosen, [c.views[0] for c in chosen], options)
                    prompts = [c.prompt for c in chosen]
                    ll, n = answer_log_likelihood(model, visual, prompts, [c.target for c in chosen])
                    total, tokens = total + float(ll.sum()), tokens + int(n.sum())
                    if options.task == "classify" and labels:
                        best = candidate_log_likelihoods(model, visual, prompts, labels).argmax(dim=1)
                        right += sum(labels[int(k)] == c.item.target for k, c in zip(best, chosen))
                    elif options.task != "classify":
                        texts = model.generate(_Tokens(prompts, visual), prompts, **asdict(generation(options)))
                        predictions.update((c.item.index, t) for c, t in zip(chosen, texts))
    finally:
        model.qformer.train(was_training)
    loss = -total / max(tokens, 1)
    return Validation(loss, _metric(options.task, clips, right, predictions, labels), METRICS[options.task])


def _metric(task: str, clips: Sequence[Clip], right: int, predictions: dict, labels) -> float | None:
    from .evaluate import exact_match

    if task == "classify":
        return right / len(clips) if labels else None
    if task == "ask":
        return sum(exact_match(predictions[c.item.index], c.item.target) for c in clips) / len(clips)
    try:
        from .evaluate import caption_scores
    except ImportError:
        return None
    references: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for c in clips:  # the rows naming a video are its references (as eval gathers them)
        references.setdefault(c.item.video, []).append(c.item.target)
        first.setdefault(c.item.video, c.item.index)
    records = [{"references": refs, "prediction": predictions[first[v]]} for v, refs in references.items()]
    return caption_scores(records, metrics=("cider",)).get("cider")
