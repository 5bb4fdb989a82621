"""The long-video loop: frames -> vision features (once per frame) -> model streams -> results.

One pass over the video feeds every stream that needs the frames: the whole-video stream
and, for summaries, the stream of the current segment. Vision features come from the
feature cache when this video was seen before with the same sampling and model; otherwise
frames are decoded (in a background thread), preprocessed, encoded on whole chunks and
written to the cache as they go. A video read once (engine/session.py) is answered again
from its kept features (kept.py): no decoding, no ViT.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from models import MALMM, VideoStream

from malmm_cli.errors import VideoError
from malmm_cli.messages import log, plural
from malmm_cli.results.events import Events
from malmm_cli.results.records import (Answer, GenerationMeta, LabelScore, MemoryMeta, Result, SamplingMeta,
                                       Segmentation, SegmentText, VideoMeta, now)
from malmm_cli.sources.decoding import stream_frames
from malmm_cli.sources.inputs import VideoSource
from malmm_cli.sources.video import Sampling, VideoInfo, plan_sampling, preprocess, probe

from .augment import Augment
from .features import FeatureCache, FrameStore, feature_key, video_fingerprint
from .heap import release_free_memory
from .kept import KeptFeatures
from .presets import LOCKSTEP_TASKS
from .provenance import made_by
from .tasks import Job, Segment, fixed_segments, label_scores, memory_timeline, ranked_labels, scene_segments
from .threads import ThreadPlan, plan_threads, torch_threads


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
    kept: KeptFeatures | None = None  # features kept by a read: replayed instead of decoded
    read_at: list[np.ndarray] = field(default_factory=list)  # timestamps of the frames fed, chunk by chunk
    augment: Augment | None = None  # a training view's crop and flip (engine/augment.py)
    pre_norm: bool = False  # features before ln_vision (training a trainable ln_vision)

    @property
    def view(self) -> str:
        """How this run's features differ from the plain ones, for the cache key ("" if not)."""
        return "|".join(([self.augment.key()] if self.augment else []) + (["pre-ln"] if self.pre_norm else []))

    @property
    def planned(self) -> int:
        return len(self.sampling.indices)

    def nothing_decoded(self) -> VideoError:
        """The error of a video that gave no frame at all (read alone or in a batch)."""
        return VideoError(f"No frames could be decoded from '{self.source.input}'.")


LLM_ROWS = 16  # rows per LLM call when a batch's answers are generated (each row has its beams)


class _Lane:
    """One video of a lockstep batch: its run and its features, handed out a frame at a time."""

    def __init__(self, source: int, run: _Run):
        self.source = source  # its position in run_batch's sources
        self.run = run
        job = run.job
        self.prompts = (job.label_set.prompt,) if job.task == "classify" else job.prompts  # its rows' instructions
        self.rows = range(0)  # its rows in the batch
        self.features: Iterator[tuple[np.ndarray, torch.Tensor]] | None = None
        self._chunk: torch.Tensor | None = None
        self._next = 0

    def next_frame(self) -> torch.Tensor | None:
        """[P, C] of the next frame, or None at the end of the video."""
        while self._chunk is None or self._next == self._chunk.shape[0]:
            chunk = next(self.features, None)
            if chunk is None:
                self._chunk = None
                return None
            self._chunk, self._next = chunk[1], 0
        self._next += 1
        return self._chunk[self._next - 1]

    def close(self) -> None:
        """Stop its decoder, and drop an unfinished feature-cache entry."""
        if self.features is not None:
            self.features.close()


def _answers(job: Job, texts: Sequence[str]) -> tuple[Answer, ...]:
    """ask's answers, each with its question as the user wrote it and the prompt it became."""
    return tuple(Answer(q, a, p) for q, a, p in zip(job.questions, texts, job.prompts))


