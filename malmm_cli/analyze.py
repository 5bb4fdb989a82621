"""The long-video loop: frames -> vision features (once per frame) -> model streams -> results.

One pass over the video feeds every stream that needs the frames: the whole-video stream
and, for summaries, the stream of the current segment. Vision features come from the
feature cache when this video was seen before with the same sampling and model; otherwise
frames are decoded (in a background thread), preprocessed, encoded on whole chunks and
written to the cache as they go.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from models import MALMM, VideoStream
from models.memory_bank import BankStatus

from .errors import VideoError
from .features import FeatureCache, FrameStore, feature_key, video_fingerprint
from .inputs import VideoSource
from .results import Answer, GenerationMeta, LabelScore, MemoryMeta, Result, SamplingMeta, SegmentText, VideoMeta
from .tasks import Job, Segment, fixed_segments, probabilities, scene_segments
from .threads import ThreadPlan, plan_threads, torch_threads
from .video import Sampling, VideoInfo, plan_sampling, preprocess, probe, stream_frames


class Events:
    """Progress callbacks (the live view implements them; the default does nothing)."""

    def started(self, source: str, info: VideoInfo, sampling: Sampling, capacity: int) -> None: ...

    def frames(self, done: int, timestamp: float, memory: BankStatus) -> None: ...

    def stage(self, text: str) -> None: ...

    def finished(self, result: Result) -> None: ...

    def close(self) -> None:
        """Tidy the display after an error or an interrupt."""


@dataclass
class _Run:
    """One video while the loop runs."""

    job: Job
    source: VideoSource
    info: VideoInfo
    sampling: Sampling
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("decode", "vision", "qformer", "llm"), 0.0))
    warnings: list[str] = field(default_factory=list)
    frames_done: int = 0

    @property
    def planned(self) -> int:
        return len(self.sampling.indices)


PerFrame = Callable[[int, torch.Tensor], None]  # (position in the sampling, features [1, P, C])


class Analyzer:
    def __init__(self, model: MALMM, model_id: str, *, cache: FeatureCache | None = None,
                 events: Events | None = None, chunk_size: int = 16):
        self.model = model
        self.model_id = model_id  # identifies vision weights + preprocessing in cache keys
        self.cache = cache
        self.events = events or Events()
        self.chunk_size = chunk_size
        self.threads: ThreadPlan | None = None

    def run(self, source: VideoSource, job: Job) -> Result:
        started = time.perf_counter()
        self._plan_threads()  # other work may have started or stopped since the last video
        info = probe(source.path)
        sampling = plan_sampling(info, fps=job.fps, num_frames=job.frames, start=job.start, end=job.end)
        run = _Run(job, source, info, sampling)
        if job.end is not None and job.end > sampling.end + 1e-6:
            run.warnings.append(f"--end {job.end:g} s is past the end of the video ({info.duration:.3f} s); "
                                "used the video up to its end")
        self.events.started(source.input, info, sampling, job.memory)
        fields, stream = getattr(self, f"_{job.task}")(run)
        run.timings["total"] = time.perf_counter() - started
        result = Result(
            input=source.input,
            task=job.task,
            model=job.model_label,
            video=VideoMeta(info.duration, info.fps, info.width, info.height),
            sampling=SamplingMeta(job.fps if job.frames is None else None, run.frames_done, sampling.start, sampling.end),
            memory=MemoryMeta(job.memory, stream.memory.compressions),
            generation=GenerationMeta(**asdict(job.generation)) if job.generation else None,
            timings={k: round(v, 4) for k, v in run.timings.items()},
            warnings=tuple(run.warnings),
            **fields,
        )
        self.events.finished(result)
        return result

    # ---- CPU threads ------------------------------------------------------------------

    def _plan_threads(self) -> None:
        """On a CPU: small ops (the Q-Former step) on the cores others leave free, the
        real-size ViT and LLM on all of them (malmm_cli/threads.py says why)."""
        if self.model.device.type != "cpu":
            self.threads = None
            return
        large = self.model.vision_model.config.hidden_size >= 1024  # ViT-g: 1408; tiny-random: 32
        self.threads = plan_threads(large)
        torch.set_num_threads(self.threads.light)

    def _heavy(self):
        """Threads for a large op (ViT on a chunk, the LLM)."""
        return torch_threads(self.threads.heavy) if self.threads is not None else contextlib.nullcontext()

    # ---- features ---------------------------------------------------------------------

    def _features(self, run: _Run) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(timestamps [k], features [k, P, C]) chunk by chunk, from the cache or the video.

        A cache entry is verified whole before its first chunk goes out (one sequential read,
        cheap next to the ViT): features fed to the streams cannot be taken back, so a damaged
        entry must be caught before any is used. It is then discarded and rebuilt from the video.
        """
        writer = None
        if self.cache is not None:
            vision = self.model.vision_model.config
            # What this model computes, [n, P, C] with P = CLS + patches: an entry holding
            # anything else is damaged.
            entry = dict(
                key=feature_key(video_fingerprint(run.source.path), run.sampling.indices, self.model_id),
                count=run.planned, torch_dtype=str(self.model.vision_dtype),
                shape=((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size))
            t0 = time.perf_counter()
            hit = self.cache.get(**entry)
            run.timings["decode"] += time.perf_counter() - t0
            if hit is not None:
                with hit:
                    t0 = time.perf_counter()
                    for start, feats in hit.chunks(self.chunk_size):
                        run.timings["decode"] += time.perf_counter() - t0
                        yield run.sampling.timestamps[start : start + feats.shape[0]], feats
                        t0 = time.perf_counter()
                return
            writer = self.cache.writer(**entry)
        try:
            with stream_frames(run.source.path, run.sampling, info=run.info, chunk_size=self.chunk_size) as frames:
                chunks = iter(frames)
                while True:
                    t0 = time.perf_counter()
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    pixels = preprocess(chunk.frames, spec=self.model.image_spec, antialias=run.job.antialias)
                    t1 = time.perf_counter()
                    with self._heavy():
                        feats = self.model.encode_frames(pixels)
                    run.timings["decode"] += t1 - t0
                    run.timings["vision"] += time.perf_counter() - t1
                    if writer is not None:  # on a write error it drops the entry and goes quiet
                        writer.append(feats)
                    yield chunk.timestamps, feats
                run.warnings.extend(frames.warnings)
            if writer is not None and not run.warnings:
                writer.commit()  # only complete, clean reads are cached
                writer = None
        finally:
            if writer is not None:
                writer.abort()

    def _feed(self, run: _Run, streams: list[VideoStream], per_frame: PerFrame | None = None) -> None:
        """Run the video through `streams`, and through `per_frame` frame by frame."""
        for timestamps, feats in self._features(run):
            t0 = time.perf_counter()
            for stream in streams:
                stream.add_features(feats)
            if per_frame is not None:
                for k in range(feats.shape[0]):
                    per_frame(run.frames_done + k, feats[k : k + 1])
            run.timings["qformer"] += time.perf_counter() - t0
            run.frames_done += feats.shape[0]
            self.events.frames(run.frames_done, float(timestamps[-1]), streams[0].memory)
        if run.frames_done == 0:
            raise VideoError(f"No frames could be decoded from '{run.source.input}'.")

    # ---- model calls ------------------------------------------------------------------------

    def _new_stream(self, run: _Run, instructions, total: int) -> VideoStream:
        return self.model.new_stream(list(instructions), total_frames=total, memory_bank_length=run.job.memory)

    def _generate(self, run: _Run, stream: VideoStream, prompts) -> list[str]:
        t0 = time.perf_counter()
        with self._heavy():
            texts = self.model.generate(stream, list(prompts), **asdict(run.job.generation))
        run.timings["llm"] += time.perf_counter() - t0
        return texts

    # ---- tasks ----------------------------------------------------------------------------

    def _answer(self, run: _Run, stage: str) -> tuple[list[str], VideoStream]:
        """One stream row per prompt, one pass over the video, the answers in one batch."""
        stream = self._new_stream(run, run.job.prompts, run.planned)
        self._feed(run, [stream])
        self.events.stage(stage)
        return self._generate(run, stream, run.job.prompts), stream

    def _caption(self, run: _Run):
        texts, stream = self._answer(run, "writing the caption")
        return {"text": texts[0]}, stream

    def _ask(self, run: _Run):
        texts, stream = self._answer(run, f"answering {len(run.job.questions)} question(s)")
        return {"answers": tuple(Answer(q, a) for q, a in zip(run.job.questions, texts))}, stream

    def _classify(self, run: _Run):
        labels = run.job.label_set
        stream = self._new_stream(run, [labels.prompt], run.planned)
        self._feed(run, [stream])
        self.events.stage(f"scoring {len(labels.labels)} labels")
        t0 = time.perf_counter()
        with self._heavy():
            loglik = self.model.score(stream, [labels.prompt], list(labels.labels))[0].double().numpy()
        run.timings["llm"] += time.perf_counter() - t0
        probs = probabilities(loglik)
        order = np.argsort(-probs, kind="stable")[: run.job.top_k]
        ranked = tuple(LabelScore(labels.labels[i], round(float(probs[i]), 6)) for i in order)
        return {"labels": ranked, "label_set": labels.name}, stream

    def _summarize(self, run: _Run):
        prompt = run.job.prompts[0]
        whole = self._new_stream(run, [prompt], run.planned)
        if run.job.scenes:
            segments, texts = self._scenes(run, whole, prompt)
        else:
            segments = fixed_segments(run.sampling.start, run.sampling.end, run.job.every, run.sampling.timestamps)
            texts = self._windows(run, whole, prompt, segments)
        self.events.stage("writing the overall summary")
        summary = self._generate(run, whole, [prompt])[0]
        parts = tuple(SegmentText(s.start, s.end, t) for s, t in zip(segments, texts))
        return {"segments": parts, "summary": summary}, whole

    def _caption_segment(self, run: _Run, stream: VideoStream, prompt: str, i: int, n: int) -> str:
        self.events.stage(f"captioning segment {i + 1}/{n}")
        return self._generate(run, stream, [prompt])[0]

    def _windows(self, run: _Run, whole: VideoStream, prompt: str, segments: list[Segment]) -> list[str]:
        """One pass: each frame goes to the whole-video stream and to its segment's stream;
        a segment is captioned as soon as its last frame has been read."""
        owner = {pos: i for i, seg in enumerate(segments) for pos in seg.frames}
        texts: list[str] = []
        current: list = [None]  # the open segment's stream

        def per_frame(pos: int, feats: torch.Tensor) -> None:
            i = owner[pos]  # every sampled position belongs to exactly one segment
            if i > len(texts) and current[0] is not None:
                texts.append(self._caption_segment(run, current[0], prompt, len(texts), len(segments)))
                current[0] = None
            if current[0] is None:
                texts.extend(["(no frames decoded)"] * (i - len(texts)))
                current[0] = self._new_stream(run, [prompt], len(segments[i].frames))
            current[0].add_features(feats)

        self._feed(run, [whole], per_frame)
        if current[0] is not None:
            texts.append(self._caption_segment(run, current[0], prompt, len(texts), len(segments)))
        # Segments after the last decoded frame (a video cut short) have nothing to caption.
        return texts + ["(no frames decoded)"] * (len(segments) - len(texts))

    def _scenes(self, run: _Run, whole: VideoStream, prompt: str) -> tuple[list[Segment], list[str]]:
        """Boundaries depend on the whole video, so: one pass over the video feeds the
        whole-video stream, measures frame-to-frame change and keeps the features in a
        temporary file; segments are then read back from it. The ViT runs once. The file goes
        in the cache directory when the cache is on (where the user keeps room for features),
        else in the system temp dir: --no-cache writes nothing under the cache."""
        change: list[float] = []
        last: list = [None]
        with FrameStore(self.cache.scratch_dir() if self.cache is not None else None) as store:

            def per_frame(pos: int, feats: torch.Tensor) -> None:
                store.append(feats)  # positions come in order from 0, so a frame's row is its position
                pooled = feats[0].float().mean(dim=0)
                change.append(0.0 if last[0] is None else float(1 - torch.cosine_similarity(pooled, last[0], dim=0)))
                last[0] = pooled

            self._feed(run, [whole], per_frame)
            timestamps = run.sampling.timestamps[: run.frames_done]
            segments = scene_segments(run.sampling.start, run.sampling.end, timestamps, np.array(change))
            texts = []
            for i, seg in enumerate(segments):
                stream = self._new_stream(run, [prompt], len(seg.frames))
                t0 = time.perf_counter()
                for a in range(0, len(seg.frames), self.chunk_size):
                    block = seg.frames[a : a + self.chunk_size]
                    stream.add_features(store.read(block[0], block[-1] + 1))
                run.timings["qformer"] += time.perf_counter() - t0
                texts.append(self._caption_segment(run, stream, prompt, i, len(segments)))
        return segments, texts
