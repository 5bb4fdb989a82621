"""What to do with each video, from the options: the bounds every analysis option must keep,
and the one place where task defaults (presets.py), the options given, and a finetuned
checkpoint's trained settings are combined into a Job (tasks.py).

Torch-free: the command line checks options with it before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import replace

from malmm_cli.errors import UsageError

from .presets import SEGMENT_TOP_K, SUMMARY_EVERY_SECONDS, TASK_DEFAULTS, TOP_K
from .tasks import Job, classify_generation, custom_label_set, load_label_set, question_prompt

# Bounds checked before any model loads, each with the reason a user can act on.
MAX_MEMORY = 256  # slots: at InstructBLIP size each holds ~5 MB of banked keys/values; the paper uses <= 40
MAX_FPS = 1000.0  # no camera records faster; a typo (or inf) otherwise samples without end
MAX_FRAMES = 1_000_000  # each frame costs a ViT pass (~1 s on a CPU)
MAX_BEAMS = 16  # every beam holds its own LLM cache; the paper uses 5
MAX_NEW_TOKENS = 1024  # Vicuna's context is 2,048 tokens
MIN_EVERY_SECONDS = 0.5  # summary segments: shorter ones hold at most a frame or two
LABEL_SCORES = ("sum", "mean")  # classify: a label's log-likelihood summed over its tokens, or their mean
SCORINGS = ("likelihood", "generate")  # classify: rank every label, or generate and match (the official eval)


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, not {value}.")


def check_options(*, fps: float | None = None, frames: int | None = None, start: float | None = None,
                  end: float | None = None, memory: int | None = None, beams: int | None = None,
                  max_tokens: int | None = None, min_tokens: int | None = None, concat: bool = False,
                  checkpoint: bool = False) -> None:
    """The sampling, memory and decoding options within their bounds (a UsageError naming the
    option otherwise)."""
    if concat and memory is not None:
        raise UsageError("--concat has no memory bank: leave out --memory (or leave out --concat).")
    if min_tokens is not None and not 0 <= min_tokens <= (max_tokens or MAX_NEW_TOKENS):
        raise UsageError(f"--min-tokens must be from 0 to --max-tokens ({max_tokens or MAX_NEW_TOKENS}).")
    for name, value in (("--fps", fps), ("--start", start), ("--end", end)):
        _finite(name, value)
    if fps is not None and frames is not None:
        raise UsageError("Use either --fps or --frames, not both.")
    if fps is not None and not 0 < fps <= MAX_FPS:
        raise UsageError(f"--fps must be above 0 and at most {MAX_FPS:g} frames per second.")
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise UsageError(f"--frames must be from 1 to {MAX_FRAMES:,} (each frame costs a pass of the vision encoder).")
    if memory is not None and not 0 <= memory <= MAX_MEMORY:
        raise UsageError(f"--memory must be from 0 (no memory) to {MAX_MEMORY}: each slot holds the keys and values "
                         "of a frame, about 5 MB at InstructBLIP size (the paper uses 10 to 40).")
    if beams is not None and not 1 <= beams <= MAX_BEAMS:
        raise UsageError(f"--beams must be from 1 to {MAX_BEAMS} (each beam keeps its own LLM cache; the paper uses 5).")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-tokens must be from 1 to {MAX_NEW_TOKENS} (the LLM's context is 2,048 tokens).")
    if start is not None and start < 0:
        raise UsageError("--start must be 0 or more seconds.")
    if end is not None and end <= 0:
        raise UsageError("--end must be after 0 seconds.")
    if start is not None and end is not None and end <= start:
        raise UsageError(f"--end ({end:g} s) must be after --start ({start:g} s).")


def build_job(task: str, model_label: str, *, fps: float | None = None, frames: int | None = None,
              start: float | None = None, end: float | None = None, memory: int | None = None,
              beams: int | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
              concat: bool = False, checkpoint: bool = False, **args) -> Job:
    """Task defaults (presets.py) overridden by the options: the one place they are combined.

    `args` are the task's own: prompt (caption, summarize, classify), questions (ask),
    label_task or labels, top_k, label_score and scoring (classify), every or scenes, and
    optionally label_task or labels to classify each segment (summarize). `concat`: the
    paper's no-memory baseline instead of the memory bank.
    `checkpoint`: a finetuned checkpoint comes with the model, which may supply classify's
    label set and prompt. The job notes which settings were left to their defaults: a
    checkpoint's own values replace those when it is known (tasks.with_trained_defaults).
    """
    defaults = TASK_DEFAULTS[_known(task)]
    fps, frames, trained = _sampling(task, fps, frames)
    if memory is None:
        memory, trained = (0 if concat else defaults.memory), trained + (() if concat else ("memory",))
    scoring = _choice("--scoring", args.get("scoring"), SCORINGS) if task == "classify" else "likelihood"
    generation = classify_generation(args.get("label_task")) if scoring == "generate" else defaults.generation
    if generation is not None:
        overrides = {"num_beams": beams, "max_new_tokens": max_tokens, "min_new_tokens": min_tokens}
        generation = replace(generation, **{k: v for k, v in overrides.items() if v is not None})
        trained += ("max_tokens",) if max_tokens is None and task == "classify" else ()
    elif beams is not None or max_tokens is not None or min_tokens is not None:
        raise UsageError(f"--beams, --max-tokens and --min-tokens set how text is generated; {task} scores "
                         "labels instead (eval --scoring generate generates them).")
    common = dict(task=task, model_label=model_label, memory=memory, generation=generation, fps=fps, frames=frames,
                  start=start, end=end, concat=concat)
    if task in ("caption", "summarize"):
        return Job(prompts=(_prompt(args.get("prompt") or defaults.prompt),), trained_defaults=trained, **common,
                   **_segments(task, args))
    if task == "ask":
        questions = tuple(q.strip() for q in args["questions"])
        return Job(prompts=tuple(question_prompt(q) for q in questions), questions=questions,
                   trained_defaults=trained, **common)
    label_set, prompts, trained = _label_source(args, checkpoint, trained)
    return Job(label_set=label_set, prompts=prompts, top_k=args.get("top_k") or TOP_K, trained_defaults=trained,
               label_score=_choice("--label-score", args.get("label_score"), LABEL_SCORES), scoring=scoring,
               **common)


def _label_source(args: dict, checkpoint: bool, trained: tuple[str, ...]):
    """classify's (label set, prompts, trained_defaults): --task NAME, --labels with --prompt,
    or, with a checkpoint, what it was trained on (filled in by tasks.with_trained_defaults)."""
    label_task, labels, prompt = args.get("label_task"), args.get("labels"), args.get("prompt")
    if label_task is not None and labels is not None:
        raise UsageError("Give exactly one of --task (a built-in label set) or --labels (your own).")
    prompt = None if prompt is None else _prompt(prompt)
    if label_task is not None:
        if prompt:
            raise UsageError("--prompt goes with --labels; built-in label sets use the paper's prompt.")
        return load_label_set(label_task), (), trained
    unset = () if prompt else ("prompt",)
    if labels is not None:
        return custom_label_set(labels, prompt), (), trained + unset
    if not checkpoint:
        raise UsageError("Give exactly one of --task (a built-in label set) or --labels (your own), or a "
                         "--checkpoint trained on a label set.")
    return None, (() if prompt is None else (prompt,)), trained + ("labels",) + unset


def _choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str:
    if value is None:
        return allowed[0]
    if value not in allowed:
        raise UsageError(f"{name} must be {' or '.join(allowed)}, not '{value}'.")
    return value


def _label_set(args: dict, prompt: str | None):
    """The label set of --task NAME or --labels FILE|LIST (`prompt`: the instruction for --labels)."""
    if args.get("label_task") is not None:
        return load_label_set(args["label_task"])
    return custom_label_set(args["labels"], prompt)


def sampling_job(task: str, model_label: str, *, fps: float | None = None, frames: int | None = None,
                 start: float | None = None, end: float | None = None) -> Job:
    """A job that says only how to sample a video (engine Session.read): `task`'s default
    sampling where neither fps nor frames is given."""
    fps, frames, trained = _sampling(_known(task), fps, frames)
    return Job(task=task, model_label=model_label, memory=TASK_DEFAULTS[task].memory, fps=fps, frames=frames,
               start=start, end=end, trained_defaults=trained)


def _known(task: str) -> str:
    if task not in TASK_DEFAULTS:
        raise UsageError(f"Unknown task '{task}': choose one of {', '.join(TASK_DEFAULTS)}.")
    return task


def _sampling(task: str, fps: float | None, frames: int | None) -> tuple[float | None, int | None, tuple[str, ...]]:
    """(fps, frames, trained_defaults): the options, else the task's defaults, which a
    checkpoint's trained frame count may then replace."""
    if fps is None and frames is None:
        return TASK_DEFAULTS[task].fps, TASK_DEFAULTS[task].frames, ("frames",)
    return fps, frames, ()


