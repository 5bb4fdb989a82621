"""Where results go (stdout, one file, or one file per video in a directory), written so
that nothing already on disk is lost.

The rules, checked before any model loads (a refusal is one sentence and exit code 2):

- `-o` never names one of the inputs (compared by file identity, so links count too).
- An existing file is written to only if it is a results file of ours:
  json: every non-blank line starts like our records, `{"input"` (a line cut short by an
  interrupted run does too); text, md, srt, vtt: the matching extension (.txt, .md, .srt,
  .vtt) and UTF-8 text that starts the way that format starts. Anything with a NUL byte
  is binary, never ours. An empty file holds nothing and is simply used.
- A results file that holds something is replaced only with --overwrite and appended to
  only with --resume; without either it is refused.
- One process at a time per output: an exclusive, non-blocking flock on the output file
  (or on the directory of per-video files). A second process is refused at once.
- Each record is rendered first and appended with one write() while SIGINT/SIGTERM are
  held back, so an interrupt never tears a record; a failed write (disk full) is cut back
  off the file, so what was written before stays intact.
- Every record (errors too) carries the run's job key (jobkey.py). --resume counts an input
  as done only if a successful record of that input has the same key: another task or other
  options are other work, and records without a key (older versions) count as not done.

Per-video files (srt/vtt with several inputs, `-o DIR`) are named `<stem>.<ext>` when no
other input of the run has the same stem, else `<stem>.<8 hex digits>.<ext>`, the digits
hashing the input's real path (or URL). A plain name is never given to a stem that itself
ends in `.<8 hex digits>`, so a hashed name of one input cannot be the plain name of
another. DIR/.malmm-outputs.json maps each file name to the input it was written for (a
name once given is kept on later runs) and to the job key it was written with. --resume
counts a file as done only if it was written for that very input with the same key; a file
of that input from other work is written again.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import signal
import stat
import sys
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.sources.inputs import is_url
from .records import ErrorResult, Result
from .writers import EXTENSIONS, get_writer

if os.name == "posix":
    import fcntl

log = logging.getLogger("malmm")

INDEX_NAME = ".malmm-outputs.json"
MODES = ("new", "resume", "overwrite")
_RECORD_START = '{"input"'  # every record (and error record) we write begins with its input
_SNIFF_BYTES = 64 * 1024
_SUFFIXES = {"text": (".txt",), "md": (".md",), "srt": (".srt",), "vtt": (".vtt",)}
_HELD = (signal.SIGINT, signal.SIGTERM)
_HASHED = re.compile(r".*\.[0-9a-f]{8}", re.IGNORECASE)


class OutputWriteError(MalmmError):
    """Results could not be written (disk full, device gone): the batch stops."""


# ---- what counts as ours ---------------------------------------------------------------------


def input_key(spec: str) -> str:
    """An input's identity for per-video file ownership: the URL, or the file's real path."""
    return spec if is_url(spec) else os.path.realpath(os.path.expanduser(spec))


def input_ids(specs: list[str]) -> set[tuple[int, int]]:
    """(device, inode) of every input that is a local file: an output must be none of them."""
    ids = set()
    for spec in specs:
        if not is_url(spec):
            with contextlib.suppress(OSError):  # a missing input is reported when its turn comes
                st = os.stat(os.path.expanduser(spec))
                ids.add((st.st_dev, st.st_ino))
    return ids


def _is_input(path: Path, ids: set[tuple[int, int]]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in ids


def looks_like_ours(data: bytes, fmt: str, path: Path) -> bool:
    """Whether `data`, the start of (json: all of) the file at `path`, is a results file of
    format `fmt` that malmm could have written. Empty counts as ours."""
    if b"\0" in data:
        return False
    if fmt == "json":
        lines = (line.decode("utf-8", "replace") for line in data.split(b"\n"))
        return all(s.startswith(_RECORD_START) or _RECORD_START.startswith(s) for s in lines if s.strip())
    if path.suffix.lower() not in _SUFFIXES[fmt]:
        return False
    try:  # incremental: a character cut at the end of the sniffed bytes is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(data).lstrip("\ufeff")
    except UnicodeDecodeError:
        return False
    if not text.strip() or fmt == "text":
        return True
    if fmt == "vtt":
        return text.startswith("WEBVTT")
    if fmt == "md":
        return text.lstrip().startswith("#")
    lines = text.lstrip().splitlines()  # srt: a cue number, then its timing line
    return len(lines) >= 2 and lines[0].strip().isdigit() and "-->" in lines[1]


def recorded_inputs(data: bytes, job: str | None = None) -> set[str]:
    """Inputs with a successful record in JSON Lines `data` (with job key `job`, if given)."""
    return {record["input"] for record in _successes(data) if job is None or record.get("job") == job}


def _successes(data: bytes):
    """The successful records in JSON Lines `data`. Lines are decoded one by one, so a line cut
    inside a character by an interrupted run is merely not JSON, hence not a record."""
    for line in data.split(b"\n"):
        try:
            record = json.loads(line.decode("utf-8", "replace"))
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("input"), str) and "error" not in record:
            yield record


def _os_reason(err: OSError) -> str:
    return (err.strerror or type(err).__name__).lower()


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back until the block is done, so a record is written whole.

    Blocking the signals in this thread would not do: the kernel then hands them to another
    thread (decoder, torch) and Python still runs the handler here at once. So the handlers
    are swapped for ones that only take note, and the signals are raised again afterwards."""
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, _HELD):
        yield  # handlers can only be set from the main thread; one set from C could not be put back
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def _lock(fd: int, busy: str) -> None:
    """Take the exclusive lock on `fd` or close it and refuse with `busy`."""
    if os.name != "posix":
        return  # no flock: concurrent runs on one output are not detected there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(busy) from None


