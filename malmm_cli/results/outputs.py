"""Where results go (stdout, one file, or one file per video in a directory), written so
that nothing already on disk is lost.

The rules, checked before any model loads (a refusal is one sentence and exit code 2):

- `-o` never names one of the inputs (compared by file identity, so links count too).
- An existing file is written to only if its content is what malmm last wrote there: each
  output file malmm writes has a record of its size and SHA-256 (written.py for one file,
  DIR/.malmm-outputs.json for the files of a directory), checked before anything is written.
  A user's file, or one of malmm's edited since, is refused whatever the options. Files that
  older versions wrote, without a record: JSON Lines whose every line is a record of ours
  with its job key (a line that older versions cut short aside) is malmm's own, verifiably;
  any other file is not. An empty file holds nothing and is simply used.
- A results file that holds something is replaced only with --overwrite and appended to
  only with --resume; without either it is refused.
- One process at a time per output: an exclusive, non-blocking flock on the output file
  (or on the directory of per-video files), and on the lock of its record. A second process
  is refused at once.
- Each record is rendered first and appended with one write() while SIGINT/SIGTERM are
  held back, so an interrupt never tears a record; a failed write (disk full) is cut back
  off the file, so what was written before stays intact. The digest is recorded before and
  after each write, so a crash in between leaves a file that is still malmm's.
- --resume on a file whose last line was cut short (a crash, a power cut) cuts that line
  off into a file beside it, `<name>.torn` (named in a warning), so the file holds only whole
  records and any JSON Lines reader reads it.
- Every record (errors too) carries the run's job key (jobkey.py). --resume counts an input
  as done only if a successful record of that input has the same key: another task or other
  options are other work, and records without a key (older versions) count as not done.
- Records are UTF-8 JSON; a file name that is not valid UTF-8 is recorded JSON-escaped
  (results.to_json), so --resume recognises it and os.fsencode gives back its bytes.

Per-video files (srt/vtt with several inputs, `-o DIR`) are named `<stem>.<ext>` when no
other input of the run has the same stem, else `<stem>.<8 hex digits>.<ext>`, the digits
hashing the input's real path (or URL). A plain name is never given to a stem that itself
ends in `.<8 hex digits>`, so a hashed name of one input cannot be the plain name of
another. DIR/.malmm-outputs.json maps each file name to the input it was written for (a
name once given is kept on later runs), to the job key it was written with, and to the
SHA-256 of its content. --resume counts a file as done only if it was written for that very
input with the same key; a file of that input from other work is written again.

A format whose writer has an index page (html: DIR/index.html) keeps it listing every page of
malmm's in the folder, rewritten after each one: it is guarded as the pages are (the index
records it as belonging to no input), and no input's page takes its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import signal
import stat
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

from malmm_cli.errors import UsageError
from malmm_cli.messages import plural
from malmm_cli.sources.inputs import VIDEO_EXTENSIONS, is_url
from .events import Events
from .records import ErrorResult, Result, SegmentText, to_json
from .results_file import (  # noqa: F401  (OutputWriteError, recorded_inputs, TORN_SUFFIX: re-exported)
    TORN_SUFFIX,
    OutputWriteError,
    ResultsFile,
    Stdout,
    is_input,
    lock_exclusive,
    os_reason,
    recorded_inputs,
    successes,
)
from .writers import EXTENSIONS, WRITERS, ResultWriter, get_writer, header_line, segment_line
from .written import file_content

log = logging.getLogger("malmm")

INDEX_NAME = ".malmm-outputs.json"
INDEX_PAGE_KEY = ""  # the input key recorded for a writer's index page (html's index.html): no input's
MODES = ("new", "resume", "overwrite")
_HELD = (signal.SIGINT, signal.SIGTERM)
_HASHED = re.compile(r".*\.[0-9a-f]{8}", re.IGNORECASE)
_FILE_SUFFIXES = frozenset(EXTENSIONS) | VIDEO_EXTENSIONS  # an -o with one of these names a file
_FORMAT_NAMES = {"text": "text", "json": "JSON", "md": "Markdown", "srt": "SubRip (srt)", "vtt": "WebVTT (vtt)",
                 "html": "HTML"}


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


# ---- the three places results go ------------------------------------------------------------


class _PerVideoDir:
    """One file per input and format in a directory (srt, vtt, html; every format with --format
    all), each replaced atomically when it is written. `writers`: format -> its writer, placed
    for this folder; a writer with an index page (html's index.html) keeps it listing its pages."""

    def __init__(self, path: Path, writers: dict[str, ResultWriter], specs: list[str], ids: set[tuple[int, int]]):
        self.path, self.writers, self.specs, self.ids = path, writers, specs, ids
        self.formats = {fmt: writer.extension.lstrip(".") for fmt, writer in writers.items()}  # format -> extension
        self.index_pages = {fmt: w.index_name for fmt, w in writers.items() if w.index_name}  # e.g. index.html
        self.entries: dict[str, dict[str, dict]] = {}  # format -> page name -> what its index page shows of it
        self.keys = {s: input_key(s) for s in specs}
        self.fd: int | None = None
        self.created = False
        self.index: dict[str, str] = {}  # file name -> input key it was written for
        self.jobs: dict[str, str] = {}  # file name -> job key it was written with
        self.digests: dict[str, list[str]] = {}  # file name -> SHA-256 of what malmm left there (two mid-write)
        self.current: dict[str, str] = {}  # file name -> SHA-256 of a file of ours there now, to be replaced
        self.names: dict[tuple[str, str], str] = {}  # (spec, format) -> file name
        self.job: str | None = None
        self.other_work: set[str] = set()  # inputs whose files are from other work (--resume)

    def claim(self, mode: str, job: str | None) -> set[str]:
        """The inputs whose files are all there from this very work (--resume); every other file
        that this run would replace is checked to be malmm's, or the run is refused."""
        self._lock_dir()
        self.index, self.jobs, self.digests = self._load_index()
        self.job = job
        reserved = frozenset(self.index_pages.values())
        for fmt, ext in self.formats.items():
            names = plan_names(self.specs, self.keys, ext, self.index, reserved)
            self.names.update({(spec, fmt): names[spec] for spec in self.specs})
        for page in self.index_pages.values():
            self._check_index_page(page)
        done_files = {key for key in self.names if mode == "resume" and self._done(key, job)}
        done = {spec for spec in self.specs if all((spec, fmt) in done_files for fmt in self.formats)}
        for (spec, fmt), name in self.names.items():
            if spec not in done:  # written again, every format of it: each file must be malmm's to replace
                self._check_replaceable(mode, spec, fmt, self.path / name)
        return done

    def _done(self, key: tuple[str, str], job: str | None) -> bool:
        """Whether the file of (spec, format) was written for that input by this work."""
        target = self.path / self.names[key]
        if not os.path.lexists(target):
            return False
        if is_input(target, self.ids):
            raise UsageError(f"{target} is one of the inputs; choose another -o directory.")
        return self.index.get(target.name) == self.keys[key[0]] and (job is None or self.jobs.get(target.name) == job)

    def _check_replaceable(self, mode: str, spec: str, fmt: str, target: Path) -> None:
        if not os.path.lexists(target):
            return
        if is_input(target, self.ids):
            raise UsageError(f"{target} is one of the inputs; choose another -o directory.")
        if not self._ours(target):
            raise UsageError(f"{target} exists and is not a {fmt} file that malmm wrote (or it was changed "
                             "since); move it away or choose another -o directory.")
        if target.name not in self.current:
            return  # empty: nothing to lose
        mine = self.index.get(target.name) == self.keys[spec]
        if mode == "resume" and mine:
            self.other_work.add(spec)
        elif mode == "resume":
            raise UsageError(f"{target} exists but was not written by malmm for {spec}; move it away, "
                             "or use --overwrite instead of --resume to replace it.")
        elif mode == "new":
            raise UsageError(f"{target} already exists; add --resume to skip the inputs whose files are "
                             "there or --overwrite to replace them.")

    def _check_index_page(self, page: str) -> None:
        """An index page may be replaced only if it is malmm's, as any page."""
        target = self.path / page
        if os.path.lexists(target) and (is_input(target, self.ids) or not self._ours(target)):
            raise UsageError(f"{target} exists and is not an index page that malmm wrote (or it was changed since); "
                             "move it away or choose another -o directory.")

    def _ours(self, target: Path) -> bool:
        """Whether the file at `target` is empty, or holds what malmm last wrote there (noted in
        self.current). A link, a folder or a device is never ours."""
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size == 0:
            return True
        known = self.digests.get(target.name, [])
        if not known:
            return False  # no record of its content: a user's file, or written by an older malmm
        digest = file_content(target).sha256
        if digest in known:
            self.current[target.name] = digest
        return digest in known

    def _lock_dir(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise UsageError(f"--output {p} is a file; one file per video needs -o DIRECTORY.")
        try:
            self.created = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            raise UsageError(f"--output {p} cannot be used as a directory ({os_reason(e)}).") from None
        lock_exclusive(fd, f"--output {p} is being written by another malmm process; "
                  "wait for it to finish or choose another directory.")
        self.fd = fd

    def _load_index(self) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
        """(file name -> input key, -> job key, -> SHA-256 digests). "jobs" and "digests" are
        maps of their own, so that versions which know only "files" still read the index; an
        index without "jobs" (written by them) leaves every file not done for --resume, one
        without "digests" leaves every file not malmm's to replace."""
        index = self.path / INDEX_NAME
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            files = {str(k): str(v) for k, v in data["files"].items()}
        except FileNotFoundError:
            return {}, {}, {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s cannot be read; files in %s count as not written by malmm.", index, self.path)
            return {}, {}, {}
        jobs, digests = data.get("jobs"), data.get("digests")
        jobs = {str(k): str(v) for k, v in jobs.items() if k in files} if isinstance(jobs, dict) else {}
        digests = {str(k): [str(d) for d in v] for k, v in digests.items()
                   if k in files and isinstance(v, list)} if isinstance(digests, dict) else {}
        return files, jobs, digests

    def _save_index(self) -> None:
        tmp = self.path / f"{INDEX_NAME}.partial"
        text = to_json({"files": self.index, "jobs": self.jobs, "digests": self.digests}, indent=1)
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, self.path / INDEX_NAME)

    def open(self) -> None:
        pass

    def put(self, spec: str, text: str, fmt: str | None = None) -> None:
        fmt = fmt or next(iter(self.formats))
        name = self.names[spec, fmt]
        self._replace(name, self.keys[spec], text, self.job)
        page = self.index_pages.get(fmt)
        if page is not None:
            writer = self.writers[fmt]
            entries = self._index_entries(fmt)
            entry = writer.index_entry(text)
            if entry is not None:
                entries[name] = entry
            index = writer.index_page(sorted(entries.items(), key=lambda item: item[0].casefold()))
            self._replace(page, INDEX_PAGE_KEY, index, None)

    def _index_entries(self, fmt: str) -> dict[str, dict]:
        """What the index page of `fmt` lists: its pages of malmm's in the folder (read once per
        run, then kept up to date as pages are written)."""
        if fmt not in self.entries:
            entries = self.entries[fmt] = {}
            writer, page, ext = self.writers[fmt], self.index_pages[fmt], self.formats[fmt]
            for name in self.index:
                target = self.path / name
                if name == page or not name.lower().endswith(f".{ext}"):
                    continue
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.lstat(target).st_mode):
                        data = target.read_bytes()
                        if hashlib.sha256(data).hexdigest() in self.digests.get(name, ()):
                            entry = writer.index_entry(data.decode("utf-8", "replace"))
                            if entry is not None:
                                entries[name] = entry
        return self.entries[fmt]

    def _replace(self, name: str, key: str, text: str, job: str | None) -> None:
        """Write file `name` of input `key` (atomically, recorded in the index before and after)."""
        data = text.encode("utf-8", "backslashreplace")  # as _ResultsFile.put
        new = hashlib.sha256(data).hexdigest()
        # Before the file is replaced, the index names the input it is for, drops another job's
        # key, and takes both the content there now and the new one for malmm's: a crash in
        # between leaves a claim without a file or a file without a key, which --resume redoes;
        # never a file that no input owns, nor one taken for work it is not, nor one of malmm's
        # that malmm will not replace.
        if self.jobs.get(name, job) != job or self.index.get(name) != key:
            self.jobs.pop(name, None)
        self.index[name] = key
        self.digests[name] = [d for d in (self.current.get(name), new) if d]
        self._save_index()
        tmp = self.path / f".{name}.partial"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.current[name] = new
        self.digests[name] = [new]
        if job is not None:
            self.jobs[name] = job
        self._save_index()

    def close(self) -> None:
        if self.fd is None:
            return
        if self.created and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):
                self.path.rmdir()
        os.close(self.fd)
        self.fd = None


