"""One results file, or stdout: records appended as inputs finish, and what counts as malmm's.

The rules are outputs.py's (its module doc says them all); this module holds the sinks for
one stream of records: stdout, and a file appended to in place, whose content must still be
what malmm wrote there (written.py) before anything is added or replaced, and whose last
line, if a crash cut it short, --resume cuts off into `<name>.torn`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import sys
from pathlib import Path

from malmm_cli.errors import MalmmError, UsageError

from .written import Content, Record, lock

if os.name == "posix":
    import fcntl

log = logging.getLogger("malmm")

TORN_SUFFIX = ".torn"  # where --resume keeps a last line cut short: results.jsonl -> results.jsonl.torn
RECORD_START = b'{"input"'  # every record (and error record) we write begins with its input
_SNIFF_BYTES = 64 * 1024
_JOB = re.compile(r"[0-9a-f]{16}")


class OutputWriteError(MalmmError):
    """Results could not be written (disk full, device gone): the batch stops."""


def is_input(path: Path, ids: set[tuple[int, int]]) -> bool:
    """Whether `path` is one of the files whose (device, inode) is in `ids` (outputs.input_ids)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in ids


def _json_line(line: bytes):
    """The JSON value of one line, or None if it is not JSON. Decoded with surrogateescape, so
    a record that holds a file name's raw bytes (not valid UTF-8) still reads, as the name."""
    try:
        return json.loads(line.decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, RecursionError):
        return None


def legacy_results(data: bytes) -> bool:
    """Whether `data`, a file without a record of what malmm wrote (older versions kept none),
    is verifiably malmm's JSON Lines: every line a record of ours, an object whose first key
    is "input" and that holds its 16-hex-digit job key. A line that starts like a record but
    is not JSON is one that older versions cut short; so may the last line be."""
    *lines, last = data.split(b"\n")
    records = 0
    for line in lines:
        if not line.strip():
            continue
        record = _json_line(line)
        if record is None and line.startswith(RECORD_START):
            continue
        if not (isinstance(record, dict) and next(iter(record), None) == "input"
                and isinstance(record.get("job"), str) and _JOB.fullmatch(record["job"])):
            return False
        records += 1
    return records > 0 and (last.startswith(RECORD_START) or RECORD_START.startswith(last))


def recorded_inputs(data: bytes, job: str | None = None) -> set[str]:
    """Inputs with a successful record in JSON Lines `data` (with job key `job`, if given)."""
    return {record["input"] for record in successes(data) if job is None or record.get("job") == job}


def successes(data: bytes):
    """The successful records in JSON Lines `data`. Lines are decoded one by one, so a line cut
    inside a character by an interrupted run is merely not JSON, hence not a record."""
    for line in data.split(b"\n"):
        record = _json_line(line)
        if isinstance(record, dict) and isinstance(record.get("input"), str) and "error" not in record:
            yield record


def os_reason(err: OSError) -> str:
    return (err.strerror or type(err).__name__).lower()


def lock_exclusive(fd: int, busy: str) -> None:
    """Take the exclusive lock on `fd` or close it and refuse with `busy`."""
    if os.name != "posix":
        return  # no flock: concurrent runs on one output are not detected there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(busy) from None


