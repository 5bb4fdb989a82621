"""Training-time frame choice and augmentation, as the official MA-LMM training data does it.

- Frames: the clip's frames are cut into T equal segments, and one frame is drawn at random
  inside each (``np.linspace(0, n, T + 1, dtype=int)``, then ``randint(start, end)``; a
  segment with no frame takes its start), drawn again every epoch (the official *train*
  datasets, e.g. ``msvd_vqa_datasets.py`` lines 47-56; the eval datasets take
  ``rint(linspace(0, n - 1, T))`` instead, as every command here does).
- Pixels (``blip2_video_train`` in ``blip_processors.py``): one RandomResizedCrop per clip,
  area 0.5 to 1 of the frame, aspect ratio 3/4 to 4/3, resized to the model's input with
  bicubic, then a horizontal flip of the whole clip with probability 0.5.

Both are pure functions of a numpy Generator, so a view is reproducible from its seed, and
:class:`Augment` names itself (:meth:`Augment.key`) for the feature cache: an augmented view's
features are cached apart from the plain ones and from every other view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CROP_SCALE = (0.5, 1.0)  # blip2_video_train: min_scale 0.5, max_scale 1.0
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCropVideo's default ratio
FLIP_P = 0.5  # RandomHorizontalFlipVideo


@dataclass(frozen=True)
class Augment:
    """One crop box (rows top:top+height, columns left:left+width of a frame of `size`) and
    whether to flip, for every frame of a clip."""

    size: tuple[int, int]  # (H, W) of the frames the box was drawn for
    top: int
    left: int
    height: int
    width: int
    flip: bool

    def key(self) -> str:
        """What the feature cache keys this view by."""
        return f"aug1|{self.size[0]}x{self.size[1]}|{self.top},{self.left},{self.height},{self.width}|{int(self.flip)}"

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [n, H, W, 3] -> the crop (flipped), [n, height, width, 3]; the caller
        resizes it to the model's input as every frame is (engine preprocess). A frame decoded
        at another size than the box was drawn for (decord's narrow-width workaround) takes the
        box scaled to it."""
        H, W = frames.shape[1:3]
        if (H, W) == self.size:
            top, left, height, width = self.top, self.left, self.height, self.width
        else:
            sy, sx = H / self.size[0], W / self.size[1]
            top, left = min(H - 1, round(self.top * sy)), min(W - 1, round(self.left * sx))
            height, width = max(1, min(H - top, round(self.height * sy))), max(1, min(W - left, round(self.width * sx)))
        crop = frames[:, top : top + height, left : left + width]
        return np.ascontiguousarray(crop[:, :, ::-1] if self.flip else crop)


def random_resized_crop(rng: np.random.Generator, height: int, width: int, scale=CROP_SCALE,
                        ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, the official crop: ten
    tries at an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`,
    else the largest centred box within the ratio bounds."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_augment(rng: np.random.Generator, height: int, width: int) -> Augment:
    """One clip's crop and flip, drawn as blip2_video_train draws them."""
    top, left, h, w = random_resized_crop(rng, height, width)
    return Augment((height, width), top, left, h, w, bool(rng.random() < FLIP_P))


def segment_frames(rng: np.random.Generator, n_frames: int, count: int) -> np.ndarray:
    """`count` frame indices of a clip of `n_frames`: a random one inside each of `count`
    equal segments, as the official training datasets draw them (sorted; a frame drawn twice,
    when the clip has fewer frames than segments, is kept once)."""
    bounds = np.linspace(0, n_frames, count + 1, dtype=int)
    picked = [start if start == end else int(rng.integers(start, end)) for start, end in zip(bounds[:-1], bounds[1:])]
    return np.unique(np.clip(np.asarray(picked, dtype=np.int64), 0, max(n_frames - 1, 0)))


def even_frames(n_frames: int, count: int) -> np.ndarray:
    """The eval datasets' frames: rint(linspace(0, n - 1, T)), each kept once (LVU's training
    data takes these too, over its window)."""
    return np.unique(np.rint(np.linspace(0, max(n_frames - 1, 0), count)).astype(np.int64))