# ---- the three places results go ------------------------------------------------------------


class _Stdout:
    other_work = frozenset()

    def claim(self, mode: str, job: str | None) -> set[str]:
        return set()

    def open(self) -> None:
        pass

    def put(self, spec: str, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def close(self) -> None:
        pass


class _ResultsFile:
    """One file, records appended as inputs finish."""

    def __init__(self, path: Path, fmt: str, ids: set[tuple[int, int]]):
        self.path, self.fmt, self.ids = path, fmt, ids
        self.fd: int | None = None
        self.regular = True  # False for devices and pipes (/dev/null, /dev/stdout): no checks, no lock
        self.created = False
        self.mode = "new"
        self.other_work: set[str] = set()  # inputs whose only results are from other work (--resume)
        self.kept = b""  # with --resume: the file as claimed, whose records are kept

    def claim(self, mode: str, job: str | None) -> set[str]:
        """Lock the file and check it may be written in `mode`; the inputs it records as done
        by job `job`."""
        p, self.mode = self.path, mode
        if p.is_dir():
            raise UsageError(f"--output {p} is a directory; give a file name.")
        if _is_input(p, self.ids):
            raise UsageError(f"--output {p} is one of the inputs; choose another name.")
        if mode == "resume" and self.fmt != "json":
            raise UsageError("--resume reads JSON records: use --json or an .jsonl/.json output file.")
        self._open()
        if not self.regular:
            return set()
        head = os.pread(self.fd, _SNIFF_BYTES, 0)
        data = self._read_all() if self.fmt == "json" and b"\0" not in head else head
        if data.strip():
            if not looks_like_ours(data, self.fmt, p):
                raise UsageError(f"--output {p} exists and is not a results file written by malmm; "
                                 "choose another name.")
            if mode == "new":
                how = "--resume to skip the inputs recorded there" if self.fmt == "json" else \
                    "--resume (JSON output only) to add to it"
                raise UsageError(f"--output {p} already holds results; add {how} or --overwrite to replace it.")
        if mode != "resume":
            return set()
        self.kept = data
        done = recorded_inputs(data, job)
        self.other_work = recorded_inputs(data) - done
        return done

    def _open(self) -> None:
        p = self.path
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            self.regular = not p.exists() or stat.S_ISREG(p.stat().st_mode)
            self.created = not p.exists()
            # No O_TRUNC: nothing is cut before the lock is ours and the checks have passed.
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT if self.regular else os.O_WRONLY | os.O_APPEND
            fd = os.open(p, flags, 0o666)
        except OSError as e:
            raise UsageError(f"--output {p} cannot be opened for writing ({_os_reason(e)}).") from None
        if self.regular:
            _lock(fd, f"--output {p} is being written by another malmm process; "
                      "wait for it to finish or choose another name.")
        self.fd = fd

    def _read_all(self) -> bytes:
        with os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)
            return f.read()

    def open(self) -> None:
        """Start writing: empty the file for --overwrite; after a line cut short, a fresh line."""
        if not self.regular:
            return
        size = os.fstat(self.fd).st_size
        if self.mode == "overwrite":
            os.ftruncate(self.fd, 0)
        elif size and os.pread(self.fd, 1, size - 1) != b"\n":
            os.write(self.fd, b"\n")

    def put(self, spec: str, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        before = os.fstat(self.fd).st_size if self.regular else None
        try:
            while data:  # one write per record; more only if the OS takes part of it
                data = data[os.write(self.fd, data):]
        except OSError:
            if before is not None:
                with contextlib.suppress(OSError):  # best effort: leave no half record behind
                    os.ftruncate(self.fd, before)
            raise

    def close(self) -> None:
        if self.fd is None:
            return
        # A file this run created and never wrote to (the model failed to load) is not left behind.
        if self.created and os.fstat(self.fd).st_size == 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)  # releases the lock
        self.fd = None


