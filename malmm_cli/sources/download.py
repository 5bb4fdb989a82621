"""URL downloads: yt-dlp in a child process, each URL fetched once into `<cache>/downloads`.

Cache layout, key = url_key(url): `<key><ext>` is the video (ext a video extension, else
`.video`, so a URL ending in .json never clashes with the metadata), `<key>.meta.json` its
metadata. The video is renamed into place last: its presence means a complete download.

Why a child process: only killing it ends every kind of hang. A server trickling a byte every
few seconds keeps a blocking read alive forever (each byte resets the socket timeout, and a
progress hook runs only after the read returns); a stall can also come while connecting or
inside ffmpeg. The parent kills the child's process group on a stall or past the deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from malmm_cli.errors import DownloadError, UsageError

from .media import URL_SCHEMES, VIDEO_EXTENSIONS

log = logging.getLogger("malmm")

# yt-dlp settings: one video, no playlists, and a format decord can read. decord's bundled
# FFmpeg (4.1) has no AV1 decoder, so H.264 is preferred; 720p is plenty for 224x224 frames.
DOWNLOAD_OPTIONS: dict[str, Any] = {
    "format": "bv*[vcodec!^=av01]/b[vcodec!^=av01]/bv*/b",
    "format_sort": ["vcodec:h264", "res:720"],
    "noplaylist": True, "playlist_items": "1",
    "socket_timeout": 30, "retries": 3, "fragment_retries": 3, "extractor_retries": 1,
    "quiet": True, "no_warnings": True, "noprogress": True, "color": "never",
}

STALL_ENV = "MALMM_DOWNLOAD_STALL_S"
DEADLINE_ENV = "MALMM_DOWNLOAD_DEADLINE_S"
DEFAULT_STALL_S = 60.0
# The deadline only has to catch a transfer that trickles just fast enough never to stall, in an
# unattended batch. 6 h still fits a 10-hour video at 720p H.264 (about 9 GB) on a 4 Mbit/s link.
DEFAULT_DEADLINE_S = 6 * 3600.0

_META_SUFFIX = ".meta.json"
_OTHER_SUFFIX = ".video"
_STALE_TMP_S = 24 * 3600.0
_TICK_S = 0.2  # how often the child reports; also the resolution of both limits
_CHILD_CODE = "import sys; sys.path.insert(0, sys.argv[1]); from malmm_cli.sources.download import child_main; child_main()"
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding malmm_cli/ (this is malmm_cli/sources/)


@dataclass(frozen=True)
class DownloadLimits:
    """A download is given up when no data arrived for `stall_s` seconds while it waited on the
    network, or when it has not finished `deadline_s` seconds after it started."""

    stall_s: float = DEFAULT_STALL_S
    deadline_s: float = DEFAULT_DEADLINE_S


def download_limits(stall_s: float | None = None, deadline_s: float | None = None) -> DownloadLimits:
    """Limits from the arguments, else from MALMM_DOWNLOAD_STALL_S / MALMM_DOWNLOAD_DEADLINE_S, else
    the defaults (60 s, 6 h); `inf` means no limit. A bad value is a UsageError."""
    return DownloadLimits(_seconds(stall_s, "stall_s", STALL_ENV, DEFAULT_STALL_S),
                          _seconds(deadline_s, "deadline_s", DEADLINE_ENV, DEFAULT_DEADLINE_S))


def _seconds(value: Any, name: str, env: str, default: float) -> float:
    if value is None:
        value, name = os.environ.get(env, "").strip(), env
        if not value:
            return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0:  # NaN too
        raise UsageError(f"{name} must be a number of seconds greater than 0 (or inf), not {value!r}.")
    return seconds


# ----------------------------------------------------------------------------- cache


def url_key(url: str) -> str:
    """Cache key of a URL: the first 24 hex digits of its SHA-256."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]


def cached_download(url: str, downloads: Path) -> Path | None:
    """The finished download of `url` in `downloads`, if any: `<key><video ext>`, never the
    metadata, a temp folder, or a file that is not a video (older versions cached pages too)."""
    key = url_key(url)
    if not downloads.is_dir():
        return None
    for p in sorted(downloads.glob(f"{key}.*")):
        if p.name == key + p.suffix and _is_video_suffix(p.suffix) and p.is_file() and _not_a_video(p) is None:
            return p
    return None


