"""Progress on stderr: a live view on a terminal, plain log lines otherwise, nothing with --quiet.

The live view shows, per input, a progress bar (frames, frames/s, time left) and the memory
bank filling and compressing: slots used of capacity, compressions so far, frames each slot
stands for (as a bar chart, oldest slot first) and the time span the oldest slot covers.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .analyze import Events
from .results import Result
from .writers import short_clock

_BARS = " ▁▂▃▄▅▆▇█"


def memory_line(memory, timestamps) -> str:
    """'12/20 slots · 37 compressions · oldest slot 0:00-0:41'."""
    text = f"{memory.length}/{memory.capacity} slots · {memory.compressions} compressions"
    if memory.slot_spans and timestamps is not None and len(timestamps):
        first, last = memory.slot_spans[0]
        last = min(last, len(timestamps) - 1)
        text += f" · oldest slot {short_clock(timestamps[first])}-{short_clock(timestamps[last])}"
    return text


def slot_chart(slot_frames) -> str:
    """Frames per slot as a one-line bar chart, scaled to the fullest slot."""
    if not slot_frames:
        return ""
    top = max(slot_frames)
    return "".join(_BARS[min(8, max(1, round(8 * f / top)))] for f in slot_frames)


class RichEvents(Events):
    """The live view (a terminal on stderr)."""

    def __init__(self, console: Console, total_inputs: int):
        self.console = console
        self.total_inputs = total_inputs
        self.index = 0
        self.live: Live | None = None

    def started(self, source, info, sampling, capacity):
        self.index += 1
        self.timestamps = sampling.timestamps
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("frames · {task.fields[rate]:.1f}/s ·"), TimeElapsedColumn(), TextColumn("elapsed ·"),
            TimeRemainingColumn(), TextColumn("left"), console=self.console,
        )
        label = source if len(source) <= 40 else "…" + source[-39:]
        prefix = f"[{self.index}/{self.total_inputs}] " if self.total_inputs > 1 else ""
        self.task = self.progress.add_task(prefix + label, total=len(sampling.indices), rate=0.0)
        self.memory_text = Text(f"memory bank: 0/{capacity} slots", style="cyan")
        self.stage_text = Text(f"{short_clock(info.duration)} of video, {len(sampling.indices)} frames to read",
                               style="dim")
        self.t0 = time.perf_counter()
        self.live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)
        self.live.start()

    def _render(self):
        return Panel(Group(self.progress, self.memory_text, self.stage_text), border_style="blue", expand=False)

    def frames(self, done, timestamp, memory):
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        self.progress.update(self.task, completed=done, rate=rate)
        chart = slot_chart(memory.slot_frames)
        self.memory_text = Text("memory bank: " + memory_line(memory, self.timestamps) + (f"  {chart}" if chart else ""),
                                style="cyan")
        self.stage_text = Text(f"at {short_clock(timestamp)}", style="dim")
        self.live.update(self._render())

    def stage(self, text):
        self.stage_text = Text(text + " …", style="yellow")
        if self.live is not None:
            self.live.update(self._render())

    def finished(self, result: Result):
        self.close()
        self.console.print(f"[green]✓[/] {result.input}: {result.sampling.frames} frames in "
                           f"{result.timings['total']:.1f} s")

    def close(self):
        if self.live is not None:
            self.live.stop()
            self.live = None


class LogEvents(Events):
    """Plain lines for logs and pipes: start, every ~10 % of frames, stages, finish."""

    def __init__(self, stream: TextIO, total_inputs: int):
        self.out = stream
        self.total_inputs = total_inputs
        self.index = 0

    def _line(self, text: str) -> None:
        self.out.write(f"malmm: {text}\n")
        self.out.flush()

    def started(self, source, info, sampling, capacity):
        self.index += 1
        self.source, self.total, self.next_report = source, len(sampling.indices), 0.1
        self.timestamps = sampling.timestamps
        prefix = f"[{self.index}/{self.total_inputs}] " if self.total_inputs > 1 else ""
        self._line(f"{prefix}{source}: {self.total} frames from {short_clock(sampling.start)} to "
                   f"{short_clock(sampling.end)}, memory {capacity} slots")

    def frames(self, done, timestamp, memory):
        if done >= self.next_report * self.total or done == self.total:
            self.next_report = (int(10 * done / max(1, self.total)) + 1) / 10
            self._line(f"{self.source}: {done}/{self.total} frames, memory {memory_line(memory, self.timestamps)}")

    def stage(self, text):
        self._line(f"{self.source}: {text}")

    def finished(self, result):
        self._line(f"{result.input}: done, {result.sampling.frames} frames in {result.timings['total']:.1f} s")


def make_events(quiet: bool, total_inputs: int, stderr: TextIO | None = None) -> Events:
    stderr = stderr or sys.stderr
    if quiet:
        return Events()
    if stderr.isatty():
        return RichEvents(Console(file=stderr), total_inputs)
    return LogEvents(stderr, total_inputs)
