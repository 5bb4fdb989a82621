"""On-disk cache of vision features, so the ViT runs once per frame per video and model.

A second question, another label set or a summary of the same video then costs only the
Q-Former and the LLM. Entries are keyed by the video's content, the sampled frames and the
model (weights, dtype, preprocessing); each is a directory with ``features.npy`` (a memory
map, [n, P, C], read back chunk by chunk, never whole) and ``meta.json``. Entries are written
under a temporary name and renamed when complete, so a crash never leaves a half entry that
looks whole. The total size is bounded: least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("malmm")

CACHE_LIMIT_ENV = "MALMM_FEATURE_CACHE_GB"
DEFAULT_LIMIT_GB = 20.0
_SAMPLE = 4 << 20  # bytes hashed at the start, middle and end of a video


def video_fingerprint(path: Path) -> str:
    """Content identity of a video without reading all of it: size + three 4 MiB windows."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def feature_key(fingerprint: str, indices: np.ndarray, model_id: str) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    h.update(model_id.encode())
    return h.hexdigest()[:40]


# numpy has no bfloat16: such features are stored as their raw 16 bits and viewed back.
_STORAGE = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "uint16"}


def storage_dtype(torch_dtype: str) -> np.dtype:
    return np.dtype(_STORAGE[torch_dtype])


def to_storage(features) -> np.ndarray:
    """torch tensor -> numpy array in its storage dtype (bf16 as raw uint16)."""
    import torch

    block = features.detach().cpu()
    return (block.view(torch.uint16) if block.dtype == torch.bfloat16 else block).numpy()


def from_storage(array: np.ndarray, torch_dtype: str):
    """Inverse of :func:`to_storage`; copies out of a memory map."""
    import torch

    tensor = torch.from_numpy(np.array(array))
    return tensor.view(torch.bfloat16) if torch_dtype == "torch.bfloat16" else tensor


@dataclass
class CachedFeatures:
    path: Path
    count: int
    shape: tuple[int, ...]
    torch_dtype: str

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, object]]:
        """(first position, torch tensor [k, P, C]) chunk by chunk from the memory map."""
        data = np.load(self.path / "features.npy", mmap_mode="r")
        for start in range(0, self.count, chunk_size):
            yield start, from_storage(data[start : start + chunk_size], self.torch_dtype)


class FeatureWriter:
    """Appends chunks to a new entry; :meth:`commit` makes it visible, :meth:`abort` drops it."""

    def __init__(self, cache: FeatureCache, key: str, count: int, shape: tuple[int, ...], torch_dtype: str):
        self.cache, self.key, self.count = cache, key, count
        self.shape, self.torch_dtype = shape, torch_dtype
        self.tmp = cache.root / f".{key}.{os.getpid()}.partial"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.data = np.lib.format.open_memmap(
            self.tmp / "features.npy", mode="w+", dtype=storage_dtype(torch_dtype), shape=(count, *shape)
        )
        self.written = 0

    def append(self, features) -> None:
        """features: torch tensor [k, P, C] in the entry's dtype."""
        self.data[self.written : self.written + features.shape[0]] = to_storage(features)
        self.written += features.shape[0]

    def commit(self) -> None:
        if self.written != self.count:
            self.abort()
            return
        self.data.flush()
        del self.data
        meta = {"count": self.count, "shape": list(self.shape), "dtype": self.torch_dtype, "created": time.time()}
        (self.tmp / "meta.json").write_text(json.dumps(meta))
        final = self.cache.root / self.key
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self.tmp, final)
        self.cache.evict()

    def abort(self) -> None:
        self.data = None
        shutil.rmtree(self.tmp, ignore_errors=True)


class FeatureCache:
    def __init__(self, root: Path, limit_gb: float | None = None):
        self.root = Path(root)
        env = os.environ.get(CACHE_LIMIT_ENV)
        self.limit = int((limit_gb if limit_gb is not None else float(env or DEFAULT_LIMIT_GB)) * 1e9)

    def get(self, key: str) -> CachedFeatures | None:
        entry = self.root / key
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        os.utime(entry)  # recently used: last to be evicted
        return CachedFeatures(entry, meta["count"], tuple(meta["shape"]), meta["dtype"])

    def writer(self, key: str, count: int, shape: tuple[int, ...], torch_dtype: str) -> FeatureWriter | None:
        """A writer for a new entry, or None if it could never fit (then nothing is cached)."""
        itemsize = storage_dtype(torch_dtype).itemsize
        if count * int(np.prod(shape)) * itemsize > self.limit:
            log.info("features of %d frames exceed the cache limit; not caching", count)
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        return FeatureWriter(self, key, count, shape, torch_dtype)

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits its limit."""
        entries = sorted(self.entries(), key=lambda p: p.stat().st_mtime)
        total = {e: sum(f.stat().st_size for f in e.iterdir()) for e in entries}
        used = sum(total.values())
        for entry in entries:
            if used <= self.limit:
                break
            shutil.rmtree(entry, ignore_errors=True)
            used -= total[entry]