def _prompt(text: str) -> str:
    prompt = text.strip()
    if not prompt:
        raise UsageError("--prompt is empty.")
    return prompt


def _segments(task: str, args: dict) -> dict:
    """summarize's segment options: every (default SUMMARY_EVERY_SECONDS) or scenes."""
    if task != "summarize":
        return {}
    if args.get("scenes") and args.get("every") is not None:
        raise UsageError("Use either --every or --scenes, not both.")
    every = args.get("every") if args.get("every") is not None else SUMMARY_EVERY_SECONDS
    if not (math.isfinite(every) and every >= MIN_EVERY_SECONDS):
        raise UsageError(f"--every must be at least {MIN_EVERY_SECONDS:g} s: each segment gets its own "
                         "caption from the LLM.")
    segments = dict(every=every, scenes=bool(args.get("scenes")))
    # Optional: each segment's top labels as well, scored as classify scores them (the prompt of
    # the label set, or classify's default for --labels: summarize's --prompt is the caption's).
    if args.get("label_task") is not None and args.get("labels") is not None:
        raise UsageError("Give at most one of --task (a built-in label set) or --labels (your own).")
    if args.get("label_task") is not None or args.get("labels") is not None:
        segments.update(label_set=_label_set(args, None), top_k=SEGMENT_TOP_K)
    return segments
