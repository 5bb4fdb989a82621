"""A synthetic data set where the answer is only at the start of each clip.

Every clip shows a colour for its first frames, then the same busy pattern (moving blocks of
seeded noise) until its end, identical in every clip of every class. The label is the
colour's name: a model can only get it right if it remembers the start of the clip, which
makes it MA-LMM's memory ablation in miniature. Clips are encoded losslessly with every
frame a key frame, so the decoded pattern frames are bit-identical across clips: without
memory the model sees the same last frame for every class and cannot beat chance.
"""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.media import ffmpeg_exe

# Label -> RGB. The labels are words the tiny-random tokenizer knows whole (one token each).
COLOURS = {"cat": (200, 40, 40), "dog": (40, 190, 60), "car": (50, 60, 210), "ball": (210, 200, 40)}
SIZE = (64, 48)  # width, height
FPS = 4


def busy_frame(index: int, size: tuple[int, int] = SIZE, seed: int = 0) -> np.ndarray:
    """Frame `index` of the pattern shared by all clips: 8x8 blocks of noise drifting right."""
    width, height = size
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 2, 3), dtype=np.uint8)
    frame = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    return np.ascontiguousarray(np.roll(frame, 3 * index, axis=1)[:height, :width])


def clip_frames(colour: tuple[int, int, int], *, n_frames: int, colour_frames: int,
                size: tuple[int, int] = SIZE) -> np.ndarray:
    """[n_frames, H, W, 3] uint8: `colour_frames` frames of the colour, then the pattern."""
    width, height = size
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i in range(n_frames):
        frames[i] = colour if i < colour_frames else busy_frame(i, size)
    return frames


def write_clip(path: str | Path, frames: np.ndarray, fps: int = FPS) -> Path:
    """Encode frames [n, H, W, 3] as lossless H.264, every frame a key frame."""
    n, height, width, _ = frames.shape
    args = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", "-g", "1",
            "-pix_fmt", "yuv444p", str(path)]
    subprocess.run(args, input=frames.tobytes(), check=True, capture_output=True)
    return Path(path)


@dataclass(frozen=True)
class SyntheticData:
    train: Path  # CSV video,label
    test: Path
    labels: tuple[str, ...]


def make_dataset(root: str | Path, *, labels: Sequence[str] = ("cat", "dog"), train_per_label: int = 6,
                 test_per_label: int = 4, n_frames: int = 8, colour_frames: int = 2, seed: int = 0) -> SyntheticData:
    """Clips under root/clips and two CSV files (video,label; paths relative to the CSV).

    Each clip's colour is its label's colour shifted by a random shade, so no two clips are
    the same and the test clips are unseen."""
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {}
    for split, per_label in (("train", train_per_label), ("test", test_per_label)):
        rows = []
        for label in labels:
            for k in range(per_label):
                shade = np.clip(np.array(COLOURS[label]) + rng.integers(-25, 26, 3), 0, 255)
                name = f"clips/{split}_{label}_{k}.mp4"
                write_clip(root / name, clip_frames(tuple(int(c) for c in shade), n_frames=n_frames,
                                                    colour_frames=colour_frames))
                rows.append((name, label))
        rng.shuffle(rows)
        files[split] = root / f"{split}.csv"
        with open(files[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "label"])
            writer.writerows(rows)
    return SyntheticData(files["train"], files["test"], tuple(labels))