class _PerVideoDir:
    """One file per input in a directory (srt, vtt), replaced atomically when it is written."""

    def __init__(self, path: Path, fmt: str, specs: list[str], ids: set[tuple[int, int]]):
        self.path, self.fmt, self.specs, self.ids = path, fmt, specs, ids
        self.keys = {s: input_key(s) for s in specs}
        self.fd: int | None = None
        self.created = False
        self.index: dict[str, str] = {}  # file name -> input key it was written for
        self.jobs: dict[str, str] = {}  # file name -> job key it was written with
        self.names: dict[str, str] = {}  # spec -> file name
        self.job: str | None = None
        self.other_work: set[str] = set()  # inputs whose files are from other work (--resume)

    def claim(self, mode: str, job: str | None) -> set[str]:
        self._lock_dir()
        self.index, self.jobs = self._load_index()
        self.job = job
        self.names = plan_names(self.specs, self.keys, self.fmt, self.index)
        done = set()
        for spec in self.specs:
            target = self.path / self.names[spec]
            if not os.path.lexists(target):
                continue
            if _is_input(target, self.ids):
                raise UsageError(f"{target} is one of the inputs; choose another -o directory.")
            if not target.is_file() or not looks_like_ours(_head(target), self.fmt, target):
                raise UsageError(f"{target} exists and is not a {self.fmt} file written by malmm; "
                                 "move it away or choose another -o directory.")
            mine = self.index.get(target.name) == self.keys[spec]
            if mode == "resume" and mine and (job is None or self.jobs.get(target.name) == job):
                done.add(spec)
            elif mode == "resume" and mine:
                self.other_work.add(spec)
            elif mode == "resume":
                raise UsageError(f"{target} exists but was not written by malmm for {spec}; move it away, "
                                 "or use --overwrite instead of --resume to replace it.")
            elif mode == "new":
                raise UsageError(f"{target} already exists; add --resume to skip the inputs whose files are "
                                 "there or --overwrite to replace them.")
        return done

    def _lock_dir(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise UsageError(f"--output {p} is a file; one file per video needs -o DIRECTORY.")
        try:
            self.created = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            raise UsageError(f"--output {p} cannot be used as a directory ({_os_reason(e)}).") from None
        _lock(fd, f"--output {p} is being written by another malmm process; "
                  "wait for it to finish or choose another directory.")
        self.fd = fd

    def _load_index(self) -> tuple[dict[str, str], dict[str, str]]:
        """(file name -> input key, file name -> job key). "jobs" is a map of its own, so
        that versions which know only "files" still read the index; an index without it
        (written by them) leaves every file not done for --resume."""
        index = self.path / INDEX_NAME
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            files = {str(k): str(v) for k, v in data["files"].items()}
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s cannot be read; files in %s count as not written by malmm.", index, self.path)
            return {}, {}
        jobs = data.get("jobs")
        if not isinstance(jobs, dict):
            return files, {}
        return files, {str(k): str(v) for k, v in jobs.items() if k in files}

    def _save_index(self) -> None:
        tmp = self.path / f"{INDEX_NAME}.partial"
        text = json.dumps({"files": self.index, "jobs": self.jobs}, ensure_ascii=False, indent=1)
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, self.path / INDEX_NAME)

    def open(self) -> None:
        pass

    def put(self, spec: str, text: str) -> None:
        name = self.names[spec]
        stale = self.jobs.get(name, self.job) != self.job
        if self.index.get(name) != self.keys[spec] or stale:
            # Claimed, and another job's key dropped, before the file is written: a crash in
            # between leaves a claim without a file or a file without a key, which --resume
            # redoes; never a file that no input owns, nor one taken for work it is not.
            self.index[name] = self.keys[spec]
            self.jobs.pop(name, None)
            self._save_index()
        tmp = self.path / f".{name}.partial"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        if self.job is not None and self.jobs.get(name) != self.job:
            self.jobs[name] = self.job
            self._save_index()

    def close(self) -> None:
        if self.fd is None:
            return
        if self.created and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):
                self.path.rmdir()
        os.close(self.fd)
        self.fd = None


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_SNIFF_BYTES)


