"""Live sources: frames that arrive in real time, decoded with PyAV (FFmpeg's bindings).

decord indexes a whole file before it decodes a frame, so it cannot read a stream that is
still arriving; PyAV demuxes and decodes packet by packet. What `malmm watch SOURCE` reads:

- `http(s)://...`: a raw stream (MPEG-TS, FLV, Matroska ...) read through Python's
  http.client, so that a stream that ends (the last chunk of a chunked reply, or all of its
  Content-Length) is told apart from a cut connection (IncompleteRead); an HLS playlist
  (`.m3u8`, or a reply typed as one) read by FFmpeg's HLS demuxer; a web page (text/html)
  resolved by yt-dlp to its stream URL, then read as one of those;
- `rtsp://`, `rtsps://`, `rtmp://`, `rtmps://`, `udp://`, `rtp://`: FFmpeg's own
  protocols (RTSP over TCP);
- `/dev/videoN`: a webcam (V4L2);
- `-`: standard input (anything FFmpeg can demux without seeking: MPEG-TS, Matroska, ...);
- a file, read as it grows: it ends when nothing has been added for `idle_s` seconds (at
  once for a file last changed longer ago than that).

A `LiveReader` runs the source in a thread: it decodes every frame (codecs need them all),
samples at `fps` by stream time (the frame on screen at each sample time, as
sources/video.plan_sampling picks frames of a file) and hands the sampled frames over through
a bounded queue. A source that runs ahead of real time (a file, a pipe fed from one) waits
for the model when the queue is full; a source that runs at real time never waits: the oldest
queued frame is dropped instead, and counted. An end of stream ends the reader; a cut
(an error, a connection lost, a live source's EOF) reopens the source with backoff, for at
most `retries_s` seconds from the cut, then ends the reader with one sentence.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import logging
import math
import os
import re
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from malmm_cli.errors import InputError

log = logging.getLogger("malmm")

FFMPEG_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "udp", "rtp")  # PyAV's FFmpeg has no SRT
HTTP_SCHEMES = ("http", "https")
HLS_TYPES = ("application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl", "audio/x-mpegurl")
OPEN_TIMEOUT_S = 15.0  # connecting and the first bytes of a source
READ_TIMEOUT_S = 15.0  # no data at all for this long on a network source: taken as a cut
_SLACK_S = 0.5  # a source this far ahead of real time is faster than real time (a file)
_TIME_SLACK = 2e-6  # frame times as plan_sampling compares them (its _time_slack for small t)
_READ_BYTES = 1 << 16
_POLL_S = 0.1
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)  # then 4 s apart, until retries_s is spent
_JOIN_S = 5.0
_DEVICE = re.compile(r"^/dev/video\d+$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ---- what a source is ----------------------------------------------------------------------


@dataclass(frozen=True)
class LiveSpec:
    """A source as the user named it, and how it is read: kind is http (decided on opening:
    a stream, an HLS playlist or a page), ffmpeg (a URL FFmpeg opens), device, stdin or file."""

    input: str
    kind: str
    target: str  # the URL, device or path to open
    headers: tuple[tuple[str, str], ...] = ()  # HTTP headers yt-dlp asks for (a resolved page)


def live_spec(spec: str) -> LiveSpec:
    """What `spec` names, checked without touching the network (an InputError otherwise)."""
    spec = spec.strip()
    if spec == "-":
        return LiveSpec("-", "stdin", "-")
    scheme = _SCHEME.match(spec)
    if scheme:
        name = scheme.group(1).lower()
        if not urllib.parse.urlparse(spec).netloc:
            raise InputError(f"{spec} is not a valid URL (it has no host name).")
        if name in HTTP_SCHEMES:
            return LiveSpec(spec, "http", spec)
        if name in FFMPEG_SCHEMES:
            return LiveSpec(spec, "ffmpeg", spec)
        raise InputError(f"{spec} uses the unsupported scheme '{scheme.group(1)}'; watch reads http(s), "
                         f"{', '.join(FFMPEG_SCHEMES)}, a device (/dev/video0), a file or - (standard input).")
    if _DEVICE.match(spec):
        if not os.path.exists(spec):
            raise InputError(f"{spec} does not exist: no camera is connected there (see: v4l2-ctl --list-devices).")
        return LiveSpec(spec, "device", spec)
    path = os.path.expanduser(spec)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{spec} does not exist.") from None
    except OSError as e:
        raise InputError(f"{spec} cannot be read ({(e.strerror or type(e).__name__).lower()}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{spec} is a folder; watch reads one stream (a file, a URL, a device or -).")
    if not os.access(path, os.R_OK):
        raise InputError(f"{spec} cannot be read (permission denied).")
    return LiveSpec(spec, "file", path)


def is_hls(url: str) -> bool:
    return urllib.parse.urlparse(url).path.lower().endswith((".m3u8", ".m3u"))


# ---- byte sources PyAV reads through Python --------------------------------------------------


class _Bytes:
    """A file-like object PyAV reads (read only: no seeking, as a live source has none). It
    returns what is there, never waits for a full buffer (a slow stream would be held up), and
    gives up when `stop` is set. `cut` holds why it ended, when that was not the stream's end."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.cut: str | None = None

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _HttpBody(_Bytes):
    def __init__(self, response: http.client.HTTPResponse, stop: threading.Event):
        super().__init__(stop)
        self.response = response

    def read(self, n: int) -> bytes:
        if self.stop.is_set():
            return b""
        try:
            data = self.response.read1(min(n, _READ_BYTES))
        except http.client.IncompleteRead:
            self.cut = "the connection closed in the middle of the stream"
            return b""
        except OSError as e:  # a timeout, a reset
            self.cut = _reason(e)
            return b""
        if not data and self.response.length:  # Content-Length not reached
            self.cut = "the connection closed before the end of the stream"
        elif not data and not self.response.chunked and self.response.length is None:
            # The connection's close is the only end there is: a live stream does not end, so it was cut.
            self.cut = "the server closed the connection"
        return data

    def close(self) -> None:
        self.response.close()


