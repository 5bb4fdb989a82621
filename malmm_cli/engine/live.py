"""The live loop: a stream whose frames arrive in real time, through the same model, streams,
thread policy and answers as a file (analyze.py), one window of stream time at a time.

    watch = session.watch("http://host/live.ts", session.job("caption", fps=1.0), every=10)
    for record in watch:          # a results.watch.WindowRecord as each window closes
        ...
    watch.stop()                  # from a signal handler: the current window is answered, then it ends

A reader thread (sources/live.py) decodes and samples the source and queues the sampled
frames (bounded: a live source drops its oldest queued frame rather than wait). This loop
takes what is queued, runs the ViT on it as one chunk, and feeds the features frame by frame
to the memory stream of the current window: a fresh stream per window (each window answered
from itself), or with `cumulative` one stream for the whole watch (each window answered over
everything seen so far, in the bank's fixed memory). When a frame of a later window arrives,
or the stream ends, the window is answered (generate or score, as the batch commands do) and
its record comes out. Windows with no frame at all (every frame dropped, or a gap in the
stream) still get a record, without an answer. Nothing grows with the stream: frames and
features are dropped once fed, a fresh stream is dropped with its window, and a cumulative
stream's banks are bounded by M.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np

from malmm_cli.errors import UsageError
from malmm_cli.results.records import Answer
from malmm_cli.results.watch import WatchEvents, WindowRecord
from malmm_cli.results.writers import short_clock
from malmm_cli.sources.live import LiveFrame, LiveReader, LiveSpec, StreamEnd, window_of

from .tasks import Job, label_scores, ranked_labels

CHUNK = 16  # sampled frames through the ViT at once, at most
_WAIT_S = 0.2  # how often the loop looks at the stop flag while the queue is empty


class LiveWatch:
    """One watched stream; iterate for its window records (once). `error` holds the sentence
    of a stream that was cut for good, or that gave no frame, once the iteration is over."""

    def __init__(self, session, spec: LiveSpec, job: Job, *, every: float, cumulative: bool = False,
                 duration: float | None = None, retries: float = 30.0, events: WatchEvents | None = None,
                 queue_frames: int | None = None):
        if job.task not in ("caption", "ask", "classify") or job.fps is None:
            raise ValueError("a live job is caption, ask or classify, sampled by rate (fps)")
        if job.concat:  # the baseline's LLM context grows with every frame: no constant memory
            raise UsageError("watch reads with a memory bank; this checkpoint was trained without one (--concat): "
                             "give --memory M to watch with a bank of M slots.")
        self.session, self.spec, self.job = session, spec, job
        self.every, self.cumulative, self.duration = every, cumulative, duration
        self.events = events or WatchEvents()
        self.reader = LiveReader(spec, fps=job.fps, every=every, duration=duration, retries_s=retries,
                                 capacity=queue_frames)
        self.error: str | None = None
        self.stopped = False
        self.frames = 0  # sampled frames fed, over the whole watch
        self.end = 0.0  # stream time where the last record written ends
        self._window = 0  # the open window
        self._in_window = 0  # its frames
        self._last: LiveFrame | None = None  # its last frame
        self._stream = None  # the memory stream the open window answers from
        self._timings = dict.fromkeys(("vision", "qformer", "llm"), 0.0)

    def stop(self) -> None:
        """End the watch: what is queued is fed, the open window answered, then iteration ends.
        Safe from a signal handler (it only sets flags)."""
        self.stopped = True
        self.reader.stop_event.set()

    # ---- the loop ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[WindowRecord]:
        analyzer = self.session.analyzer
        self.model = analyzer.model
        analyzer.plan_threads()
        self.events.started(self.spec.input, self.job.fps, self.every, self.job.memory, self.cumulative)
        self.reader.start()
        end: StreamEnd | None = None
        try:
            while end is None:
                items = self.reader.queue.take(CHUNK, 0.0 if self.stopped else _WAIT_S)
                end = next((i for i in items if isinstance(i, StreamEnd)), None)
                frames = [i for i in items if isinstance(i, LiveFrame)]
                if frames:
                    yield from self._feed(frames)
                elif self.stopped:  # nothing queued after a stop: do not wait for the reader's end
                    break
                else:
                    self.events.waiting(self.reader.state)
            if self.frames == 0:
                self.error = (end.error if end is not None and end.error else
                              None if self.stopped else f"No frames could be decoded from '{self.spec.input}'.")
                return
            stream_end = end.end if end is not None else self._last.time + 1.0 / self.job.fps
            yield self._close(min(stream_end, (self._window + 1) * self.every))
            if end is not None and end.error:
                self.error = end.error
        finally:
            self.reader.stop()
            self._stream = None

    def _feed(self, frames: list[LiveFrame]) -> Iterator[WindowRecord]:
        """The ViT over `frames` (in runs of one frame size), then each frame into its window."""
        for run in _same_size(frames):
            features = self._vision(run)
            for frame, feats in zip(run, features):
                window = window_of(frame.time, self.every)
                while window > self._window:  # the open window is complete; so are any empty ones after it
                    yield self._close((self._window + 1) * self.every)
                t0 = time.perf_counter()
                if self._stream is None:
                    self._stream = self._new_stream()
                self._stream.add_features(feats[None])
                self._timings["qformer"] += time.perf_counter() - t0
                self._in_window += 1
                self.frames += 1
                self._last = frame
            last = run[-1]
            self.events.progress(last.time, last.lag(time.monotonic()), self.frames, self.reader.state,
                                 self._stream.memory)

    def _vision(self, run: list[LiveFrame]):
        from malmm_cli.sources.video import preprocess

        t0 = time.perf_counter()
        pixels = preprocess(np.stack([f.rgb for f in run]), spec=self.model.image_spec, antialias=self.job.antialias)
        with self.session.analyzer.heavy():
            features = self.model.encode_frames(pixels)
        self._timings["vision"] += time.perf_counter() - t0
        return features

    def _new_stream(self):
        job = self.job
        instructions = [job.label_set.prompt] if job.task == "classify" else list(job.prompts)
        # A fresh window knows how many frames it will hold (the temporal position embedding maps
        # them onto a checkpoint's trained rows); a cumulative stream does not know its length.
        total = None if self.cumulative else max(1, math.ceil(self.every * job.fps))
        return self.model.new_stream(instructions, total_frames=total, memory_bank_length=job.memory)

    def _close(self, end: float) -> WindowRecord:
        """Answer the open window (ending at stream time `end`) and open the next one."""
        start, n = self._window * self.every, self._in_window
        stream = self._stream
        fields: dict = {}
        if n:
            self.events.stage(f"{'answering' if self.job.task == 'ask' else self.job.task + 'ing'} "
                              f"{short_clock(start)}-{short_clock(end)}")
            fields = self._answer(stream)
        memory = stream.memory if stream is not None else None
        record = WindowRecord(
            input=self.spec.input, task=self.job.task, model=self.job.model_label, window=self._window,
            start=start, end=end, frames=n, dropped=self.reader.drops_in(self._window),
            lag=self._last.lag(time.monotonic()) if n and self._last is not None else None,
            memory={"length": self.job.memory, "slots": memory.length if memory else 0,
                    "compressions": memory.compressions if memory else 0},
            cumulative=self.cumulative, timings={k: round(v, 4) for k, v in self._timings.items()}, **fields)
        self._window += 1
        self.end = end
        self._in_window = 0
        self._timings = dict.fromkeys(self._timings, 0.0)
        if not self.cumulative:
            self._stream = None  # a fresh memory for the next window; this one's is freed
        self.events.window(record)
        return record

    def _answer(self, stream) -> dict:
        """The window's fields: caption text, answers, or ranked labels, as the batch commands
        produce them from a stream."""
        job, model = self.job, self.model
        t0 = time.perf_counter()
        with self.session.analyzer.heavy():
            if job.task == "classify":
                labels = job.label_set
                scores = label_scores(job, model.tokenizer, model.score(stream, [labels.prompt], list(labels.labels)))
                fields = ranked_labels(job, scores[0])
                del fields["label_score"]  # watch scores by the sum (a window record has no such field)
            else:
                texts = model.generate(stream, list(job.prompts), **asdict(job.generation))
                fields = ({"text": texts[0]} if job.task == "caption" else
                          {"answers": tuple(Answer(q, a) for q, a in zip(job.questions, texts))})
        self._timings["llm"] += time.perf_counter() - t0
        return fields


def _same_size(frames: list[LiveFrame]) -> Iterator[list[LiveFrame]]:
    """Consecutive runs of frames of one size (a stream may change resolution midway)."""
    run: list[LiveFrame] = []
    for frame in frames:
        if run and frame.rgb.shape != run[0].rgb.shape:
            yield run
            run = []
        run.append(frame)
    if run:
        yield run
