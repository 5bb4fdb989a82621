"""Thumbnails for the report page: the frame on screen at given times, decoded by the
project's own decoding (sources/), made small JPEG data URIs with Pillow.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from malmm_cli.errors import MalmmError
from malmm_cli.sources.decoding import stream_frames
from malmm_cli.sources.download import cached_download
from malmm_cli.sources.inputs import cache_root, is_url
from malmm_cli.sources.video import Sampling, probe

log = logging.getLogger("malmm")

THUMBNAIL_WIDTH = 320  # px, at most; a frame narrower than this keeps its width
JPEG_QUALITY = 80


def video_file(spec: str) -> Path | None:
    """The local file of an input: the path itself, or a URL's downloaded copy in the cache.
    None when there is none to read (a file moved since, a cache cleared)."""
    if is_url(spec):
        try:
            return cached_download(spec, cache_root() / "downloads")
        except (MalmmError, OSError):
            return None
    path = Path(spec).expanduser()
    return path if path.is_file() else None


def frames_at(path: Path, times: Sequence[float]) -> list[np.ndarray | None]:
    """The frame on screen at each time (uint8 RGB [H, W, 3]), as the sampling plans take
    frames: the last one whose presentation time is at or before it. None where it could not
    be decoded."""
    if not times:
        return []
    info = probe(path)
    frame_times = info.times()
    wanted = np.clip(np.searchsorted(frame_times, np.asarray(times, dtype=np.float64), side="right") - 1,
                     0, len(frame_times) - 1)
    indices = np.unique(wanted)  # in order, each once: what the decoder takes
    sampling = Sampling(indices, frame_times[indices], float(frame_times[0]), info.duration, None, len(indices))
    found: dict[int, np.ndarray] = {}
    with stream_frames(path, sampling, info=info, chunk_size=4, prefetch=1, workers=1) as chunks:
        for chunk in chunks:
            for index, frame in zip(chunk.indices, chunk.frames):
                found[int(index)] = frame
    return [found.get(int(i)) for i in wanted]


def jpeg_data_uri(frame: np.ndarray, width: int = THUMBNAIL_WIDTH) -> str:
    """A frame as a JPEG data URI at most `width` pixels wide, its aspect ratio kept."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frame[..., :3]), "RGB")
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(path: Path, times: Sequence[float]) -> list[str | None]:
    """A JPEG data URI of the frame at each time, or None for each when the video cannot be
    read now (the page is written without pictures, and says why in the log)."""
    try:
        frames = frames_at(path, times)
    except (MalmmError, OSError, RuntimeError, ValueError) as err:
        log.warning("%s: no thumbnails for the report (%s)", path, err)
        return [None] * len(times)
    return [None if frame is None else jpeg_data_uri(frame) for frame in frames]
