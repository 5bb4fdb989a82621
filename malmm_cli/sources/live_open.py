"""Opening a live source for PyAV: what a source is (LiveSpec), and how its bytes come in.

- `http(s)://...`: a raw stream (MPEG-TS, FLV, Matroska ...) is read through Python's
  http.client, so that a stream that ends (the last chunk of a chunked reply, or all of its
  Content-Length) is told apart from a cut connection (IncompleteRead); an HLS playlist
  (`.m3u8`, or a reply typed as one) goes to FFmpeg's HLS demuxer; a web page (text/html) is
  resolved by yt-dlp to its stream URL, then read as one of those;
- `rtsp://`, `rtsps://`, `rtmp://`, `rtmps://`, `udp://`, `rtp://`: FFmpeg's own protocols
  (RTSP over TCP);
- `/dev/videoN`: a webcam (V4L2);
- `-`: standard input (anything FFmpeg demuxes without seeking: MPEG-TS, Matroska, ...);
- a file, read as it grows: it ends when nothing has been added for `idle_s` seconds (at
  once for a file last changed longer ago than that).

The reader (live.py) decodes what `open_live` returns.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from malmm_cli.errors import InputError

log = logging.getLogger("malmm")

FFMPEG_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "udp", "rtp")  # PyAV's FFmpeg has no SRT
HTTP_SCHEMES = ("http", "https")
HLS_TYPES = ("application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl", "audio/x-mpegurl")
OPEN_TIMEOUT_S = 15.0  # connecting and the first bytes of a source
READ_TIMEOUT_S = 15.0  # no data at all for this long on a network source: taken as a cut
_READ_BYTES = 1 << 16
_POLL_S = 0.1
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


class _GrowingFile(_Fd):
    """A file still being written: read as it grows, and seekable (an MP4 or Matroska demuxer
    looks for its index)."""

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)


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
        elif kind == "file" and time.time() - os.stat(url).st_mtime <= (idle_s or 0):
            body = _GrowingFile(os.open(url, os.O_RDONLY), stop, idle_s, owned=True)
        # A file nobody writes any more is FFmpeg's to read (by path: seekable, no Python in between).
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
        raise InputError(f"{spec.input} cannot be opened as a stream ({av_reason(e)}).") from None
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


def av_reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    text = re.sub(r":\s*'[^']*'$", "", text)  # PyAV appends the file name: the sentence names it already
    return text.strip().rstrip(".").lower() or type(err).__name__
