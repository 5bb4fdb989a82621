"""Result records: one per input, as in architecture.md. Times are float seconds."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from malmm_cli import __version__

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def to_json(obj: Any, **kwargs) -> str:
    """JSON as our records are written: UTF-8 text as is (not \\u-escaped), except lone
    surrogates, which are JSON-escaped (`"\\udcff"`). A file name that is not valid UTF-8
    holds them (Python decodes its bad bytes with surrogateescape): so the record is valid
    UTF-8, and `os.fsencode(json.loads(line)["input"])` gives back the name's bytes."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    # json.dumps leaves characters inside strings raw, so each lone surrogate is in a string.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


@dataclass(frozen=True)
class VideoMeta:
    duration: float
    fps: float
    width: int
    height: int


@dataclass(frozen=True)
class SamplingMeta:
    fps: float | None  # None when frames were spread uniformly (paper style)
    frames: int
    start: float
    end: float


@dataclass(frozen=True)
class SlotSpan:
    """What one memory slot holds at the end: the span of video [start, end) its frames come
    from (over all token positions) and how many frames it stands for (mean over positions)."""

    start: float
    end: float
    frames: float


@dataclass(frozen=True)
class MemoryMeta:
    length: int  # M, the bank capacity used
    compressions: int
    # Summaries only (engine.tasks.memory_timeline): the whole-video stream's slots at the end,
    # oldest first, and the time of each frame whose step compressed the bank.
    slots: tuple[SlotSpan, ...] | None = None
    compressions_at: tuple[float, ...] | None = None
    concat: bool = False  # the paper's no-memory baseline: every frame's query tokens went to the LLM


@dataclass(frozen=True)
class GenerationMeta:
    """How the text was decoded (beam search; see presets.Generation)."""

    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float
    repetition_penalty: float


def now() -> str:
    """This moment as records hold it: ISO 8601, local time with its UTC offset, to the second."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class MadeBy:
    """What made a record, in the record: --resume appends the records of many runs to one file,
    so each line says for itself which malmm, weights and precision computed it, and when."""

    checkpoint: dict[str, str] | None  # {"path": as loaded, "sha256": the first 16 hex digits of its bytes}
    device: str  # cpu | cuda
    dtype: dict[str, str]  # each part's precision: vision, qformer, llm (float32, bfloat16, float16)
    quant: str  # the LLM's weights: none | 8bit | 4bit
    malmm_version: str = __version__
    created: str = field(default_factory=now)

    def fields(self) -> dict[str, Any]:
        """As a record holds them, in this order."""
        return {"malmm_version": self.malmm_version, "checkpoint": self.checkpoint, "device": self.device,
                "dtype": dict(self.dtype), "quant": self.quant, "created": self.created}


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    prompt: str | None = None  # the instruction this question became (the record's "prompt" filled in)


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float  # probability over the label set (sums to 1 over all labels)


@dataclass(frozen=True)
class SegmentText:
    start: float
    end: float
    text: str
    labels: tuple[LabelScore, ...] | None = None  # summarize --labels/--task: the segment's top labels


@dataclass(frozen=True)
class Segmentation:
    """How a summary was cut: fixed windows of `every` seconds, or at scene changes."""

    every: float | None
    scenes: bool


@dataclass(frozen=True)
class Result:
    input: str
    task: str  # caption | ask | classify | summarize
    model: str
    video: VideoMeta
    sampling: SamplingMeta
    memory: MemoryMeta
    timings: dict[str, float]
    prompt: str | None = None  # the instruction the model was given (ask: the template each question fills)
    text: str | None = None
    answers: tuple[Answer, ...] | None = None
    labels: tuple[LabelScore, ...] | None = None
    label_set: str | None = None
    segments: tuple[SegmentText, ...] | None = None
    summary: str | None = None
    segmentation: Segmentation | None = None  # summarize
    generation: GenerationMeta | None = None  # set when text was generated (not for classify)
    beams: tuple[str, ...] | None = None  # classify scored by generation (the official eval): the beams, best first
    label_score: str | None = None  # classify by likelihood: "sum" or "mean" of the label's token log-probabilities
    made_by: MadeBy | None = None  # the engine sets it; a record shows its fields at top level
    warnings: tuple[str, ...] = field(default_factory=tuple)
    job: str | None = None  # jobkey.job_key: which work this is, for --resume; last, out of a reader's way

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        for key in ("prompt", "text", "answers", "labels", "label_set", "segments", "summary", "segmentation",
                    "generation", "beams", "label_score", "job"):
            if record[key] is None:
                del record[key]
        for key in ("slots", "compressions_at"):
            if record["memory"][key] is None:
                del record["memory"][key]
        if not record["memory"]["concat"]:
            del record["memory"]["concat"]
        for answer in record.get("answers") or ():
            if answer["prompt"] is None:
                del answer["prompt"]
        for segment in record.get("segments") or ():
            if segment["labels"] is None:
                del segment["labels"]
        del record["made_by"]
        tail = {key: record.pop(key) for key in ("warnings", "job") if key in record}
        if self.made_by is not None:
            record.update(self.made_by.fields())
        if tail["warnings"]:
            record["warnings"] = tail["warnings"]
        if "job" in tail:
            record["job"] = tail["job"]
        return record


@dataclass(frozen=True)
class ErrorResult:
    input: str
    error: str  # one clear sentence
    job: str | None = None  # as in Result: which work failed
    created: str = field(default_factory=now)  # as in MadeBy: when it failed, by which malmm

    def to_record(self) -> dict[str, Any]:
        record = {"input": self.input, "error": self.error, "malmm_version": __version__, "created": self.created}
        if self.job is not None:
            record["job"] = self.job
        return record
