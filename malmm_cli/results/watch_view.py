"""What `malmm watch` shows on stderr: a live panel on a terminal, plain lines otherwise,
nothing with --quiet.

The panel follows the stream: stream time, how far behind real time the last frame was
handled (lag), frames read and dropped, reconnects, the memory bank (slots used of M,
compressions, frames per slot as a chart) and the last window's text. It is redrawn several
times a second from the reader's own counts, so a reconnecting source shows it while no
frame arrives. Records go to stdout: when stdout is the same terminal, they are printed above
the panel (Rich's stdout redirection), so neither tears the other.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from malmm_cli.terminal import shown

from .progress import shorten_middle, slot_chart, wrap_parts
from .watch import WatchEvents, WindowRecord
from .writers import short_clock

_MAX_WIDTH = 100
_FRAME = 4  # the panel's border and padding, both sides
_CHART_LABEL = "frames per slot: "


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 60 else short_clock(value)


class _WatchPanel:
    """The panel, laid out afresh at each refresh for the terminal's width."""

    def __init__(self, source: str, fps: float, every: float, capacity: int, cumulative: bool):
        self.source = source
        self.how = f"{fps:g} frame/s · a record every {_seconds(every)}" + (" · cumulative" if cumulative else "")
        self.capacity = capacity
        self.stream_time = 0.0
        self.lag: float | None = None
        self.frames = 0
        self.state: Any = None
        self.memory: Any = None
        self.last = ""
        self.stage = "opening the stream …"
        self.t0 = time.monotonic()

    def numbers(self) -> list[str]:
        s = self.state
        parts = [f"stream {short_clock(self.stream_time)}",
                 f"lag {'?' if self.lag is None else _seconds(self.lag)}",
                 f"{self.frames} frames", f"{s.dropped if s else 0} dropped"]
        if s is not None and s.reconnects:
            parts.append(f"{s.reconnects} reconnects")
        return parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = min(options.max_width, _MAX_WIDTH)
        inner = width - _FRAME
        m = self.memory
        bank = (f"memory bank: {m.length}/{m.capacity} slots · {m.compressions} compressions" if m is not None
                else f"memory bank: 0/{self.capacity} slots")
        rows = [Text(wrap_parts(self.numbers(), inner), style="bold"),
                Text(wrap_parts(bank.split(" · "), inner), style="cyan")]
        if m is not None and m.slot_frames:
            label = _CHART_LABEL if inner - len(_CHART_LABEL) >= 10 else ""
            rows.append(Text(label + slot_chart(m.slot_frames, inner - len(label)), style="cyan"))
        if self.last:
            rows.append(Text(self.last, no_wrap=True, overflow="ellipsis"))
        note = self.state.note if self.state is not None and self.state.note else self.stage
        rows.append(Text(note or self.how, style="yellow" if note else "dim", no_wrap=True, overflow="ellipsis"))
        title = Text(shorten_middle(self.source, width - _FRAME - 2), style="bold")
        yield Panel(Group(*rows), title=title, title_align="left", border_style="blue", width=width)
        yield Text("")  # the cursor rests here, so a ^C echo does not wrap under the border (progress.py)


class RichWatchView(WatchEvents):
    """The live panel on a terminal (stderr)."""

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None
        self.panel: _WatchPanel | None = None

    def started(self, source, fps, every, capacity, cumulative):
        self.panel = _WatchPanel(source, fps, every, capacity, cumulative)
        # Records on the same terminal go above the panel; to a file or a pipe, stdout is left alone.
        self.live = Live(self.panel, console=self.console, refresh_per_second=4, transient=True,
                         redirect_stdout=_is_tty(sys.stdout), redirect_stderr=False)
        self.live.start()

    def progress(self, stream_time, lag, frames, state, memory):
        if self.panel is not None:
            p = self.panel
            p.stream_time, p.lag, p.frames, p.state, p.memory = stream_time, lag, frames, state, memory
            p.stage = ""

    def stage(self, text):
        if self.panel is not None:
            self.panel.stage = text + " …"

    def window(self, record: WindowRecord):
        if self.panel is not None:
            self.panel.last = shown(f"[{short_clock(record.start)} - {short_clock(record.end)}] "
                                    + " · ".join(record.lines()))
            self.panel.stage = ""

    def close(self):
        if self.live is not None:
            self.live.stop()
            self.live = None


class LogWatchView(WatchEvents):
    """Plain lines on stderr (a log, a pipe): the start, each window, reconnects."""

    def __init__(self, stream: TextIO):
        self.out = stream
        self.note = ""

    def _line(self, text: str) -> None:
        self.out.write(f"malmm: {shown(text)}\n")
        self.out.flush()

    def started(self, source, fps, every, capacity, cumulative):
        self.source = source
        self._line(f"{source}: watching at {fps:g} frame/s, a record every {_seconds(every)} of stream time, "
                   f"memory {capacity} slots{' (cumulative)' if cumulative else ''}")

    def progress(self, stream_time, lag, frames, state, memory):
        self.waiting(state)

    def waiting(self, state):
        if state is not None and state.note != self.note:
            self.note = state.note
            if state.note:
                self._line(f"{self.source}: {state.note}")

    def window(self, record):
        lag = "" if record.lag is None else f", lag {record.lag:.2f} s"
        self._line(f"{self.source}: [{short_clock(record.start)} - {short_clock(record.end)}] {record.frames} frames, "
                   f"{record.dropped} dropped{lag}")


def _is_tty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def make_watch_events(quiet: bool, stderr: TextIO | None = None) -> WatchEvents:
    stderr = stderr or sys.stderr
    if quiet:
        return WatchEvents()
    if _is_tty(stderr):
        return RichWatchView(Console(file=stderr))
    return LogWatchView(stderr)
