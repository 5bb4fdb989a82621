"""Frames of a video file by index, read with PyAV: only the packets that are decoded are read.

decord (which probes every file: frame times, keyframes, size) decodes in a thread of its own
while its caller reads packets, one per turn, into a queue with no bound, and a decoder
thread that lags (a busy machine) lets that queue run towards the end of the file; only a
seek empties it (issue 18: the first minutes of a long video cost more than a short one's).
`FileFrames` decodes in the calling thread instead: it reads a packet only when the decoder
needs one, so what it holds is the decoder's own reference frames and nothing more, however
long the video and however busy the machine. Frames are numbered as decord numbers them
(display order, from the probe's frame times) and converted to RGB the same way (the same
size, the same rotation), so the frames are decord's frames: tests/test_video.py compares them
pixel for pixel.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from malmm_cli.errors import VideoError
from .video import VideoInfo, check_file, utf8_name


class FileFrames:
    """A reader of one video file: `get_batch(indices)` -> uint8 RGB [n, H, W, 3] in the probe's
    size, any indices in any order (forward within a keyframe interval decodes on, anything
    else seeks to the keyframe first). FFmpeg's errors while decoding come out as
    RuntimeError (the decoder's damage handling catches them). `packets` counts the packets read."""

    def __init__(self, path: Any, info: VideoInfo):
        import av
        from av.video.reformatter import VideoReformatter

        path = Path(path)
        check_file(path)
        name, alias = utf8_name(path)
        try:
            self._container = av.open(name)
            self._stream = self._container.streams.best("video")
            if self._stream is None:
                self._container.close()
                raise VideoError(f"{path} has no video stream (audio-only, or not a video).")
        except av.FFmpegError as e:
            raise VideoError(f"{path} cannot be opened as a video ({e.strerror or type(e).__name__}).") from None
        finally:
            if alias is not None:
                shutil.rmtree(alias, ignore_errors=True)  # FFmpeg has the file open: the link may go
        self._stream.thread_type = "AUTO"  # frame and slice threads, FFmpeg's count
        self.height, self.width = info.height, info.decode_width or info.width
        self._times = info.times()
        self._keys = info.keys()
        self._timed = info.frame_times is not None and info.timed
        self._start = self._stream.start_time or 0
        self._tb = float(self._stream.time_base) if self._stream.time_base else 0.0
        self._frames: Any = None  # the decoded frames from the last seek on, with their indices
        self._next = 0  # index of the frame the decoder gives next (0: the start of the file)
        self.packets = 0
        # One converter for every frame: frame.to_ndarray would set up FFmpeg's scaler anew
        # for each (a new VideoReformatter per frame).
        self._reformatter = VideoReformatter()
        weakref.finalize(self, self._container.close)

    def get_batch(self, indices: Any) -> np.ndarray:
        import av

        out = np.empty((len(indices), self.height, self.width, 3), np.uint8)
        try:
            for k, index in enumerate(indices):
                out[k] = self._frame(int(index))
        except av.FFmpegError as e:
            self._frames = None  # the decoder's state after an error is unknown: seek next time
            raise RuntimeError(f"decoding failed: {e.strerror or type(e).__name__} ({e})") from None
        return out

    # ---- inside -------------------------------------------------------------------------------

    def _frame(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self._times):
            raise IndexError(f"frame {index} is outside the video's {len(self._times)} frames")
        # Forward within a keyframe interval: decode on. Into a later one: seek there (where
        # frames are placed by time; without times the decoder reads on from the start).
        later = self._timed and self._key(index) > self._key(self._next)
        if self._frames is None or index < self._next or later:
            self._seek(self._key(index))
        for frame, at in self._frames:
            self._next = at + 1
            if at == index:
                return self._rgb(frame)
            if at > index:  # the decoder dropped it (damaged data): an error, handled as damage
                self._frames = None
                raise RuntimeError(f"frame {index} could not be decoded")
        self._frames = None
        raise RuntimeError(f"the file ended before frame {index}")

    def _key(self, index: int) -> int:
        """The keyframe at or before frame `index`."""
        index = min(index, len(self._times) - 1)
        return int(self._keys[max(0, int(np.searchsorted(self._keys, index, side="right")) - 1)])

    def _seek(self, key: int) -> None:
        """Seek to keyframe `key` (by its time, half a frame late so rounding cannot land on
        the keyframe before), then number the decoded frames from there."""
        if key == 0 or not self._timed or not self._tb:
            # Without trusted times a seek target is unknown: decode from the start, counting.
            if self.packets:  # only once something was read: a fresh reader is at the start
                self._container.seek(self._start, stream=self._stream, backward=True)
            self._frames, self._next = self._numbered(first=0), 0
            return
        half = 0.5 * (self._times[key + 1] - self._times[key]) if key + 1 < len(self._times) else 0.0
        target = int(math.floor((self._times[key] + half) / self._tb)) + self._start
        self._container.seek(target, stream=self._stream, backward=True)
        self._frames, self._next = self._numbered(first=None), key

    def _numbered(self, first: int | None):
        """(frame, index) for each decoded frame. Indices come from the frame's time where the
        probe's times are trusted (a seek may land on an earlier keyframe, and a damaged packet
        may drop a frame), else by counting from `first`, as decord counts."""
        at = first if first is not None else -1  # the next index by counting; -1: not known yet
        for packet in self._container.demux(self._stream):
            self.packets += packet.size > 0
            for frame in packet.decode():
                found = self._index_at(frame) if self._timed else None
                if found is None:
                    if at < 0:  # no time and nothing to count from: a frame we cannot place
                        continue
                    found = at
                at = found + 1
                yield frame, found

    def _index_at(self, frame: Any) -> int | None:
        """The index whose probed time is this frame's, within half the gap to its neighbours."""
        if frame.pts is None:
            return None
        t = (frame.pts - self._start) * self._tb
        times = self._times
        j = int(np.searchsorted(times, t))
        best = min((i for i in (j - 1, j) if 0 <= i < len(times)), key=lambda i: abs(times[i] - t))
        gaps = [times[i + 1] - times[i] for i in (best - 1, best) if 0 <= i < len(times) - 1]
        tolerance = 0.5 * min(gaps) if gaps and min(gaps) > 0 else 1e-3
        return best if abs(times[best] - t) <= tolerance else None

    def _rgb(self, frame: Any) -> np.ndarray:
        """RGB at the probe's size and orientation, as decord makes it: rotate by the display
        matrix (decord's transpose filters), scale only where the size differs (bilinear, as
        FFmpeg's scale filter in decord)."""
        turn = _quarter_turns(frame)
        w, h = (self.height, self.width) if turn % 2 else (self.width, self.height)
        if (frame.width, frame.height) == (w, h):
            rgb = self._reformatter.reformat(frame, format="rgb24")
        else:
            rgb = self._reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation="BILINEAR")
        rgb = rgb.to_ndarray()
        return np.rot90(rgb, k=turn) if turn else rgb


def _quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns that show the frame upright (0-3), from its display matrix."""
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        rotation = frame.rotation
        if rotation:
            return int(round(rotation / 90.0)) % 4
    return 0