def download(url: str, downloads: Path, options: Mapping[str, Any], *,
             stall_s: float | None = None, deadline_s: float | None = None) -> Path:
    """Download `url` with yt-dlp unless cached; the video appears atomically, or nothing does.

    yt-dlp writes into a private temp folder next to the cache; only a complete download that
    is a video is renamed into place (os.replace, same filesystem). `options` are merged over
    DOWNLOAD_OPTIONS; they must be plain data, as they travel to the child process as JSON.
    `stall_s` and `deadline_s`: see download_limits.
    """
    limits = download_limits(stall_s, deadline_s)
    hit = cached_download(url, downloads)
    if hit is not None:
        log.debug("using cached download %s for %s", hit, url)
        return hit
    downloads.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(downloads)
    key = url_key(url)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=downloads))
    try:
        meta, fetched = _fetch(url, tmp, options, limits)
        problem = _not_a_video(fetched)
        if problem is not None:
            raise DownloadError(f"Could not download {url}: {problem}.")
        final = downloads / f"{key}{_video_suffix(fetched)}"
        (tmp / "meta.json").write_text(json.dumps({"url": url, **meta, "downloaded_at": time.time()}, indent=1),
                                       encoding="utf-8")
        os.replace(tmp / "meta.json", downloads / f"{key}{_META_SUFFIX}")
        os.replace(fetched, final)
        log.info("downloaded %s to %s", url, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_video_suffix(suffix: str) -> bool:
    return suffix.lower() in VIDEO_EXTENSIONS or suffix == _OTHER_SUFFIX


def _video_suffix(path: Path) -> str:
    return path.suffix.lower() if _is_video_suffix(path.suffix) else _OTHER_SUFFIX


def _not_a_video(path: Path) -> str | None:
    """Why a file is certainly not a video (empty, or text such as an HTML page), or None."""
    from .video import looks_like_text

    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the server sent an empty file, not a video"
    if not looks_like_text(head):
        return None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    kind = ("an HTML page" if text.startswith((b"<!doctype html", b"<html")) or b"<body" in text
            else "JSON" if text[:1] in (b"{", b"[") else "a text file")
    return f"the server sent {kind}, not a video"


def _remove_stale_temps(downloads: Path) -> None:
    """Delete temp folders left by killed runs (older than a day, so never a live download)."""
    now = time.time()
    for p in downloads.glob(".tmp-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


# ----------------------------------------------------------------------------- parent side


def _fetch(url: str, folder: Path, options: Mapping[str, Any], limits: DownloadLimits) -> tuple[dict, Path]:
    """Run yt-dlp in a child process; (metadata, downloaded file) or a DownloadError sentence."""
    try:
        request = json.dumps({"url": url, "folder": str(folder), "options": dict(options)})
    except (TypeError, ValueError) as e:
        raise UsageError(f"download_options must be plain data (they go to the download process as JSON): {e}.") from None
    with tempfile.TemporaryFile() as stderr:
        # Own session: Ctrl-C reaches only us, and killing the group also ends any ffmpeg it started.
        child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, _PACKAGE_PARENT], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            with contextlib.suppress(BrokenPipeError):  # it died at once: _supervise says so
                child.stdin.write(request.encode("utf-8") + b"\n")
                child.stdin.close()
            result = _supervise(child, url, limits)
        finally:
            _end(child)
            stderr.seek(0)
            tail = stderr.read()[-4000:].decode("utf-8", "replace").strip()
            if tail:
                log.debug("download process stderr: %s", tail)
    if result is None:
        raise DownloadError(f"Could not download {url}: the download process ended unexpectedly "
                            f"(exit code {child.returncode}).")
    return result


def _supervise(child: subprocess.Popen, url: str, limits: DownloadLimits) -> tuple[dict, Path] | None:
    """The child's result, or None if it died without one; a DownloadError on a stall or the deadline."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True).start()
    started = heard = time.monotonic()
    status = {"busy": False, "quiet_s": 0.0}
    while True:
        now = time.monotonic()
        if now - started > limits.deadline_s:
            raise DownloadError(f"Could not download {url}: it did not finish within {_duration(limits.deadline_s)} "
                                f"(set {DEADLINE_ENV} to allow longer).")
        # Extrapolated from the last report, so a child that stops reporting still stalls.
        if status["busy"] and status["quiet_s"] + (now - heard) > limits.stall_s:
            raise DownloadError(f"Could not download {url}: no data arrived for {_duration(limits.stall_s)}, so the "
                                f"download was given up (set {STALL_ENV} to wait longer).")
        try:
            message = lines.get(timeout=_TICK_S)
        except queue.Empty:
            continue
        if message is None:
            return None
        if "error" in message:
            raise DownloadError(message["error"])
        if "file" in message:
            return message["meta"], Path(message["file"])
        status, heard = message, time.monotonic()


def _read_lines(stream, lines: queue.Queue) -> None:
    with stream:  # closed here, by the one thread reading it
        for raw in stream:
            try:
                lines.put(json.loads(raw))
            except ValueError:
                log.debug("download process: %r", raw)
    lines.put(None)


def _end(child: subprocess.Popen) -> None:
    """Kill the child's process group (a no-op once it has exited) and reap it.

    The child is reaped only here, after the kill, so its group id cannot have been reused."""
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    else:
        child.kill()
    child.wait()


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


# ----------------------------------------------------------------------------- child side


def child_main() -> None:
    """The download process: one request as a JSON line on stdin; on stdout, a status line every
    _TICK_S and finally {"file", "meta"} or {"error"}."""
    request = json.loads(sys.stdin.readline())
    activity = _Activity(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # anything else printed to stdout must not be taken for a status line
    threading.Thread(target=activity.report_forever, daemon=True).start()
    try:
        meta, path = _run_yt_dlp(request["url"], Path(request["folder"]), request["options"], activity)
    except DownloadError as e:
        activity.send({"error": str(e)})
    else:
        activity.send({"file": str(path), "meta": meta})


class _Activity:
    """The child's network activity, as the parent needs it to tell a stall; and the first URL refused."""

    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()
        self._calls = 0
        self._since = time.monotonic()  # last bytes received, or when the network wait began
        self.refused: str | None = None

    @contextlib.contextmanager
    def waiting(self):
        """Around a call that blocks on the network: connecting, a request, a read."""
        with self._lock:
            if self._calls == 0:
                self._since = time.monotonic()
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1

    def received(self, n: int) -> None:
        if n:
            with self._lock:
                self._since = time.monotonic()

    def refuse(self, url: str, how: str) -> None:
        if self.refused is None:
            self.refused = f"it {how} {url}, which is not http(s)"

    def send(self, message: dict) -> None:
        with self._lock:
            self._out.write(json.dumps(message) + "\n")
            self._out.flush()

    def report_forever(self) -> None:
        while True:
            with self._lock:
                status = {"busy": self._calls > 0, "quiet_s": time.monotonic() - self._since}
            self.send(status)
            time.sleep(_TICK_S)


def _run_yt_dlp(url: str, folder: Path, options: Mapping[str, Any], activity: _Activity) -> tuple[dict, Path]:
    import yt_dlp

    # The temp folder is private, so a fixed name: the metadata written next to it cannot collide.
    opts = {**DOWNLOAD_OPTIONS, **options, "paths": {"home": str(folder)}, "outtmpl": "video.%(ext)s",
            "logger": _YtdlLogger(), "enable_file_urls": False}
    try:
        with _guarded_ydl(opts, activity) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as e:
        raise DownloadError(f"Could not download {url}: {activity.refused or _download_reason(e)}.") from None
    except yt_dlp.utils.YoutubeDLError as e:  # e.g. a post-processing error
        raise DownloadError(f"Could not download {url}: {activity.refused or _clean(str(e))}.") from None
    if activity.refused:  # even if yt-dlp found a way round the refusal
        raise DownloadError(f"Could not download {url}: {activity.refused}.")
    if info is None or info.get("_type") in ("playlist", "multi_video"):
        raise DownloadError(f"Could not download {url}: it is a playlist, not a single video (list its videos in an @list file).")
    files = [Path(d["filepath"]) for d in info.get("requested_downloads") or [] if d.get("filepath")]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DownloadError(f"Could not download {url}: yt-dlp finished without producing a file.")
    return {"title": info.get("title"), "id": info.get("id"), "extractor": info.get("extractor_key")}, files[0]


def _guarded_ydl(params: dict, activity: _Activity):
    """A YoutubeDL whose one request handler is _http_only_handler: no other handler (requests,
    curl_cffi, websockets) can carry a request that this one would refuse."""
    import yt_dlp

    handler = _http_only_handler(activity)

    class GuardedYDL(yt_dlp.YoutubeDL):
        def build_request_director(self, handlers, preferences=None):
            return super().build_request_director([handler], preferences)

    return GuardedYDL(params)


def _http_only_handler(activity: _Activity):
    """yt-dlp's urllib request handler, refusing a non-http(s) request and a redirect hop to one
    before connecting to it, and telling `activity` when it waits on the network and gets bytes.

    Classes built here, so that importing this module does not import yt-dlp."""
    import urllib.error
    import urllib.request

    from yt_dlp.networking._urllib import UrllibRH

    class HopCheck(urllib.request.BaseHandler):
        handler_order = 400  # before yt-dlp's RedirectHandler (500), which would follow the hop

        def http_error_302(self, req, fp, code, msg, headers):
            target = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
            if urlparse(target).scheme.lower() in URL_SCHEMES:
                return None  # the next handler follows it
            activity.refuse(target, "redirected to")
            fp.close()
            raise urllib.error.URLError(f"refused to follow a redirect to {target}")

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    counted = _counted_response(activity)

    class HttpOnlyRH(UrllibRH):
        _SUPPORTED_URL_SCHEMES = URL_SCHEMES

        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "enable_file_urls": False})

        def _check_url_scheme(self, request):  # every request; redirects are HopCheck's
            if urlparse(request.url).scheme.lower() not in URL_SCHEMES:
                activity.refuse(request.url, "led to")
            return super()._check_url_scheme(request)

        def _create_instance(self, *args, **kwargs):
            opener = super()._create_instance(*args, **kwargs)
            opener.add_handler(HopCheck())
            return opener

        def _send(self, request):
            with activity.waiting():
                return counted(super()._send(request))

    return HttpOnlyRH


