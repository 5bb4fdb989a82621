"""What counts as a video file name and as a URL malmm fetches: shared by the input
expansion (inputs.py) and the downloader (download.py), which import it and not each other."""

from __future__ import annotations

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".3g2", ".3gp", ".asf", ".avi", ".divx", ".f4v", ".flv", ".m2ts", ".m2v", ".m4v",
        ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".mts", ".mxf", ".ogv", ".ts", ".vob",
        ".webm", ".wmv",
    }
)

URL_SCHEMES = ("http", "https")
