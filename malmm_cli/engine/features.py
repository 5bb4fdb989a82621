"""On-disk cache of vision features, so the ViT runs once per frame per video and model.

A second question, another label set or a summary of the same video then costs only the
Q-Former and the LLM. Entries are keyed by the video's content, the sampled frames and the
model (weights, dtype, preprocessing); each is a directory with ``features.npy`` ([n, P, C],
read back chunk by chunk, never whole) and ``meta.json`` (count, shape, dtype and the
SHA-256 of the data bytes).

The cache is an optimisation, never a risk:

- An entry is verified whole (size, header, shape and dtype against its meta and against
  what the caller expects, checksum) before its first chunk is handed out: features fed to
  a model cannot be taken back, so damage must be found before any are used. A damaged
  entry is discarded and the features are computed again from the video.
- Entries are written with plain file writes (a memory map turns a full disk into SIGBUS)
  under a hidden name carrying the writer's pid, and renamed into place when complete, so
  readers never see half an entry. When two writers race, the first rename wins.
- Any OSError while writing (full, read-only, quota) drops the entry, warns once and turns
  writing off for this cache; the analysis goes on without it.
- Hidden work directories of dead processes (or untouched for a day) are removed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from malmm_cli.errors import UsageError

log = logging.getLogger("malmm")

CACHE_LIMIT_ENV = "MALMM_FEATURE_CACHE_GB"
DEFAULT_LIMIT_GB = 20.0
STALE_SECONDS = 24 * 3600  # a work directory nobody wrote to for this long belongs to nobody
_SAMPLE = 4 << 20  # bytes hashed at the start, middle and end of a video
_BLOCK = 8 << 20  # read size when verifying: large enough that hashing, not syscalls, dominates
FORMAT = 2  # entries without the checksum (format 1) are rebuilt

# The host is part of a work directory's name so that, on a cache shared between machines,
# a pid is only ever looked up on the machine it belongs to.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_WORK_NAME = re.compile(r"^\.(?P<name>[\w-]+)\.(?P<pid>\d+)(?:\.(?P<host>[0-9a-f]{8})[0-9a-f]{8})?\.(?:partial|trash)$")


def cache_limit_from_env() -> float:
    """$MALMM_FEATURE_CACHE_GB as a number of gigabytes (default 20); a UsageError otherwise."""
    text = os.environ.get(CACHE_LIMIT_ENV)
    if text is None or not text.strip():
        return DEFAULT_LIMIT_GB
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{CACHE_LIMIT_ENV} must be a number of gigabytes, 0 or more (e.g. 20), not '{text}'.")
    return value


def video_fingerprint(path: Path) -> str:
    """Content identity of a video without reading all of it: size + three 4 MiB windows."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def feature_key(fingerprint: str, indices: np.ndarray, model_id: str, view: str = "") -> str:
    """An entry's name: the video's content, the frames sampled, the model's vision path, and
    `view` (a training view: its crop and flip, engine/augment.py; or features taken before
    ln_vision); the plain view ("") keeps the keys entries always had."""
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    h.update(model_id.encode())
    if view:
        h.update(b"|view|" + view.encode())
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
    """Inverse of :func:`to_storage`; shares `array`'s memory unless it is read-only."""
    import torch

    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    return tensor.view(torch.bfloat16) if torch_dtype == "torch.bfloat16" else tensor


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _bytes(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (memoryview.cast refuses empty arrays)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def _read_exact(f: BinaryIO, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(errno.EIO, "the cached features ended early")
        done += n


def _work_dir(root: Path, name: str, kind: str) -> Path:
    """A hidden sibling of the entries, named so that :meth:`FeatureCache.clean` knows its owner."""
    return root / f".{name}.{os.getpid()}.{_HOST}{os.urandom(4).hex()}.{kind}"


class Damaged(Exception):
    """A cache entry that must not be used; str() says why."""


class CachedFeatures:
    """A verified entry, held open: an eviction that removes it meanwhile cannot cut it short."""

    def __init__(self, file: BinaryIO, offset: int, count: int, shape: tuple[int, ...], torch_dtype: str):
        self.file, self.offset = file, offset
        self.count, self.shape, self.torch_dtype = count, shape, torch_dtype

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, object]]:
        """(first position, torch tensor [k, P, C]) chunk by chunk; closes the file at the end."""
        with self.file:
            self.file.seek(self.offset)
            for start in range(0, self.count, chunk_size):
                block = np.empty((min(chunk_size, self.count - start), *self.shape), storage_dtype(self.torch_dtype))
                _read_exact(self.file, _bytes(block))
                yield start, from_storage(block, self.torch_dtype)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CachedFeatures:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_verified(entry: Path, count: int, shape: tuple[int, ...], torch_dtype: str) -> CachedFeatures:
    """Raises FileNotFoundError when a file is missing, Damaged when the entry must not be used."""
    f, verified = None, False
    try:
        # Data first: once it is open, an eviction that renames the entry away cannot pull
        # it from under us.
        f = open(entry / "features.npy", "rb")
        meta = _check_meta(json.loads((entry / "meta.json").read_text()), count, shape, torch_dtype)
        _check_data(f, count, shape, storage_dtype(torch_dtype), meta["sha256"])
        verified = True
        return CachedFeatures(f, f.tell(), count, shape, torch_dtype)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:  # ValueError: meta.json is not JSON
        raise Damaged(f"it cannot be read ({err})") from None
    finally:
        if f is not None and not verified:
            f.close()