def _stem(spec: str) -> str:
    return Path(spec.rstrip("/").split("?")[0]).stem or "video"


def plan_names(specs: list[str], keys: dict[str, str], fmt: str, index: dict[str, str]) -> dict[str, str]:
    """File name per input: the one it was given before (the index), else `<stem>.<fmt>` if
    that is unambiguous, else `<stem>.<hash of the input>.<fmt>` (see the module doc)."""
    owner = {name.casefold(): key for name, key in index.items()}
    before = {key: name for name, key in index.items() if name.lower().endswith(f".{fmt}")}
    stems = Counter(_stem(s).casefold() for s in specs)  # casefold: x.srt and X.srt are one file on macOS
    names: dict[str, str] = {}
    for spec in specs:
        key, stem = keys[spec], _stem(spec)
        plain = f"{stem}.{fmt}"
        if key in before:
            names[spec] = before[key]
        elif stems[stem.casefold()] == 1 and not _HASHED.fullmatch(stem) and owner.get(plain.casefold(), key) == key:
            names[spec] = plain
        else:
            names[spec] = f"{stem}.{hashlib.sha256(key.encode()).hexdigest()[:8]}.{fmt}"
    taken = Counter(n.casefold() for n in names.values())
    clash = next((n for n in names.values() if taken[n.casefold()] > 1), None)
    if clash is not None:
        raise UsageError(f"Two inputs would write to the same file {clash}; run them into separate -o directories.")
    return names


# ---- the output of a run ----------------------------------------------------------------------


