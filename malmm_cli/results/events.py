"""Progress events of an analysis, for any listener: the terminal view (progress.py), a log,
and the front ends to come (a chat, a server, a live-stream watcher).

The engine calls these as it goes; the base class does nothing, so a listener overrides only
what it shows. Times are seconds; `memory` is the visual bank's status
(models.memory_bank.BankStatus).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


class Events:
    """Progress callbacks (the live view implements them; the default does nothing)."""

    def started(self, source: str, info: Any, sampling: Any, capacity: int) -> None:
        """One video starts: its input as given, its VideoInfo, its Sampling, the bank's M."""

    def frames(self, done: int, timestamp: float, memory: Any) -> None:
        """Frames read so far, the time of the last one, the visual bank after it."""

    def stage(self, text: str) -> None:
        """What the analysis does now, in words ("writing the caption")."""

    def segment(self, index: int, total: int, start: float, end: float, text: str) -> None:
        """A summary's segment `index` (from 0) of `total` is captioned: its times and its text,
        as soon as it is written (the summary's record comes at the end)."""

    def finished(self, result: Any) -> None:
        """The video's Result (results.records)."""

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        """While this is open the caller writes to the terminal (a result as it comes): a live
        view steps aside, and comes back after."""
        yield

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


class Fanout(Events):
    """Every event to each of `listeners`, in order (the terminal view, then a writer of results)."""

    def __init__(self, *listeners: Events):
        self.listeners = listeners

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for each in self.listeners:
                stack.enter_context(each.printing())
            yield


def _forward(name: str):
    def forward(self: Fanout, *args, **kwargs) -> None:
        for each in self.listeners:
            getattr(each, name)(*args, **kwargs)

    forward.__name__ = name
    return forward


for _name, _value in list(vars(Events).items()):  # each callback of Events, forwarded
    if callable(_value) and not _name.startswith("_") and _name != "printing":
        setattr(Fanout, _name, _forward(_name))
