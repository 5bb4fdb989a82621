"""The examples a training run learns from: each data row's instruction, its target as the official
training data normalises it, and its vision features, computed once per view and kept in one
temporary file (constant RAM whatever the data set's size).

A view is one draw of the official training sampling (engine/augment.py): a random frame in each
of T segments, one random crop and flip for the clip. The official code draws anew every epoch,
which runs the ViT on every frame of every epoch; here K views per clip are drawn once (``--views
K``), cached, and each epoch takes one of them, so the ViT runs K x T times per clip however many
epochs follow. Validation clips take the eval sampling, one view, as every command reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from malmm_cli.engine.augment import even_frames, random_augment, segment_frames
from malmm_cli.engine.features import FrameStore
from malmm_cli.engine.presets import TASK_DEFAULTS
from malmm_cli.engine.tasks import normalize_caption, normalize_question, question_prompt
from malmm_cli.errors import MalmmError, write_failure

from .dataset import Item
from .recipe import TrainOptions


@dataclass(frozen=True)
class Clip:
    """One example: what to ask and answer, and where each of its views' features are."""

    item: Item
    prompt: str
    target: str  # normalised as the official training data does (train_target)
    views: tuple[tuple[int, int], ...]  # (first row in the FeatureStore, frames) per view

    @property
    def frames(self) -> int:
        return self.views[0][1]

    def view(self, epoch: int, seed: int) -> tuple[int, int]:
        """The view an epoch trains on: every view once per K epochs, in an order of its own."""
        k = len(self.views)
        if k == 1:
            return self.views[0]
        order = np.random.default_rng([seed, self.item.index, epoch // k]).permutation(k)
        return self.views[int(order[epoch % k])]


def training_prompt(task: str, item: Item, prompt: str | None = None) -> str:
    """The instruction for an item (Q-Former instruction and LLM prompt), exactly the one the
    matching command uses at inference: classify and caption the task's prompt (or ``prompt``,
    e.g. a label set's), ask the question in the paper's QA template."""
    if task == "ask":
        return question_prompt(item.question or "")
    return (prompt or TASK_DEFAULTS[task].prompt).strip()


def train_target(task: str, target: str) -> str:
    """What the loss teaches, as the official training data gives it: a caption through LAVIS's
    pre_caption (lowercase, .!"()*#:;~ to spaces, at most 50 words), an answer through
    pre_question (lowercase, those characters removed), a label as it is (the official data
    asserts its labels are already in that form). Eval compares with the raw references."""
    if task == "caption":
        return normalize_caption(target)
    if task == "ask":
        return normalize_question(target)
    return target


class FeatureStore:
    """Every clip's features in one temporary file: read back per batch, never all in RAM."""

    def __init__(self, directory=None):
        self.store = FrameStore(directory)
        self.directory = directory

    def add(self, features) -> tuple[int, int]:
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

    def read(self, view: tuple[int, int]):
        start, frames = view
        return self.store.read(start, start + frames)

    def close(self) -> None:
        self.store.close()


def _views(session, item: Item, options: TrainOptions, store: FeatureStore, train: bool) -> tuple:
    """The item's views' features into `store`: the eval sampling (validation, --no-augment, a
    rate), or `options.views` draws of the official training sampling."""
    plain = not (train and options.augment) or options.fps is not None
    if plain:
        return (store.add(session.features(item.video, frames=options.frames, fps=options.fps,
                                           pre_norm=options.ln_vision)),)
    from malmm_cli.sources.video import probe

    info = probe(item.video)
    height, width = info.height, info.decode_width or info.width
    views = []
    for k in range(options.views):
        rng = np.random.default_rng([options.seed, item.index, k])
        # LVU's training data takes its window's frames evenly (lvu_cls_datasets.py); the others jitter.
        jitter = not (options.label_set or "").startswith("lvu_")
        frames = segment_frames(rng, info.frame_count, options.frames) if jitter else even_frames(
            info.frame_count, options.frames)
        augment = random_augment(rng, height, width)
        views.append(store.add(session.features(item.video, indices=frames, augment=augment,
                                                pre_norm=options.ln_vision)))
    return tuple(views)


def prepare_clips(session, items: Sequence[Item], options: TrainOptions, store: FeatureStore, *, train: bool,
                  progress: Callable[[int], None] | None = None) -> list[Clip]:
    """Features of every item into `store` (the ViT once per view, through the session's feature
    path and the feature cache the other commands use), as Clips."""
    clips = []
    for i, item in enumerate(items):
        views = _views(session, item, options, store, train)
        prompt = training_prompt(options.task, item, options.prompt)
        clips.append(Clip(item, prompt, train_target(options.task, item.target), views))
        if progress is not None:
            progress(i + 1)
    return clips
