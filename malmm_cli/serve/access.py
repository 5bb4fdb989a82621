"""Who may ask, and which files a request may name.

- The API key is compared in constant time (hmac.compare_digest): how long a refusal takes
  says nothing of how much of a guess was right.
- A local file is read only from under an --allow-dir folder (none by default), checked on
  the path with every symbolic link resolved, so a link inside an allowed folder that points
  out of it is refused. The refusal names the path as the client gave it, never where a link
  leads, and comes before any question of whether the file exists.
- Without a key the server is for this machine only: it binds a loopback address, and takes
  only Host headers that name one (a web page whose name was re-pointed at 127.0.0.1, "DNS
  rebinding", sends its own name), and only JSON bodies (a page can post a form or text to
  any address without asking, but JSON only after a CORS check this server never passes).
- http(s) URLs go to the downloader (sources/download.py), whose every hop is checked to be
  http or https.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from malmm_cli.errors import UsageError
from malmm_cli.sources.inputs import is_url

from .protocol import ApiError

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: addresses only this machine reaches."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_allowed_dirs(dirs: list[Path]) -> tuple[Path, ...]:
    """Each --allow-dir as the real folder it names (links resolved): an existing folder, or a
    UsageError."""
    resolved = []
    for given in dirs:
        real = Path(os.path.realpath(Path(given).expanduser()))
        if not real.is_dir():
            raise UsageError(f"--allow-dir {given} is not an existing folder.")
        resolved.append(real)
    return tuple(dict.fromkeys(resolved))


def key_matches(header: str | None, key: str) -> bool:
    """`Authorization: Bearer KEY` against the server's key, in constant time."""
    scheme, _, token = (header or "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape"))


def host_allowed(host_header: str | None) -> bool:
    """A Host header that names a loopback address (any port), for a server without a key."""
    if not host_header:
        return False
    if host_header.startswith("["):  # [::1]:8000
        host = host_header[1 : host_header.find("]")] if "]" in host_header else ""
    else:  # 127.0.0.1:8000, localhost, or ::1 without brackets (no port then)
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    return is_loopback(host)


@dataclass(frozen=True)
class Located:
    """A video a request names: `input`, how records name it (the path or URL as given), and
    `spec`, where to open it (the real path under an allowed folder, or the URL)."""

    input: str
    spec: str


def locate(reference: str, allowed: tuple[Path, ...]) -> Located:
    """A request's video reference (a file:// URL, an absolute path, an http(s) URL) as what to
    open, or an ApiError: 400 for what is not a video reference, 403 for a path outside the
    allowed folders."""
    reference = reference.strip()
    parsed = urlparse(reference)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not is_url(reference):
            raise ApiError(400, f"The video URL {reference!r} has no host name.", code="invalid_video_url")
        return Located(reference, reference)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"The file URL {reference!r} names another machine ({parsed.netloc}); "
                           "use file:///path or an http(s) URL.", code="invalid_video_url")
        path = unquote(parsed.path)
    elif scheme and len(scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise ApiError(400, f"Videos are given as file:// or http(s) URLs, not {scheme}: URLs.",
                       code="invalid_video_url")
    else:
        path = reference
    if not os.path.isabs(path):
        raise ApiError(400, f"The video path {path!r} is not absolute; give the whole path (file:///...).",
                       code="invalid_video_url")
    return Located(path, _allowed_real_path(path, allowed))


def _allowed_real_path(path: str, allowed: tuple[Path, ...]) -> str:
    if "\x00" in path:
        raise ApiError(400, "The video path holds a NUL character.", code="invalid_video_url")
    if not allowed:
        raise ApiError(403, "This server reads no local files; its owner can allow folders with --allow-dir.",
                       type="permission_error", code="path_not_allowed")
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(folder) for folder in allowed):
        raise ApiError(403, f"{path} is outside the folders this server may read (--allow-dir).",
                       type="permission_error", code="path_not_allowed")
    return str(real)
