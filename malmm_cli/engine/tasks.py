"""What each command asks the model: prompts, label sets, and summary segments.

Label sets are package data (``labels/label_sets.json``: LVU's seven tasks, Breakfast, COIN
with its 180 tasks as readable phrases), with the prompts the paper used for each.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from malmm_cli.errors import UsageError
from malmm_cli.results.records import SlotSpan
from .presets import TASK_DEFAULTS, Generation
from malmm_cli.sources.textfiles import MAX_LABEL_CHARS, MAX_LABELS, check_length, lines, open_regular

LVU_TASKS = ("relationship", "way_speaking", "scene", "director", "genre", "writer", "year")
LABEL_SET_NAMES = tuple(f"lvu_{t}" for t in LVU_TASKS) + ("coin", "breakfast")


@dataclass(frozen=True)
class LabelSet:
    name: str
    prompt: str
    labels: tuple[str, ...]


@cache
def _label_data() -> dict:
    return json.loads(resources.files("malmm_cli.labels").joinpath("label_sets.json").read_text())


def load_label_set(name: str) -> LabelSet:
    """A built-in label set by name (see LABEL_SET_NAMES)."""
    data = _label_data()
    if name.startswith("lvu_") and name[4:] in LVU_TASKS:
        task = name[4:]
        # The paper's prompt uses the task key as is ("way_speaking" included).
        return LabelSet(name, data["lvu"]["prompt"].format(task=task), tuple(data["lvu"]["tasks"][task]))
    if name == "breakfast":
        return LabelSet(name, data["breakfast"]["prompt"], tuple(data["breakfast"]["labels"]))
    if name == "coin":
        return LabelSet(name, data["coin"]["prompt"], tuple(t["label"] for t in data["coin"]["targets"]))
    raise UsageError(f"Unknown task '{name}': choose one of {', '.join(LABEL_SET_NAMES)}, or use --labels.")


def custom_label_set(spec: str | Sequence[str], prompt: str | None) -> LabelSet:
    """--labels FILE (one label per line, '#' starts a comment, or a JSON list) or "a,b,c"; or
    the labels themselves as a list, never taken for a file (a server's clients name no files)."""
    path = Path(spec).expanduser() if isinstance(spec, str) else None
    if path is None:
        raw = list(spec)
    elif path.exists():
        raw = _label_file(path)
    elif "," in spec or not (path.suffix or "/" in spec):
        raw = spec.split(",")
    else:
        raise UsageError(f"Labels file '{spec}' does not exist (or give labels inline: --labels \"a,b,c\").")
    labels = tuple(dict.fromkeys(label.strip() for label in raw if label.strip()))
    if len(labels) < 2:
        raise UsageError(f"--labels needs at least two different labels, got {len(labels)}.")
    check_labels(labels, "--labels")
    return LabelSet("custom", prompt or TASK_DEFAULTS["classify"].prompt, labels)


def label_set_name(label_set: LabelSet) -> str:
    """How messages name a label set: the option or data it came from, or its built-in name."""
    return {"custom": "--labels", "data": "The data's label set"}.get(label_set.name, f"--label-set {label_set.name}")


def check_labels(labels, where: str) -> None:
    """A label set within bounds (sources/textfiles.py): at most MAX_LABELS labels, each of at most
    MAX_LABEL_CHARS characters; checked before any model loads."""
    if len(labels) > MAX_LABELS:
        raise UsageError(f"{where}: {len(labels):,} labels; the limit is {MAX_LABELS:,} (each is scored for "
                         "every video).")
    for label in labels:
        check_length(label, MAX_LABEL_CHARS, where, f"label {label if len(label) <= 40 else label[:37] + '...'!r}")


def _label_file(path: Path) -> list[str]:
    """The labels of a --labels file, read within bounds: a JSON list (.json) or one per line."""
    with open_regular(path, "labels file") as f:
        if path.suffix.lower() == ".json":
            limit = MAX_LABELS * (4 * MAX_LABEL_CHARS + 8)  # the largest list within the bounds, in bytes
            data = f.read(limit + 1)
            if len(data) > limit:
                raise UsageError(f"Labels file '{path}' is larger than {limit // 2**20} MB; it cannot hold a "
                                 f"label set within the limits ({MAX_LABELS:,} labels).")
            try:
                raw = json.loads(data.decode("utf-8-sig"))
            except UnicodeDecodeError:
                raise UsageError(f"Labels file '{path}' is not UTF-8 text.") from None
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from None
            except (RecursionError, ValueError):
                raise UsageError(f"Labels file '{path}' must hold a JSON list of strings.") from None
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise UsageError(f"Labels file '{path}' must hold a JSON list of strings.")
            return raw
        seen: dict[str, None] = {}
        for line in lines(f, path):
            label = line.split("#", 1)[0].strip()
            if label and label not in seen:
                seen[label] = None
                if len(seen) > MAX_LABELS:
                    raise UsageError(f"Labels file '{path}' holds more than {MAX_LABELS:,} labels; the limit is "
                                     f"{MAX_LABELS:,} (each is scored for every video).")
        return list(seen)


@dataclass(frozen=True)
class Job:
    """What to do with each video; built once per command from the options and presets."""

    task: str  # caption | ask | classify | summarize
    model_label: str
    memory: int
    generation: Generation | None = None  # None for classify (labels are scored, not generated)
    fps: float | None = None
    frames: int | None = None
    start: float | None = None
    end: float | None = None
    prompts: tuple[str, ...] = ()  # the instruction (caption, summarize) or one prompt per question
    questions: tuple[str, ...] = ()
    label_set: LabelSet | None = None
    top_k: int = 5
    every: float | None = None
    scenes: bool = False
    antialias: bool = True
    # Which of "frames", "memory", "labels" and "prompt" were left to the defaults: a finetuned
    # checkpoint's trained values replace those once it is known (with_trained_defaults).
    trained_defaults: tuple[str, ...] = ()
    # Fields added after records first carried job keys: left out of the key at their default
    # (results/jobkey.py), so work recorded before them still counts as done.
    concat: bool = field(default=False, metadata={"key_if_set": True})  # the no-memory baseline
    label_score: str = field(default="sum", metadata={"key_if_set": True})  # classify: sum | mean
    scoring: str = field(default="likelihood", metadata={"key_if_set": True})  # classify: likelihood | generate

    @property
    def prompt(self) -> str:
        """The instruction (Q-Former instruction and LLM prompt) records carry: classify's label
        set's, caption's and summarize's own, and for ask the template each question fills."""
        if self.label_set is not None:
            return self.label_set.prompt
        if self.task == "ask":
            return TASK_DEFAULTS["ask"].prompt
        return self.prompts[0] if self.prompts else TASK_DEFAULTS[self.task].prompt


_QUESTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
QUESTION_MAX_WORDS = 50


def normalize_question(question: str) -> str:
    """The question as the official QA data saw it (LAVIS ``pre_question``): lowercased, the
    characters .!"()*#:; and ~ removed, trailing spaces dropped, at most 50 words."""
    text = _QUESTION_PUNCTUATION.sub("", question.lower()).rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:QUESTION_MAX_WORDS]) if len(words) > QUESTION_MAX_WORDS else text


