"""Chunked background decoding: sampled frames arrive in bounded chunks, decoded ahead by threads.

`stream_frames` turns a sampling plan into an iterator of `FrameChunk`s. Decoder threads, each
with its own reader (FileFrames: PyAV, reading only the packets it decodes), work on alternate
runs of the plan cut at keyframe boundaries and hand chunks over through bounded queues, so
decoding overlaps the model's work and memory does not grow with the video. Damage inside a
file is skipped with a warning; a stuck decoder gives up after STALL_TIMEOUT_S; closing the
stream (or breaking out of the loop) stops the threads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malmm_cli.errors import UsageError, VideoError
from .file_frames import FileFrames
from .video import Sampling, VideoInfo, probe

log = logging.getLogger("malmm")

STALL_TIMEOUT_S = 600.0  # no chunk for this long means the decoder is stuck: give up, never hang
MAX_CHUNK_BYTES = 128 * 2**20  # caps frames per chunk for 4K/8K sources (16 x 4K would be 400 MB)
MAX_DAMAGED_REGIONS = 16  # after this many undecodable regions the rest of the file is skipped
_JOIN_TIMEOUT_S = 5.0
_POLL_S = 0.2



@dataclass(frozen=True)
class FrameChunk:
    """Consecutive sampled frames: source indices, presentation times (s), uint8 RGB [n, H, W, 3]."""

    indices: np.ndarray
    timestamps: np.ndarray
    frames: np.ndarray


def stream_frames(
    path: str | os.PathLike,
    sampling: Sampling,
    *,
    info: VideoInfo | None = None,
    chunk_size: int = 16,
    prefetch: int = 2,
    workers: int | None = None,
) -> FrameStream:
    """Decode the planned frames in order, in chunks of at most `chunk_size`, ahead of the reader.

    `workers` decoder threads (default: one per CPU, at most 2) take turns over
    keyframe-aligned runs of the plan, each running up to `prefetch` chunks ahead, so at most
    workers x (prefetch + 1) + 1 chunks exist at once. Chunks of large frames are smaller
    (MAX_CHUNK_BYTES), so memory stays bounded whatever the resolution.
    """
    if int(chunk_size) < 1 or int(prefetch) < 1:
        raise UsageError("chunk_size and prefetch must be at least 1.")
    path = Path(path)
    info = info if info is not None else probe(path)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    return FrameStream(path, sampling, info, int(chunk_size), int(prefetch), max(1, int(workers)))


class FrameStream:
    """Iterable of FrameChunk (once), decoded by background threads; a context manager.

    Breaking out, an exception or KeyboardInterrupt in the consumer stops the threads (close).
    `warnings` lists, one sentence each, damaged regions that were skipped; those frames
    are missing from the chunks and everything decoded around them is still delivered.
    """

    def __init__(self, path: Path, sampling: Sampling, info: VideoInfo, chunk_size: int,
                 prefetch: int, workers: int):
        self.info = info
        self.sampling = sampling
        self.warnings: list[str] = []
        frame_bytes = max(1, info.width * info.height * 3)
        chunk = max(1, min(chunk_size, MAX_CHUNK_BYTES // frame_bytes))
        self._decoder = _Decoder(path, sampling, info, chunk, workers, prefetch)
        self._started = False

    def __iter__(self) -> Iterator[FrameChunk]:
        if self._started:
            raise RuntimeError("A FrameStream can be iterated only once.")
        self._started = True
        return self._iterate()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        decoder = getattr(self, "_decoder", None)
        if decoder is not None:
            decoder.stop.set()

    def close(self) -> None:
        """Stop the decoder threads and drop what they queued; safe to call twice."""
        self._decoder.shutdown()

    def _iterate(self) -> Iterator[FrameChunk]:
        d = self._decoder
        delivered = 0
        try:
            d.start()  # inside the try: an interrupt while threads start still stops those started
            for unit in range(len(d.units)):
                worker = unit % d.workers
                while (item := d.get(worker)) is not _UNIT_END:
                    if item is _STOP:
                        break
                    if isinstance(item, _Failure):
                        raise item.error
                    if isinstance(item, _Warning):
                        self.warnings.append(item.message)
                        log.warning("%s", item.message)
                        continue
                    delivered += len(item.indices)
                    yield item
                if item is _STOP:
                    break
            if delivered == 0 and self.warnings:
                raise VideoError(f"{d.path} is corrupt: none of the sampled frames could be decoded.")
        finally:
            self.close()


_UNIT_END = object()  # a worker finished one run of the plan
_STOP = object()  # a worker gave up on the rest of the file (too many damaged regions)


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Warning:
    message: str


class _GiveUp(Exception):
    pass


class _Stopped(Exception):
    pass


class _Decoder:
    """State shared by the decoder threads. Holds no reference to the FrameStream, so an
    abandoned stream is garbage-collected and its __del__ stops the threads."""

    def __init__(self, path: Path, sampling: Sampling, info: VideoInfo, chunk: int,
                 workers: int, prefetch: int):
        self.path, self.chunk, self.info = path, chunk, info
        self.indices, self.times = sampling.indices, sampling.timestamps
        self.keys = info.keys()
        # Runs of >= 2 chunks: short runs balance the workers (measured: 5.3 s vs 6.5 s with
        # 8-chunk runs on a 10-minute clip) at the price of a short last chunk per run.
        # One worker reads the plan as a single run, so all its chunks are full.
        self.units = _plan_units(self.indices, self.keys, 2 * chunk if workers > 1 else len(self.indices))
        self.workers = max(1, min(workers, len(self.units)))
        self.queues = [queue.Queue(maxsize=prefetch) for _ in range(self.workers)]
        self.threads: list[threading.Thread] = []
        self.readers: list[FileFrames | None] = [None] * self.workers
        self.stop = threading.Event()
        self.damaged = 0
        self.lock = threading.Lock()

    def start(self) -> None:
        self.threads = [threading.Thread(target=self.run, args=(w,), name=f"malmm-decode-{w}", daemon=True)
                        for w in range(self.workers)]
        for t in self.threads:
            t.start()

    def shutdown(self) -> None:
        self.stop.set()
        for q in self.queues:
            _drain(q)
        for t in self.threads:
            # Only running threads: an interrupt can land between creating a thread and the end
            # of its start(), and joining it then raises RuntimeError. One that never got going
            # sees `stop` when it does, and ends by itself.
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=_JOIN_TIMEOUT_S)
                if t.is_alive():  # stuck inside FFmpeg; it is a daemon and exits with the process
                    log.debug("decoder thread %s did not stop within %.0f s", t.name, _JOIN_TIMEOUT_S)
        for q in self.queues:
            _drain(q)

    def get(self, worker: int) -> Any:
        """Next item from one worker's queue; VideoError if the worker died or stalled."""
        q, deadline = self.queues[worker], time.monotonic() + STALL_TIMEOUT_S
        while True:
            if self.stop.is_set():  # closed from inside the loop: end the iteration quietly
                return _STOP
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.threads[worker].is_alive() and q.empty():
                    raise VideoError(f"Decoding {self.path} stopped unexpectedly.") from None
                if time.monotonic() > deadline:
                    raise VideoError(f"Decoding {self.path} stalled for {STALL_TIMEOUT_S:g} s; giving up.") from None

    def put(self, worker: int, item: Any) -> None:
        """Queue an item, waiting for room; _Stopped if the stream is closed meanwhile."""
        while not self.stop.is_set():
            try:
                self.queues[worker].put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def run(self, worker: int) -> None:
        """Thread body: decode this worker's runs of the plan (units w, w+W, ...) in order."""
        try:
            mine = list(range(worker, len(self.units), self.workers))
            for k, unit in enumerate(mine):
                after = self.units[mine[k + 1]][0] if k + 1 < len(mine) else None
                self.decode_unit(worker, *self.units[unit], after)
                self.put(worker, _UNIT_END)
        except _Stopped:
            pass
        except _GiveUp:
            self._final(worker, _STOP)
        except BaseException as e:  # delivered to the consumer, which re-raises it
            self._final(worker, _Failure(e))
        finally:
            self.readers[worker] = None

    def _final(self, worker: int, item: Any) -> None:
        try:
            self.put(worker, item)
        except _Stopped:
            pass

    def decode_unit(self, worker: int, lo: int, hi: int, after: int | None) -> None:
        """Decode plan positions [lo, hi) in chunks; `after` is where this worker goes next.

        A reader reads only the packets it decodes (FileFrames), so one that waits for queue
        room holds no more than its decoder's frames; self.readers[worker] is its only
        reference, dropped after an error and once the worker has nowhere to go."""
        p = lo
        while p < hi:
            if self.stop.is_set():
                raise _Stopped
            if self.readers[worker] is None:
                self.readers[worker] = self.open()
            q = min(p + self.chunk, hi)
            try:
                batch = self.readers[worker].get_batch(self.indices[p:q])
            except RuntimeError as e:
                self.readers[worker] = None  # the decoder's state after an error is unknown
                p = self.recover(worker, p, q, hi, e)
                continue
            if q == hi and after is None:
                self.readers[worker] = None  # the worker's last chunk: free the reader now
            self.put(worker, self.chunk_of(p, q, batch))
            p = q

    def open(self) -> FileFrames:
        return FileFrames(self.path, self.info)

    def recover(self, worker: int, p: int, q: int, hi: int, error: BaseException) -> int:
        """After a decode error in plan positions [p, q): deliver what still decodes of them
        (fresh reader, frame by frame), skip the damage, return the position to go on from."""
        reader = self.open()
        good: list[np.ndarray] = []
        for j in range(p, q):
            try:
                good.append(reader.get_batch([int(self.indices[j])])[0])
            except RuntimeError:
                break
        if good:
            self.put(worker, self.chunk_of(p, p + len(good), np.stack(good)))
        bad = p + len(good)
        if bad == q:
            return q
        resume = self.skip_damage(bad, hi)
        self.damage(worker, bad, resume, error)
        return resume

    def skip_damage(self, bad: int, hi: int) -> int:
        """First plan position after `bad` that decodes again, trying the keyframe 1, 2, 4, ...
        intervals further on. The extent of the damage is unknown; doubling keeps the reopen
        count logarithmic."""
        pos, step = bad, 1
        while True:
            later = self.keys[self.keys > self.indices[pos]]
            if len(later) < step:
                return hi
            resume = int(np.searchsorted(self.indices, later[step - 1]))
            if resume >= hi:
                return hi
            try:
                self.open().get_batch([int(self.indices[resume])])
                return resume
            except RuntimeError:
                pos, step = resume, step * 2

    def damage(self, worker: int, bad: int, resume: int, error: BaseException) -> None:
        t_bad = float(self.times[bad])
        until = f"to {self.times[resume]:.2f} s" if resume < len(self.indices) else "the rest of the video"
        with self.lock:
            self.damaged += 1
            give_up = self.damaged > MAX_DAMAGED_REGIONS
        if give_up:
            msg = f"{self.path}: too many damaged regions; stopped decoding at {t_bad:.2f} s."
        else:
            msg = f"{self.path}: corrupt data near {t_bad:.2f} s could not be decoded; skipped {until}."
        log.debug("decoding error in %s: %s", self.path, error)
        self.put(worker, _Warning(msg))  # in band, so warnings arrive in video order
        if give_up:
            raise _GiveUp

    def chunk_of(self, p: int, q: int, frames: np.ndarray) -> FrameChunk:
        return FrameChunk(self.indices[p:q].copy(), self.times[p:q].copy(), frames)


def _plan_units(indices: np.ndarray, keys: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """Split plan positions into runs of >= min_len samples, cut only where a sample opens a new
    keyframe interval (GOP): a decoder starting a run then never decodes frames another
    decoder already decoded (it seeks straight to the run's keyframe)."""
    if len(indices) == 0:
        return []
    gop = np.searchsorted(keys, indices, side="right")
    opens = np.flatnonzero(np.concatenate([[True], gop[1:] != gop[:-1]]))
    starts = [0]
    for p in opens[1:]:
        if p - starts[-1] >= min_len:
            starts.append(int(p))
    return list(zip(starts, starts[1:] + [len(indices)]))


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


