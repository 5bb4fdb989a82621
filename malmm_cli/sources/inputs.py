"""Inputs -> video sources: local files, folders, globs, @list files and http(s) URLs.

`expand_inputs` turns command-line arguments into a flat, stable list of specs (paths or
URLs); `open_source` turns one spec into a local file, downloading URLs once with yt-dlp
into a cache keyed by the URL (sources/download.py, whose names are re-exported here).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from malmm_cli.errors import InputError, UsageError

from .download import (  # noqa: F401  (re-exported: callers import them from here)
    DOWNLOAD_OPTIONS,
    DownloadLimits,
    cached_download,
    download,
    download_limits,
    url_key,
)
from .media import URL_SCHEMES, VIDEO_EXTENSIONS

log = logging.getLogger("malmm")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------- expansion


def is_url(spec: str) -> bool:
    """True for http(s) URLs with a host; other schemes are not URLs we accept."""
    parsed = urlparse(spec.strip())
    return parsed.scheme.lower() in URL_SCHEMES and bool(parsed.netloc)


def expand_inputs(args: Sequence[str]) -> list[str]:
    """Flatten arguments into specs: folders and globs become sorted video files, @lists their lines.

    Files and URLs pass through unchanged. A local path that does not exist, on the command
    line or in a list, is a UsageError naming every such path as it was written (before any
    model loads: a typo costs nothing). In "@list.txt" files, one input per line, blank lines
    and lines starting with # are skipped and relative paths are relative to the list file. A
    path that exists is never treated as a glob. Duplicates are dropped, keeping the first
    spelling: the same URL, or the same real file (a symlinked folder can reach it twice);
    a warning names them, once.
    """
    out: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []  # (spelling dropped, the one kept)
    missing: list[str] = []  # each missing path as written, with its list file and line
    for arg in args:
        for spec in _expand_one(arg, base=None, lists=(), missing=missing):
            key = spec if is_url(spec) else os.path.realpath(spec)
            if key in out:
                dropped.append((spec, out[key]))
            else:
                out[key] = spec
    if missing:
        raise UsageError(missing_note(missing))
    if dropped:
        log.warning(duplicates_note(dropped))
    return list(out.values())


def missing_note(missing: Sequence[str], shown: int = 5) -> str:
    """'clip.mp4 does not exist.' or '3 inputs do not exist: a.mp4, b.mp4 (todo.txt, line 3), c.mp4.'"""
    if len(missing) == 1:
        return f"{missing[0]} does not exist."
    more = f", and {len(missing) - shown} more" if len(missing) > shown else ""
    return f"{len(missing)} inputs do not exist: {', '.join(missing[:shown])}{more}."


def duplicates_note(dropped: Sequence[tuple[str, str]], shown: int = 5) -> str:
    """'2 duplicate inputs dropped (each video is read once): a.mp4 (given twice), l.mp4 (the
    same file as a.mp4)', naming the first `shown` of them."""
    named = [f"{spec} (given twice)" if spec == kept else f"{spec} (the same file as {kept})"
             for spec, kept in dropped[:shown]]
    more = f", and {len(dropped) - shown} more" if len(dropped) > shown else ""
    n = len(dropped)
    return f"{n} duplicate input{'s' if n != 1 else ''} dropped (each video is read once): {', '.join(named)}{more}"


def _expand_one(arg: str, base: Path | None, lists: tuple[Path, ...], missing: list[str],
                where: str = "") -> list[str]:
    """The specs `arg` stands for; a local path that does not exist goes to `missing`, as written
    (`where`: " (todo.txt, line 3)" for a list's line)."""
    spec = arg.strip()
    if not spec:
        raise InputError("An empty input was given; pass a file, folder, glob, URL or @list.")
    if spec.startswith("@"):
        return _expand_list(spec[1:], base, lists, missing)
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
            raise InputError(f"The folder {spec}{where} contains no video files.")
        return videos
    if not path.exists() and _GLOB_CHARS.search(spec):
        return _expand_glob(str(path))
    if not path.exists():
        missing.append(spec + where)
        return []
    return [str(path)]


def _expand_list(name: str, base: Path | None, lists: tuple[Path, ...], missing: list[str]) -> list[str]:
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
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            # Relative entries are relative to the list file, so a list works from any cwd.
            out.extend(_expand_one(line, path.parent, lists + (path.resolve(),), missing,
                                   f" ({name}, line {number})"))
    return out