class _Fd(_Bytes):
    """Standard input, or a file read as it grows: at its end, a file is polled until nothing
    has been added for `idle_s` seconds (the writer has stopped)."""

    def __init__(self, fd: int, stop: threading.Event, idle_s: float | None, owned: bool):
        super().__init__(stop)
        self.fd, self.idle_s, self.owned = fd, idle_s, owned
        self.last_data = time.monotonic()

    def read(self, n: int) -> bytes:
        while not self.stop.is_set():
            data = os.read(self.fd, min(n, _READ_BYTES))
            if data:
                self.last_data = time.monotonic()
                return data
            if self.idle_s is None or time.monotonic() - self.last_data > self.idle_s:
                self.idle_s = None  # the end: FFmpeg reads past it more than once, none of them waits again
                return data
            time.sleep(_POLL_S)
        return b""

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, TimeoutError) or "timed out" in str(err):
        return "no data arrived for a while (timed out)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    return str(err).strip().rstrip(".") or type(err).__name__


def _opener() -> urllib.request.OpenerDirector:
    """http and https only: a redirect to file:// or ftp:// is refused ("unknown url type")."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _get(url: str, headers, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "malmm", **dict(headers)})
    return _opener().open(request, timeout=timeout)


def hls_ended(url: str, headers=(), timeout: float = OPEN_TIMEOUT_S) -> bool:
    """Whether the HLS playlist at `url` (or the first variant of a master playlist) says the
    stream is over (#EXT-X-ENDLIST). False when it cannot be fetched: then it is a cut."""
    for _ in range(2):  # the playlist, then the first variant of a master playlist
        try:
            with _get(url, headers, timeout) as response:
                text = response.read(4 << 20).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException, ValueError):
            return False
        if "#EXT-X-ENDLIST" in text:
            return True
        variant = next((line.strip() for line in text.splitlines()[1:] if line.strip()
                        and not line.startswith("#")), None) if "#EXT-X-STREAM-INF" in text else None
        if variant is None:
            return False
        url = urllib.parse.urljoin(url, variant)
    return False


