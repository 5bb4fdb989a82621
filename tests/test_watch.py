"""malmm watch: a live stream followed as it plays (sources/live.py, engine/live.py, runs/watch.py).

Streams are served on 127.0.0.1 only, in real time, by the ffmpeg binary of imageio-ffmpeg
(`-re ... -f mpegts -listen 1 http://...`: it starts when the watcher connects) and by a
local http.server whose HLS playlist the test grows segment by segment. Every server,
stream and watcher a test starts, it stops.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from malmm_cli.sources.live import LiveReader, StreamEnd, live_spec
from malmm_cli.sources.video import plan_sampling, probe

from .cli import SAMPLE, TINY, malmm, records
from .media import decode_indices, ffmpeg_exe, make_video

REPO = Path(__file__).resolve().parents[1]
TMUX = shutil.which("tmux")


# ---- servers and watchers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, read from /proc (connecting would use up
    the one connection an ffmpeg -listen 1 server takes)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                    return True
    return False


class TsServer:
    """ffmpeg serving `seconds` of a synthetic stream in real time, MPEG-TS over HTTP (one client)."""

    def __init__(self, seconds: float, fps: int = 10, size: str = "96x64", port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/live.ts"
        self.proc = subprocess.Popen(
            [ffmpeg_exe(), "-loglevel", "error", "-re", "-f", "lavfi", "-i",
             f"testsrc2=size={size}:rate={fps}:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
             "-bf", "2", "-g", str(fps), "-f", "mpegts", "-listen", "1", self.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not listening(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, "ffmpeg did not start listening"
            time.sleep(0.05)

    def playing(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Watcher:
    """`malmm watch ARGS` in a child process; its stdout lines are collected with the time each came."""

    def __init__(self, *args, stdin=subprocess.DEVNULL):
        self.proc = subprocess.Popen([sys.executable, "-m", "malmm_cli", "watch", *map(str, args), *TINY],
                                     cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.err = ""
        self.threads = [threading.Thread(target=self._out, daemon=True),
                        threading.Thread(target=self._errors, daemon=True)]
        for t in self.threads:
            t.start()

    def _out(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def _errors(self) -> None:
        self.err = self.proc.stderr.read()

    def records(self) -> list[dict]:
        return [json.loads(line) for _, line in self.lines if line.strip()]

    def wait_records(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n:
            assert self.proc.poll() is None or len(self.lines) >= n, self.err
            assert time.monotonic() < deadline, f"no record {n} within {timeout} s: {self.err}"
            time.sleep(0.05)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        for t in self.threads:
            t.join(10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def started():
    """Everything a test starts, stopped at its end whatever happens."""
    things = []
    yield things.append
    for thing in reversed(things):
        thing.stop()


def check_windows(recs: list[dict], every: float) -> None:
    """Windows follow one another, each `every` s of stream time (the last may be shorter)."""
    assert [r["window"] for r in recs] == list(range(len(recs)))
    for r in recs:
        assert r["start"] == pytest.approx(r["window"] * every)
        assert r["start"] < r["end"] <= r["start"] + every + 1e-6
    for a, b in zip(recs, recs[1:]):
        assert b["start"] == pytest.approx(a["end"])
        assert a["end"] - a["start"] == pytest.approx(every)


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


# ---- real streams ------------------------------------------------------------------------------


def test_http_mpeg_ts_in_real_time(tmp_path, started):
    """Records come while the stream plays, one per window of stream time, each flushed to -o
    as it closes (what `tail -f` sees); the stream's end writes the last window and exits 0."""
    server = TsServer(seconds=4)
    started(server)
    out = tmp_path / "live.jsonl"
    watcher = Watcher(server.url, "--every", 1, "-o", out)
    started(watcher)
    watcher.wait_records(0)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline and watcher.proc.poll() is None, watcher.err
        time.sleep(0.02)
    assert server.playing(), "the first record is in the file while the stream still plays"
    assert watcher.wait() == 0, watcher.err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    check_windows(recs, 1.0)
    assert len(recs) == 4 and recs[-1]["end"] == pytest.approx(4.0, abs=0.15)
    assert all(r["frames"] == 1 and r["dropped"] == 0 and r["lag"] < 3 for r in recs)
    assert "stream ended" in watcher.err and "Traceback" not in watcher.err