def _check_meta(meta: object, count: int, shape: tuple[int, ...], torch_dtype: str) -> dict:
    if not isinstance(meta, dict):
        raise Damaged("meta.json is not an object")
    found = (meta.get("count"), meta.get("shape"), meta.get("dtype"))
    if found != (count, list(shape), torch_dtype):
        raise Damaged(f"it holds {found}, expected {(count, list(shape), torch_dtype)}")
    if meta.get("format") != FORMAT or not isinstance(meta.get("sha256"), str):
        raise Damaged("it has no checksum (written by an older malmm)")
    return meta


def _check_data(f: BinaryIO, count: int, shape: tuple[int, ...], dtype: np.dtype, sha256: str) -> None:
    """Header, size and checksum of features.npy; leaves `f` at the first data byte."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        file_shape, fortran, file_dtype = read(f)
    except ValueError as err:
        raise Damaged(f"features.npy has no valid header ({err})") from None
    if file_shape != (count, *shape) or file_dtype != dtype or fortran:
        raise Damaged(f"features.npy holds {file_dtype} {file_shape}, expected {dtype} {(count, *shape)}")
    offset = f.tell()
    nbytes = count * math.prod(shape) * dtype.itemsize
    size = os.fstat(f.fileno()).st_size
    if size != offset + nbytes:
        raise Damaged(f"features.npy has {size} bytes, expected {offset + nbytes}")
    h, buf = hashlib.sha256(), bytearray(min(_BLOCK, max(nbytes, 1)))
    view = memoryview(buf)
    for start in range(0, nbytes, len(buf)):
        part = view[: min(len(buf), nbytes - start)]
        _read_exact(f, part)
        h.update(part)
    if h.hexdigest() != sha256:
        raise Damaged("the checksum of features.npy does not match")
    f.seek(offset)


class FeatureWriter:
    """Appends chunks to a new entry; :meth:`commit` makes it visible, :meth:`abort` drops it.

    Never raises OSError: a failed write drops the entry and turns the cache's writing off.
    """

    def __init__(self, cache: FeatureCache, key: str, count: int, shape: tuple[int, ...], torch_dtype: str):
        self.cache, self.key, self.count = cache, key, count
        self.shape, self.torch_dtype, self.dtype = tuple(shape), torch_dtype, storage_dtype(torch_dtype)
        self.tmp = _work_dir(cache.root, key, "partial")
        self.tmp.mkdir()
        self.file: BinaryIO | None = None
        try:
            self.file = open(self.tmp / "features.npy", "wb")
            self.file.write(_npy_header(self.dtype, (count, *self.shape)))
        except BaseException:
            self.abort()
            raise
        self.hash = hashlib.sha256()  # of the data bytes, as they go out: no second read to checksum
        self.written = 0

    def append(self, features) -> None:
        """features: torch tensor [k, P, C] in the entry's dtype."""
        if self.file is None:
            return
        block = np.ascontiguousarray(to_storage(features))
        if block.shape[1:] != self.shape or block.dtype != self.dtype or self.written + len(block) > self.count:
            log.warning("features %s %s do not fit the cache entry (%s %s); not caching them",
                        block.dtype, block.shape, self.dtype, (self.count, *self.shape))
            self.abort()
            return
        data = _bytes(block)
        try:
            self.file.write(data)
        except OSError as err:
            self._fail(err)
            return
        self.hash.update(data)
        self.written += len(block)

    def commit(self) -> bool:
        """Publish the entry if it is complete; True if a valid entry is now in the cache."""
        if self.file is None or self.written != self.count:
            self.abort()
            return False
        meta = {"format": FORMAT, "count": self.count, "shape": list(self.shape), "dtype": self.torch_dtype,
                "sha256": self.hash.hexdigest(), "created": time.time()}
        try:
            self.file.close()  # flushes: a full disk may only show here
            self.file = None
            with open(self.tmp / "meta.json", "w", encoding="utf-8") as f:
                f.write(json.dumps(meta))
            published = self._publish()
            self.cache.evict()
        except OSError as err:
            self._fail(err)
            return False
        return published

    def _publish(self) -> bool:
        final = self.cache.root / self.key
        for _ in range(2):
            try:
                os.rename(self.tmp, final)  # atomic: readers see no entry or a whole one
                return True
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            # Another writer committed first. Theirs stands if it is sound; if it is not, get()
            # has just discarded it and ours goes in on the second try.
            if self.cache.check(self.key, self.count, self.shape, self.torch_dtype):
                self.abort()
                return True
        self.abort()
        return False

    def abort(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # the unflushed bytes were going to be deleted anyway
            self.file = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _fail(self, err: OSError) -> None:
        self.abort()
        self.cache.unwritable(err)


class FeatureCache:
    def __init__(self, root: Path, limit_gb: float | None = None):
        self.root = Path(root)
        self.limit = int((cache_limit_from_env() if limit_gb is None else limit_gb) * 1e9)
        self.writable = True  # off after the first failed write: one warning, not one per video

    def get(self, key: str, count: int, shape: tuple[int, ...], torch_dtype: str) -> CachedFeatures | None:
        """The verified entry `key` if it holds `count` frames of `shape` and `torch_dtype`.

        Close it (or exhaust :meth:`CachedFeatures.chunks`) when done. A damaged entry is
        discarded, so the caller computes the features again and may write a new one.
        """
        entry = self.root / key
        why = ""
        for _ in range(2):
            try:
                hit = _open_verified(entry, count, tuple(shape), torch_dtype)
            except FileNotFoundError:
                if not entry.is_dir():
                    return None
                # A file is missing from an entry that exists: damage, unless the entry was
                # swapped for a new one in between (eviction, then a commit). Look once more.
                why = "features.npy or meta.json is missing"
                continue
            except Damaged as err:
                why = str(err)
                break
            try:
                os.utime(entry)  # recently used: last to be evicted
            except OSError:
                pass  # a read-only cache still serves hits; only eviction order suffers
            return hit
        log.warning("discarding the feature cache entry %s: %s; computing the features again", entry, why)
        self._discard(entry)
        return None

    def check(self, key: str, count: int, shape: tuple[int, ...], torch_dtype: str) -> bool:
        hit = self.get(key, count, shape, torch_dtype)
        if hit is not None:
            hit.close()
        return hit is not None

    def writer(self, key: str, count: int, shape: tuple[int, ...], torch_dtype: str) -> FeatureWriter | None:
        """A writer for a new entry, or None when nothing is to be cached (too big, or unwritable)."""
        if not self.writable:
            return None
        if count * math.prod(shape) * storage_dtype(torch_dtype).itemsize > self.limit:
            log.info("features of %d frames exceed the cache limit; not caching", count)
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean()
            return FeatureWriter(self, key, count, shape, torch_dtype)
        except OSError as err:
            self.unwritable(err)
            return None

    def scratch_dir(self) -> Path | None:
        """Where a big temporary file may go: the cache root if it can be written, else None."""
        if not self.writable:
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return self.root

    def unwritable(self, err: OSError) -> None:
        if self.writable:
            state = "is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot be written"
            log.warning("the feature cache at %s %s (%s); continuing without it", self.root, state,
                        err.strerror or err)
        self.writable = False

    def entries(self) -> list[Path]:
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return [p for p in children if not p.name.startswith(".") and p.is_dir()]

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits its limit.

        Other processes add and remove entries meanwhile: one that vanishes is skipped.
        """
        sized = []
        for entry in self.entries():
            try:
                sized.append((entry.stat().st_mtime, entry, sum(f.stat().st_size for f in entry.iterdir())))
            except FileNotFoundError:
                continue
        used = sum(size for _, _, size in sized)
        for _, entry, size in sorted(sized, key=lambda s: s[0]):
            if used <= self.limit:
                break
            self._discard(entry)
            used -= size

    def clean(self) -> None:
        """Remove work directories of writers that are gone: dead pid, or untouched for a day."""
        now = time.time()
        for path in self.root.iterdir():
            match = _WORK_NAME.match(path.name)
            if match and _abandoned(path, int(match["pid"]), match["host"], now):
                shutil.rmtree(path, ignore_errors=True)

    def _discard(self, entry: Path) -> None:
        """Rename out of sight first, so no reader meets an entry half deleted."""
        trash = _work_dir(self.root, entry.name, "trash")
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return
        except OSError:
            trash = entry  # e.g. read-only: removing in place fails the same way, quietly
        shutil.rmtree(trash, ignore_errors=True)


def _abandoned(path: Path, pid: int, host: str | None, now: float) -> bool:
    local = host is None or host == _HOST
    if local and pid == os.getpid():
        return False
    if local and not _alive(pid):
        return True
    # A pid may be reused, or belong to another machine: the last write says whether it is alive.
    try:
        last = max([path.stat().st_mtime] + [f.stat().st_mtime for f in path.iterdir()])
    except OSError:
        return False  # being removed by someone else, or not ours to judge
    return now - last > STALE_SECONDS


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it there; the age rule decides
    if pid <= 0:
        return False  # kill(0 or -n) would signal a process group, not look up a pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False
    return True


class FrameStore:
    """Features of every frame of one pass, kept on disk for a second pass (summarize
    --scenes): memory stays constant however long the video. Plain writes, positional reads,
    an anonymous temporary file (deleted by the OS even if this process is killed).
    `directory` None means the system temp dir; if it cannot be used, the temp dir is."""

    def __init__(self, directory: Path | None = None):
        try:
            self.file = tempfile.TemporaryFile(dir=directory)
        except OSError:
            if directory is None:
                raise
            self.file = tempfile.TemporaryFile()
        self.count = 0
        self.shape: tuple[int, ...] = ()
        self.torch_dtype = ""

    def append(self, features) -> None:
        """features: torch tensor [k, P, C], all appends of one shape and dtype."""
        block = np.ascontiguousarray(to_storage(features))
        if not self.count:
            self.shape, self.torch_dtype = tuple(block.shape[1:]), str(features.dtype)
        self.file.write(_bytes(block))
        self.count += len(block)

    def read(self, start: int, stop: int):
        """Frames [start, stop) as a torch tensor [stop - start, P, C]."""
        if not 0 <= start <= stop <= self.count:
            raise IndexError(f"frames {start}:{stop} of {self.count}")
        dtype = storage_dtype(self.torch_dtype)
        block = np.empty((stop - start, *self.shape), dtype)
        self.file.seek(start * math.prod(self.shape) * dtype.itemsize)
        _read_exact(self.file, _bytes(block))
        self.file.seek(0, os.SEEK_END)
        return from_storage(block, self.torch_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the features written so far."""
        return self.count * math.prod(self.shape) * storage_dtype(self.torch_dtype).itemsize if self.count else 0

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