_CAPTION_PUNCTUATION = _QUESTION_PUNCTUATION
_WHITESPACE_RUN = re.compile(r"\s{2,}")
CAPTION_MAX_WORDS = 50


def normalize_caption(caption: str) -> str:
    """A caption as the official training data feeds it to the loss (LAVIS ``pre_caption``):
    lowercased, each of .!"()*#:;~ replaced by a space, runs of two or more whitespace
    characters made one space, a trailing newline and outer spaces dropped, at most 50 words."""
    text = _WHITESPACE_RUN.sub(" ", _CAPTION_PUNCTUATION.sub(" ", caption.lower()))
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:CAPTION_MAX_WORDS]) if len(words) > CAPTION_MAX_WORDS else text


def question_prompt(question: str) -> str:
    """The prompt (Q-Former instruction and LLM prompt) for a question; records keep the
    user's own text."""
    question = question.strip()
    if not normalize_question(question).strip():
        raise UsageError("A question is empty." if not question else f"The question {question!r} has no words.")
    return TASK_DEFAULTS["ask"].prompt.format(question=normalize_question(question))


def with_trained_defaults(job: Job, trained) -> Job:
    """A finetuned checkpoint's own settings where the user set none (job.trained_defaults):
    its frame count (for the tasks sampled by frame count; summaries keep their rate), its
    memory bank length (or the no-memory baseline it was trained as), and for classify its
    label set and prompt. `trained` is the model's TrainedConfig, or None. Applying it twice
    changes nothing more. A classify job the checkpoint cannot complete is a UsageError."""
    changes = {}
    if trained is not None:
        if "memory" in job.trained_defaults and trained.concat:
            changes["concat"] = True
        if "memory" in job.trained_defaults and trained.memory_bank_length is not None:
            changes["memory"] = trained.memory_bank_length
        if "frames" in job.trained_defaults and trained.num_frames and job.frames is not None:
            changes["frames"] = trained.num_frames
    if job.task == "classify" and ({"labels", "prompt"} & set(job.trained_defaults)):
        changes["label_set"] = trained_label_set(job, trained)
        if job.scoring == "generate" and "max_tokens" in job.trained_defaults:
            changes["generation"] = replace(job.generation, max_new_tokens=classify_generation(
                changes["label_set"].name).max_new_tokens)
    return replace(job, **changes) if changes else job


