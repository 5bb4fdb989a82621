"""malmm watch on files and in-process: sampling by stream time, the same answers as a file's,
options and output, the panel (sources/live.py, engine/live.py, runs/watch.py, results/watch*.py).
Real streams (HTTP, HLS, a live page, cuts, signals, drops, Ctrl-C in tmux) are in
test_watch_streams.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from malmm_cli.sources.live import LiveReader, StreamEnd, live_spec
from malmm_cli.sources.video import plan_sampling, probe

from .cli import SAMPLE, TINY, malmm, records, stable
from .media import decode_indices, make_video
from .streams import check_windows, free_port


# ---- sampling: the frames a file would give ---------------------------------------------------


@pytest.mark.parametrize("fps", [1.0, 2.5, 30.0])
def test_a_file_read_live_samples_the_frames_plan_sampling_picks(tmp_path, fps):
    """The reader takes the frame on screen at each sample time of the stream, exactly as the
    batch commands sample a file (sources/video.plan_sampling); the frames spell their index."""
    path = tmp_path / "v.mp4"
    make_video(path, fps=25, n_frames=130, size=(96, 64))
    plan = plan_sampling(probe(path), fps=fps)
    frames, end = _read(path, fps)
    assert end.error is None and end.end == pytest.approx(130 / 25)
    assert np.allclose([f.time for f in frames], plan.timestamps, atol=1e-4)
    assert np.array_equal(decode_indices(np.stack([f.rgb for f in frames])), plan.indices)


def test_mpeg_ts_with_b_frames_is_sampled_in_display_order(tmp_path):
    """MPEG-TS with B-frames (frames decode out of display order; decord misreads such files):
    the sampled frames are the ones shown at each sample time, by their index."""
    path = tmp_path / "v.ts"
    make_video(path, fps=25, n_frames=100, size=(96, 64), extra_args=["-bf", "3", "-g", "12"])
    frames, end = _read(path, 3.0)
    times = np.arange(math_ceil(4.0 * 3.0)) / 3.0
    assert np.allclose([f.time for f in frames], np.floor(times * 25 + 1e-6) / 25, atol=1e-3)
    assert list(decode_indices(np.stack([f.rgb for f in frames]))) == [int(t * 25 + 1e-6) for t in times]


def math_ceil(x: float) -> int:
    return int(-(-x // 1))


def _read(path: Path, fps: float):
    reader = LiveReader(live_spec(str(path)), fps=fps, every=2.0, retries_s=0)
    reader.start()
    frames = []
    try:
        while True:
            items = reader.queue.take(64, 5.0)
            frames += [i for i in items if not isinstance(i, StreamEnd)]
            ends = [i for i in items if isinstance(i, StreamEnd)]
            if ends:
                assert reader.state.dropped == 0  # a file runs ahead of real time: it waits, never drops
                return frames, ends[0]
    finally:
        reader.stop()


# ---- the same answers as a file's ------------------------------------------------------------


def test_fresh_windows_are_summarize_segments_and_cumulative_ends_with_the_summary():
    """Each window answered from its own frames is summarize's segment caption for the same
    span; answered over everything seen (--cumulative), the last one is the whole video's summary."""
    summary = records(malmm("summarize", SAMPLE, "--every", 2, "--fps", 1, *TINY, "--json", "-q", "--no-cache").stdout)[0]
    fresh = records(malmm("watch", SAMPLE, "--every", 2, *TINY, "--json", "-q").stdout)
    cumulative = records(malmm("watch", SAMPLE, "--every", 2, *TINY, "--json", "-q", "--cumulative").stdout)
    assert [(r["start"], r["end"], r["text"]) for r in fresh] == \
        [(s["start"], s["end"], s["text"]) for s in summary["segments"]]
    assert cumulative[-1]["text"] == summary["summary"]
    assert [r["memory"]["slots"] for r in cumulative] == [2, 4, 6] and [r["memory"]["slots"] for r in fresh] == [2] * 3
    check_windows(fresh, 2.0)
    assert all(r["dropped"] == 0 and r["frames"] == 2 for r in fresh)


def test_ask_and_classify_windows_and_duration():
    asked = records(malmm("watch", SAMPLE, "--every", 2, "--task", "ask", "-Q", "what is shown?", "-Q", "where?",
                          "--duration", 3, *TINY, "--json", "-q").stdout)
    assert [(r["start"], r["end"]) for r in asked] == [(0.0, 2.0), (2.0, 3.0)]  # --duration cuts the last window
    assert all([a["question"] for a in r["answers"]] == ["what is shown?", "where?"] for r in asked)
    ranked = records(malmm("watch", SAMPLE, "--every", 3, "--task", "classify", "--labels", "cat,dog,car", "-k", 2,
                           *TINY, "--json", "-q").stdout)
    assert len(ranked) == 2 and all(len(r["labels"]) == 2 and r["label_set"] == "custom" for r in ranked)