def _check_lockstep(jobs: list[Job], videos: int) -> None:
    """Videos in one lockstep batch share everything but their questions."""
    if len(jobs) != videos:
        raise ValueError(f"{len(jobs)} jobs for {videos} videos")
    if not jobs:
        return
    if jobs[0].task not in LOCKSTEP_TASKS:
        raise ValueError(f"{jobs[0].task} does not run in lockstep")
    same = [replace(j, prompts=(), questions=()) for j in jobs]
    if any(j != same[0] for j in same):
        raise ValueError("videos in one lockstep batch must share task, sampling, memory and decoding")


@dataclass
class _Rows:
    """Rows of a finished VideoBatch, as MALMM.generate and MALMM.score take a stream."""

    instructions: list[str]
    tokens: torch.Tensor  # [rows, 32, H_llm]

    def visual_tokens(self) -> torch.Tensor:
        return self.tokens

    def part(self, a: int, b: int) -> _Rows:
        return _Rows(self.instructions[a:b], self.tokens[a:b])


PerFrame = Callable[[int, torch.Tensor], None]  # (position in the sampling, features [1, P, C])
Described = tuple[str, tuple[LabelScore, ...] | None]  # a summary segment's caption and its top labels
NOTHING_DECODED: Described = ("(no frames decoded)", None)