def test_records_come_out_in_real_time_on_stdout(started):
    server = TsServer(seconds=4)
    started(server)
    watcher = Watcher(server.url, "--every", 1, "--json")
    started(watcher)
    assert watcher.wait() == 0, watcher.err
    came = [t for t, _ in watcher.lines]
    check_windows(watcher.records(), 1.0)
    # The stream plays in real time: its records come as it plays (4 s), not all at its end.
    assert len(came) == 4 and came[-1] - came[0] > 1.5, np.diff(came)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class HlsServer:
    """A local http.server for a folder whose HLS playlist the test grows."""

    def __init__(self, folder: Path):
        handler = functools.partial(_Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/index.m3u8"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _hls_segments(folder: Path, seconds: int) -> list[tuple[str, float]]:
    """One-second segments of a synthetic stream (made at once, not in real time)."""
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size=96x64:rate=10:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
                    "-g", "10", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0",
                    "-hls_segment_filename", str(folder / "seg%03d.ts"), str(folder / "made.m3u8")], check=True)
    text = (folder / "made.m3u8").read_text()
    return [(name, float(d)) for d, name in re.findall(r"#EXTINF:([\d.]+),\s*\n(\S+)", text)]


def _playlist(folder: Path, segments, ended: bool) -> None:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1", "#EXT-X-MEDIA-SEQUENCE:0"]
    for name, duration in segments:
        lines += [f"#EXTINF:{duration:.6f},", name]
    tmp = folder / "index.m3u8.tmp"
    tmp.write_text("\n".join(lines + (["#EXT-X-ENDLIST"] if ended else [])) + "\n")
    os.replace(tmp, folder / "index.m3u8")  # as a live packager does: never a half-written playlist


def test_hls_playlist_growing_as_segments_are_added(tmp_path, started):
    segments = _hls_segments(tmp_path, 5)
    assert len(segments) == 5
    _playlist(tmp_path, segments[:2], ended=False)
    server = HlsServer(tmp_path)
    started(server)
    watcher = Watcher(server.url, "--every", 1, "--json", "--retries", 10)
    started(watcher)
    watcher.wait_records(1)  # written from the first segments, while the playlist has no end yet
    for k in range(3, len(segments) + 1):
        time.sleep(1.0)  # a segment a second, as a live packager adds them
        _playlist(tmp_path, segments[:k], ended=k == len(segments))
    assert watcher.wait() == 0, watcher.err  # #EXT-X-ENDLIST: the end, not a cut
    recs = watcher.records()
    check_windows(recs, 1.0)
    assert len(recs) == 5 and recs[-1]["end"] == pytest.approx(5.0, abs=0.15)
    assert sum(r["frames"] for r in recs) == 5


def test_a_live_page_is_resolved_by_yt_dlp_to_its_stream(tmp_path, started):
    """A web page (text/html) goes to yt-dlp, which finds the stream in it (here an HLS
    playlist in a <video> tag); a page without one is one sentence."""
    segments = _hls_segments(tmp_path, 3)
    _playlist(tmp_path, segments, ended=True)
    (tmp_path / "live.html").write_text('<html><head><title>Live</title></head><body>'
                                        '<video controls src="index.m3u8"></video></body></html>')
    (tmp_path / "empty.html").write_text("<html><head><title>Nothing</title></head><body>hello</body></html>")
    server = HlsServer(tmp_path)
    started(server)
    out = malmm("watch", server.url.replace("index.m3u8", "live.html"), "--every", 1, *TINY, "--json", "-q")
    assert out.exit_code == 0, out.stderr
    recs = records(out.stdout)
    check_windows(recs, 1.0)
    assert len(recs) == 3 and recs[0]["input"].endswith("/live.html")
    out = malmm("watch", server.url.replace("index.m3u8", "empty.html"), *TINY, "-q")
    assert out.exit_code == 1 and "is a web page, and yt-dlp found no stream in it" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1


