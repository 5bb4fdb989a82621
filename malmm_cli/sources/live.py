"""Live sources: frames that arrive in real time, decoded with PyAV (FFmpeg's bindings).

decord indexes a whole file before it decodes a frame, so it cannot read a stream that is
still arriving; PyAV demuxes and decodes packet by packet. What can be watched, and how each
source is opened, is live_open.py's business.

A `LiveReader` runs the source in a thread: it decodes every frame (codecs need them all),
samples at `fps` by stream time (the frame on screen at each sample time, as
sources/video.plan_sampling picks frames of a file) and hands the sampled frames over through
a bounded queue. A source that runs ahead of real time (a file, a pipe fed from one) waits
for the model when the queue is full; a source that runs at real time never waits: the oldest
queued frame is dropped instead, and counted. An end of stream ends the reader; a cut
(an error, a connection lost, a live source's EOF) reopens the source with backoff, for at
most `retries_s` seconds from the cut, then ends the reader with one sentence.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from malmm_cli.errors import InputError

from .live_open import LiveSpec, Opened, av_reason, hls_ended, live_spec, open_live  # noqa: F401  (re-exported)

log = logging.getLogger("malmm")

_SLACK_S = 0.5  # a source this far ahead of real time is faster than real time (a file)
_TIME_SLACK = 2e-6  # frame times as plan_sampling compares them (its _time_slack for small t)
_POLL_S = 0.1
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)  # then 4 s apart, until retries_s is spent
_JOIN_S = 5.0


# ---- frames --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveFrame:
    """A sampled frame: its stream time (s, from the stream's first frame), when it was
    decoded (time.monotonic()), when real time would have shown it, and its pixels."""

    time: float
    arrived: float
    due: float  # time.monotonic() at which the stream, played in real time, shows this frame
    rgb: np.ndarray  # uint8 [H, W, 3]

    def lag(self, now: float) -> float:
        """How far behind the stream a result of this frame at `now` is: from when the frame
        was due in real time (for a live source), or from when it was decoded (for a source
        faster than real time, whose frames are all early)."""
        return max(0.0, now - min(self.arrived, self.due))


@dataclass(frozen=True)
class StreamEnd:
    """The reader is done. `end`: the stream time where the stream stopped; `error`: the
    sentence when it was cut and could not be reopened (None: it ended, or was stopped)."""

    end: float
    error: str | None = None


@dataclass
class ReaderState:
    """What the reader has done so far (read by the consumer and the terminal view)."""

    kind: str = ""
    url: str = ""
    width: int = 0
    height: int = 0
    codec: str = ""
    rate: float | None = None  # the stream's frame rate, when it says
    sampled: int = 0
    dropped: int = 0
    reconnects: int = 0
    stream_time: float = 0.0
    note: str = ""  # what the reader does now, in words ("reconnecting ...")
    drops_by_window: collections.Counter = field(default_factory=collections.Counter)


class FrameQueue:
    """Sampled frames from the reader to the model, at most `capacity` of them at once."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()

    def put(self, frame: LiveFrame, wait: Callable[[], bool]) -> LiveFrame | None:
        """Queue `frame`; while the queue is full, wait as long as `wait()` says, then drop the
        oldest frame and return it."""
        with self.cond:
            while len(self.items) >= self.capacity and wait():
                self.cond.wait(_POLL_S)
            dropped = self.items.popleft() if len(self.items) >= self.capacity else None
            self.items.append(frame)
            self.cond.notify_all()
            return dropped

    def finish(self, end: StreamEnd) -> None:
        with self.cond:
            self.items.append(end)  # never dropped, whatever the capacity
            self.cond.notify_all()

    def take(self, most: int, timeout: float) -> list:
        """Up to `most` items, waiting up to `timeout` s for the first; frames, then at most one StreamEnd."""
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            out = []
            while self.items and len(out) < most:
                item = self.items.popleft()
                out.append(item)
                if isinstance(item, StreamEnd):
                    break
            self.cond.notify_all()
            return out


# How far back in stream time a reopened source may start again, repeating what was read: an
# HLS playlist a few segments back, a file from its start. A stream, camera or pipe gives what
# plays now, so a time back there is a restarted encoder, read as new.
_REPLAY_S = {"hls": 60.0, "page-hls": 60.0, "file": math.inf}


class _Clock:
    """Stream time of decoded frames: from 0 at the first frame, continuous across reconnects."""

    def __init__(self):
        self.base: float | None = None  # raw time of stream time 0
        self.last_raw: float | None = None
        self.last: float = 0.0
        self.step = 0.04  # a frame's duration, for a frame without a time and after a restart
        self.wall0 = self.t0 = 0.0  # real-time anchor: stream time t0 was shown at wall0
        self.reopened = False  # set on a reconnect: the next frame re-anchors real time
        self.replay_s = 0.0  # how far back a reopened source may start again: frames there are skipped

    def anchor(self, t: float, now: float) -> None:
        self.wall0, self.t0 = now, t

    def place(self, raw: float | None, now: float) -> float | None:
        """The stream time of a frame with raw time `raw` (s, the container's), or None for a
        frame to skip: one seen already (a reopened HLS stream starts a few segments back) or
        out of order. Times that start over (a restarted encoder, a discontinuity, any time back
        after reopening a source that does not replay: it gives what plays now) go on from the
        last stream time."""
        if raw is None:
            raw = 0.0 if self.last_raw is None else self.last_raw + self.step
        if self.base is None:
            self.base = raw
            self.anchor(0.0, now)
        else:
            back = raw <= self.last_raw
            if self.reopened and back and raw > self.last_raw - self.replay_s:
                return None
            restarted = self.reopened and back  # further back than a replay: what plays now
            if restarted or raw < self.last_raw - 1 or raw > self.last_raw + (60 if self.reopened else 3600):
                self.base = raw - (self.last + self.step)
            elif back:
                return None
            if self.reopened:
                self.reopened = False
                self.anchor(raw - self.base, now)  # real time starts again where the stream resumed
        self.last_raw = raw
        self.last = round(raw - self.base, 6)  # 4.4 - 1.4 is 2.9999999999999996: a frame in the wrong window
        return self.last

    @property
    def end(self) -> float:
        """Where the stream read so far ends: its last frame shows for one frame time."""
        return round(self.last + self.step, 6) if self.base is not None else 0.0

    def due(self, t: float) -> float:
        return self.wall0 + (t - self.t0)


class LiveReader:
    """A source read in a thread: sampled frames into a FrameQueue, then one StreamEnd."""

    def __init__(self, spec: LiveSpec, *, fps: float, every: float, duration: float | None = None,
                 retries_s: float = 30.0, capacity: int | None = None):
        self.spec, self.fps, self.every, self.duration, self.retries_s = spec, fps, every, duration, retries_s
        # About two seconds of sampled frames: enough to batch the ViT, little enough to stay live.
        self.queue = FrameQueue(capacity or max(2, math.ceil(2 * fps)))
        self.state = ReaderState(kind=spec.kind)
        self.stop_event = threading.Event()
        self.clock = _Clock()
        self.thread = threading.Thread(target=self._run, name="malmm-live", daemon=True)
        self._resolved: tuple[str, tuple] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop reading (the consumer's end: Ctrl-C, --duration reached elsewhere, an error)."""
        self.stop_event.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(_JOIN_S)  # a read blocked in FFmpeg ends by its timeout; the thread is a daemon

    def drops_in(self, window: int) -> int:
        """Frames of window `window` dropped so far; forgotten once asked for (the window is done)."""
        with self._lock:
            return self.state.drops_by_window.pop(window, 0)

    # ---- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        end: StreamEnd | None = None
        try:
            end = self._read_all()
        except InputError as e:
            end = StreamEnd(self.clock.end, str(e))
        except Exception as e:  # noqa: BLE001 - a bug in the reader: said in one sentence, not lost in a thread
            log.debug("live reader failed", exc_info=True)
            end = StreamEnd(self.clock.end, f"reading {self.spec.input} failed: {type(e).__name__}: {e}")
        finally:
            self.queue.finish(end or StreamEnd(self.clock.end))

    def _read_all(self) -> StreamEnd:
        opened = open_live(self.spec, self.stop_event, idle_s=self.retries_s)  # the first open fails at once
        self._describe(opened)
        while True:
            ended, cut = self._decode(opened)
            if ended is not None:
                return ended
            cut_at = time.monotonic()
            opened = self._reopen(cut, cut_at)
            if opened is None:
                return StreamEnd(self.clock.end, self._cut_sentence(cut))
            self.state.reconnects += 1
            self.state.note = ""
            self.clock.reopened = True
            self.clock.replay_s = _REPLAY_S.get(opened.kind, 0.0)

    def _describe(self, opened: Opened) -> None:
        s, ctx = self.state, opened.stream.codec_context
        s.kind, s.url, s.width, s.height, s.codec = opened.kind, opened.url, ctx.width, ctx.height, ctx.name
        rate = opened.stream.average_rate or opened.stream.guessed_rate
        s.rate = float(rate) if rate else None
        if s.rate:
            self.clock.step = 1.0 / s.rate
        if opened.kind.startswith("page-"):
            self._resolved = (opened.url, opened.headers)

    def _cut_sentence(self, cut: str) -> str:
        return (f"{self.spec.input}: the stream was cut at {_clock(self.clock.last)} ({cut}) and could not be "
                f"reopened within {self.retries_s:g} s")

    def _reopen(self, cut: str, cut_at: float) -> Opened | None:
        """Open the source again, with backoff, until retries_s have passed since the cut."""
        import av

        for attempt in range(10_000):
            wait = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            left = cut_at + self.retries_s - time.monotonic()
            if left <= 0 or self.stop_event.is_set():
                return None
            # Said by the terminal view, from this note: a log line from this thread would tear its panel.
            self.state.note = f"cut at {_clock(self.clock.last)} ({cut}); reconnecting, try {attempt + 1}"
            log.debug("%s: %s", self.spec.input, self.state.note)
            if self.stop_event.wait(min(wait, left)):
                return None
            try:
                spec = self.spec if self._resolved is None else LiveSpec(self.spec.input, "http", self._resolved[0],
                                                                         self._resolved[1])
                return open_live(spec, self.stop_event, idle_s=self.retries_s)
            except (InputError, av.FFmpegError, OSError) as e:
                cut = str(e).removeprefix(f"{self.spec.input} ").rstrip(".")
        return None

    def _decode(self, opened: Opened) -> tuple[StreamEnd | None, str]:
        """Decode until the source ends or is cut: (StreamEnd, "") when it ended or was
        stopped, (None, why) when it was cut. Samples the frame on screen at each sample time."""
        import av

        fps, previous, next_sample = self.fps, None, None
        error = ""
        try:
            for frame in opened.container.decode(opened.stream):
                if self.stop_event.is_set():
                    break
                now = time.monotonic()
                t = self.clock.place(frame.time, now)
                if t is None:
                    continue
                self.state.stream_time = t
                if next_sample is None:
                    next_sample = self._first_sample(t)
                if self.duration is not None and t >= self.duration - _TIME_SLACK:
                    if previous is not None and next_sample < self.duration:
                        self._emit(previous)
                    return StreamEnd(self.duration), ""
                # The previous frame is on screen at every sample time before this frame's.
                if previous is not None and next_sample < t - _TIME_SLACK:
                    self._emit(previous)
                    next_sample = math.ceil((t - _TIME_SLACK) * fps) / fps
                previous = (frame, t, now)
        except (av.FFmpegError, OSError, EOFError) as e:
            error = av_reason(e)
        finally:
            opened.close()
        end = self.clock.end
        if self.duration is not None:
            end = min(end, self.duration)
        if previous is not None and next_sample is not None and next_sample < end - _TIME_SLACK:
            self._emit(previous)
        if self.stop_event.is_set():
            return StreamEnd(end), ""
        cut = error or (opened.body.cut if opened.body is not None else None)
        if not cut and opened.kind in ("hls", "page-hls") and not hls_ended(opened.url, opened.headers):
            cut = "the playlist stopped growing, or could not be loaded"
        if not cut and opened.kind in ("ffmpeg", "device"):
            # A camera or a live protocol does not end by itself: a killed RTSP server reads as
            # an end here (FFmpeg sees its connection close), so it is a cut, named for what it is.
            cut = "the camera stopped sending frames" if opened.kind == "device" else "the server closed the stream"
        return (None, cut) if cut else (StreamEnd(end), "")

    def _first_sample(self, t: float) -> float:
        return math.ceil((t - _TIME_SLACK) * self.fps) / self.fps

    def _emit(self, previous) -> None:
        """Queue the frame `previous` = (av frame, stream time, when decoded)."""
        frame, t, arrived = previous
        item = LiveFrame(t, arrived, self.clock.due(t), frame.to_ndarray(format="rgb24"))
        self.state.sampled += 1
        # A source ahead of real time waits for the model; a live one never does.
        dropped = self.queue.put(item, lambda: not self.stop_event.is_set() and self._ahead(item))
        if dropped is not None:
            with self._lock:
                self.state.dropped += 1
                self.state.drops_by_window[window_of(dropped.time, self.every)] += 1

    def _ahead(self, frame: LiveFrame) -> bool:
        return frame.due - time.monotonic() > _SLACK_S


def window_of(t: float, every: float) -> int:
    """The window of stream time `t`: [k * every, (k + 1) * every) is window k (a time a rounding
    error below a boundary is on it)."""
    return int(math.floor(t / every + 1e-9))


def _clock(seconds: float) -> str:
    total = int(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
