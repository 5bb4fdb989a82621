"""Progress on stderr: a live view on a terminal, plain log lines otherwise, nothing with --quiet.

The live view shows, per input, a progress bar (frames, frames/s, time left) and the memory
bank filling and compressing: slots used of capacity, compressions so far, frames each slot
stands for (as a bar chart, oldest slot first) and the time span the oldest slot covers.

It is laid out afresh for the terminal's width at every refresh. At 80 columns and below,
what gives way is, in order: the elapsed time, the progress bar, the rate; the frames done
of total and the time left always stay, and a long input path loses its middle, never its
file name.

Below the bar: the memory bank in words, the frames-per-slot chart with its scale, a one-line
legend of slots and compressions, and where in the video the run is ("video at 1:03 of 1:10").
When a video is done its panel goes, and what stays is a line for it and its memory bank as it
ended (the words and the chart). A summary's segments are printed above the panel as each is
captioned, unless they go to stdout as they come (runs/command.py), and the panel counts them.

With --batch, one view follows the videos read in lockstep: the frames read of all of them,
then a row per video (frames read, where in its video it is, memory slots, compressions; up to
a dozen rows, then a count of the rest). In a row the name gives way first, then the
compressions, then the slots, then the time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from malmm_cli.messages import plural
from malmm_cli.terminal import shown

from .events import Events
from .records import Result, SegmentText
from .writers import segment_line, short_clock

_BARS = " ▁▂▃▄▅▆▇█"
_MAX_WIDTH = 100  # wider, the panel would be mostly empty bar
_MIN_BAR = 10  # a bar narrower than this shows nothing the numbers do not
_PANEL_FRAME = 4  # border and one space of padding on each side
_CHART_LABEL = "frames per slot: "
# What a slot and a compression are, in one line (it shows where it fits).
LEGEND = "slot: frames averaged into one entry · compression: two alike slots merged"
_MAX_LANES = 12  # rows of a batch view: with the frame and the lines around it, within 24 rows
_MIN_NAME = 12  # a batch row narrower than this for its name drops a number instead


def memory_line(memory, timestamps) -> str:
    """'12/20 slots · 37 compressions · oldest slot 0:00-0:41'."""
    text = f"{memory.length}/{memory.capacity} slots · {plural(memory.compressions, 'compression')}"
    if memory.slot_spans and timestamps is not None and len(timestamps):
        first, last = memory.slot_spans[0]
        last = min(last, len(timestamps) - 1)
        text += f" · oldest slot {short_clock(timestamps[first])}-{short_clock(timestamps[last])}"
    return text


def _bins(slot_frames: Sequence[float], width: int | None) -> list[float]:
    """The chart's bars: one per slot, or with more slots than `width` columns the mean of
    neighbouring slots, so that it still reads oldest to newest."""
    values = list(slot_frames)
    if width is not None and len(values) > width:
        n = len(values)
        values = [sum(values[i * n // width:(i + 1) * n // width]) / ((i + 1) * n // width - i * n // width)
                  for i in range(width)]
    return values


def slot_chart(slot_frames: Sequence[float], width: int | None = None) -> str:
    """Frames per slot as a one-line bar chart, scaled to the fullest bar (chart_top)."""
    if width == 0:
        return ""
    values = _bins(slot_frames, width)
    top = max(values, default=0) or 1
    return "".join(_BARS[min(8, max(1, round(8 * v / top)))] for v in values)


def chart_top(slot_frames: Sequence[float], width: int | None = None) -> float:
    """The frames a full bar (█) of slot_chart stands for."""
    return max(_bins(slot_frames, width), default=0)


def chart_row(slot_frames: Sequence[float], width: int) -> str:
    """'frames per slot: █▂▁▂ (█ = 25)' in at most `width` columns: the chart and its scale."""
    if not slot_frames:
        return ""
    for label in (_CHART_LABEL, ""):
        room = width - len(label) - 12  # 12: the widest scale, " (█ = 1,234)"
        if room >= _MIN_BAR or not label:
            break
    if room < 1:
        return ""
    top = chart_top(slot_frames, room)
    return label + slot_chart(slot_frames, room) + (f" (█ = {top:.0f})" if top >= 10 else f" (█ = {top:.1f})")


def _fit(chars: Iterable[str], cells: int) -> str:
    """The longest run of `chars` that fits in `cells` terminal columns (wide characters take two)."""
    kept, used = [], 0
    for ch in chars:
        used += cell_len(ch)
        if used > cells:
            break
        kept.append(ch)
    return "".join(kept)


def shorten_middle(path: str, width: int) -> str:
    """`path` in at most `width` columns: its start, '…', and its end. The end is whole folders
    and the file name, up to half the room (the name always, cut at its start only if it alone
    does not fit)."""
    # A newline or escape in a file name would break the layout of the lines around it: shown as
    # escapes (`\\n`, `\\x1b`, an undecodable byte as `\\xff`); other unprintable characters as "?".
    path = "".join(ch if ch.isprintable() else "?" for ch in shown(path))
    if cell_len(path) <= width:
        return path
    if width < 1:
        return ""
    room = width - 1  # the ellipsis
    slashes = [i for i, ch in enumerate(path[:-1]) if ch == "/"]  # a trailing "/" is the name's (a folder)
    start = slashes.pop() if slashes else 0
    while slashes and cell_len(path[slashes[-1]:]) <= room // 2:
        start = slashes.pop()
    tail = _fit(reversed(path[start:]), room)[::-1]
    return _fit(path, room - cell_len(tail)) + "…" + tail


def wrap_parts(parts: Sequence[str], width: int, sep: str = " · ") -> str:
    """`parts` joined by `sep`, a line broken between parts, never inside one that fits a line."""
    lines: list[str] = []
    for part in parts:
        if lines and cell_len(lines[-1] + sep + part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return "\n".join(lines)


def _counter(first: int, count: int, total: int) -> str:
    """'[5-8/20] ' for inputs 5 to 8 of 20, '[5/20] ' for one; '' when these are all the inputs."""
    if count >= total:
        return ""
    return f"[{first}-{first + count - 1}/{total}] " if count > 1 else f"[{first}/{total}] "


def _batch_title(first: int, count: int, total: int) -> str:
    """'[5-8/20] 4 videos in lockstep'."""
    return _counter(first, count, total) + f"{count} video{'s' if count != 1 else ''} in lockstep"


def _rate(per_second: float) -> str:
    # Two decimals below 1/s, so the 7B model on a CPU does not read as 0.0/s.
    return f"{per_second:.1f}/s" if per_second >= 1 else f"{per_second:.2f}/s"


def progress_line(width: int, done: int, total: int, rate: float | None, elapsed: float,
                  left: float | None) -> Text:
    """'━━━━━━━━━━━━ 12/80 frames · 3.2/s · 0:04 elapsed · 0:21 left' in `width` columns."""
    counts = f"{done}/{total} frames"
    speed = _rate(rate) if rate else "?/s"
    spent = f"{short_clock(elapsed)} elapsed"
    remaining = f"{'?' if left is None else short_clock(left)} left"
    # Tried in order, least useful part dropped first: elapsed time is what a clock tells too, the
    # bar repeats the counts, and the time left matters more than the rate behind it.
    layouts = (((counts, speed, spent, remaining), True), ((counts, speed, remaining), True),
               ((counts, speed, remaining), False), ((counts, remaining), False))
    for parts, with_bar in layouts:  # the last one is kept when none fits: Rich then wraps it
        numbers = " · ".join(parts)
        bar_width = width - cell_len(numbers) - 1  # 1: the space after the bar
        if bar_width >= (_MIN_BAR if with_bar else -1):
            break
    line = Text()
    if with_bar:
        filled = round(bar_width * done / total) if total else bar_width
        line.append("━" * filled, style="bar.finished" if done >= total else "bar.complete")
        line.append("━" * (bar_width - filled), style="bar.back")
        line.append(" ")
    line.append(numbers, style="progress.download")
    return line


class _Panel:
    """What a live view draws: a title, the progress line, what the subclass adds below it, and a
    note. Rendered by Live at every refresh, at the width of that moment, so a resized terminal
    gets a fresh layout."""

    def __init__(self, title: str, total: int, note: str):
        self.title = title
        self.total = total
        self.done = 0
        self.rate: float | None = None
        self.left: float | None = None  # seconds, as estimated at the last frames event
        self.note = (note, "dim")  # (text, style): where in the video the run is, or its stage
        self.t0 = self.t_frames = time.perf_counter()

    def advance(self, done: int) -> None:
        self.t_frames = time.perf_counter()
        self.done = done
        self.rate = done / max(1e-9, self.t_frames - self.t0)
        self.left = (self.total - done) / self.rate if self.rate else None

    def body(self, inner: int) -> list[Text]:
        """The rows between the progress line and the note, in `inner` columns."""
        return []

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = min(options.max_width, _MAX_WIDTH)
        inner = width - _PANEL_FRAME
        now = time.perf_counter()
        # Counted down between events: with the 7B model on a CPU they come minutes apart.
        left = None if self.left is None else max(0.0, self.left - (now - self.t_frames))
        rows = [progress_line(inner, self.done, self.total, self.rate, now - self.t0, left), *self.body(inner),
                Text(self.note[0], style=self.note[1], no_wrap=True, overflow="ellipsis")]
        title = Text(shorten_middle(self.title, width - _PANEL_FRAME - 2), style="bold")  # 2: spaces around it
        yield Panel(Group(*rows), title=title, title_align="left", border_style="blue", width=width)
        # The cursor rests on this empty line, not after the panel's last column: there the "^C"
        # the terminal echoes on Ctrl-C would wrap to a new line, and Live, erasing as many lines
        # as it drew, would leave the panel's top border on the screen.
        yield Text("")


class _View(_Panel):
    """One input: its frames, its memory bank in words and as a chart with its scale, a legend,
    and for a summary the segments captioned so far."""

    def __init__(self, title: str, total: int, capacity: int, note: str):
        super().__init__(title, total, note)
        self.memory = f"memory bank: 0/{capacity} slots"
        self.slot_frames: Sequence[float] = ()
        self.segments = ""  # "segment 2 of 6 captioned"

    def frames(self, done: int, memory_text: str, slot_frames: Sequence[float]) -> None:
        self.advance(done)
        self.memory = "memory bank: " + memory_text
        self.slot_frames = slot_frames

    def body(self, inner: int) -> list[Text]:
        rows = [Text(wrap_parts(self.memory.split(" · "), inner), style="cyan")]
        if self.slot_frames:
            rows.append(Text(chart_row(self.slot_frames, inner), style="cyan"))
            if cell_len(LEGEND) <= inner:
                rows.append(Text(LEGEND, style="dim"))
        if self.segments:
            rows.append(Text(self.segments, style="green"))
        return rows

    def final(self, width: int) -> list[str]:
        """What stays of the view when it closes: the memory bank as the video ended."""
        lines = ["  " + line for line in wrap_parts(self.memory.split(" · "), width - 2).split("\n")]
        if self.slot_frames:
            lines.append("  " + chart_row(self.slot_frames, width - 2))
        return lines


def _at(seconds: float, of: float) -> str:
    return f"at {short_clock(seconds)} of {short_clock(of)}"


class _BatchView(_Panel):
    """Videos read in lockstep: the frames read of them all, then a row per video."""

    def __init__(self, title: str, names: Sequence[str], samplings: Sequence, capacity: int):
        planned = [len(s.indices) for s in samplings]
        super().__init__(title, sum(planned), f"{plural(sum(planned), 'frame')} to read in "
                         f"{plural(max(planned, default=0), 'step')}")
        self.names, self.planned = list(names), planned
        self.times = [list(s.timestamps) for s in samplings]
        self.ends = [float(getattr(s, "end", t[-1] if len(t) else 0.0)) for s, t in zip(samplings, self.times)]
        self.counts = [0] * len(names)  # frames each video has read
        self.memory = [(0, capacity, 0)] * len(names)  # (slots used, capacity, compressions)

    def frames(self, done: Sequence[int], memories: Sequence) -> None:
        self.advance(sum(done))
        self.counts = list(done)
        self.memory = [(m.length, m.capacity, m.compressions) for m in memories]
        read = sum(d >= p for d, p in zip(self.counts, self.planned))
        self.note = (f"{read}/{len(self.names)} videos read", "dim")

    def at(self, i: int) -> str:
        """Where video `i` is in its own time."""
        count, times = self.counts[i], self.times[i]
        return _at(float(times[count - 1]) if count and times else 0.0, self.ends[i])

    def memory_text(self, i: int) -> str:
        used, capacity, compressions = self.memory[i]
        return f"{used}/{capacity} slots · {plural(compressions, 'compression')}"

    def body(self, inner: int) -> list[Text]:
        lanes = len(self.names) if len(self.names) <= _MAX_LANES else _MAX_LANES - 1
        parts = [(f"{self.counts[i]}/{self.planned[i]} frames", self.at(i), *self.memory_text(i).split(" · "))
                 for i in range(min(lanes, len(self.names)))]
        for keep in (4, 3, 2, 1):  # what gives way once the name is down to _MIN_NAME: compressions, slots, time
            numbers = [" · ".join(p[:keep]) for p in parts]
            room = inner - 4 - max(map(cell_len, numbers), default=0)  # 4: the "✓ " marker, the gap after the name
            if room >= _MIN_NAME:
                break
        room = max(0, min(room, max(map(cell_len, map(shown, self.names[:lanes])), default=0)))
        rows = []
        for name, count, planned, text in zip(self.names, self.counts, self.planned, numbers):
            name = shorten_middle(name, room)
            rows.append(Text.assemble(("✓ " if count >= planned else "  ", "green"),
                                      name + " " * (room - cell_len(name)) + "  ", (text, "cyan"),
                                      no_wrap=True, overflow="ellipsis"))
        if lanes < len(self.names):
            rows.append(Text(f"… and {len(self.names) - lanes} more", style="dim"))
        return rows

    def final(self, name: str) -> list[str]:
        """What stays of a video of the batch when it is done: its memory bank as it ended."""
        if name not in self.names:
            return []
        return [f"  memory bank: {self.memory_text(self.names.index(name))}"]


class RichEvents(Events):
    """The live view (a terminal on stderr). `show_segments`: print a summary's segments above
    the view as each comes (off when they go to stdout on this terminal already)."""

    def __init__(self, console: Console, total_inputs: int, show_segments: bool = True):
        self.console = console
        self.total_inputs = total_inputs
        self.show_segments = show_segments
        self.index = 0
        self.live: Live | None = None
        self.view: _Panel | None = None

    def _show(self, view: _Panel) -> None:
        self.close()  # the previous view, if it ended without finished()
        self.view = view
        self._start()

    def _start(self) -> None:
        # stdout is for results, even when a stray write there happens while the view is up.
        self.live = Live(self.view, console=self.console, refresh_per_second=8, transient=True, redirect_stdout=False)
        self.live.start()

    def started(self, source, info, sampling, capacity):
        self.index += 1
        self.timestamps = sampling.timestamps
        self.duration = info.duration
        self._show(_View(_counter(self.index, 1, self.total_inputs) + source, len(sampling.indices), capacity,
                         f"{short_clock(info.duration)} of video, {len(sampling.indices)} frames to read"))

    def frames(self, done, timestamp, memory):
        self.view.frames(done, memory_line(memory, self.timestamps), memory.slot_frames)
        self.view.note = ("video " + _at(timestamp, self.duration), "dim")
        self._refresh()

    def batch_started(self, sources, samplings, capacity):
        title = _batch_title(self.index + 1, len(sources), self.total_inputs)
        self.index += len(sources)
        self._show(_BatchView(title, sources, samplings, capacity))

    def batch_frames(self, done, memories):
        self.view.frames(done, memories)
        self._refresh()

    def stage(self, text):
        if self.live is not None:
            self.view.note = (text + " …", "yellow")
            self._refresh()

    def segment(self, index, total, start, end, text):
        if isinstance(self.view, _View):
            self.view.segments = f"summary: segment {index + 1} of {total} captioned"
            self.view.note = ("video " + _at(end, self.duration), "dim")  # the stage that captioned it is over
        if self.show_segments:
            line = segment_line(SegmentText(start, end, text)).rstrip("\n")
            self.console.print(Text(line), soft_wrap=True)  # above the view while it is up
        self._refresh()

    def reading(self, source, info, sampling):
        self.index += 1
        self.duration = info.duration
        self._show(_Panel(_counter(self.index, 1, self.total_inputs) + source, len(sampling.indices),
                          f"{short_clock(info.duration)} of video, {len(sampling.indices)} frames to keep"))

    def features(self, done, timestamp):
        self.view.advance(done)
        self.view.note = ("video " + _at(timestamp, self.duration), "dim")
        self._refresh()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()

    def finished(self, result: Result):
        view = self.view
        batch = isinstance(view, _BatchView)
        self.close()  # a batch's view too: its results come after its last step
        rest = f": {result.sampling.frames} frames in {result.timings['total']:.1f} s"
        name = shorten_middle(result.input, max(20, self.console.width - cell_len(rest) - 2))
        lines = view.final(result.input) if batch else view.final(min(self.console.width, _MAX_WIDTH)) \
            if isinstance(view, _View) else []
        self.console.print(Text.assemble(("✓", "green"), " ", name, rest), no_wrap=True, overflow="ellipsis")
        for line in lines:
            self.console.print(Text(line, style="cyan"), no_wrap=True, overflow="ellipsis")

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        if self.live is None:
            yield
            return
        self.live.stop()  # transient: the view is erased, and drawn again below what is printed
        try:
            yield
        finally:
            self._start()

    def close(self):
        if self.live is not None:
            self.live.stop()
            self.live = None


class LogEvents(Events):
    """Plain lines for logs and pipes: start, every ~10 % of frames, stages, segments, finish."""

    def __init__(self, stream: TextIO, total_inputs: int, show_segments: bool = True):
        self.out = stream
        self.total_inputs = total_inputs
        self.show_segments = show_segments
        self.index = 0

    def _line(self, text: str) -> None:
        self.out.write(f"malmm: {shown(text)}\n")  # names are the user's: a newline in one would make two lines
        self.out.flush()

    def _due(self, done: int) -> bool:
        """Whether `done` of `self.total` is worth a line: every ~10 %, and the end."""
        if done < self.next_report * self.total and done != self.total:
            return False
        self.next_report = (int(10 * done / max(1, self.total)) + 1) / 10
        return True

    def started(self, source, info, sampling, capacity):
        self.index += 1
        self.source, self.total, self.next_report = source, len(sampling.indices), 0.1
        self.timestamps, self.duration = sampling.timestamps, info.duration
        self._line(f"{_counter(self.index, 1, self.total_inputs)}{source}: {self.total} frames from "
                   f"{short_clock(sampling.start)} to {short_clock(sampling.end)}, memory {capacity} slots")

    def frames(self, done, timestamp, memory):
        if self._due(done):
            self._line(f"{self.source}: {done}/{self.total} frames, video {_at(timestamp, self.duration)}, memory "
                       f"{memory_line(memory, self.timestamps)}")

    def batch_started(self, sources, samplings, capacity):
        self.source = _batch_title(self.index + 1, len(sources), self.total_inputs)  # what stage lines name
        self.index += len(sources)
        self.planned = [len(s.indices) for s in samplings]
        self.total, self.next_report = sum(self.planned), 0.1
        videos = ", ".join(f"{source} ({n} frames)" for source, n in zip(sources, self.planned))
        self._line(f"{self.source}: {videos}, memory {capacity} slots")

    def batch_frames(self, done, memories):
        if self._due(sum(done)):
            frames = ", ".join(f"{d}/{p}" for d, p in zip(done, self.planned))
            self._line(f"{self.source}: {sum(done)}/{self.total} frames ({frames})")

    def stage(self, text):
        self._line(f"{self.source}: {text}")

    def segment(self, index, total, start, end, text):
        if self.show_segments:
            self._line(f"{self.source}: " + segment_line(SegmentText(start, end, text)).rstrip("\n"))

    def reading(self, source, info, sampling):
        self.index += 1
        self.source, self.total, self.next_report = source, len(sampling.indices), 0.1
        self._line(f"{_counter(self.index, 1, self.total_inputs)}{source}: reading {self.total} frames from "
                   f"{short_clock(sampling.start)} to {short_clock(sampling.end)}")

    def features(self, done, timestamp):
        if self._due(done):
            self._line(f"{self.source}: {done}/{self.total} frames read")

    def finished(self, result):
        self._line(f"{result.input}: done, {result.sampling.frames} frames in {result.timings['total']:.1f} s")


def make_events(quiet: bool, total_inputs: int, stderr: TextIO | None = None, show_segments: bool = True) -> Events:
    stderr = stderr or sys.stderr
    if quiet:
        return Events()
    if stderr.isatty():
        return RichEvents(Console(file=stderr), total_inputs, show_segments)
    return LogEvents(stderr, total_inputs, show_segments)