def test_a_server_killed_mid_stream(tmp_path, started):
    """The records written stay; the watcher tries to reconnect, then gives up by itself after
    --retries seconds, in one sentence, exit 1."""
    server = TsServer(seconds=30)
    started(server)
    out = tmp_path / "cut.jsonl"
    watcher = Watcher(server.url, "--every", 1, "-o", out, "--retries", 2)
    started(watcher)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and watcher.proc.poll() is None, watcher.err
        time.sleep(0.02)
    server.stop()  # SIGKILL: the connection closes without the stream's end
    killed = time.monotonic()
    assert watcher.wait(60) == 1, watcher.err
    assert time.monotonic() - killed < 15  # 2 s of retries, the last window's answer, the exit
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    check_windows(recs, 1.0)
    assert len(recs) >= 2
    errors = [line for line in watcher.err.splitlines() if "error" in line]
    assert len(errors) == 1 and "cut at" in errors[0] and "could not be reopened within 2 s" in errors[0]
    assert f"{len(recs)} record(s) written" in errors[0]
    assert re.search(r"reconnecting, try [2-9]", watcher.err), watcher.err  # retries were made, with backoff
    assert "Traceback" not in watcher.err


def test_a_restarted_server_is_read_on_from_where_the_stream_was_cut(started):
    """A server killed mid-stream and started again, its times starting over: the reader
    reconnects and reads the new stream as what plays now, on from the cut (none of it is taken
    for a replay of what was read, as a reopened HLS playlist's segments would be)."""
    first = TsServer(seconds=30)
    started(first)
    reader = LiveReader(live_spec(first.url), fps=2.0, every=1.0, retries_s=20)
    started(reader)
    reader.start()
    frames, ends = [], []

    def read_until(done) -> None:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, (frames, reader.state)
            items = reader.queue.take(64, 0.5)
            frames.extend(i for i in items if not isinstance(i, StreamEnd))
            ends.extend(i for i in items if isinstance(i, StreamEnd))

    read_until(lambda: any(f.time >= 2.5 for f in frames))
    first.stop()
    read_until(lambda: "reconnecting" in reader.state.note)  # every frame before the cut is queued by now
    frames.extend(reader.queue.take(64, 0.1))
    cut = frames[-1].time
    started(TsServer(seconds=4, port=first.port))  # the same URL, a new encoder: its times start at 0 again
    read_until(lambda: ends)
    times = [f.time for f in frames]
    after = [t for t in times if t > cut]
    assert reader.state.reconnects == 1 and ends[0].error is None
    assert times == sorted(set(times))
    assert len(after) >= 6 and after[0] - cut < 1.0, times  # 4 s of the new stream at 2 frames/s


def test_sigterm_writes_the_current_window_and_exits_143(started):
    server = TsServer(seconds=30)
    started(server)
    watcher = Watcher(server.url, "--every", 2, "--json")
    started(watcher)
    watcher.wait_records(1)
    time.sleep(0.5)  # into the second window
    watcher.proc.send_signal(signal.SIGTERM)
    assert watcher.wait(60) == 143, watcher.err
    recs = watcher.records()
    check_windows(recs[:-1], 2.0)
    last = recs[-1]
    assert last["window"] == len(recs) - 1 and last["frames"] >= 1 and last["end"] < last["start"] + 2.0
    assert "the current window was written" in watcher.err