class Analyzer:
    def __init__(self, model: MALMM, model_id: str, *, cache: FeatureCache | None = None,
                 events: Events | None = None, chunk_size: int = 16):
        self.model = model
        self.model_id = model_id  # identifies vision weights + preprocessing in cache keys
        self.cache = cache
        self.events = events or Events()
        self.chunk_size = chunk_size
        self.threads: ThreadPlan | None = None
        self._made_by = None  # results.records.MadeBy of this model, once a record needs it

    def run(self, source: VideoSource, job: Job, kept: KeptFeatures | None = None) -> Result:
        """One video through `job`, in one pass. With `kept` (from :meth:`read` of this
        source, sampled as `job` samples), its kept features replace decoding and the ViT:
        the same Result, timings aside."""
        started = time.perf_counter()
        self._plan_threads()  # other work may have started or stopped since the last video
        run = self._prepare(source, job, kept)
        self.events.started(source.input, run.info, run.sampling, job.memory)
        fields, stream = getattr(self, f"_{job.task}")(run)
        if kept is not None:
            kept.keep(stream)
        result = self._result(run, fields, stream.memory.compressions, time.perf_counter() - started)
        self.events.finished(result)
        return result

    def run_batch(self, sources: Sequence[VideoSource], job: Job | Sequence[Job],
                  errors: tuple[type[BaseException], ...]) -> Iterator[tuple[int, Result | BaseException]]:
        """Read the videos in lockstep: one batched Q-Former step per frame for all of them
        (:class:`models.VideoBatch`), then their answers in LLM batches. Yields (i, Result) for
        sources[i], or (i, the exception) when it fails (`errors`); the others go on.

        `job`: one for all videos, or one per video that differ only in their questions (an
        evaluation's items). Each video's output is what :meth:`run` gives it alone, up to float
        rounding. A video that ends early leaves the batch; the batch ends with its longest
        video. Caption, ask and classify only (a summary captions segments as they end).
        """
        jobs = [job] * len(sources) if isinstance(job, Job) else list(job)
        _check_lockstep(jobs, len(sources))
        if jobs and jobs[0].concat:  # no bank to batch: the baseline reads its videos one at a time
            for i, (source, each) in enumerate(zip(sources, jobs)):
                try:
                    yield i, self.run(source, each)
                except errors as err:
                    yield i, err
            return
        started = time.perf_counter()
        self._plan_threads()
        lanes: list[_Lane] = []
        for i, (source, each) in enumerate(zip(sources, jobs)):
            try:
                lanes.append(_Lane(i, self._prepare(source, each)))
            except errors as err:
                yield i, err
        if not lanes:
            return
        instructions, totals = [], []
        for lane in lanes:  # each video's rows, one per prompt (ask: per question)
            lane.rows = range(len(instructions), len(instructions) + len(lane.prompts))
            instructions += lane.prompts
            totals += [lane.run.planned] * len(lane.prompts)
        first = jobs[0]
        batch = self.model.new_batch(instructions, total_frames=totals, memory_bank_length=first.memory)
        self.events.batch_started([lane.run.source.input for lane in lanes], [lane.run.sampling for lane in lanes],
                                  first.memory)
        try:
            for lane in lanes:  # one decoder thread per video, one chunk ahead: B videos' frames stay bounded
                lane.features = self._features(lane.run, workers=1, prefetch=1)
            failed = yield from self._lockstep(lanes, batch, errors)
        finally:
            for lane in lanes:
                lane.close()
        done = [lane for lane in lanes if lane.source not in failed]
        if not done:
            return
        rows = [r for lane in done for r in lane.rows]
        view = _Rows([batch.instructions[r] for r in rows], batch.visual_tokens(rows))
        answers = self._batch_answers(first, done, view)
        memory = batch.memory
        for lane, fields in zip(done, answers):
            result = self._result(lane.run, fields, memory[lane.rows[0]].compressions, time.perf_counter() - started)
            self.events.finished(result)
            yield lane.source, result

    def _lockstep(self, lanes: list[_Lane], batch, errors) -> Iterator[tuple[int, BaseException]]:
        """Step the videos through `batch` until all have ended; yields (source, error) for
        each one that fails, and returns the set of their sources."""
        failed: set[int] = set()
        going = [True] * len(lanes)
        buffer: torch.Tensor | None = None  # [rows, P, C], refilled each step (rows of ended videos unused)
        step = 0
        while True:
            frames, ended = [], False
            for i, lane in enumerate(lanes):
                frame = None
                if going[i]:
                    try:
                        frame = lane.next_frame()
                        if frame is None and lane.run.frames_done == 0:
                            raise lane.run.nothing_decoded()
                    except errors as err:
                        failed.add(lane.source)
                        yield lane.source, err
                    going[i] = frame is not None
                    ended = ended or frame is None
                frames.append(frame)
            if ended or step % self.chunk_size == 0:
                memory = batch.memory
                self.events.batch_frames([lane.run.frames_done for lane in lanes],
                                         [memory[lane.rows[0]] for lane in lanes])
            if not any(going):
                break
            t0 = time.perf_counter()
            if buffer is None:
                first = next(f for f in frames if f is not None)
                buffer = first.new_zeros(batch.videos, *first.shape)
            active = [False] * batch.videos
            for lane, frame in zip(lanes, frames):
                if frame is not None:
                    buffer[lane.rows.start : lane.rows.stop] = frame
                    active[lane.rows.start : lane.rows.stop] = [True] * len(lane.rows)
            batch.add_features(buffer, active=active)
            share = (time.perf_counter() - t0) / sum(going)
            for i, lane in enumerate(lanes):
                if going[i]:
                    lane.run.timings["qformer"] += share
                    lane.run.frames_done += 1
            step += 1
        return failed

    def _batch_answers(self, job: Job, lanes: list[_Lane], rows: _Rows) -> list[dict]:
        """The result fields of each video (one LLM row per prompt of each), in LLM batches."""
        n = len(lanes)
        prompts = [p for lane in lanes for p in lane.prompts]
        t0 = time.perf_counter()
        if job.task == "classify" and job.scoring == "likelihood":
            labels = job.label_set
            self.events.stage(f"scoring {len(labels.labels)} labels for {plural(n, 'video')}")
            with self._heavy():
                loglik = label_scores(job, self.model.tokenizer, self.model.score(rows, prompts, list(labels.labels)))
            fields = [ranked_labels(job, row) for row in loglik]
        elif job.task == "classify":
            self.events.stage(f"generating labels for {plural(n, 'video')}")
            beams = job.generation.num_beams
            texts = []
            with self._heavy():
                for a in range(0, len(prompts), LLM_ROWS):
                    texts += self.model.generate(rows.part(a, a + LLM_ROWS), prompts[a : a + LLM_ROWS],
                                                 num_return_sequences=beams, **asdict(job.generation))
            fields = [{"beams": tuple(texts[i * beams : (i + 1) * beams]), "label_set": job.label_set.name}
                      for i in range(n)]
        else:
            self.events.stage(f"writing {plural(n, 'caption')}" if job.task == "caption" else
                              f"answering {plural(len(prompts), 'question')} about {plural(n, 'video')}")
            texts: list[str] = []
            with self._heavy():
                for a in range(0, len(prompts), LLM_ROWS):
                    texts += self.model.generate(rows.part(a, a + LLM_ROWS), prompts[a : a + LLM_ROWS],
                                                 **asdict(job.generation))
            fields, at = [], 0
            for lane in lanes:
                mine, at = texts[at : at + len(lane.prompts)], at + len(lane.prompts)
                fields.append({"text": mine[0]} if job.task == "caption" else
                              {"answers": _answers(lane.run.job, mine)})
        share = (time.perf_counter() - t0) / n
        for lane in lanes:
            lane.run.timings["llm"] += share
        return fields

    def _prepare(self, source: VideoSource, job: Job, kept: KeptFeatures | None = None) -> _Run:
        if kept is not None:  # read before: the video is not opened again
            info, sampling = kept.info, kept.sampling
        else:
            info = probe(source.path)
            sampling = plan_sampling(info, fps=job.fps, num_frames=job.frames, start=job.start, end=job.end)
        run = _Run(job, source, info, sampling, kept=kept)
        if job.end is not None and job.end > sampling.end + 1e-6:
            run.warnings.append(f"--end {job.end:g} s is past the end of the video ({info.duration:.3f} s); "
                                "used the video up to its end")
        return run

    def _result(self, run: _Run, fields: dict, compressions: int, total: float) -> Result:
        job, info, sampling = run.job, run.info, run.sampling
        run.timings["total"] = total
        return Result(
            input=run.source.input,
            task=job.task,
            model=job.model_label,
            video=VideoMeta(info.duration, info.fps, info.width, info.height),
            sampling=SamplingMeta(job.fps if job.frames is None else None, run.frames_done, sampling.start, sampling.end),
            memory=MemoryMeta(job.memory, compressions, *fields.pop("memory_timeline", ()), concat=job.concat),
            prompt=job.prompt,
            generation=GenerationMeta(**asdict(job.generation)) if job.generation else None,
            made_by=self._provenance(),
            timings={k: round(v, 4) for k, v in run.timings.items()},
            warnings=tuple(run.warnings),
            **fields,
        )

    def _provenance(self):
        if self._made_by is None:
            self._made_by = made_by(self.model)
        return replace(self._made_by, created=now())

    # ---- CPU threads ------------------------------------------------------------------

    def _plan_threads(self) -> None:
        """On a CPU: small ops (the Q-Former step) on the cores others leave free, the
        real-size ViT and LLM on all of them (engine/threads.py says why)."""
        if self.model.device.type != "cpu":
            self.threads = None
            return
        large = self.model.vision_model.config.hidden_size >= 1024  # ViT-g: 1408; tiny-random: 32
        self.threads = plan_threads(large)
        torch.set_num_threads(self.threads.light)

    def _heavy(self):
        """Threads for a large op (ViT on a chunk, the LLM)."""
        return torch_threads(self.threads.heavy) if self.threads is not None else contextlib.nullcontext()

    # The same policy for front ends that drive the model themselves (the live loop, engine/live.py).
    plan_threads = _plan_threads
    heavy = _heavy

    # ---- features ---------------------------------------------------------------------

    def _features(self, run: _Run, **decoding) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(timestamps [k], features [k, P, C]) chunk by chunk, from the cache or the video
        (`decoding`: stream_frames' workers and prefetch).

        A cache entry is verified whole before its first chunk goes out (one sequential read,
        cheap next to the ViT): features fed to the streams cannot be taken back, so a damaged
        entry must be caught before any is used. It is then discarded and rebuilt from the video.
        """
        if run.kept is not None:
            yield from run.kept.replay(run.timings, run.warnings, self.chunk_size)
            return
        writer = None
        if self.cache is not None:
            vision = self.model.vision_model.config
            # What this model computes, [n, P, C] with P = CLS + patches: an entry holding
            # anything else is damaged.
            entry = dict(
                key=feature_key(video_fingerprint(run.source.path), run.sampling.indices, self.model_id, run.view),
                count=run.planned, torch_dtype=str(self.model.vision_dtype),
                shape=((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size))
            t0 = time.perf_counter()
            hit = self.cache.get(**entry)
            run.timings["decode"] += time.perf_counter() - t0
            log.debug("%s: vision features %s the cache", run.source.input, "read from" if hit else "not in")
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
            with stream_frames(run.source.path, run.sampling, info=run.info, chunk_size=self.chunk_size,
                               **decoding) as frames:
                chunks = iter(frames)
                while True:
                    t0 = time.perf_counter()
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    rgb = chunk.frames if run.augment is None else run.augment.apply(chunk.frames)
                    pixels = preprocess(rgb, spec=self.model.image_spec, antialias=run.job.antialias)
                    t1 = time.perf_counter()
                    with self._heavy():
                        feats = (self.model.encode_frames(pixels, pre_norm=True) if run.pre_norm else
                                 self.model.encode_frames(pixels))
                    run.timings["decode"] += t1 - t0
                    run.timings["vision"] += time.perf_counter() - t1
                    if writer is not None:  # on a write error it drops the entry and goes quiet
                        writer.append(feats)
                    yield chunk.timestamps, feats
                    # The consumer has taken the chunk: give its freed buffers back to the
                    # system, else the allocator keeps them and what stays resident grows with
                    # the video's length on a busy machine (heap.py).
                    del chunk, rgb, pixels, feats
                    release_free_memory()
                run.warnings.extend(frames.warnings)
            if writer is not None and not run.warnings:
                writer.commit()  # only complete, clean reads are cached
                writer = None
        finally:
            if writer is not None:
                writer.abort()

    def read(self, source: VideoSource, job: Job, keep: FrameStore) -> KeptFeatures:
        """Decode `source` and run the ViT once, as `job` samples it (or take the features from
        the cache), appending them to `keep`; no Q-Former, no LLM. What comes back replays them
        through :meth:`run` for any question of the same sampling."""
        started = time.perf_counter()
        self._plan_threads()
        run = self._prepare(source, job)
        decoded_from = len(run.warnings)  # what decoding adds after the range's own warning
        self.events.reading(source.input, run.info, run.sampling)
        stamps = []
        for timestamps, feats in self._features(run):
            keep.append(feats)
            stamps.append(timestamps)
            run.frames_done += feats.shape[0]
            self.events.features(run.frames_done, float(timestamps[-1]))
        if run.frames_done == 0:
            raise run.nothing_decoded()
        run.timings["total"] = time.perf_counter() - started
        return KeptFeatures(keep, run.info, run.sampling, np.concatenate(stamps), tuple(run.warnings[decoded_from:]),
                            {k: round(v, 4) for k, v in run.timings.items()})

    def features_of(self, source: VideoSource, job: Job, *, indices: Sequence[int] | None = None,
                    augment: Augment | None = None,
                    pre_norm: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(timestamps, features) of `source` sampled as `job` says, chunk by chunk, from the
        cache or through the ViT (and into the cache): the vision pass alone (train's).

        A training view instead: `indices`, the frames to read (sorted source frame indices,
        e.g. engine/augment.segment_frames), `augment`, one crop and flip for all of them, and
        `pre_norm`, features before ln_vision. Each is part of the cache key."""
        run = self._prepare(source, job)
        if indices is not None:
            idx = np.unique(np.clip(np.asarray(indices, dtype=np.int64), 0, run.info.frame_count - 1))
            run.sampling = Sampling(idx, run.info.times()[idx].astype(np.float64), run.sampling.start,
                                    run.sampling.end, None, len(idx))
        run.augment, run.pre_norm = augment, pre_norm
        for timestamps, feats in self._features(run):
            run.frames_done += feats.shape[0]
            yield timestamps, feats
        if run.frames_done == 0:
            raise run.nothing_decoded()

    def _feed(self, run: _Run, streams: list[VideoStream], per_frame: PerFrame | None = None) -> None:
        """Run the video through `streams`, and through `per_frame` frame by frame."""
        for timestamps, feats in self._features(run):
            run.read_at.append(timestamps)
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
            raise run.nothing_decoded()

    # ---- model calls ------------------------------------------------------------------------

    def _new_stream(self, run: _Run, instructions, total: int) -> VideoStream:
        return self.model.new_stream(list(instructions), total_frames=total, memory_bank_length=run.job.memory,
                                     concat=run.job.concat)

    def _whole_stream(self, run: _Run, instructions) -> VideoStream:
        """The stream over the whole video; over kept features, it replays or records their
        visual bank (kept.py: the same bits, less work). The concat baseline keeps no bank."""
        if run.job.concat or run.kept is None:
            return self._new_stream(run, instructions, run.planned)
        track = run.kept.track_for(self.model, run.job.memory, run.planned)
        return self.model.new_stream(list(instructions), total_frames=run.planned, memory_bank_length=run.job.memory,
                                     visual_track=track)

    def _generate(self, run: _Run, stream: VideoStream, prompts, **extra) -> list[str]:
        t0 = time.perf_counter()
        with self._heavy():
            texts = self.model.generate(stream, list(prompts), **asdict(run.job.generation), **extra)
        run.timings["llm"] += time.perf_counter() - t0
        return texts

    # ---- tasks ----------------------------------------------------------------------------

    def _answer(self, run: _Run, stage: str) -> tuple[list[str], VideoStream]:
        """One stream row per prompt, one pass over the video, the answers in one batch."""
        stream = self._whole_stream(run, run.job.prompts)
        self._feed(run, [stream])
        self.events.stage(stage)
        return self._generate(run, stream, run.job.prompts), stream

    def _caption(self, run: _Run):
        texts, stream = self._answer(run, "writing the caption")
        return {"text": texts[0]}, stream

    def _ask(self, run: _Run):
        texts, stream = self._answer(run, f"answering {plural(len(run.job.questions), 'question')}")
        return {"answers": _answers(run.job, texts)}, stream

    def _classify(self, run: _Run):
        job, labels = run.job, run.job.label_set
        stream = self._whole_stream(run, [labels.prompt])
        self._feed(run, [stream])
        if job.scoring == "generate":  # the official eval: 5 beams, the label matched against them
            self.events.stage("generating the label")
            beams = self._generate(run, stream, [labels.prompt], num_return_sequences=job.generation.num_beams)
            return {"beams": tuple(beams), "label_set": labels.name}, stream
        self.events.stage(f"scoring {len(labels.labels)} labels")
        return ranked_labels(job, self._score(run, stream)), stream

    def _score(self, run: _Run, stream: VideoStream) -> np.ndarray:
        """The job's label scores (label_scores: sum or mean log-likelihood) after its label
        prompt, for a stream of that prompt."""
        job, labels = run.job, run.job.label_set
        t0 = time.perf_counter()
        with self._heavy():
            summed = self.model.score(stream, [labels.prompt], list(labels.labels))
            loglik = label_scores(job, self.model.tokenizer, summed)[0]
        run.timings["llm"] += time.perf_counter() - t0
        return loglik

    def _summarize(self, run: _Run):
        prompt = run.job.prompts[0]
        whole = self._whole_stream(run, [prompt])
        if run.job.scenes:
            segments, described = self._scenes(run, whole, prompt)
        else:
            segments = fixed_segments(run.sampling.start, run.sampling.end, run.job.every, run.sampling.timestamps)
            described = self._windows(run, whole, prompt, segments)
        self.events.stage("writing the overall summary")
        summary = self._generate(run, whole, [prompt])[0]
        parts = tuple(SegmentText(s.start, s.end, text, labels) for s, (text, labels) in zip(segments, described))
        read_at = np.concatenate(run.read_at) if run.read_at else np.zeros(0)
        fields = {"segments": parts, "summary": summary,
                  "segmentation": Segmentation(None if run.job.scenes else run.job.every, run.job.scenes),
                  "memory_timeline": memory_timeline(whole.memory, read_at, run.sampling.end)}
        if run.job.label_set is not None:
            fields["label_set"] = run.job.label_set.name
        return fields, whole

    def _segment_streams(self, run: _Run, prompt: str, frames: int) -> list[VideoStream]:
        """A segment's streams, fed the same frames: its caption's, and with a label set its
        labels' (the label set's own instruction, as classify reads a video)."""
        prompts = [prompt] + ([run.job.label_set.prompt] if run.job.label_set is not None else [])
        return [self._new_stream(run, [p], frames) for p in prompts]

    def _caption_segment(self, run: _Run, streams: list[VideoStream], prompt: str, segments: list[Segment],
                         described: list[Described]) -> None:
        """Describe the next segment (the one after `described`) from its streams: its caption,
        and its top labels when the job has a label set."""
        i, n = len(described), len(segments)
        self.events.stage(f"captioning segment {i + 1} of {n}")
        text = self._generate(run, streams[0], [prompt])[0]
        labels = None if len(streams) == 1 else ranked_labels(run.job, self._score(run, streams[1]))["labels"]
        self._segment_done(segments, described, (text, labels))

    def _segment_done(self, segments: list[Segment], described: list[Described], item: Described) -> None:
        """The next segment's description, kept and told at once (whisper prints each segment as it comes)."""
        seg = segments[len(described)]
        described.append(item)
        self.events.segment(len(described) - 1, len(segments), seg.start, seg.end, item[0])

    def _windows(self, run: _Run, whole: VideoStream, prompt: str, segments: list[Segment]) -> list[Described]:
        """One pass: each frame goes to the whole-video stream and to its segment's streams;
        a segment is described as soon as its last frame has been read."""
        owner = {pos: i for i, seg in enumerate(segments) for pos in seg.frames}
        described: list[Described] = []
        current: list = [None]  # the open segment's streams

        def per_frame(pos: int, feats: torch.Tensor) -> None:
            i = owner[pos]  # every sampled position belongs to exactly one segment
            if i > len(described) and current[0] is not None:
                self._caption_segment(run, current[0], prompt, segments, described)
                current[0] = None
            if current[0] is None:
                while len(described) < i:
                    self._segment_done(segments, described, NOTHING_DECODED)
                current[0] = self._segment_streams(run, prompt, len(segments[i].frames))
            for stream in current[0]:
                stream.add_features(feats)

        self._feed(run, [whole], per_frame)
        if current[0] is not None:
            self._caption_segment(run, current[0], prompt, segments, described)
        # Segments after the last decoded frame (a video cut short) have nothing to describe.
        while len(described) < len(segments):
            self._segment_done(segments, described, NOTHING_DECODED)
        return described

    def _scenes(self, run: _Run, whole: VideoStream, prompt: str) -> tuple[list[Segment], list[Described]]:
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
            described: list[Described] = []
            for seg in segments:
                streams = self._segment_streams(run, prompt, len(seg.frames))
                t0 = time.perf_counter()
                for a in range(0, len(seg.frames), self.chunk_size):
                    block = seg.frames[a : a + self.chunk_size]
                    feats = store.read(block[0], block[-1] + 1)
                    for stream in streams:
                        stream.add_features(feats)
                run.timings["qformer"] += time.perf_counter() - t0
                self._caption_segment(run, streams, prompt, segments, described)
        return segments, described
