"""malmm watch on real streams, as they play: HTTP MPEG-TS in real time, a growing HLS playlist,
RTSP (GStreamer's server, where installed),
a live page through yt-dlp, a killed and a restarted server, SIGTERM, standard input, a file
still being written, a slow model's drops, Ctrl-C in tmux. Everything on 127.0.0.1; every
server, stream and watcher a test starts, it stops (tests/streams.py).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from malmm_cli.sources.live import LiveReader, StreamEnd, live_spec

from .cli import TINY, malmm, records
from .media import ffmpeg_exe, make_video
from .streams import HlsServer, Proc, RtspServer, TsServer, Watcher, check_windows, hls_segments, playlist
from .streams import require_rtsp
from .streams import started  # noqa: F401 - a fixture

TMUX = shutil.which("tmux")


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
    watcher.wait_lines(out, 1, timeout=120)
    assert server.playing(), "the first record is in the file while the stream still plays"
    assert watcher.wait() == 0, watcher.err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    check_windows(recs, 1.0)
    assert len(recs) == 4 and recs[-1]["end"] == pytest.approx(4.0, abs=0.15)
    # One sampled frame per window, read or (on a busy machine) dropped to stay live; how late
    # each came is the slow-model test's business, not a timing asserted here.
    assert all(r["frames"] + r["dropped"] == 1 and r["lag"] is not None for r in recs if r["frames"])
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



def test_hls_playlist_growing_as_segments_are_added(tmp_path, started):
    segments = hls_segments(tmp_path, 5)
    assert len(segments) == 5
    playlist(tmp_path, segments[:2], ended=False)
    server = HlsServer(tmp_path)
    started(server)
    watcher = Watcher(server.url, "--every", 1, "--json", "--retries", 10)
    started(watcher)
    watcher.wait_records(1)  # written from the first segments, while the playlist has no end yet
    for k in range(3, len(segments) + 1):
        time.sleep(1.0)  # a segment a second, as a live packager adds them
        playlist(tmp_path, segments[:k], ended=k == len(segments))
    assert watcher.wait() == 0, watcher.err  # #EXT-X-ENDLIST: the end, not a cut
    recs = watcher.records()
    check_windows(recs, 1.0)
    assert len(recs) == 5 and recs[-1]["end"] == pytest.approx(5.0, abs=0.15)
    assert sum(r["frames"] for r in recs) == 5


def test_a_live_page_is_resolved_by_yt_dlp_to_its_stream(tmp_path, started):
    """A web page (text/html) goes to yt-dlp, which finds the stream in it (here an HLS
    playlist in a <video> tag); a page without one is one sentence."""
    segments = hls_segments(tmp_path, 3)
    playlist(tmp_path, segments, ended=True)
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
    watcher.wait_lines(out, 2, timeout=120)
    server.stop()  # SIGKILL: the connection closes without the stream's end
    killed = time.monotonic()
    assert watcher.wait(60) == 1, watcher.err
    assert time.monotonic() - killed < 15  # 2 s of retries, the last window's answer, the exit
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    check_windows(recs, 1.0)
    assert len(recs) >= 2
    errors = [line for line in watcher.err.splitlines() if "error" in line]
    assert len(errors) == 1 and "cut at" in errors[0] and "could not be reopened within 2 s" in errors[0]
    assert f"{len(recs)} records written" in errors[0]
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


def test_an_rtsp_camera_is_watched_as_it_plays(started):
    """A real RTSP server (GStreamer's, on 127.0.0.1): records every 2 s of stream time, as the
    stream plays; --duration ends it with exit 0. A path the server does not serve: one sentence."""
    require_rtsp()
    server = RtspServer()
    started(server)
    watcher = Watcher(server.url, "--every", 2, "--duration", 6, "--json")
    started(watcher)
    assert watcher.wait(60) == 0, watcher.err
    recs = watcher.records()
    check_windows(recs, 2.0)
    assert len(recs) == 3 and recs[-1]["end"] == pytest.approx(6.0)
    assert all(r["frames"] == 2 and r["dropped"] == 0 and r["lag"] < 5 for r in recs), recs
    came = np.diff([t for t, _ in watcher.lines])
    assert all(1.0 < d < 3.0 for d in came), came  # 2 s apart: as the stream plays, not all at the end
    assert "Traceback" not in watcher.err
    out = malmm("watch", server.url.replace("/test", "/nothing"), *TINY, "-q")
    assert out.exit_code == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot be opened as a stream (server returned 404 not found)" in out.stderr, out.stderr


def test_an_rtsp_server_killed_mid_stream(tmp_path, started):
    """The records written stay; the watcher retries, then ends by itself in one sentence that
    says the server closed the stream (FFmpeg reads a killed RTSP server as an end)."""
    require_rtsp()
    server = RtspServer()
    started(server)
    out = tmp_path / "cut.jsonl"
    watcher = Watcher(server.url, "--every", 1, "-o", out, "--retries", 2)
    started(watcher)
    watcher.wait_lines(out, 2, timeout=60)
    server.stop()
    assert watcher.wait(60) == 1, watcher.err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    check_windows(recs, 1.0)
    assert len(recs) >= 2
    errors = [line for line in watcher.err.splitlines() if "error" in line]
    assert len(errors) == 1, watcher.err
    assert "(the server closed the stream) and could not be reopened within 2 s" in errors[0], errors[0]
    assert re.search(r"reconnecting, try [2-9]", watcher.err), watcher.err
    assert "Traceback" not in watcher.err


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
    started(Proc(writer))
    while not growing.exists() or growing.stat().st_size < 2000:
        time.sleep(0.02)
    follower = Watcher(growing, "--every", 1, "--json", "--retries", 2)
    started(follower)
    assert follower.wait() == 0, follower.err  # the file stopped growing for 2 s: its end
    assert writer.wait(10) == 0
    recs = follower.records()
    check_windows(recs, 1.0)
    assert len(recs) == 4 and recs[-1]["end"] == pytest.approx(4.0, abs=0.15)


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