class Stdout:
    """Records to standard output, flushed one by one."""

    other_work = frozenset()

    def claim(self, mode: str, job: str | None) -> set[str]:
        if sys.stdout is None:  # started with stdout closed (`>&-`): results would go nowhere
            raise UsageError("Standard output is closed, so results have nowhere to go; give -o FILE.")
        return set()

    def open(self) -> None:
        pass

    def put(self, spec: str, text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()
            raise  # the reader left (`| head`): Typer, then app.main, stop quietly (exit 1)
        except OSError as e:
            # What is still buffered cannot be written either: let it go, so that the flush at
            # exit does not fail a second time, with a traceback.
            silence_stdout()
            raise OutputWriteError(f"Cannot write the results to standard output ({os_reason(e)}).") from None

    def close(self) -> None:
        pass


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null (the reader of stdout is gone, or stdout cannot be
    written): what is left in Python's buffer then goes nowhere, quietly."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class ResultsFile:
    """One file, records appended as inputs finish."""

    def __init__(self, path: Path, fmt: str, ids: set[tuple[int, int]], resumable: bool = True):
        self.path, self.fmt, self.ids = path, fmt, ids
        self.resumable = resumable  # False: the command has no --resume (watch), so a refusal must not offer it
        self.fd: int | None = None
        self.lock_fd: int | None = None
        self.regular = True  # False for devices and pipes (/dev/null, /dev/stdout): no checks, no lock
        self.created = False
        self.mode = "new"
        self.other_work: set[str] = set()  # inputs whose only results are from other work (--resume)
        self.kept = b""  # with --resume: the file as claimed (less a torn last line), whose records are kept
        self.record: Record | None = None  # what malmm wrote here (written.py)
        self.digest = hashlib.sha256()  # of the file's content as this run leaves it, record by record
        self.size = 0

    def claim(self, mode: str, job: str | None) -> set[str]:
        """Lock the file and check it may be written in `mode`; the inputs it records as done
        by job `job`."""
        p, self.mode = self.path, mode
        if p.is_dir():
            raise UsageError(f"--output {p} is a directory; give a file name.")
        if is_input(p, self.ids):
            raise UsageError(f"--output {p} is one of the inputs; choose another name.")
        if mode == "resume" and self.fmt != "json":
            raise UsageError("--resume reads JSON records: use --json or an .jsonl/.json output file.")
        self._open()
        if not self.regular:
            return set()
        self.record = Record(p, "results", self.fmt)
        data = self._check_ours(mode)
        if mode != "resume":
            return set()
        cut = data.rfind(b"\n") + 1
        self.kept, torn = data[:cut], data[cut:]
        self.digest, self.size = hashlib.sha256(self.kept), len(self.kept)
        if torn:  # now, not when writing starts: a resume with nothing left to do repairs it too
            self._cut_torn(torn)
        done = recorded_inputs(self.kept, job)
        self.other_work = recorded_inputs(self.kept) - done
        return done

    def _check_ours(self, mode: str) -> bytes:
        """The file's content, if malmm may write to it in `mode`; else a refusal."""
        p, record = self.path, self.record
        size = os.fstat(self.fd).st_size
        if size == 0:
            return b""
        head = os.pread(self.fd, _SNIFF_BYTES, 0)
        # A video or any binary file is not read whole; nor a file without a record unless it
        # may be older JSON Lines of ours.
        plausible = b"\0" not in head and (record.exists or (self.fmt == "json" and head.startswith(RECORD_START)))
        data = self._read_all() if plausible else head
        content = Content.of(data) if plausible else None
        ours = content is not None and (record.holds(content) or record.holds_torn(data) or self._torn_json(data))
        if not ours and not (plausible and not record.exists and legacy_results(data)):
            if record.exists:
                raise UsageError(f"--output {p} was written by malmm but has been changed since; "
                                 "choose another name, or move it away.")
            raise UsageError(f"--output {p} exists and is not a results file written by malmm; "
                             "choose another name, or move it away.")
        if mode == "new" and not self.resumable:
            raise UsageError(f"--output {p} already holds results; add --overwrite to replace them, or choose "
                             "another name.")
        if mode == "new":
            how = "--resume to skip the inputs recorded there" if self.fmt == "json" else \
                "--resume (JSON output only) to add to it"
            raise UsageError(f"--output {p} already holds results; add {how} or --overwrite to replace them.")
        if mode == "resume" and record.recorded_fmt not in (None, "json"):
            raise UsageError(f"--output {p} holds {record.recorded_fmt} results, and --resume adds JSON records "
                             "only to JSON results; use --overwrite to replace them, or choose another name.")
        return data

    def _torn_json(self, data: bytes) -> bool:
        """JSON Lines malmm recorded, then a last line with no end: a write cut short (by a crash
        before the record of a write was first kept, as older versions never kept one)."""
        kept = self.record.kept
        return (self.fmt == "json" and kept is not None and kept.size < len(data)
                and b"\n" not in data[kept.size:] and Content.of(data[:kept.size]) == kept)

    def _open(self) -> None:
        p = self.path
        busy = f"--output {p} is being written by another malmm process; wait for it to finish or choose another name."
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            self.regular = not p.exists() or stat.S_ISREG(p.stat().st_mode)
            self.created = not p.exists()
            # No O_TRUNC: nothing is cut before the lock is ours and the checks have passed.
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT if self.regular else os.O_WRONLY | os.O_APPEND
            fd = os.open(p, flags, 0o666)
        except OSError as e:
            raise UsageError(f"--output {p} cannot be opened for writing ({os_reason(e)}).") from None
        if self.regular:
            lock_exclusive(fd, busy)  # the file itself, as older versions lock it
            try:
                self.lock_fd = lock(p, busy)  # and its record's lock, as `malmm train -o` takes it
            except UsageError:
                os.close(fd)
                raise
        self.fd = fd

    def _read_all(self) -> bytes:
        with os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)
            return f.read()

    def open(self) -> None:
        """Start writing: empty the file for --overwrite."""
        if not self.regular:
            return
        if self.mode == "overwrite":
            os.ftruncate(self.fd, 0)
            self.digest, self.size = hashlib.sha256(), 0
        self.record.save(self._content())

    def _cut_torn(self, torn: bytes) -> None:
        """Keep the torn last line in a file of its own beside the output, then cut it off: the
        output holds whole records only, and nothing is lost."""
        aside = _keep_aside(self.path, torn)
        try:
            self.record.save(self._content())  # recorded before the cut: a crash in between is still ours
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            raise OutputWriteError(f"Cannot cut the torn last line off {self.path} ({os_reason(e)}); it is "
                                   f"also kept in {aside}.") from None
        log.warning("%s ended in a line cut short (%d bytes, by a run that stopped while writing it); the line "
                    "is moved to %s, so the file holds whole records only.", self.path, len(torn), aside)

    def _content(self) -> Content:
        return Content(self.size, self.digest.hexdigest())

    def put(self, spec: str, text: str) -> None:
        # backslashreplace: a lone surrogate that reached the text would otherwise stop the batch
        # (records escape them already, results.to_json; text formats show them escaped).
        data = text.encode("utf-8", "backslashreplace")
        if not self.regular:
            _write_all(self.fd, data)
            return
        before, digest = self._content(), self.digest.copy()
        digest.update(data)
        after = Content(self.size + len(data), digest.hexdigest())
        self.record.save(before, after)
        try:
            _write_all(self.fd, data)
        except OSError:
            with contextlib.suppress(OSError):  # best effort: leave no half record behind
                os.ftruncate(self.fd, before.size)
            raise
        self.digest, self.size = digest, after.size
        self.record.save(after)

    def close(self) -> None:
        if self.fd is None:
            return
        # A file this run created and never wrote to (the model failed to load) is not left behind.
        if self.created and os.fstat(self.fd).st_size == 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
                if self.record is not None:
                    self.record.forget()
        os.close(self.fd)  # releases the locks
        self.fd = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # one write per record; more only if the OS takes part of it
        view = view[os.write(fd, view):]


def _keep_aside(path: Path, data: bytes) -> Path:
    """Write `data` to a new file `<path>.torn` (or `.torn-2`, ...) and return its path."""
    for n in range(1, 1000):
        aside = path.with_name(path.name + TORN_SUFFIX + (f"-{n}" if n > 1 else ""))
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputWriteError(f"Cannot keep the last line of {path}, cut short, in {aside} "
                                   f"({os_reason(e)}); nothing was changed.") from None
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        return aside
    raise OutputWriteError(f"Cannot keep the last line of {path}, cut short: {path}{TORN_SUFFIX}-1 to -999 exist.")