def test_stdin_and_a_file_still_being_written(tmp_path, started):
    clip = tmp_path / "clip.ts"
    make_video(clip, fps=10, n_frames=40, size=(96, 64))
    with open(clip, "rb") as f:  # standard input, fed faster than real time: no drop
        piped = Watcher("-", "--every", 1, "--json", stdin=f)
        started(piped)
        assert piped.wait() == 0, piped.err
    assert [r["frames"] for r in piped.records()] == [1] * 4 and all(r["dropped"] == 0 for r in piped.records())

    growing = tmp_path / "growing.ts"
    writer = subprocess.Popen([ffmpeg_exe(), "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                               "testsrc2=size=96x64:rate=10:duration=4", "-c:v", "libx264", "-preset", "ultrafast",
                               "-g", "10", "-f", "mpegts", "-flush_packets", "1", str(growing)])
    started(_Proc(writer))
    while not growing.exists() or growing.stat().st_size < 2000:
        time.sleep(0.02)
    follower = Watcher(growing, "--every", 1, "--json", "--retries", 2)
    started(follower)
    assert follower.wait() == 0, follower.err  # the file stopped growing for 2 s: its end
    assert writer.wait(10) == 0
    recs = follower.records()
    check_windows(recs, 1.0)
    assert len(recs) == 4 and recs[-1]["end"] == pytest.approx(4.0, abs=0.15)


class _Proc:
    def __init__(self, proc):
        self.proc = proc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# ---- keeping up ------------------------------------------------------------------------------


def test_a_slow_model_drops_frames_and_its_lag_stays_bounded(started, monkeypatch):
    """A vision encoder slowed to 4 frames/s against a stream sampled at 10: the oldest queued
    frames are dropped and counted per window, and the lag stays within what the bounded
    queue allows (without dropping, it would grow by 0.6 s per second of stream)."""
    from malmm_cli.engine import Session

    session = Session.load("tiny-random", device="cpu")
    model = session.model
    encode = model.encode_frames

    def slow(pixels):
        time.sleep(0.25 * pixels.shape[0])
        return encode(pixels)

    monkeypatch.setattr(model, "encode_frames", slow)
    server = TsServer(seconds=10, fps=10)
    started(server)
    watch = session.watch(server.url, session.job("caption", fps=10.0, beams=1, max_tokens=5), every=2,
                          queue_frames=4)
    recs = [r.to_record() for r in watch]
    assert watch.error is None
    check_windows(recs, 2.0)
    dropped = sum(r["dropped"] for r in recs)
    assert dropped == watch.reader.state.dropped > 20  # every drop is counted, in its window
    assert sum(r["frames"] for r in recs) + dropped == watch.reader.state.sampled == 100
    lags = [r["lag"] for r in recs if r["lag"] is not None]
    assert max(lags) < 4.0, lags  # queue (1 s) + a chunk (1 s) + the answer; unbounded: 6 s by the end


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


needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")


@needs_tmux
def test_ctrl_c_in_a_terminal_writes_the_current_window_and_leaves_a_clean_screen(started):
    from .test_live import BOX, Pane

    server = TsServer(seconds=120)
    started(server)
    pane = Pane([sys.executable, "-m", "malmm_cli", "watch", server.url, "--every", "1", *TINY])
    try:
        def live(screen):
            return any("stream 0:0" in line for line in screen) and any(line.startswith("[0:00 - 0:01]")
                                                                          for line in screen)

        screen = pane.wait_for(live)
        panel = [line for line in screen if line.startswith("│")]
        assert panel and all(line.endswith("│") and len(line) == 80 for line in panel), "\n".join(screen)
        assert any("memory bank:" in line for line in panel) and any("dropped" in line for line in panel)
        pane.tmux("send-keys", "-t", "t", "C-c")
        screen = pane.wait_for(lambda s: any(line.startswith("EXIT=") for line in s), timeout=60)
        shown = [line for line in screen if line.strip()]
        assert not BOX & set("".join(screen)), "\n".join(screen)  # the panel is gone, nothing torn
        assert shown[-1] == "EXIT=130" and "the current window was written" in shown[-2], "\n".join(screen)
        windows = [line for line in shown if re.match(r"\[\d+:\d\d - \d+:\d\d\] ", line)]
        assert windows[0].startswith("[0:00 - 0:01]") and len(windows) >= 2
    finally:
        pane.close()
