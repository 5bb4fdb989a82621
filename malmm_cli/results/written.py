"""What malmm wrote: a record, per output file, of the content malmm last left there, so that
`-o` replaces or appends to a file only while its content is still malmm's own.

Guessing from the content cannot tell a user's notes.txt from a caption, nor a results file
from the same file edited since. So each output file malmm writes has a record: its real
path, what kind of output it is (results in a format, or a checkpoint), and the size and
SHA-256 of the content malmm last left there. A file is malmm's own when its content still
has that digest.

The records live in the malmm cache folder, `<cache>/outputs/<digest of the real path>.json`,
not beside the file: nothing appears in the user's folders. Losing them (a cleared cache,
another MALMM_CACHE_DIR, a file moved elsewhere) makes a file count as not malmm's, the safe
way to be wrong; outputs.py says what may still be done with such a file.

A write never leaves the user locked out of their own output: before the file changes the
record names both the content now and the content the write will leave (`next`), and only
after it the new one alone. A crash at any point leaves a file whose content is one of the
two, or, for a write cut short, the first followed by a part of the second.

`lock(path)` takes an exclusive lock on the record's file, so that two malmm processes never
write one output at once, whichever command they run (a checkpoint is replaced by rename, so
a lock on the checkpoint itself would not outlive the first save). So the record is updated
in place, never renamed over: one write of a small JSON object, read back up to its end
(what a crash could leave after it is ignored).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from malmm_cli.errors import UsageError

from .records import to_json

if os.name == "posix":
    import fcntl

log = logging.getLogger("malmm")

RECORDS = "outputs"  # the folder of records in the cache folder
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Content:
    """The size and SHA-256 of a file's bytes."""

    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> Content:
        return cls(len(data), hashlib.sha256(data).hexdigest())

    def to_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


EMPTY = Content.of(b"")


def file_content(path: Path) -> Content:
    """Content of the file at `path`, read in chunks (a checkpoint can be gigabytes)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Content(size, h.hexdigest())


def _records_dir() -> Path:
    from malmm_cli.sources.inputs import cache_root

    return cache_root() / RECORDS


def _key(path: Path) -> str:
    real = os.path.realpath(os.path.expanduser(path))
    return hashlib.sha256(os.fsencode(real)).hexdigest()[:32]


class Record:
    """The record of what malmm wrote to the output file `path` as output `kind`
    ("results" or "checkpoint"); `fmt` is the results format (json, text, md, srt, vtt)."""

    def __init__(self, path: Path, kind: str, fmt: str | None = None):
        self.path, self.kind, self.fmt = Path(path), kind, fmt
        self.real = os.path.realpath(os.path.expanduser(path))
        self.file = _records_dir() / f"{_key(path)}.json"
        self.kept: Content | None = None  # the content malmm last left (None: no record of ours)
        self.next: Content | None = None  # while a write is under way: the content it leaves
        self.recorded_fmt: str | None = None
        self._load()

    def _load(self) -> None:
        try:
            text = self.file.read_text(encoding="utf-8")
            if not text:
                return  # created by lock() before anything was recorded
            data, _ = json.JSONDecoder().raw_decode(text)
            if data["path"] != self.real or data["kind"] != self.kind:
                return  # another file whose real path hashed alike, or another kind of output
            self.kept = Content(int(data["size"]), str(data["sha256"]))
            nxt = data.get("next")
            self.next = Content(int(nxt["size"]), str(nxt["sha256"])) if nxt else None
            self.recorded_fmt = data.get("format")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("the record of what malmm wrote to %s cannot be read; the file counts as not malmm's.",
                        self.path)
            self.kept = self.next = None

    @property
    def exists(self) -> bool:
        return self.kept is not None

    def holds(self, content: Content) -> bool:
        """Whether `content` is what malmm left in the file (or is leaving there now)."""
        return content in (self.kept, self.next)

    def holds_torn(self, data: bytes) -> bool:
        """Whether `data` is what malmm left, followed by part of the write that was under way
        when malmm stopped (a crash, a power cut: a write cut short)."""
        kept, nxt = self.kept, self.next
        return (kept is not None and nxt is not None and kept.size < len(data) < nxt.size
                and Content.of(data[:kept.size]) == kept)

    def save(self, kept: Content, next: Content | None = None) -> None:
        """Record `kept` as the content malmm left in the file (and `next` as the content a
        write under way leaves there), in place: the record's file is also the lock."""
        self.kept, self.next = kept, next
        record = {"path": self.real, "kind": self.kind, "format": self.fmt, **kept.to_dict()}
        if next is not None:
            record["next"] = next.to_dict()
        data = (to_json(record) + "\n").encode("utf-8")
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def forget(self) -> None:
        """The file is gone (a run that wrote nothing removed it): so is its record."""
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()
        self.kept = self.next = None


def lock(path: Path, busy: str) -> int:
    """Take the exclusive lock for the output `path` (by its real path), or refuse with `busy`
    at once; returns the lock's file descriptor, which the caller closes to release it."""
    folder = _records_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{_key(path)}.json", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UsageError(f"The lock for {path} cannot be taken in {folder} "
                         f"({(e.strerror or type(e).__name__).lower()}).") from None
    if os.name == "posix":
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(busy) from None
    return fd


def replace_file(path: Path, write, kind: str) -> None:
    """Write a whole new file at `path` by `write(tmp)` into a temporary file beside it, then
    rename it over `path` (the real path: a symbolic link stays one), recording its content
    before and after the rename. A failure to record is a warning: the file is whole, only
    a later `--overwrite` of it will be refused."""
    real = Path(os.path.realpath(os.path.expanduser(path)))
    tmp = real.with_name(f".malmm-{os.getpid()}.partial")  # short: the name may be near the 255-byte limit
    try:
        write(tmp)
        try:
            record = Record(path, kind)
            new = file_content(tmp)
            record.save(record.kept or EMPTY, new)
        except (OSError, UsageError) as e:
            log.warning("what malmm wrote to %s could not be recorded (%s); it will not be replaced by a later "
                        "run.", path, e)
            record = new = None
        os.replace(tmp, real)
        if record is not None:
            with contextlib.suppress(OSError):  # the record still names the new content as `next`
                record.save(new)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