def official_label_set(trained) -> str | None:
    """The built-in label set of an official checkpoint's dataset (its config's ``datasets``):
    breakfast_cls, coin_cls, and lvu_cls with its task."""
    for dataset in trained.datasets:
        if dataset == "breakfast_cls":
            return "breakfast"
        if dataset == "coin_cls":
            return "coin"
        if dataset == "lvu_cls" and trained.dataset_task in LVU_TASKS:
            return f"lvu_{trained.dataset_task}"
    return None


def trained_label_set(job: Job, trained) -> LabelSet:
    """classify's label set and prompt where the options leave them to the checkpoint: its own
    label set (malmm's name, or an official checkpoint's dataset), else the labels it was
    trained on; the prompt it was trained with unless --prompt is given."""
    label_set = job.label_set
    if "labels" in job.trained_defaults:
        name = None if trained is None else trained.label_set or official_label_set(trained)
        if name is not None:
            label_set = load_label_set(name)
        elif trained is not None and trained.labels and len(trained.labels) >= 2:
            label_set = LabelSet("checkpoint", TASK_DEFAULTS["classify"].prompt, tuple(trained.labels))
        else:
            raise UsageError("Give the labels to score (--task NAME or --labels): the checkpoint names no label "
                             "set." if trained is not None else "Give exactly one of --task (a built-in label "
                             "set) or --labels (your own), or a --checkpoint trained on a label set.")
    prompt = job.prompts[0] if job.prompts else label_set.prompt
    if "prompt" in job.trained_defaults and trained is not None and trained.prompt:
        prompt = trained.prompt
    return replace(label_set, prompt=prompt)


def trained_prompt_note(job: Job, trained) -> str | None:
    """A warning when the instruction a classify job asks differs from the one the checkpoint
    was trained with (a model answers the prompt it learnt; another one costs accuracy)."""
    if trained is None or job.label_set is None or not trained.prompt and not official_label_set(trained):
        return None
    learnt = trained.prompt or load_label_set(official_label_set(trained)).prompt
    if job.label_set.prompt == learnt:
        return None
    return (f"the checkpoint was trained with the prompt {learnt!r}; this asks {job.label_set.prompt!r} "
            "(leave out --task/--prompt to ask what it learnt)")


def classify_generation(label_set_name: str | None) -> Generation:
    """The official classification eval's decoding (classification.py with the cls configs):
    5 beams, all 5 returned, at most 20 new tokens (LVU: 5), at least 1, repetition penalty 1.5,
    length penalty 1."""
    return Generation(num_beams=5, max_new_tokens=5 if (label_set_name or "").startswith("lvu_") else 20)


def label_scores(job: Job, tokenizer, summed) -> np.ndarray:
    """[B, K] scores of the labels from their summed log-likelihoods (a tensor, EOS included):
    as they are, or with --label-score mean over the label's tokens, which takes away the head
    start a short label has (every token costs log-probability)."""
    loglik = summed.double().numpy()
    if job.label_score == "mean":
        ids = tokenizer(list(job.label_set.labels), add_special_tokens=False).input_ids
        loglik = loglik / np.array([len(x) + 1 for x in ids], dtype=np.float64)
    return loglik


def ranked_labels(job: Job, scores: np.ndarray) -> dict:
    """classify's result fields from one video's label scores: the top k with probabilities."""
    from malmm_cli.results.records import LabelScore

    labels = job.label_set
    probs = probabilities(scores)
    order = np.argsort(-probs, kind="stable")[: job.top_k]
    ranked = tuple(LabelScore(labels.labels[i], round(float(probs[i]), 6)) for i in order)
    return {"labels": ranked, "label_set": labels.name, "label_score": job.label_score}


def probabilities(log_likelihoods: np.ndarray) -> np.ndarray:
    """Softmax over the label set: P(label | video, prompt, the answer is one of the labels)."""
    z = log_likelihoods - log_likelihoods.max()
    p = np.exp(z)
    return p / p.sum()


# ---- summary segments -----------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    frames: tuple[int, ...]  # positions in the sampling (0-based) whose timestamp falls inside


