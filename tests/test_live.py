"""The terminal as a person meets it at 80 columns: the live view (laid out in-process with
Rich, and for real in a tmux pane, Ctrl-C included) and `malmm models list`."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.cells import cell_len
from rich.console import Console

from malmm_cli.results.progress import RichEvents, progress_line, shorten_middle, slot_chart
from models.memory_bank import BankStatus

from .cli import SAMPLE, malmm
from .media import make_video

REPO = Path(__file__).resolve().parents[1]
TMUX = shutil.which("tmux")
BOX = set("╭╮╰╯│─━┏┓┗┛┃")  # Rich's panel borders and progress bar

# "━━━━ 16/300 frames · 1.5/s · 0:15 elapsed · 3:01 left": done/total, a rate and a time left.
PROGRESS = re.compile(r"(\d+)/(\d+) frames · (\d+(?:\.\d+)?)/s · (?:.* · )?(\d+:\d\d) left")


def long_path(root: Path) -> Path:
    """A clip deep enough that its path cannot fit an 80-column line."""
    folder = root / ("a_rather_long_folder_name_" * 2) / "another_level_of_nested_folders" / "and_one_more"
    folder.mkdir(parents=True)
    return folder / "holiday_clip.mp4"


def plain(renderable, width: int) -> list[str]:
    """The lines `renderable` draws at `width` columns, without colours."""
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue().split("\n")[:-1]


def live_view(source: str, width: int, slots: int = 40, done: int = 1234) -> list[str]:
    """The live view after `done` frames of a 3000-frame plan, as a `width`-column terminal shows it."""
    sampling = SimpleNamespace(indices=range(3000), timestamps=[i / 25 for i in range(3000)])
    info = SimpleNamespace(duration=120.0)
    events = RichEvents(Console(width=width, file=io.StringIO(), force_terminal=True), total_inputs=3)
    events.started(source, info, sampling, capacity=slots)
    frames = tuple(float(1 + (i * 7) % 13) for i in range(slots))
    spans = tuple((30 * i, 30 * i + 29) for i in range(slots))
    events.frames(done, done / 25, BankStatus(slots, slots, done, done - slots, frames, spans))
    try:
        return plain(events.live.renderable, width)
    finally:
        events.close()


# ---- the live view, in-process (runs everywhere) --------------------------------------------


def test_progress_line_keeps_done_total_and_time_left_at_every_width():
    smallest = cell_len("1234/3000 frames · 0:33 left")
    seen = set()
    for width in range(smallest, 121):
        line = progress_line(width, 1234, 3000, 53.1, 83.0, 33.0).plain
        assert "1234/3000 frames" in line and line.endswith("0:33 left"), (width, line)
        assert cell_len(line) <= width, (width, line)
        has = ("elapsed" in line, "━" in line, "53.1/s" in line)
        # What gives way, in order: elapsed, then the bar, then the rate.
        assert has in {(True, True, True), (False, True, True), (False, False, True), (False, False, False)}, line
        seen.add(has)
    assert len(seen) == 4  # every step is reached somewhere in the range
    assert "1:23 elapsed" in progress_line(76, 1234, 3000, 53.1, 83.0, 33.0).plain  # inside an 80-column panel


def test_progress_line_before_the_first_frames_and_for_a_slow_model():
    assert progress_line(76, 0, 80, None, 2.0, None).plain.endswith("0/80 frames · ?/s · 0:02 elapsed · ? left")
    slow = progress_line(76, 16, 3000, 16 / 400, 400.0, 2984 * 25.0).plain
    assert "0.04/s" in slow and "20:43:20 left" in slow  # not "0.0/s"


def test_a_long_path_loses_its_middle_never_its_file_name():
    path = "/home/someone/videos/a_rather_long_folder_name/another_level_of_nested_folders/holiday_clip.mp4"
    for width in range(20, len(path)):
        short = shorten_middle(path, width)
        assert cell_len(short) <= width and short.count("…") == 1, (width, short)
        head, tail = short.split("…")
        assert path.startswith(head) and path.endswith(tail) and tail.endswith("/holiday_clip.mp4")
        assert tail.startswith("/")  # whole folders, not the end of one
    assert shorten_middle(path, len(path)) == path
    assert shorten_middle(path, 12) == "…ay_clip.mp4"  # the name alone is too long: its end stays


def test_shortening_counts_terminal_columns_and_hides_control_characters():
    wide = "/videos/長い長い長いフォルダ/映画の予告編.mp4"
    short = shorten_middle(wide, 24)
    assert cell_len(short) <= 24 and short.endswith("/映画の予告編.mp4")
    assert "\n" not in shorten_middle("/tmp/two\nlines.mp4", 80)


def test_slot_chart_fits_the_width_it_is_given():
    assert slot_chart((8.0, 6.0, 4.0, 2.0)) == "█▆▄▂"
    rising = slot_chart(range(1, 101), 30)
    assert len(rising) == 30 and list(rising) == sorted(rising)  # still oldest to newest
    assert slot_chart(range(1, 11), 30) == slot_chart(range(1, 11))  # fewer slots than columns: as is


@pytest.mark.parametrize("width", [80, 100, 120])
def test_live_view_at_80_columns_and_wider_shows_every_number(width, tmp_path):
    source = str(long_path(tmp_path))
    lines = live_view(source, width)
    assert all(cell_len(line) <= width for line in lines), lines
    title = next(line for line in lines if "holiday_clip.mp4" in line)
    assert "[1/3] " + source[:15] in title and "…" in title
    match = next(m for m in map(PROGRESS.search, lines) if m)
    assert match.groups()[:2] == ("1234", "3000") and "elapsed" in match.group(0)
    assert any("memory bank: 40/40 slots · 1194 compressions · oldest slot 0:00-0:01" in line for line in lines)
    chart = next(line for line in lines if "frames per slot" in line)
    bars, scale = chart.split(" (█ = ")
    assert len(re.sub(r"[^▁▂▃▄▅▆▇█]", "", bars)) == 40  # one bar per slot: there is room
    assert scale.startswith("13)")  # the scale: a full bar is the fullest slot's 13 frames
    assert any(line.strip("│ ").startswith("slot: frames averaged into one entry · compression:") for line in lines)
    assert any("video at 0:49 of 2:00" in line for line in lines)  # where the run is, in the video's time


@pytest.mark.parametrize("width", [60, 50, 40])
def test_live_view_below_80_columns_drops_elapsed_first(width, tmp_path):
    lines = live_view(str(long_path(tmp_path)), width, slots=100)
    assert all(cell_len(line) <= width for line in lines), lines
    progress = next(line for line in lines if "1234/3000 frames" in line)
    assert "elapsed" not in progress and re.search(r"\d+:\d\d left", progress)
    assert any("holiday_clip.mp4" in line for line in lines)


def test_live_view_memory_chart_is_scaled_to_the_width(tmp_path):
    lines = live_view(str(long_path(tmp_path)), 80, slots=200)
    assert all(cell_len(line) <= 80 for line in lines), lines
    chart = next(line for line in lines if "frames per slot" in line).split(" (█ = ")[0]
    assert 40 < len(re.sub(r"[^▁▂▃▄▅▆▇█]", "", chart)) < 80


def test_live_view_leaves_the_cursor_on_an_empty_line(tmp_path):
    """Why Ctrl-C leaves no border behind: the terminal echoes "^C" at the cursor. After the
    panel's last column it would wrap to a new line, and Live, erasing as many lines as it drew,
    would stop one short. (The tmux test below sees this happen.)"""
    lines = live_view(str(long_path(tmp_path)), 80)
    assert lines[-1] == "" and lines[-2].startswith("╰")


def test_finished_line_is_one_line_with_the_file_name(tmp_path):
    source = str(long_path(tmp_path))
    console = Console(width=80, file=io.StringIO(), color_system=None)
    events = RichEvents(console, total_inputs=1)
    events.finished(SimpleNamespace(input=source, sampling=SimpleNamespace(frames=1500), timings={"total": 12.34}))
    (line,) = console.file.getvalue().splitlines()
    assert cell_len(line) <= 80 and line.startswith("✓ " + source[:10]) and line.endswith("/holiday_clip.mp4: "
                                                                                           "1500 frames in 12.3 s")


def test_the_memory_bank_as_it_ended_stays_after_the_view_closes():
    console = Console(width=80, file=io.StringIO(), color_system=None)  # not a terminal: only what stays
    events = RichEvents(console, total_inputs=1)
    sampling = SimpleNamespace(indices=range(300), timestamps=[i / 25 for i in range(300)])
    events.started("clip.mp4", SimpleNamespace(duration=12.0), sampling, capacity=4)
    events.frames(300, 11.96, BankStatus(4, 4, 300, 296, (290.0, 5.0, 3.0, 2.0), ((0, 289), (290, 294),
                                                                                 (295, 297), (298, 299))))
    events.finished(SimpleNamespace(input="clip.mp4", sampling=SimpleNamespace(frames=300), timings={"total": 2.0}))
    lines = console.file.getvalue().splitlines()
    assert lines == ["✓ clip.mp4: 300 frames in 2.0 s",
                     "  memory bank: 4/4 slots · 296 compressions · oldest slot 0:00-0:11",
                     "  frames per slot: █▁▁▁ (█ = 290)"]


def test_live_view_does_not_take_over_stdout():
    """Results go to stdout; the view is on stderr and must not redirect stdout into itself."""
    from malmm_cli.sources.video import plan_sampling, probe

    info = probe(SAMPLE)
    events = RichEvents(Console(file=io.StringIO(), force_terminal=True, width=80), total_inputs=1)
    before = sys.stdout
    events.started(str(SAMPLE), info, plan_sampling(info, fps=10), capacity=4)
    try:
        assert sys.stdout is before
    finally:
        events.close()


# ---- the live view in a real terminal: tmux at 80x24 ----------------------------------------


class Pane:
    """A command in an 80x24 pane of a private tmux server (its own socket, no user config)."""

    def __init__(self, command: list[str], width: int = 80, height: int = 24):
        self.socket = f"malmm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # COLUMNS/LINES from the test's environment would override the pane's real size.
        env = ["env", "-u", "COLUMNS", "-u", "LINES", f"MALMM_CACHE_DIR={os.environ['MALMM_CACHE_DIR']}",
               "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"]
        # The pane stays open after the command, so its last screen can be read.
        shell = f"{shlex.join(env + command)}; echo EXIT=$?; sleep 300"
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "t", "-c", str(REPO), shell)

    def tmux(self, *args: str) -> str:
        out = subprocess.run([TMUX, "-L", self.socket, "-f", os.devnull, *args], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "t").splitlines()

    def wait_for(self, found, timeout: float = 180) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if found(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail("timed out; the pane shows:\n" + "\n".join(screen))
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian/Ubuntu: apt-get install tmux); "
                                                      "the in-process tests check the same layout")


def _caption(video: Path) -> list[str]:
    return [sys.executable, "-m", "malmm_cli", "caption", str(video), "--model", "tiny-random", "--fps", "25",
            "--no-cache"]


def _progress(screen: list[str]):
    """The progress match once frames have been read, else None."""
    for line in screen:
        match = PROGRESS.search(line)
        if match and int(match.group(1)) > 0:
            return match
    return None


@needs_tmux
def test_live_view_in_a_terminal_then_ctrl_c(tmp_path):
    video = long_path(tmp_path)
    make_video(video, fps=25, n_frames=3000)  # two minutes: still running when Ctrl-C comes
    pane = Pane(_caption(video))
    try:
        screen = pane.wait_for(_progress)
        progress = next(line for line in screen if _progress([line]))
        assert progress.startswith("│") and progress.endswith("│") and "elapsed" in progress, screen
        title = next(line for line in screen if "holiday_clip.mp4" in line)
        assert title.startswith("╭─ " + str(video)[:15]) and "…/" in title and "/holiday_clip.mp4 ─" in title, screen

        pane.tmux("send-keys", "-t", "t", "C-c")
        screen = pane.wait_for(lambda s: any(line.startswith("EXIT=") for line in s), timeout=60)
        shown = [line for line in screen if line.strip()]
        assert not BOX & set("".join(screen)), "\n".join(screen)  # not a border, not a bar
        assert shown[-2].startswith("malmm: interrupted") and shown[-1] == "EXIT=130", "\n".join(screen)
    finally:
        pane.close()


@needs_tmux
def test_a_finished_run_leaves_one_line_per_input(tmp_path):
    video = long_path(tmp_path)
    make_video(video, fps=25, n_frames=60)
    pane = Pane(_caption(video))
    try:
        screen = pane.wait_for(lambda s: any(line.startswith("EXIT=") for line in s))
        assert not BOX & set("".join(screen)), "\n".join(screen)
        done = [line for line in screen if line.startswith("✓ ")]
        assert len(done) == 1 and re.search(r"…/holiday_clip\.mp4: 60 frames in \d+\.\d s$", done[0]), screen
        after = screen[screen.index(done[0]) + 1:]  # the memory bank as it ended stays below it
        assert after[0].startswith("  memory bank: 40/40 slots · 20 compressions") and \
            after[1].startswith("  frames per slot: ") and after[1].endswith(")"), screen
        assert "EXIT=0" in screen, "\n".join(screen)
    finally:
        pane.close()


# ---- malmm models list ------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 100, 60])
def test_models_list_never_breaks_a_word(width, monkeypatch):
    from malmm_cli.engine.presets import PRESETS

    monkeypatch.setenv("COLUMNS", str(width))  # Rich's width when stdout is not a terminal
    out = malmm("models", "list")
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert all(cell_len(line) <= width for line in lines), "\n".join(lines)
    words = out.stdout.split()
    for preset in PRESETS.values():
        for text in (preset.name, preset.source, preset.description, preset.hardware):
            missing = [w for w in text.split() if w not in words]
            assert not missing, f"{missing} cut at {width} columns:\n{out.stdout}"