def _counted_response(activity: _Activity):
    """A yt-dlp Response wrapper whose reads are network waits, and their bytes progress."""
    from yt_dlp.networking.common import Response

    class CountedResponse(Response):
        def __init__(self, inner: Response):
            super().__init__(fp=inner, url=inner.url, headers=inner.headers, status=inner.status,
                             reason=inner.reason, extensions=inner.extensions)

        def read(self, amt=None):
            with activity.waiting():
                data = self.fp.read(amt)
            activity.received(len(data))
            if self.fp.closed:
                self.close()
            return data

    return CountedResponse


class _YtdlLogger:
    """Routes yt-dlp's console output to our logger: errors become our exception's sentence."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = debug

    def warning(self, msg: str) -> None:
        log.debug("yt-dlp warning: %s", msg)

    def error(self, msg: str) -> None:
        log.debug("yt-dlp error: %s", msg)


def _download_reason(e: Exception) -> str:
    """One clause saying why yt-dlp failed, from its original exception where it kept one."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import UnsupportedError

    orig = e.exc_info[1] if getattr(e, "exc_info", None) else None
    msg = str(e)
    if isinstance(orig, UnsupportedError):
        return "no video was found there (unsupported site, or a page without a video)"
    if isinstance(orig, HTTPError):
        return f"the server answered HTTP {orig.status} ({orig.reason or 'error'})"
    if isinstance(orig, TransportError):
        return _transport_reason(orig)
    short = re.search(r"Downloaded (\d+) bytes, expected (\d+) bytes", msg)
    if short:
        return f"the connection broke off before the download finished ({short[1]} of {short[2]} bytes)"
    return _clean(msg)


def _transport_reason(err: BaseException) -> str:
    import socket

    cause = err.__cause__ or err.__context__ or getattr(err, "cause", None)
    if isinstance(cause, socket.gaierror):
        return "its host name could not be resolved (no network connection?)"
    if isinstance(cause, ConnectionRefusedError):
        return "the connection was refused (server down, or no network connection?)"
    if isinstance(cause, (TimeoutError, socket.timeout)) or "timed out" in str(err):
        return "the connection timed out"
    return f"a network error occurred ({_clean(str(err))})"


def _clean(msg: str) -> str:
    """yt-dlp's message without its 'ERROR: [extractor] id:' prefix and '(caused by ...)' tail."""
    msg = msg.replace("\r", "").strip()
    msg = re.sub(r"^ERROR:\s*", "", msg)
    msg = re.sub(r"^\[[^\]]+\]\s*(\S+:\s*)?", "", msg)
    msg = re.sub(r"\s*\(caused by .*\)\s*$", "", msg, flags=re.S)
    msg = re.sub(r";\s*please report this issue.*$", "", msg, flags=re.S | re.I)
    return msg.rstrip(". ") or "yt-dlp failed"