# ---- options and output ----------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--every", "0.5"], "holds no sampled frame at --fps 1"),
    (["--task", "ask"], "--task ask needs a question"),
    (["--task", "classify"], "--task classify needs --label-set"),
    (["-Q", "why?"], "-Q goes with --task ask"),
    (["--duration", "0"], "--duration must be a positive time"),
    (["--resume", "-o", "x.jsonl"], None),
    (["--json", "--format", "srt"], "--json and --format srt disagree"),
])
def test_usage_errors_are_one_sentence_before_anything_loads(args, message):
    out = malmm("watch", SAMPLE, *args, *TINY)
    assert out.exit_code == 2
    if message is not None:
        assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("source, message", [
    ("ftp://127.0.0.1/live.ts", "unsupported scheme 'ftp'"),
    ("/no/such/stream.ts", "does not exist"),
    ("/dev/video99", "no camera is connected there"),
])
def test_a_source_that_cannot_be_watched(source, message):
    out = malmm("watch", source, *TINY)
    assert out.exit_code == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_nothing_listening_is_one_sentence():
    out = malmm("watch", f"http://127.0.0.1:{free_port()}/live.ts", *TINY, "-q")
    assert out.exit_code == 1 and "cannot be opened (connection refused)" in out.stderr, out.stderr


def test_output_follows_the_batch_commands_rules(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    out = malmm("watch", SAMPLE, "-o", mine, *TINY, "-q")
    assert out.exit_code == 2 and "not a results file written by malmm" in out.stderr
    assert mine.read_text() == "my notes\n"  # never touched
    srt = tmp_path / "live.srt"
    assert malmm("watch", SAMPLE, "--every", 2, "-o", srt, *TINY, "-q").exit_code == 0
    first = srt.read_text()
    assert first.startswith("1\n00:00:00,000 --> 00:00:02,000\n") and first.count(" --> ") == 3
    again = malmm("watch", SAMPLE, "--every", 2, "-o", srt, *TINY, "-q")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert "--resume" not in again.stderr  # watch has no --resume: the refusal offers only what it has
    vtt = tmp_path / "live.vtt"
    assert malmm("watch", SAMPLE, "--every", 3, "-o", vtt, *TINY, "-q").exit_code == 0
    assert vtt.read_text().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:03.000\n")
    assert malmm("watch", SAMPLE, "--every", 3, "-o", srt, "--overwrite", *TINY, "-q").exit_code == 0
    assert srt.read_text().count(" --> ") == 2


def test_with_o_each_record_goes_to_stdout_and_to_the_file(tmp_path):
    """Issue 22: every record "to stdout and to -o", so a pipe and `tail -f` both see it."""
    log = tmp_path / "live.jsonl"
    out = malmm("watch", SAMPLE, "--every", 2, "-o", log, *TINY, "-q")
    assert out.exit_code == 0, out.output
    assert [stable(r) for r in records(out.stdout)] == [stable(r) for r in records(log.read_text())]
    assert len(records(out.stdout)) == 3
    srt = tmp_path / "live.srt"
    out = malmm("watch", SAMPLE, "--every", 3, "-o", srt, *TINY, "-q")
    assert out.exit_code == 0 and out.stdout == srt.read_text()  # a pipe gets the file's own format


def test_help_examples_that_need_no_network_run_as_printed(tmp_path, monkeypatch):
    from .cli import help_examples, help_text

    examples = help_examples(help_text(["watch"]))
    assert len(examples) == 4 and all(" | " not in e for e in examples)
    make_video(tmp_path / "recording.ts", fps=10, n_frames=40, size=(64, 48))
    an_hour_ago = time.time() - 3600  # a finished recording: not awaited to grow
    os.utime(tmp_path / "recording.ts", (an_hour_ago, an_hour_ago))
    monkeypatch.chdir(tmp_path)
    local = [e for e in examples if "recording.ts" in e]
    out = malmm(*local[0].split()[1:], *TINY, "-q")
    assert out.exit_code == 0 and (tmp_path / "recording.srt").read_text().count(" --> ") == 1


# ---- the terminal ----------------------------------------------------------------------------


def test_the_panel_at_80_columns_shows_stream_time_lag_drops_and_memory():
    import io

    from rich.console import Console

    from malmm_cli.results.watch_view import RichWatchView
    from malmm_cli.sources.live import ReaderState
    from models.memory_bank import BankStatus

    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    view = RichWatchView(console)
    view.started("http://127.0.0.1:8000/a/very/long/path/to/the/camera/feed/of/the/front/door/live.m3u8", 1.0,
                 10.0, 40, False)
    try:
        memory = BankStatus(40, 12, 12, 0, tuple([1.0] * 12), tuple((i, i) for i in range(12)))
        view.progress(75.2, 0.42, 75, ReaderState(dropped=3, reconnects=1), memory)
        with console.capture() as capture:
            console.print(view.panel)
    finally:
        view.close()
    lines = capture.get().splitlines()
    text = "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    assert "stream 1:15" in text and "lag 0.4 s" in text and "3 dropped" in text and "1 reconnects" in text
    assert "memory bank: 12/40 slots" in text and "…/" in lines[0] and lines[0].endswith("/live.m3u8 ─╮")