def _assign(bounds: list[float], timestamps: np.ndarray) -> list[Segment]:
    """Tile [bounds[0], bounds[-1]] into segments, each with the sampled frames inside it.

    Every frame lands in exactly one window (start inclusive; the last window also takes its
    end, and frames a rounding error outside the span go to the nearest end). Windows with
    no frame merge into the previous one (the first into the next), so every segment has
    frames and the tiling stays gap-free.
    """
    bounds = [float(b) for b in bounds]
    n_windows = len(bounds) - 1
    window = np.clip(np.searchsorted(bounds, timestamps, side="right") - 1, 0, n_windows - 1)
    # Timestamps are sorted, so each window's frames are one run: split once, O(frames + windows).
    cuts = np.searchsorted(window, np.arange(1, n_windows), side="left")
    per_window = np.split(np.arange(len(window)), cuts)
    segments: list[Segment] = []
    for w in range(n_windows):
        frames = tuple(int(i) for i in per_window[w])
        if frames and segments and not segments[-1].frames:  # an empty first window
            segments[-1] = Segment(segments[-1].start, bounds[w + 1], frames)
        elif frames or not segments:
            segments.append(Segment(bounds[w], bounds[w + 1], frames))
        else:
            segments[-1] = Segment(segments[-1].start, bounds[w + 1], segments[-1].frames)
    return segments


def fixed_segments(start: float, end: float, every: float, timestamps: np.ndarray) -> list[Segment]:
    """Windows of `every` seconds from `start`; the last one ends at `end`. A last window
    shorter than a quarter of `every` joins the one before it (a 0.3 s cue at the end of a
    subtitle file is a sliver nobody wants to read)."""
    if every <= 0:
        raise UsageError("--every must be a positive number of seconds.")
    n = max(1, math.ceil((end - start) / every - 1e-9))
    if n > 1 and end - (start + (n - 1) * every) < every / 4:
        n -= 1
    bounds = [start + i * every for i in range(n)] + [end]
    return _assign(bounds, timestamps)


def scene_segments(start: float, end: float, timestamps: np.ndarray, change: np.ndarray,
                   min_seconds: float | None = None) -> list[Segment]:
    """Boundaries where consecutive frames' visual features change most.

    ``change[t]`` is the feature distance between sampled frames t-1 and t (change[0] = 0).
    Candidates are changes more than one standard deviation above the mean; the largest are
    taken first, each at least ``min_seconds`` (default: a 50th of the span, at least two
    sampling intervals) from the boundaries already chosen.
    """
    n = len(timestamps)
    if n < 3:
        return _assign([start, end], timestamps)
    interval = float(np.median(np.diff(timestamps)))
    min_seconds = min_seconds if min_seconds is not None else max(2 * interval, (end - start) / 50)
    d = change[1:]
    threshold = d.mean() + d.std()
    chosen: list[float] = []
    for t in np.argsort(-d, kind="stable") + 1:
        if change[t] <= threshold:
            break
        at = float(timestamps[t])
        if min(abs(at - b) for b in [start, end, *chosen]) >= min_seconds:
            chosen.append(at)
    return _assign([start, *sorted(chosen), end], timestamps)


# ---- what the memory holds ------------------------------------------------------------


def memory_timeline(memory, timestamps: np.ndarray, end: float) -> tuple[tuple[SlotSpan, ...], tuple[float, ...]]:
    """(slots, compressions_at) of a stream that read the frames at `timestamps`, in order:
    the summary's picture of its memory. `memory` is the stream's models BankStatus at the end;
    `end` the end of the sampled range.

    Slot s holds, at each token position, the frames counted by that position's slot s, and
    a position's counts, oldest slot first, sum to the frames seen (method.md, MBC). So slot s
    covers frames slot_spans[s] (first, last, over all positions); as a span of video it runs
    from its first frame's time to the next frame's time (the range's end after the last
    frame), and stands for slot_frames[s] frames (mean over positions). Every step that takes
    the bank past M compresses it once, and the bank fills at M frames: the compressions
    happened at the last `compressions` frames read.
    """
    n = memory.frames_seen
    if n != len(timestamps):
        raise ValueError(f"{len(timestamps)} timestamps for a stream that read {n} frames")
    times = [float(t) for t in timestamps] + [float(end)]
    slots = tuple(SlotSpan(round(times[first], 3), round(times[last + 1], 3), round(frames, 3))
                  for (first, last), frames in zip(memory.slot_spans, memory.slot_frames))
    compressions_at = tuple(round(t, 3) for t in times[n - memory.compressions : n])
    return slots, compressions_at
