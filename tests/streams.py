"""Servers, streams and watchers for the tests of `malmm watch`: all on 127.0.0.1, each with a
stop(), which the `started` fixture calls at the end of a test whatever happens.

Streams are served in real time by the ffmpeg binary of imageio-ffmpeg (`-re ... -f mpegts
-listen 1 http://...`: it starts when the watcher connects) and by a local http.server whose
HLS playlist a test grows segment by segment.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .cli import TINY
from .media import ffmpeg_exe

REPO = Path(__file__).resolve().parents[1]

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

    def wait_lines(self, path: Path, n: int, timeout: float = 120) -> None:
        """Until `path` holds `n` lines, while this watcher still runs."""
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.read_text().count("\n") >= n):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.err
            time.sleep(0.02)

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



class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class FolderServer:
    """A local http.server (127.0.0.1 only) for the files of a folder: `base` + "/name".
    As a context manager it stops at the block's end."""

    def __init__(self, folder: Path):
        handler = functools.partial(_Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FolderServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class HlsServer(FolderServer):
    """A local http.server for a folder whose HLS playlist the test grows."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.url = f"{self.base}/index.m3u8"


def hls_segments(folder: Path, seconds: int) -> list[tuple[str, float]]:
    """One-second segments of a synthetic stream (made at once, not in real time)."""
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size=96x64:rate=10:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
                    "-g", "10", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0",
                    "-hls_segment_filename", str(folder / "seg%03d.ts"), str(folder / "made.m3u8")], check=True)
    text = (folder / "made.m3u8").read_text()
    return [(name, float(d)) for d, name in re.findall(r"#EXTINF:([\d.]+),\s*\n(\S+)", text)]


def playlist(folder: Path, segments, ended: bool) -> None:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:1", "#EXT-X-MEDIA-SEQUENCE:0"]
    for name, duration in segments:
        lines += [f"#EXTINF:{duration:.6f},", name]
    tmp = folder / "index.m3u8.tmp"
    tmp.write_text("\n".join(lines + (["#EXT-X-ENDLIST"] if ended else [])) + "\n")
    os.replace(tmp, folder / "index.m3u8")  # as a live packager does: never a half-written playlist



class Proc:
    def __init__(self, proc):
        self.proc = proc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)



# ---- RTSP: GStreamer's server, run by the system python3 -------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"  # PyGObject (python3-gi) is a Debian package, not in the venv
RTSP_SCRIPT = Path(__file__).with_name("rtsp_server.py")


@functools.lru_cache(maxsize=1)
def rtsp_missing() -> str | None:
    """Why no local RTSP server can be started here (None when one can)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON} to run GStreamer's RTSP server"
    try:
        check = subprocess.run([SYSTEM_PYTHON, str(RTSP_SCRIPT), "--check"], capture_output=True, text=True,
                               timeout=30)
    except subprocess.TimeoutExpired:
        return "GStreamer did not answer within 30 s"
    if check.returncode == 0:
        return None
    last = (check.stderr.strip().splitlines() or ["?"])[-1]
    return (f"no GStreamer RTSP server ({last}); apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi "
            "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly")


def require_rtsp() -> None:
    """Skip, saying why, where no RTSP server can be started; fail instead under
    MALMM_REQUIRE_RTSP=1 (.ci/run sets it, having installed GStreamer)."""
    reason = rtsp_missing()
    if reason is not None:
        if os.environ.get("MALMM_REQUIRE_RTSP") == "1":
            pytest.fail(f"MALMM_REQUIRE_RTSP=1 but {reason}")
        pytest.skip(reason)


class RtspServer:
    """GStreamer's RTSP server on 127.0.0.1, a live synthetic stream (10 frames/s, 96x64 H.264)."""

    def __init__(self):
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SCRIPT)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        port = self.proc.stdout.readline().strip() if ready else ""  # printed once it listens
        if not port.isdigit():
            self.stop()
            raise AssertionError("the RTSP server did not start")
        self.port = int(port)
        self.url = f"rtsp://127.0.0.1:{self.port}/test"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