def resolve_page(url: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The stream URL behind a web page, and the headers to fetch it with, from yt-dlp (no download)."""
    import yt_dlp

    options = {"quiet": True, "no_warnings": True, "noplaylist": True, "playlist_items": "1",
               "format": "bv*[height<=720]/b[height<=720]/bv*/b", "socket_timeout": OPEN_TIMEOUT_S,
               "logger": _Silent()}  # its errors become our one sentence, not lines of its own
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=False)
    except yt_dlp.utils.YoutubeDLError as e:
        message = re.sub(r"^ERROR:\s*", "", str(e)).strip().rstrip(".")
        why = "" if message.startswith("Unsupported URL") else f" ({message})"
        raise InputError(f"{url} is a web page, and yt-dlp found no stream in it{why}.") from None
    if info.get("_type") == "playlist":
        entries = [e for e in info.get("entries") or () if e]
        info = entries[0] if entries else {}
    chosen = [f for f in info.get("requested_formats") or () if f.get("vcodec") not in (None, "none")]
    chosen = chosen[0] if chosen else info
    if not chosen.get("url"):
        raise InputError(f"{url} is a web page, and yt-dlp found no stream URL in it.")
    return chosen["url"], tuple((chosen.get("http_headers") or info.get("http_headers") or {}).items())


class _Silent:
    """yt-dlp's logger: quiet (what matters comes back as its exception)."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    warning = error = info = debug


# ---- opening -------------------------------------------------------------------------------


@dataclass
class Opened:
    """A source opened: the PyAV container, its video stream, what to call it, and the byte
    source PyAV reads through (None when FFmpeg reads by itself)."""

    container: Any
    stream: Any
    kind: str  # http | hls | ffmpeg | device | stdin | file
    url: str  # what was opened (a page's stream URL once resolved)
    headers: tuple[tuple[str, str], ...] = ()
    body: _Bytes | None = None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a container that failed mid-read may raise anything of PyAV's
            self.container.close()
        if self.body is not None:
            self.body.close()


def open_live(spec: LiveSpec, stop: threading.Event, *, idle_s: float | None = None,
              resolved: tuple[str, tuple] | None = None) -> Opened:
    """Open `spec` for reading (an InputError with one sentence when it cannot be). `resolved`:
    a page's stream URL and headers found before (a reconnect does not ask yt-dlp again)."""
    import av

    kind, url, headers = spec.kind, spec.target, spec.headers
    if resolved is not None:
        url, headers = resolved
    body: _Bytes | None = None
    options: dict[str, str] = {}
    fmt = None
    try:
        if kind == "http":
            kind, body, url, headers = _open_http(spec.input, url, headers, stop)
        if kind == "stdin":
            body = _Fd(0, stop, None, owned=False)
        elif kind == "file":
            fresh = time.time() - os.stat(url).st_mtime <= (idle_s or 0)
            body = _Fd(os.open(url, os.O_RDONLY), stop, idle_s if fresh else None, owned=True)
        elif kind == "device":
            fmt = "v4l2"
        elif kind == "ffmpeg" and url.lower().startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = "tcp"
        elif kind == "hls":
            # FFmpeg's defaults reload a playlist that stopped growing, or fails to load, about a
            # thousand times: the reader's own reconnecting (within retries_s) handles both.
            options.update(m3u8_hold_counters="4", max_reload="3", seg_max_retry="1")
            if headers:
                options["headers"] = "".join(f"{k}: {v}\r\n" for k, v in headers)
        # FFmpeg reads 5 s of a stream to learn its codecs before the first frame: a live view
        # would start 5 s late. A second is enough for the video streams of live protocols.
        options.update(analyzeduration="1000000", probesize="1000000")
        if body is not None:
            container = av.open(body, format=None, options=options, buffer_size=_READ_BYTES,
                                timeout=(OPEN_TIMEOUT_S, READ_TIMEOUT_S))
        else:
            container = av.open(url, format=fmt, options=options, timeout=(OPEN_TIMEOUT_S, READ_TIMEOUT_S))
    except InputError:
        raise
    except (av.FFmpegError, OSError, http.client.HTTPException, ValueError) as e:
        if body is not None:
            body.close()
        raise InputError(f"{spec.input} cannot be opened as a stream ({_av_reason(e)}).") from None
    if not container.streams.video:
        container.close()
        if body is not None:
            body.close()
        raise InputError(f"{spec.input} has no video stream.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame and slice threads: decoding keeps up with the stream
    return Opened(container, stream, kind, url, headers, body)


def _open_http(name: str, url: str, headers, stop: threading.Event):
    """(kind, body or None, url, headers) of an http(s) source: an HLS playlist (FFmpeg reads
    it), a raw stream (read here, through http.client) or a page (yt-dlp finds its stream)."""
    if is_hls(url):
        return "hls", None, url, headers
    try:
        response = _get(url, headers, OPEN_TIMEOUT_S)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise InputError(f"{name} cannot be opened ({_reason(e)}).") from None
    ctype = (response.headers.get_content_type() or "").lower()
    if ctype in HLS_TYPES:
        response.close()
        return "hls", None, response.url, headers
    if ctype in ("text/html", "application/xhtml+xml"):
        response.close()
        stream_url, stream_headers = resolve_page(url)
        log.debug("%s: the page's stream is %s", name, stream_url)
        kind, body, url, headers = _open_http(name, stream_url, stream_headers, stop)
        return ("page-" + kind), body, url, headers
    return "http", _HttpBody(response, stop), response.url, headers


def _av_reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    text = re.sub(r":\s*'[^']*'$", "", text)  # PyAV appends the file name: the sentence names it already
    return text.strip().rstrip(".").lower() or type(err).__name__


# ---- frames --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveFrame:
    """A sampled frame: its stream time (s, from the stream's first frame), when it was
    decoded (time.monotonic()), when real time would have shown it, and its pixels."""

    time: float
    arrived: float
    due: float  # time.monotonic() at which the stream, played in real time, shows this frame
    rgb: np.ndarray  # uint8 [H, W, 3]

    def lag(self, now: float) -> float:
        """How far behind the stream a result of this frame at `now` is: from when the frame
        was due in real time (for a live source), or from when it was decoded (for a source
        faster than real time, whose frames are all early)."""
        return max(0.0, now - min(self.arrived, self.due))


@dataclass(frozen=True)
class StreamEnd:
    """The reader is done. `end`: the stream time where the stream stopped; `error`: the
    sentence when it was cut and could not be reopened (None: it ended, or was stopped)."""

    end: float
    error: str | None = None


@dataclass
class ReaderState:
    """What the reader has done so far (read by the consumer and the terminal view)."""

    kind: str = ""
    url: str = ""
    width: int = 0
    height: int = 0
    codec: str = ""
    rate: float | None = None  # the stream's frame rate, when it says
    sampled: int = 0
    dropped: int = 0
    reconnects: int = 0
    stream_time: float = 0.0
    note: str = ""  # what the reader does now, in words ("reconnecting ...")
    drops_by_window: collections.Counter = field(default_factory=collections.Counter)


class FrameQueue:
    """Sampled frames from the reader to the model, at most `capacity` of them at once."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()

    def put(self, frame: LiveFrame, wait: Callable[[], bool]) -> LiveFrame | None:
        """Queue `frame`; while the queue is full, wait as long as `wait()` says, then drop the
        oldest frame and return it."""
        with self.cond:
            while len(self.items) >= self.capacity and wait():
                self.cond.wait(_POLL_S)
            dropped = self.items.popleft() if len(self.items) >= self.capacity else None
            self.items.append(frame)
            self.cond.notify_all()
            return dropped

    def finish(self, end: StreamEnd) -> None:
        with self.cond:
            self.items.append(end)  # never dropped, whatever the capacity
            self.cond.notify_all()

    def take(self, most: int, timeout: float) -> list:
        """Up to `most` items, waiting up to `timeout` s for the first; frames, then at most one StreamEnd."""
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            out = []
            while self.items and len(out) < most:
                item = self.items.popleft()
                out.append(item)
                if isinstance(item, StreamEnd):
                    break
            self.cond.notify_all()
            return out


class _Clock:
    """Stream time of decoded frames: from 0 at the first frame, continuous across reconnects."""

    def __init__(self):
        self.base: float | None = None  # raw time of stream time 0
        self.last_raw: float | None = None
        self.last: float = 0.0
        self.step = 0.04  # a frame's duration, for a frame without a time and after a restart
        self.wall0 = self.t0 = 0.0  # real-time anchor: stream time t0 was shown at wall0
        self.reopened = False  # set on a reconnect: the next frame re-anchors real time

    def anchor(self, t: float, now: float) -> None:
        self.wall0, self.t0 = now, t

    def place(self, raw: float | None, now: float) -> float | None:
        """The stream time of a frame with raw time `raw` (s, the container's), or None for a
        frame to skip: one seen already (a reopened HLS stream starts a few segments back) or
        out of order. Times that start over (a restarted encoder, a discontinuity) go on from
        the last stream time."""
        if raw is None:
            raw = 0.0 if self.last_raw is None else self.last_raw + self.step
        if self.base is None:
            self.base = raw
            self.anchor(0.0, now)
        else:
            back = raw <= self.last_raw
            if self.reopened and back and raw > self.last_raw - 60:
                return None
            if raw < self.last_raw - 1 or raw > self.last_raw + (60 if self.reopened else 3600):
                self.base = raw - (self.last + self.step)
            elif back:
                return None
            if self.reopened:
                self.reopened = False
                self.anchor(raw - self.base, now)  # real time starts again where the stream resumed
        self.last_raw = raw
        self.last = round(raw - self.base, 6)  # 4.4 - 1.4 is 2.9999999999999996: a frame in the wrong window
        return self.last

    @property
    def end(self) -> float:
        """Where the stream read so far ends: its last frame shows for one frame time."""
        return round(self.last + self.step, 6) if self.base is not None else 0.0

    def due(self, t: float) -> float:
        return self.wall0 + (t - self.t0)


class LiveReader:
    """A source read in a thread: sampled frames into a FrameQueue, then one StreamEnd."""

    def __init__(self, spec: LiveSpec, *, fps: float, every: float, duration: float | None = None,
                 retries_s: float = 30.0, capacity: int | None = None):
        self.spec, self.fps, self.every, self.duration, self.retries_s = spec, fps, every, duration, retries_s
        # About two seconds of sampled frames: enough to batch the ViT, little enough to stay live.
        self.queue = FrameQueue(capacity or max(2, math.ceil(2 * fps)))
        self.state = ReaderState(kind=spec.kind)
        self.stop_event = threading.Event()
        self.clock = _Clock()
        self.thread = threading.Thread(target=self._run, name="malmm-live", daemon=True)
        self._resolved: tuple[str, tuple] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop reading (the consumer's end: Ctrl-C, --duration reached elsewhere, an error)."""
        self.stop_event.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(_JOIN_S)  # a read blocked in FFmpeg ends by its timeout; the thread is a daemon

    def drops_in(self, window: int) -> int:
        """Frames of window `window` dropped so far; forgotten once asked for (the window is done)."""
        with self._lock:
            return self.state.drops_by_window.pop(window, 0)

    # ---- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        end: StreamEnd | None = None
        try:
            end = self._read_all()
        except InputError as e:
            end = StreamEnd(self.clock.end, str(e))
        except Exception as e:  # noqa: BLE001 - a bug in the reader: said in one sentence, not lost in a thread
            log.debug("live reader failed", exc_info=True)
            end = StreamEnd(self.clock.end, f"reading {self.spec.input} failed: {type(e).__name__}: {e}")
        finally:
            self.queue.finish(end or StreamEnd(self.clock.end))

    def _read_all(self) -> StreamEnd:
        opened = open_live(self.spec, self.stop_event, idle_s=self.retries_s)  # the first open fails at once
        self._describe(opened)
        while True:
            ended, cut = self._decode(opened)
            if ended is not None:
                return ended
            cut_at = time.monotonic()
            opened = self._reopen(cut, cut_at)
            if opened is None:
                return StreamEnd(self.clock.end, self._cut_sentence(cut))
            self.state.reconnects += 1
            self.state.note = ""
            self.clock.reopened = True

    def _describe(self, opened: Opened) -> None:
        s, ctx = self.state, opened.stream.codec_context
        s.kind, s.url, s.width, s.height, s.codec = opened.kind, opened.url, ctx.width, ctx.height, ctx.name
        rate = opened.stream.average_rate or opened.stream.guessed_rate
        s.rate = float(rate) if rate else None
        if s.rate:
            self.clock.step = 1.0 / s.rate
        if opened.kind.startswith("page-"):
            self._resolved = (opened.url, opened.headers)

    def _cut_sentence(self, cut: str) -> str:
        return (f"{self.spec.input}: the stream was cut at {_clock(self.clock.last)} ({cut}) and could not be "
                f"reopened within {self.retries_s:g} s")

    def _reopen(self, cut: str, cut_at: float) -> Opened | None:
        """Open the source again, with backoff, until retries_s have passed since the cut."""
        import av

        for attempt in range(10_000):
            wait = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            left = cut_at + self.retries_s - time.monotonic()
            if left <= 0 or self.stop_event.is_set():
                return None
            # Said by the terminal view, from this note: a log line from this thread would tear its panel.
            self.state.note = f"cut at {_clock(self.clock.last)} ({cut}); reconnecting, try {attempt + 1}"
            log.debug("%s: %s", self.spec.input, self.state.note)
            if self.stop_event.wait(min(wait, left)):
                return None
            try:
                spec = self.spec if self._resolved is None else LiveSpec(self.spec.input, "http", self._resolved[0],
                                                                         self._resolved[1])
                return open_live(spec, self.stop_event, idle_s=self.retries_s)
            except (InputError, av.FFmpegError, OSError) as e:
                cut = str(e).removeprefix(f"{self.spec.input} ").rstrip(".")
        return None

    def _decode(self, opened: Opened) -> tuple[StreamEnd | None, str]:
        """Decode until the source ends or is cut: (StreamEnd, "") when it ended or was
        stopped, (None, why) when it was cut. Samples the frame on screen at each sample time."""
        import av

        fps, previous, next_sample = self.fps, None, None
        error = ""
        try:
            for frame in opened.container.decode(opened.stream):
                if self.stop_event.is_set():
                    break
                now = time.monotonic()
                t = self.clock.place(frame.time, now)
                if t is None:
                    continue
                self.state.stream_time = t
                if next_sample is None:
                    next_sample = self._first_sample(t)
                if self.duration is not None and t >= self.duration - _TIME_SLACK:
                    if previous is not None and next_sample < self.duration:
                        self._emit(previous)
                    return StreamEnd(self.duration), ""
                # The previous frame is on screen at every sample time before this frame's.
                if previous is not None and next_sample < t - _TIME_SLACK:
                    self._emit(previous)
                    next_sample = math.ceil((t - _TIME_SLACK) * fps) / fps
                previous = (frame, t, now)
        except (av.FFmpegError, OSError, EOFError) as e:
            error = _av_reason(e)
        finally:
            opened.close()
        end = self.clock.end
        if self.duration is not None:
            end = min(end, self.duration)
        if previous is not None and next_sample is not None and next_sample < end - _TIME_SLACK:
            self._emit(previous)
        if self.stop_event.is_set():
            return StreamEnd(end), ""
        cut = error or (opened.body.cut if opened.body is not None else None)
        if not cut and opened.kind in ("hls", "page-hls") and not hls_ended(opened.url, opened.headers):
            cut = "the playlist stopped growing, or could not be loaded"
        if not cut and opened.kind in ("ffmpeg", "device"):
            cut = "the stream ended"  # a camera or a live protocol does not end by itself
        return (None, cut) if cut else (StreamEnd(end), "")

    def _first_sample(self, t: float) -> float:
        return math.ceil((t - _TIME_SLACK) * self.fps) / self.fps

    def _emit(self, previous) -> None:
        """Queue the frame `previous` = (av frame, stream time, when decoded)."""
        frame, t, arrived = previous
        item = LiveFrame(t, arrived, self.clock.due(t), frame.to_ndarray(format="rgb24"))
        self.state.sampled += 1
        # A source ahead of real time waits for the model; a live one never does.
        dropped = self.queue.put(item, lambda: not self.stop_event.is_set() and self._ahead(item))
        if dropped is not None:
            with self._lock:
                self.state.dropped += 1
                self.state.drops_by_window[window_of(dropped.time, self.every)] += 1

    def _ahead(self, frame: LiveFrame) -> bool:
        return frame.due - time.monotonic() > _SLACK_S


def window_of(t: float, every: float) -> int:
    """The window of stream time `t`: [k * every, (k + 1) * every) is window k (a time a rounding
    error below a boundary is on it)."""
    return int(math.floor(t / every + 1e-9))


def _clock(seconds: float) -> str:
    total = int(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
