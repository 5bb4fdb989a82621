"""The vision features of a video read once (engine Session.read), kept for any number of
answers: what a chat, a server or a second question needs so that no frame is decoded and
no ViT pass runs again.

They sit in a temporary file (features.FrameStore: in the cache folder when the cache is on,
else the system's temp folder; deleted by the OS even if the process is killed), never all
in RAM, so keeping an hour of video costs disk, not memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class KeptFeatures:
    """Features of every frame a read decoded, with what the read learnt on the way."""

    store: Any  # features.FrameStore: .read(start, stop) -> tensor [stop - start, P, C]
    info: Any  # sources.video.VideoInfo
    sampling: Any  # sources.video.Sampling: the plan the features follow
    timestamps: np.ndarray  # [count] seconds: the frames actually decoded (a damaged region is missing)
    warnings: tuple[str, ...] = ()  # what decoding said (damaged regions skipped)
    timings: dict[str, float] = field(default_factory=dict)  # what the read cost: decode, vision, total

    @property
    def count(self) -> int:
        return len(self.timestamps)

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
        self.store.close()