def _expand_glob(pattern: str) -> list[str]:
    matches = sorted(_glob(pattern))
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


def _glob(pattern: str) -> Iterator[str]:
    """glob.glob(pattern, recursive=True), except that `**` does not descend into symlinked
    folders, as os.walk does not: glob follows a link to an ancestor round and round until the
    OS refuses, so one such link turned 8 videos into hundreds of inputs."""
    parts = Path(pattern).parts
    if "**" not in parts:
        yield from glob.glob(pattern)
        return
    i = parts.index("**")
    head, tail = (os.path.join(*parts[:i]) if i else ""), parts[i:]
    hidden_ok = any(p.startswith(".") for p in tail)
    for base in glob.glob(head) if _GLOB_CHARS.search(head) else [head]:
        top = base or "."
        if not os.path.isdir(top):
            continue
        if base and _glob_match(tail, ()):
            yield os.path.join(base, "")  # as glob does: "videos/**" matches "videos/" itself
        for root, dirs, files in os.walk(top, followlinks=False):
            rel = () if root == top else Path(os.path.relpath(root, top)).parts
            for name in dirs + files:
                if _glob_match(tail, rel + (name,)):
                    yield os.path.join(base, *rel, name)
            dirs[:] = [d for d in dirs if hidden_ok or not d.startswith(".")]


def _glob_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Path components against glob components, `**` standing for any number of folders; as in
    glob, a hidden name matches only a component that starts with a dot, and never `**`."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[k:]) for k in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:k]))
    return (bool(parts) and (pattern[0].startswith(".") or not parts[0].startswith("."))
            and fnmatch.fnmatch(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:]))


def _videos_under(folder: Path) -> list[str]:
    """Video files below `folder`, recursively, in path order; hidden files and folders skipped.

    Hidden entries are skipped because macOS writes `._name.mp4` resource forks next to real
    videos on external drives, which have a video extension but are not videos. Symlinked
    folders are not followed (os.walk's default): a link to an ancestor would loop.
    """
    found: list[tuple[tuple[str, ...], str]] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
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
    """MALMM_CACHE_DIR if set, else the user cache dir (e.g. ~/.cache/malmm).

    A UsageError if it cannot be a folder malmm writes to (it is created on first use): one
    sentence now rather than a traceback from the first cache write, possibly after a model load.
    """
    env = os.environ.get("MALMM_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
        problem = _folder_problem(root)
        if problem:
            raise UsageError(f"MALMM_CACHE_DIR is {env}, {problem}; point it at a folder malmm can write to.")
        return root
    from platformdirs import user_cache_dir

    root = Path(user_cache_dir("malmm"))
    problem = _folder_problem(root)
    if problem:
        raise UsageError(f"The cache folder {root} cannot be used: it {problem.removeprefix('which ')}; "
                         "set MALMM_CACHE_DIR to a folder malmm can write to.")
    return root


def _folder_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a writable folder, created if missing ("which ..."), or None."""
    if os.path.islink(path) and not path.exists():
        return "which is a broken symbolic link"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    if existing == path and not path.is_dir():
        return "which is a file, not a folder"
    if not existing.is_dir():
        return f"which cannot be created because {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "which is not writable" if existing == path else f"which cannot be created in {existing} (not writable)"
    return None


def open_source(
    spec: str, *, cache_dir: Path | None = None, download_options: Mapping[str, Any] | None = None,
    stall_s: float | None = None, deadline_s: float | None = None,
) -> VideoSource:
    """Resolve one spec: check a local file, or download a URL (cached in `<cache>/downloads`).

    `cache_dir` is the cache root (default `cache_root()`); `download_options` are merged
    over DOWNLOAD_OPTIONS for yt-dlp (e.g. a shorter socket_timeout); `stall_s` and
    `deadline_s` end a download that stalls or takes too long (defaults: download_limits).
    """
    spec = spec.strip()
    if _SCHEME_RE.match(spec):
        if not is_url(spec):
            raise _bad_scheme(spec)
        root = Path(cache_dir) if cache_dir is not None else cache_root()
        path = download(spec, root / "downloads", download_options or {}, stall_s=stall_s, deadline_s=deadline_s)
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