class Output:
    """Where a run's results go: stdout, one file (records appended as they finish), or a
    directory with one file per input for per-video formats (srt, vtt).

    `claim(mode, job)` (before the model loads) checks and locks; `open()` starts writing;
    `write`/`write_error` append whole records, marked with the job key; `close()` releases
    the lock."""

    def __init__(self, task: str, path: Path | None, fmt: str | None, json_: bool, specs: list[str]):
        if fmt is None:
            fmt = "json" if json_ else (EXTENSIONS.get(path.suffix.lower(), "text") if path else "text")
        elif json_ and fmt != "json":
            raise UsageError(f"--json and --format {fmt} disagree; use one.")
        self.writer = get_writer(fmt, task)
        self.fmt, self.path, self.n_inputs = fmt, path, len(specs)
        self.per_file = path is not None and not self.writer.many_per_file and (len(specs) > 1 or path.is_dir())
        if path is None and not self.writer.many_per_file and len(specs) > 1:
            raise UsageError(f"--format {fmt} makes one file per video: with several inputs, give -o DIRECTORY.")
        if path is None:
            self.sink = _Stdout()
        elif self.per_file:
            self.sink = _PerVideoDir(path, fmt, specs, input_ids(specs))
        else:
            self.sink = _ResultsFile(path, fmt, input_ids(specs))
        self.written = 0
        self.job: str | None = None

    def claim(self, mode: str, job: str | None = None) -> set[str]:
        """Check that `mode` (new, resume, overwrite) destroys nothing and take the lock;
        returns the inputs already done by job `job` (jobkey.py; resume). None: any job."""
        assert mode in MODES
        self.job = job
        return self.sink.claim(mode, job)

    def other_work_note(self, todo: list[str]) -> str:
        """What --resume says of the inputs in `todo` that have results from other work only
        ("" when none do): why they are done again."""
        n = sum(spec in self.sink.other_work for spec in todo)
        if not n:
            return ""
        how = "with another task or other options, or by an older malmm"
        if self.per_file:
            return f"{n} of them have files in {self.path} written {how}; those are replaced"
        return f"{n} of them recorded in {self.path} {how}"

    def open(self) -> None:
        try:
            self.sink.open()
        except OSError as e:
            raise OutputWriteError(f"Cannot write to {self.path} ({_os_reason(e)}).") from None

    def write(self, result: Result) -> None:
        if self.job is not None:
            result = replace(result, job=self.job)
        buf = io.StringIO()
        self.writer.write(result, buf, header=self.n_inputs > 1 and not self.per_file)
        with _signals_held():
            self._put(result.input, buf.getvalue())
            self.written += 1

    def kept_records(self) -> list[dict]:
        """With --resume on one results file: the successful records it held when claimed, with
        this run's job key. For commands whose unit of work is not an input (eval's data items,
        several of which may share a video), which match records to their own units."""
        data = getattr(self.sink, "kept", b"")
        return [record for record in _successes(data) if self.job is None or record.get("job") == self.job]

    def write_record(self, record: dict) -> None:
        """Append one ready-made JSON record (its first key "input", as every record of ours),
        marked with the job key; written whole, like write()."""
        if next(iter(record), None) != "input":
            raise ValueError("a record's first key must be 'input'")
        if self.job is not None:
            record = {**record, "job": self.job}
        text = json.dumps(record, ensure_ascii=False) + "\n"
        with _signals_held():
            self._put(record["input"], text)
            if "error" not in record:
                self.written += 1

    def write_error(self, error: ErrorResult) -> None:
        if self.job is not None:
            error = replace(error, job=self.job)
        buf = io.StringIO()
        self.writer.write_error(error, buf)
        if buf.getvalue() and not self.per_file:
            with _signals_held():
                self._put(error.input, buf.getvalue())

    def _put(self, spec: str, text: str) -> None:
        try:
            self.sink.put(spec, text)
        except OSError as e:
            if self.path is None:
                raise
            kept = f"the {self.written} result(s) written before are kept"
            raise OutputWriteError(f"Cannot write to {self.path} ({_os_reason(e)}); {kept}.") from None

    def close(self) -> None:
        self.sink.close()