def _stem(spec: str) -> str:
    return Path(spec.rstrip("/").split("?")[0]).stem or "video"


def plan_names(specs: list[str], keys: dict[str, str], fmt: str, index: dict[str, str],
               reserved: frozenset[str] = frozenset()) -> dict[str, str]:
    """File name per input: the one it was given before (the index), else `<stem>.<fmt>` if
    that is unambiguous, else `<stem>.<hash of the input>.<fmt>` (see the module doc). No
    input gets a `reserved` name (a writer's index page)."""
    owner = {name.casefold(): key for name, key in index.items()}
    before = {key: name for name, key in index.items() if name.lower().endswith(f".{fmt}")}
    stems = Counter(_stem(s).casefold() for s in specs)  # casefold: x.srt and X.srt are one file on macOS
    names: dict[str, str] = {}
    for spec in specs:
        key, stem = keys[spec], _stem(spec)
        plain = f"{stem}.{fmt}"
        if key in before:
            names[spec] = before[key]
        elif (stems[stem.casefold()] == 1 and not _HASHED.fullmatch(stem) and owner.get(plain.casefold(), key) == key
              and plain.casefold() not in {r.casefold() for r in reserved}):
            names[spec] = plain
        else:
            digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()  # a name's bytes as they are
            names[spec] = f"{stem}.{digest[:8]}.{fmt}"
    taken = Counter(n.casefold() for n in names.values())
    clash = next((n for n in names.values() if taken[n.casefold()] > 1), None)
    if clash is not None:
        raise UsageError(f"Two inputs would write to the same file {clash}; run them into separate -o directories.")
    return names


