"""Inputs -> video sources: local files, folders, globs, @list files and http(s) URLs.

`expand_inputs` turns command-line arguments into a flat, stable list of specs (paths or
URLs); `open_source` turns one spec into a local file, downloading URLs once with yt-dlp
into a cache keyed by the URL.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from malmm_cli.errors import DownloadError, InputError

log = logging.getLogger("malmm")

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".3g2", ".3gp", ".asf", ".avi", ".divx", ".f4v", ".flv", ".m2ts", ".m2v", ".m4v",
        ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".mts", ".mxf", ".ogv", ".ts", ".vob",
        ".webm", ".wmv",
    }
)

URL_SCHEMES = ("http", "https")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")

# yt-dlp settings: one video, no playlists, and a format decord can read. decord's bundled
# FFmpeg (4.1) has no AV1 decoder, so H.264 is preferred; 720p is plenty for 224x224 frames.
DOWNLOAD_OPTIONS: dict[str, Any] = {
    "format": "bv*[vcodec!^=av01]/b[vcodec!^=av01]/bv*/b",
    "format_sort": ["vcodec:h264", "res:720"],
    "noplaylist": True,
    "playlist_items": "1",
    "socket_timeout": 30,
    "retries": 3,
    "fragment_retries": 3,
    "extractor_retries": 1,
    "quiet": True,
    "no_warnings": True,
    "noprogress": True,
    "color": "never",
}
_STALE_TMP_S = 24 * 3600.0


# ----------------------------------------------------------------------------- expansion


def is_url(spec: str) -> bool:
    """True for http(s) URLs with a host; other schemes are not URLs we accept."""
    parsed = urlparse(spec.strip())
    return parsed.scheme.lower() in URL_SCHEMES and bool(parsed.netloc)


def expand_inputs(args: Sequence[str]) -> list[str]:
    """Flatten arguments into specs: folders and globs become sorted video files, @lists their lines.

    Files and URLs pass through unchanged (a missing file too, so a batch can report it as
    that input's error). In "@list.txt" files, one input per line, blank lines and lines
    starting with # are skipped and relative paths are relative to the list file. A path
    that exists is never treated as a glob. Duplicates are dropped, keeping the first.
    """
    out: list[str] = []
    for arg in args:
        out.extend(_expand_one(arg, base=None, lists=()))
    return list(dict.fromkeys(out))


def _expand_one(arg: str, base: Path | None, lists: tuple[Path, ...]) -> list[str]:
    spec = arg.strip()
    if not spec:
        raise InputError("An empty input was given; pass a file, folder, glob, URL or @list.")
    if spec.startswith("@"):
        return _expand_list(spec[1:], base, lists)
    scheme = _SCHEME_RE.match(spec)
    if scheme:
        if not is_url(spec):
            raise _bad_scheme(spec)
        return [spec]
    path = Path(spec).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        videos = _videos_under(path)
        if not videos:
            raise InputError(f"The folder {path} contains no video files.")
        return videos
    if not path.exists() and _GLOB_CHARS.search(spec):
        return _expand_glob(str(path))
    return [str(path)]


def _expand_list(name: str, base: Path | None, lists: tuple[Path, ...]) -> list[str]:
    path = Path(name).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.resolve() in lists:
        raise InputError(f"The list file {path} includes itself.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"The list file {path} cannot be read ({_os_reason(e)}).") from None
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            # Relative entries are relative to the list file, so a list works from any cwd.
            out.extend(_expand_one(line, path.parent, lists + (path.resolve(),)))
    return out


def _expand_glob(pattern: str) -> list[str]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise InputError(f"The pattern {pattern} matches no files.")
    out: list[str] = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            out.extend(_videos_under(p))
        elif _is_video_name(p):
            out.append(m)
    if not out:
        raise InputError(f"The pattern {pattern} matches no video files.")
    return out


def _videos_under(folder: Path) -> list[str]:
    """Video files below `folder`, recursively, in path order; hidden files and folders skipped.

    Hidden entries are skipped because macOS writes `._name.mp4` resource forks next to real
    videos on external drives, which have a video extension but are not videos.
    """
    found: list[tuple[tuple[str, ...], str]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            p = Path(root) / f
            if not f.startswith(".") and _is_video_name(p) and p.is_file():
                found.append((p.relative_to(folder).parts, str(p)))
    return [s for _, s in sorted(found)]


def _bad_scheme(spec: str) -> InputError:
    scheme = spec.split("://", 1)[0]
    if scheme.lower() in URL_SCHEMES:
        return InputError(f"{spec} is not a valid URL (it has no host name).")
    return InputError(f"{spec} uses the unsupported scheme '{scheme}'; only http and https URLs are accepted.")


def _is_video_name(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _os_reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "it is a folder"
    if isinstance(e, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return type(e).__name__


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class VideoSource:
    """One input resolved to a readable local file; `url` is set when it was downloaded."""

    input: str
    path: Path
    url: str | None


def cache_root() -> Path:
    """MALMM_CACHE_DIR if set, else the user cache dir (e.g. ~/.cache/malmm)."""
    env = os.environ.get("MALMM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("malmm"))


def open_source(
    spec: str, *, cache_dir: Path | None = None, download_options: Mapping[str, Any] | None = None
) -> VideoSource:
    """Resolve one spec: check a local file, or download a URL (cached in `<cache>/downloads`).

    `cache_dir` is the cache root (default `cache_root()`); `download_options` are merged
    over DOWNLOAD_OPTIONS for yt-dlp (e.g. a shorter socket_timeout).
    """
    spec = spec.strip()
    if _SCHEME_RE.match(spec):
        if not is_url(spec):
            raise _bad_scheme(spec)
        root = Path(cache_dir) if cache_dir is not None else cache_root()
        path = download(spec, root / "downloads", download_options or {})
        return VideoSource(input=spec, path=path, url=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{spec} does not exist.")
    if path.is_dir():
        raise InputError(f"{spec} is a folder, not a video file (pass it to expand_inputs to list its videos).")
    if not path.is_file():
        raise InputError(f"{spec} is not a regular file.")
    if not os.access(path, os.R_OK):
        raise InputError(f"{spec} cannot be read (permission denied).")
    return VideoSource(input=spec, path=path, url=None)


# ----------------------------------------------------------------------------- downloads


def url_key(url: str) -> str:
    """Cache key of a URL: the first 24 hex digits of its SHA-256."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]


def cached_download(url: str, downloads: Path) -> Path | None:
    """The finished download of `url` in `downloads`, if any (temp dirs are never matched)."""
    key = url_key(url)
    if not downloads.is_dir():
        return None
    for p in sorted(downloads.glob(f"{key}.*")):
        if p.suffix != ".json" and p.is_file():
            return p
    return None


def download(url: str, downloads: Path, options: Mapping[str, Any]) -> Path:
    """Download `url` with yt-dlp unless cached; the result appears atomically or not at all.

    yt-dlp writes into a private temp folder next to the cache; only a download yt-dlp
    reports complete is renamed into place (os.replace, same filesystem), so an interrupted
    or failed download can never be mistaken for a video.
    """
    hit = cached_download(url, downloads)
    if hit is not None:
        log.debug("using cached download %s for %s", hit, url)
        return hit
    downloads.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(downloads)
    key = url_key(url)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=downloads))
    try:
        info, fetched = _run_yt_dlp(url, tmp, options)
        final = downloads / f"{key}{fetched.suffix or '.video'}"
        meta = {"url": url, "title": info.get("title"), "id": info.get("id"),
                "extractor": info.get("extractor_key"), "downloaded_at": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp / "meta.json", downloads / f"{key}.json")
        os.replace(fetched, final)
        log.info("downloaded %s to %s", url, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_yt_dlp(url: str, folder: Path, options: Mapping[str, Any]) -> tuple[dict, Path]:
    import yt_dlp

    opts = {**DOWNLOAD_OPTIONS, **options, "paths": {"home": str(folder)},
            "outtmpl": "%(id).64B.%(ext)s", "logger": _YtdlLogger()}
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as e:
        raise DownloadError(f"Could not download {url}: {_download_reason(e)}.") from None
    except yt_dlp.utils.YoutubeDLError as e:  # e.g. a post-processing error
        raise DownloadError(f"Could not download {url}: {_clean(str(e))}.") from None
    if info is None or info.get("_type") in ("playlist", "multi_video"):
        raise DownloadError(f"Could not download {url}: it is a playlist, not a single video (list its videos in an @list file).")
    files = [Path(d["filepath"]) for d in info.get("requested_downloads") or [] if d.get("filepath")]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DownloadError(f"Could not download {url}: yt-dlp finished without producing a file.")
    return info, files[0]


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


def _remove_stale_temps(downloads: Path) -> None:
    """Delete temp folders left by killed runs (older than a day, so never a live download)."""
    now = time.time()
    for p in downloads.glob(".tmp-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue
