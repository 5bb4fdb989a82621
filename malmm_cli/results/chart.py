"""The memory of a summary, drawn: the geometry of the report's inline SVG (no JS library).

From a summarize record's memory (engine.tasks.memory_timeline): one bar per slot of the
whole-video stream at the end, oldest on top, over the span of video its frames come from;
below them a mark at each compression; chapter boundaries as thin lines; an axis in mm:ss.
Pure: numbers in, shapes out; the template draws them. Across, positions are percentages of
the drawing's width, so it fills any page width while its text keeps its size; down, pixels.
"""

from __future__ import annotations

from collections.abc import Callable

from .records import Result

LEFT, RIGHT = 1.0, 99.0  # the time axis, in percent of the width
FONT = 13.0  # px
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_TICKS = 6
LANES_HEIGHT = 160.0  # px the slots share; a lane is 2 to 8 px high
MERGE_GAP = 0.2  # compression marks closer than this (percent of the width) are drawn as one run
MARK_WIDTH = 0.15  # percent


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _pct(x: float) -> str:
    return f"{x:.2f}%"


def _ticks(start: float, end: float) -> list[float]:
    span = end - start
    step = next((s for s in TICK_STEPS if span / s <= MAX_TICKS), TICK_STEPS[-1])
    first = -(-start // step) * step
    ticks = [first + i * step for i in range(int((end - first) // step) + 1)]
    return ticks or [start]


def _runs(xs: list[float]) -> list[tuple[float, float]]:
    """Marks at `xs` (sorted) grouped into runs whose neighbours are within MERGE_GAP."""
    runs: list[tuple[float, float]] = []
    for x in xs:
        if runs and x - runs[-1][1] <= MERGE_GAP:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


def memory_chart(result: Result, clock: Callable[[float], str]) -> dict | None:
    """Shapes and words of the memory drawing, or None for a record without a memory timeline."""
    memory, sampling = result.memory, result.sampling
    if memory.slots is None or memory.compressions_at is None:
        return None
    start, end = sampling.start, max(sampling.end, sampling.start + 1e-6)
    scale = (RIGHT - LEFT) / (end - start)

    def x(t: float) -> float:
        return LEFT + (min(max(t, start), end) - start) * scale

    slots = memory.slots
    lane = max(2.0, min(8.0, LANES_HEIGHT / max(1, len(slots))))
    bars = [dict(x=_pct(x(s.start)), y=_fmt(4 + i * lane), w=_pct(max(MARK_WIDTH, x(s.end) - x(s.start))),
                 h=_fmt(lane * 0.8),
                 title=f"slot {i + 1} of {len(slots)}: {clock(s.start)} to {clock(s.end)}, {s.frames:.1f} frames")
            for i, s in enumerate(slots)]
    top = 4 + len(slots) * lane + 6
    marks = [dict(x=_pct(a - MARK_WIDTH / 2), w=_pct(b - a + MARK_WIDTH))
             for a, b in _runs([x(t) for t in memory.compressions_at])]
    axis = top + 16 + 6
    ticks = []
    for t in _ticks(start, end):
        anchor = "start" if x(t) < LEFT + 3 else "end" if x(t) > RIGHT - 3 else "middle"
        ticks.append(dict(x=_pct(x(t)), label=clock(t), anchor=anchor))
    cuts = [_pct(x(s.start)) for s in (result.segments or ())[1:]]
    return dict(
        height=_fmt(axis + FONT + 10), font=_fmt(FONT), bars=bars, marks=marks,
        marks_y=_fmt(top), marks_h="16.0", axis_y=_fmt(axis), tick_y2=_fmt(axis + 4), label_y=_fmt(axis + FONT + 4),
        ticks=ticks,
        cuts=cuts, cuts_h=_fmt(top + 16), legend=legend(result, clock))


def legend(result: Result, clock: Callable[[float], str]) -> str:
    """The drawing in one sentence."""
    memory = result.memory
    n, k = len(memory.slots or ()), len(memory.compressions_at or ())
    if memory.length == 0:
        return "No memory (--memory 0): each frame was read on its own, so there is nothing to draw."
    frames = sum(s.frames for s in memory.slots or ()) / max(1, n)
    bars = (f"Bars: the {n} memory slot{'s' if n != 1 else ''} at the end, oldest on top, each over the part of the "
            f"video its frames come from ({frames:.1f} frames a slot on average)")
    if k == 0:
        return f"{bars}; no marks: the memory never filled, so it was never compressed."
    return (f"{bars}; marks: the {k} compression{'s' if k != 1 else ''}, one at each frame read after the memory "
            f"filled at {clock(memory.compressions_at[0])}; dotted lines: chapter boundaries.")
