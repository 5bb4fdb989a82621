"""Named models and per-task defaults: every default the CLI uses is defined here, once.

Task defaults follow the paper (method.md): prompts, frame counts, memory bank lengths and
answer lengths. Imported by ``malmm --help``, so this module must not import torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from malmm_cli.errors import UsageError

MODEL_ENV = "MALMM_MODEL"
PRECISION_ENV = "MALMM_PRECISION"
# The model's precision: auto = bf16 where the hardware runs it fast (CUDA with bf16, CPUs with
# AVX512-BF16 or AMX; fp16 on older GPUs), else fp32, and on a CPU the vision encoder in whichever
# of bf16 and fp32 runs faster there (timed at load); fp32 and bf16 pin every part.
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelPreset:
    name: str
    source: str  # hub id, or "tiny-random" (built locally)
    description: str
    download: str  # what fetching it costs
    hardware: str  # what running it needs
    download_bytes: int | None = None  # the files malmm fetches (the disk space a download needs)


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="instructblip-vicuna-7b",
            source="Salesforce/instructblip-vicuna-7b",
            description="InstructBLIP-Vicuna-7B with MA-LMM's memory bank (zero-shot; --checkpoint adds finetuned weights)",
            download="32 GB to fetch",
            hardware="GPU with 16 GB (bf16), 10 GB (8-bit) or 6 GB (4-bit); or a CPU with 20+ GB RAM (slow)",
            download_bytes=32 * 10**9,
        ),
        ModelPreset(
            name="tiny-random",
            source="tiny-random",
            description="tiny random weights: runs every command in seconds; its text is meaningless by design",
            download="about 1 MB, built locally",
            hardware="any CPU",
        ),
    )
}
DEFAULT_MODEL = "instructblip-vicuna-7b"

# The hub's rule for a repo id: owner/name, each of letters, digits, "-", "_", "."; neither
# starting nor ending with "-" or "."; no ".." or "--"; at most 96 characters.
_HUB_PART = r"(?![.-])(?!.*(?:\.\.|--))[\w.-]{1,96}(?<![.-])"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


@dataclass(frozen=True)
class ModelChoice:
    """What --model resolved to: a label for records and the source MALMM loads."""

    label: str
    source: str
    preset: ModelPreset | None


def resolve_model(value: str | None) -> ModelChoice:
    """--model NAME|PATH|HUB_ID (default: $MALMM_MODEL, else the default preset)."""
    value = value or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if value in PRESETS:
        preset = PRESETS[value]
        return ModelChoice(value, preset.source, preset)
    path = Path(value).expanduser()
    if path.is_dir():
        return ModelChoice(str(path), str(path), None)
    if path.exists():
        raise UsageError(f"--model '{value}' is a file; give a model folder (the Hugging Face layout), a preset "
                         "or a hub id.")
    if _HUB_ID.match(value):
        return ModelChoice(value, value, None)
    if value.startswith((".", "/", "~")) or value.count("/") > 1:  # a path: no hub id looks like it
        raise UsageError(f"The model folder '{value}' does not exist.")
    raise UsageError(
        f"Unknown model '{value}': use a preset ({', '.join(PRESETS)}), "
        "a local directory in the Hugging Face layout, or a hub id like org/name."
    )


@dataclass(frozen=True)
class Generation:
    """Decoding settings of one task, as the official configs and LAVIS's generate() use them
    (beam search, no sampling). ``max_new_tokens`` is LAVIS's max_len/max_length (with
    embeddings as input it counts only new tokens), ``min_new_tokens`` its min_len."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.5


@dataclass(frozen=True)
class TaskDefaults:
    """Paper defaults for one task. Sampling is `frames` spread uniformly (paper style) unless
    `fps` is set; the user's --fps / --frames override either."""

    prompt: str
    memory: int  # memory bank length M
    generation: Generation | None  # None: the task scores candidates instead of generating
    frames: int | None = None
    fps: float | None = None


# Captions: official cap_msrvtt/cap_msvd configs (max_len 50, min_len 1, 5 beams).
CAPTION_GENERATION = Generation(max_new_tokens=50)

TASK_DEFAULTS: dict[str, TaskDefaults] = {
    # Captioning: 80 frames, M=40 in the paper.
    "caption": TaskDefaults(prompt="what does the video describe?", frames=80, memory=40, generation=CAPTION_GENERATION),
    # Open-ended QA: 20 frames, M=10; LAVIS predict_answers: max_len 10, length_penalty 0.
    "ask": TaskDefaults(prompt="Question: {question} Short answer:", frames=20, memory=10,
                        generation=Generation(max_new_tokens=10, length_penalty=0.0)),
    # LVU / Breakfast / COIN classification: 100 frames, M=20 (prompts come with the label set);
    # labels are ranked by likelihood, nothing is generated.
    "classify": TaskDefaults(prompt="what is shown in the video?", frames=100, memory=20, generation=None),
    # Timestamped summaries need time coverage: sample by rate; each segment is a caption.
    "summarize": TaskDefaults(prompt="what does the video describe?", fps=1.0, memory=40,
                              generation=CAPTION_GENERATION),
}

SUMMARY_EVERY_SECONDS = 60.0  # default --every window when neither --every nor --scenes is given
TOP_K = 5  # classify --top-k default
SEGMENT_TOP_K = 3  # summarize --labels/--task: labels kept per segment (the report draws them as bars)
LOCKSTEP_TASKS = ("caption", "ask", "classify")  # --batch: whole videos in lockstep (a summary captions segments)

# malmm watch (a live stream): sampled by stream time, one record per window of stream time.
WATCH_FPS = 1.0  # --fps default
WATCH_EVERY_SECONDS = 10.0  # --every default: a record every 10 s of stream time
WATCH_RETRY_SECONDS = 30.0  # --retries default: how long a cut stream is reopened before giving up
WATCH_TASKS = ("caption", "ask", "classify")


def resolve_precision(value: str | None) -> str:
    """--precision, else $MALMM_PRECISION, else auto; anything else is a UsageError."""
    if value is not None:
        value = str(getattr(value, "value", value))
        where = "--precision"
    else:
        value, where = os.environ.get(PRECISION_ENV) or "auto", PRECISION_ENV
    if value not in PRECISIONS:
        raise UsageError(f"{where} is '{value}'; use one of {', '.join(PRECISIONS)}.")
    return value
