"""Progress events of an analysis, for any listener: the terminal view (progress.py), a log,
and the front ends to come (a chat, a server, a live-stream watcher).

The engine calls these as it goes; the base class does nothing, so a listener overrides only
what it shows. Times are seconds; `memory` is the visual bank's status
(models.memory_bank.BankStatus).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Events:
    """Progress callbacks (the live view implements them; the default does nothing)."""

    def started(self, source: str, info: Any, sampling: Any, capacity: int) -> None:
        """One video starts: its input as given, its VideoInfo, its Sampling, the bank's M."""

    def frames(self, done: int, timestamp: float, memory: Any) -> None:
        """Frames read so far, the time of the last one, the visual bank after it."""

    def stage(self, text: str) -> None:
        """What the analysis does now, in words ("writing the caption")."""

    def finished(self, result: Any) -> None:
        """The video's Result (results.records)."""

    def batch_started(self, sources: Sequence[str], samplings: Sequence[Any], capacity: int) -> None:
        """Several videos start together, read in lockstep (--batch); `sources` are their inputs
        as given, `samplings` their frame plans."""

    def batch_frames(self, done: Sequence[int], memories: Sequence[Any]) -> None:
        """Frames each video of the batch has taken so far (in the order of batch_started), and
        each one's visual memory bank."""

    def reading(self, source: str, info: Any, sampling: Any) -> None:
        """A video is read to be kept (engine Session.read): decoded and through the vision
        encoder once, with no question yet, hence no memory bank."""

    def features(self, done: int, timestamp: float) -> None:
        """Frames of the video being read whose features are kept so far."""

    def close(self) -> None:
        """Tidy the display after an error or an interrupt."""
