"""The vision features of a video read once (engine Session.read), kept for any number of
answers: what a chat, a server or a second question needs so that no frame is decoded and
no ViT pass runs again.

They sit in a temporary file (features.FrameStore: in the cache folder when the cache is on,
else the system's temp folder; deleted by the OS even if the process is killed), never all
in RAM, so keeping an hour of video costs disk, not memory.

Beside them, in memory and within a budget (kv_budget), the visual memory bank of the whole
video as the first answer at each bank length M computed it (models.VisualTrack: each
frame's cross-attention keys/values and the bank's merges). It does not depend on the
question, so later answers at that M replay it and run only the question's part of the
Q-Former: no key/value projection of the frames, no similarity, no merge of the features
(BENCHMARKS.md, section 24). The answers are the same bits either way (tests/test_chat.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Memory the visual tracks of one video read once may hold, all Ms together (bytes). At
# InstructBLIP size a frame's track is 4.7 MB in bf16: 1 GiB holds about 220 frames, so
# ask's, caption's and classify's default samplings (20, 80, 100 frames) fit together; a
# video too long for it is answered by the plain replay, and costs no more than before.
KV_BUDGET_BYTES = 1 << 30


@dataclass
class KeptFeatures:
    """Features of every frame a read decoded, with what the read learnt on the way."""

    store: Any  # features.FrameStore: .read(start, stop) -> tensor [stop - start, P, C]
    info: Any  # sources.video.VideoInfo
    sampling: Any  # sources.video.Sampling: the plan the features follow
    timestamps: np.ndarray  # [count] seconds: the frames actually decoded (a damaged region is missing)
    warnings: tuple[str, ...] = ()  # what decoding said (damaged regions skipped)
    timings: dict[str, float] = field(default_factory=dict)  # what the read cost: decode, vision, total
    kv_budget: int = KV_BUDGET_BYTES  # bytes the visual tracks may hold; 0: keep none
    # (M, total frames) -> sealed VisualTrack, least recently used first
    tracks: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def count(self) -> int:
        return len(self.timestamps)

    @property
    def nbytes(self) -> int:
        """Memory held (the tracks; the features themselves are on disk)."""
        with self._lock:
            return sum(track.nbytes for track in self.tracks.values()) + self.timestamps.nbytes

    def track_for(self, model, memory: int, total: int):
        """The visual bank of the whole video at bank length `memory`, for a stream of `model`
        over `total` frames: the sealed track to replay if one is kept, else an empty one to
        record into (then :meth:`keep`), or None when the video's track would not fit the
        budget. `model` must be the one the features were read with."""
        from models import VisualTrack

        key = (memory, total)
        with self._lock:
            kept = self.tracks.get(key)
            if kept is not None:
                self.tracks.move_to_end(key)
                return kept
        if self.count * VisualTrack.frame_bytes(model, self.store.shape[0]) > self.kv_budget:
            return None
        return VisualTrack(memory, total)

    def keep(self, stream) -> None:
        """Keep the track `stream` (models.VideoStream) recorded, if it read every frame;
        the least recently used tracks make room for it within the budget."""
        track = getattr(stream, "visual_track", None)  # the concat baseline's stream records no bank
        if track is None or track.sealed or track.frames != self.count:
            return
        track.seal()
        with self._lock:
            key = (track.capacity, track.total_frames)
            self.tracks.pop(key, None)
            self.tracks[key] = track
            self._trim()

    def set_budget(self, nbytes: int) -> None:
        """A new budget for the tracks; the least recently used go until the rest fit."""
        with self._lock:
            self.kv_budget = nbytes
            self._trim()

    def _trim(self) -> None:
        while self.tracks and sum(t.nbytes for t in self.tracks.values()) > self.kv_budget:
            self.tracks.popitem(last=False)

    def replay(self, timings: dict[str, float], warnings: list[str],
               chunk_size: int) -> Iterator[tuple[np.ndarray, Any]]:
        """(timestamps [k], features [k, P, C]) chunk by chunk, as a fresh read would give them;
        reading them counts as decoding in `timings`; the read's warnings end up in `warnings`,
        where the read's own run put them."""
        for start in range(0, self.count, chunk_size):
            t0 = time.perf_counter()
            feats = self.store.read(start, min(start + chunk_size, self.count))
            timings["decode"] += time.perf_counter() - t0
            yield self.timestamps[start : start + feats.shape[0]], feats
        warnings.extend(self.warnings)

    def close(self) -> None:
        self.set_budget(0)
        self.store.close()
