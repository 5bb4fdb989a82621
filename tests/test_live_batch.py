"""Progress for --batch: videos read in lockstep, in the live view (laid out in-process with Rich)
and as plain log lines."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from malmm_cli.results.progress import LogEvents, RichEvents
from models.memory_bank import BankStatus

from .test_live import PROGRESS, plain

FOLDER = "/home/someone/videos/a_rather_long_folder_name/another_level_of_nested_folders"


def sampling(n: int) -> SimpleNamespace:
    return SimpleNamespace(indices=np.arange(n), timestamps=np.arange(n) / 2.0)


def memory(done: int, capacity: int = 20) -> BankStatus:
    return BankStatus(capacity, min(done, capacity), done, max(0, done - capacity), (), ())


def started(events, planned: list[int], names: list[str] | None = None) -> list[str]:
    names = names or [f"{FOLDER}/holiday_clip_{i}.mp4" for i in range(len(planned))]
    events.batch_started(names, [sampling(n) for n in planned], capacity=20)
    return names


def step(events, planned: list[int], steps: int) -> list[int]:
    """Every video of the batch after `steps` lockstep steps (a short one has ended)."""
    done = [min(steps, n) for n in planned]
    events.batch_frames(done, [memory(d) for d in done])
    return done


def batch_view(width: int, planned: list[int], steps: int, total_inputs: int = 20, before: int = 4):
    """The view of a batch after inputs 1 to `before`, at `steps` steps, at `width` columns."""
    events = RichEvents(Console(width=width, file=io.StringIO(), force_terminal=True), total_inputs)
    events.index = before
    names = started(events, planned)
    done = step(events, planned, steps)
    return events, names, done, plain(events.live.renderable, width)


# ---- the live view --------------------------------------------------------------------------


@pytest.mark.parametrize("width", [60, 80, 120])
def test_batch_view_shows_each_video_in_one_row(width):
    planned = [3000, 1200, 40, 0]
    events, names, done, lines = batch_view(width, planned, steps=1234)
    try:
        assert all(cell_len(line) <= width for line in lines), lines
        assert "[5-8/20] 4 videos in lockstep" in lines[0] and events.index == 8
        progress = next(m for m in map(PROGRESS.search, lines) if m)
        assert progress.groups()[:2] == (str(sum(done)), str(sum(planned)))  # the frames of all the videos
        for i, (name, d, n) in enumerate(zip(names, done, planned)):
            (row,) = [line for line in lines if f"clip_{i}.mp4" in line]  # the name's end always shows
            assert f"{d}/{n} frames" in row, row
            end = f"{(n - 1) // 2 // 60}:{(n - 1) // 2 % 60:02d}" if n else "0:00"
            at = f"{(d - 1) // 2 // 60}:{(d - 1) // 2 % 60:02d}" if d else "0:00"
            assert f"at {at} of {end}" in row, row  # each video's own time (a frame every half second)
            if width >= 80:
                assert f"{min(d, 20)}/20 slots" in row, row
            if width >= 120:
                assert f"{max(0, d - 20)} compression" in row, row
            assert ("✓" in row) == (d == n), row  # read to the end (a zero-length video too)
        assert any("3/4 videos read" in line for line in lines)
    finally:
        events.close()


@pytest.mark.parametrize("width", [60, 80])
def test_a_batch_of_20_videos_fits_a_24_row_terminal(width):
    events, names, done, lines = batch_view(width, [100 + i for i in range(20)], steps=50, before=0)
    try:
        assert len(lines) <= 24 and all(cell_len(line) <= width for line in lines), lines
        assert "20 videos in lockstep" in lines[0] and "[" not in lines[0]  # all the inputs: no counter
        shown = [i for i in range(20) if any(f"holiday_clip_{i}.mp4" in line for line in lines)]
        assert shown == list(range(11))
        assert any(line.strip("│ ") == "… and 9 more" for line in lines), lines
    finally:
        events.close()


def test_batch_view_shows_the_stage_then_each_input_finishes_on_one_line():
    console = Console(width=80, file=io.StringIO(), color_system=None)  # not a terminal: only what stays
    events = RichEvents(console, total_inputs=4)
    planned = [300, 120, 60, 30]
    names = started(events, planned)
    step(events, planned, 300)
    events.stage("writing 4 captions")
    assert any("writing 4 captions …" in line for line in plain(events.live.renderable, 80))
    for name, n in zip(names, planned):
        events.finished(SimpleNamespace(input=name, sampling=SimpleNamespace(frames=n), timings={"total": 12.34}))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 8 and events.live is None  # each input: its line, and its memory bank as it ended
    for i, (line, n) in enumerate(zip(lines[::2], planned)):
        assert cell_len(line) <= 80 and line.startswith("✓ ") and line.endswith(
            f"/holiday_clip_{i}.mp4: {n} frames in 12.3 s"), line
    assert lines[1] == "  memory bank: 20/20 slots · 280 compressions"
    assert lines[7] == "  memory bank: 20/20 slots · 10 compressions"


def test_a_later_input_closes_the_batch_view_and_counts_on():
    events, _, _, _ = batch_view(80, [40, 40], steps=10)
    batch_live = events.live
    events.started("next.mp4", SimpleNamespace(duration=10.0), sampling(20), capacity=20)
    try:
        assert not batch_live.is_started and events.view.title == "[7/20] next.mp4"
    finally:
        events.close()


# ---- plain lines ----------------------------------------------------------------------------


def test_log_lines_for_a_batch():
    out = io.StringIO()
    events = LogEvents(out, total_inputs=20)
    events.index = 4
    planned = [120, 40, 60, 0]  # the last one has no frames: no division by its length
    started(events, planned, names=["a.mp4", "b.mp4", "c.mp4", "empty.mp4"])
    for steps in range(121):
        step(events, planned, steps)
    events.stage("writing 3 captions")
    events.finished(SimpleNamespace(input="a.mp4", sampling=SimpleNamespace(frames=120), timings={"total": 3.21}))
    lines = out.getvalue().splitlines()
    assert lines[0] == ("malmm: [5-8/20] 4 videos in lockstep: a.mp4 (120 frames), b.mp4 (40 frames), "
                        "c.mp4 (60 frames), empty.mp4 (0 frames), memory 20 slots")
    progress = [line for line in lines if "/220 frames (" in line]  # the frames of all the videos
    counts = [int(re.search(r"(\d+)/220 frames", line).group(1)) for line in progress]
    assert counts[-1] == 220 and len(counts) == 10 and all(c >= 22 * k for k, c in enumerate(counts, 1))
    assert progress[0] == "malmm: [5-8/20] 4 videos in lockstep: 24/220 frames (8/120, 8/40, 8/60, 0/0)"
    assert progress[-1].endswith("220/220 frames (120/120, 40/40, 60/60, 0/0)")
    assert lines[-2] == "malmm: [5-8/20] 4 videos in lockstep: writing 3 captions"  # the batch, not a stale input
    assert lines[-1] == "malmm: a.mp4: done, 120 frames in 3.2 s"
    assert events.index == 8


def test_log_lines_for_a_batch_of_empty_videos():
    out = io.StringIO()
    events = LogEvents(out, total_inputs=1)
    started(events, [0], names=["empty.mp4"])
    step(events, [0], 0)
    assert out.getvalue().splitlines() == ["malmm: 1 video in lockstep: empty.mp4 (0 frames), memory 20 slots",
                                           "malmm: 1 video in lockstep: 0/0 frames (0/0)"]