# ---- the output of a run ----------------------------------------------------------------------


ALL_FORMATS = "all"  # --format all: every format of the writers' registry, in one pass


def _every_format(task: str, path: Path | None) -> dict[str, object]:
    """The writers of --format all: every one of the registry (writers.WRITERS) that writes this
    task, each to a file of its own per video, into -o DIRECTORY."""
    if path is None or (not path.is_dir() and path.suffix.lower() in _FILE_SUFFIXES):
        raise UsageError("--format all writes a file per format and video: give -o DIRECTORY.")
    return {name: writer for name, writer in WRITERS.items() if task in writer.tasks}


class Output:
    """Where a run's results go: stdout, one file (records appended as they finish), or a
    directory with one file per input for per-video formats (srt, vtt, html).

    `claim(mode, job)` (before the model loads) checks and locks; `open()` starts writing;
    `write`/`write_error` append whole records, marked with the job key; `close()` releases
    the lock."""

    def __init__(self, task: str, path: Path | None, fmt: str | None, json_: bool, specs: list[str]):
        named = EXTENSIONS.get(path.suffix.lower()) if path is not None else None  # what the name says
        if fmt is None:
            fmt = "json" if json_ else (named or "text")
        elif json_ and fmt != "json":
            raise UsageError(f"--json and --format {fmt} disagree; use one.")
        if fmt == ALL_FORMATS:
            self.writers = _every_format(task, path)
        else:
            self.writers = {fmt: get_writer(fmt, task)}
        self.writer = next(iter(self.writers.values()))  # the one writer, but for --format all
        self.fmt, self.path, self.n_inputs = fmt, path, len(specs)
        self.per_file = path is not None and (fmt == ALL_FORMATS or not self.writer.many_per_file
                                              and (len(specs) > 1 or path.is_dir()))
        if path is None and not self.writer.many_per_file and len(specs) > 1:
            raise UsageError(f"--format {fmt} makes one file per video: with several inputs, give -o DIRECTORY.")
        if self.per_file and not path.is_dir() and path.suffix.lower() in _FILE_SUFFIXES:
            # -o all.srt would become a folder named all.srt, holding one file per video.
            raise UsageError(f"--output {path} names a file, but {fmt} makes one file per video: with "
                             f"{len(specs)} inputs, give -o DIRECTORY (a name without {path.suffix}).")
        if named is not None and fmt != named and not path.is_dir():
            # -o x.srt --format vtt would put WebVTT in a file every program opens as SubRip.
            given = "--json" if json_ else f"--format {fmt}"
            ext = WRITERS[fmt].extension if fmt in WRITERS else f".{fmt}"
            raise UsageError(f"--output {path} names a {_FORMAT_NAMES.get(named, named)} file, but {given} writes "
                             f"{_FORMAT_NAMES.get(fmt, fmt)}; name it {path.with_suffix(ext).name}, or leave out "
                             f"{given}.")
        # Where the output goes, for what it links to (html: the video, relative to the page).
        folder = Path(".") if path is None else path if self.per_file else path.parent
        self.writers = {name: writer.placed(folder) for name, writer in self.writers.items()}
        self.writer = next(iter(self.writers.values()))
        if path is None:
            self.sink = Stdout()
        elif self.per_file:
            self.sink = _PerVideoDir(path, self.writers, specs, input_ids(specs))
        else:
            self.sink = ResultsFile(path, fmt, input_ids(specs))
        self.written = 0
        self.job: str | None = None
        self.task = task
        self.streamed: dict[str, str] = {}  # input -> what of its text output went out before its record

    @property
    def streams(self) -> bool:
        """Whether a result's parts go out as they come (stream_segment): a summary as text on
        stdout, segment by segment, as whisper prints them. Files get whole records."""
        return self.path is None and self.fmt == "text" and self.task == "summarize"

    def stream_segment(self, spec: str, segment: SegmentText) -> None:
        """One segment of `spec`'s summary, now (the header first when there are several inputs);
        its record, written later, adds only what is not out yet."""
        text = segment_line(segment)
        if spec not in self.streamed and self.n_inputs > 1:
            text = header_line(spec) + text
        with _signals_held():
            self._put(spec, text)
            self.streamed[spec] = self.streamed.get(spec, "") + text

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
            raise OutputWriteError(f"Cannot write to {self.path} ({os_reason(e)}).") from None

    def write(self, result: Result) -> None:
        if self.job is not None:
            result = replace(result, job=self.job)
        texts = {}
        for fmt, writer in self.writers.items():
            buf = io.StringIO()
            writer.write(result, buf, header=self.n_inputs > 1 and not self.per_file)
            texts[fmt] = buf.getvalue()
        out = self.streamed.pop(result.input, "")
        if out and texts[self.fmt].startswith(out):  # the segments went out as they came
            texts[self.fmt] = texts[self.fmt][len(out):]
        with _signals_held():
            for fmt, text in texts.items():
                self._put(result.input, text, fmt if len(texts) > 1 else None)
            self.written += 1

    def kept_records(self) -> list[dict]:
        """With --resume on one results file: the successful records it held when claimed, with
        this run's job key. For commands whose unit of work is not an input (eval's data items,
        several of which may share a video), which match records to their own units."""
        data = getattr(self.sink, "kept", b"")
        return [record for record in successes(data) if self.job is None or record.get("job") == self.job]

    def write_record(self, record: dict) -> None:
        """Append one ready-made JSON record (its first key "input", as every record of ours),
        marked with the job key; written whole, like write()."""
        if next(iter(record), None) != "input":
            raise ValueError("a record's first key must be 'input'")
        if self.job is not None:
            record = {**record, "job": self.job}
        text = to_json(record) + "\n"
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

    def _put(self, spec: str, text: str, fmt: str | None = None) -> None:
        try:
            if fmt is None:
                self.sink.put(spec, text)
            else:  # one of several formats, each a file of its own
                self.sink.put(spec, text, fmt)
        except OSError as e:
            if self.path is None:
                raise
            kept = f"the {plural(self.written, 'result')} written before {'is' if self.written == 1 else 'are'} kept"
            raise OutputWriteError(f"Cannot write to {self.path} ({os_reason(e)}); {kept}.") from None

    def close(self) -> None:
        self.sink.close()


class SegmentEcho(Events):
    """Hears a summary's segments as they are captioned and writes each to `output` at once
    (Output.stream_segment), the live view `view` stepping aside while it does."""

    def __init__(self, output: Output, view: Events):
        self.output, self.view = output, view
        self.source = ""

    def started(self, source, info, sampling, capacity):
        self.source = source

    def segment(self, index, total, start, end, text):
        with self.view.printing():
            self.output.stream_segment(self.source, SegmentText(start, end, text))
