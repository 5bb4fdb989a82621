"""What `malmm watch` writes: one record per window of stream time, in JSON Lines, SRT, WebVTT
or plain text, each written whole and flushed as soon as its window closes (so `tail -f` sees
it), to standard output or to `-o FILE` under the batch commands' rules (outputs.py): a file
that is not malmm's is never touched, one of malmm's is replaced only with --overwrite, one
process at a time.

A record has the shape of a summary segment (start, end, and the window's text, answers or
labels) plus what the live loop counts: frames read in the window, frames dropped to stay
live, and how far behind the stream it was written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.terminal import shown

from .records import Answer, LabelScore, to_json
from .results_file import ResultsFile, Stdout
from .writers import clock, short_clock, srt_text, vtt_text

FORMATS = {"jsonl": "json", "json": "json", "srt": "srt", "vtt": "vtt", "txt": "text", "text": "text"}
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".srt": "srt", ".vtt": "vtt", ".txt": "text"}
NO_FRAMES = "(no frames)"


@dataclass(frozen=True)
class WindowRecord:
    """One window of a watched stream. Times are stream seconds, from its first frame."""

    input: str
    task: str  # caption | ask | classify
    model: str
    window: int  # 0, 1, 2, ...: [window * every, (window + 1) * every)
    start: float
    end: float
    frames: int  # sampled frames read in this window
    dropped: int  # sampled frames of this window dropped to stay live
    lag: float | None  # seconds between the window's last frame being due and its record (None: no frame)
    memory: dict[str, int]  # length (M), slots (used), compressions
    cumulative: bool  # answered over everything seen so far (else: this window alone)
    text: str | None = None
    answers: tuple[Answer, ...] | None = None
    labels: tuple[LabelScore, ...] | None = None
    label_set: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"input": self.input, "task": self.task, "model": self.model, "window": self.window,
                                  "start": round(self.start, 6), "end": round(self.end, 6)}
        if self.text is not None:
            record["text"] = self.text
        if self.answers is not None:
            record["answers"] = [{"question": a.question, "answer": a.answer} for a in self.answers]
        if self.labels is not None:
            record["labels"] = [{"label": s.label, "score": s.score} for s in self.labels]
            record["label_set"] = self.label_set
        record.update(frames=self.frames, dropped=self.dropped, lag=None if self.lag is None else round(self.lag, 3),
                      memory=dict(self.memory), cumulative=self.cumulative, timings=dict(self.timings))
        return record

    def lines(self) -> list[str]:
        """What the window says, as lines of text (one per question for several)."""
        if self.frames == 0 and self.text is None and self.answers is None and self.labels is None:
            return [NO_FRAMES]
        if self.text is not None:
            return [self.text]
        if self.answers is not None:
            if len(self.answers) == 1:
                return [self.answers[0].answer]
            return [f"Q: {a.question} A: {a.answer}" for a in self.answers]
        return [", ".join(f"{s.label} {s.score:.1%}" for s in self.labels or ())]


# ---- formats ----------------------------------------------------------------------------------


def choose_format(fmt: str | None, path: Path | None) -> str:
    """The format's inner name (json, srt, vtt, text): --format, else -o's extension, else text."""
    if fmt is not None:
        if fmt.lower() not in FORMATS:
            raise UsageError(f"Unknown format '{fmt}': choose one of jsonl, srt, vtt, txt.")
        return FORMATS[fmt.lower()]
    if path is not None:
        return _EXTENSIONS.get(path.suffix.lower(), "text")
    return "text"


def render(record: WindowRecord, fmt: str, cue: int) -> str:
    """One record as `fmt` writes it; `cue` numbers SRT cues from 1."""
    if fmt == "json":
        return to_json(record.to_record()) + "\n"
    body = " · ".join(record.lines())
    if fmt == "srt":
        return f"{cue}\n{clock(record.start, ',')} --> {clock(record.end, ',')}\n{srt_text(body)}\n\n"
    if fmt == "vtt":
        return f"{clock(record.start)} --> {clock(record.end)}\n{vtt_text(body)}\n\n"
    span = f"[{short_clock(record.start)} - {short_clock(record.end)}]"
    return "".join(f"{span} {shown(line, lines=False)}\n" for line in record.lines())


def header(fmt: str) -> str:
    """What a file of `fmt` starts with (WebVTT's signature)."""
    return "WEBVTT\n\n" if fmt == "vtt" else ""


# ---- where records go -------------------------------------------------------------------------


class WatchOutput:
    """Records to stdout, and to one file with -o, claimed under the batch commands' rules
    before the model loads (`claim`), then written whole, one by one, flushed (`write`).

    With -o, stdout still gets every record as it comes (the issue: "to stdout and to -o"): a
    terminal as plain text, above the live panel; a pipe in the file's format. The file comes
    first: a reader of stdout that leaves (`| head`) stops the echo, never the file."""

    def __init__(self, path: Path | None, fmt: str, source: str, overwrite: bool):
        self.path, self.fmt, self.overwrite = path, fmt, overwrite
        self.source = source
        self.written = 0
        self.echo: Stdout | None = None
        self.echo_fmt = fmt
        if path is None:
            self.sink: Any = Stdout()
        else:
            if path.is_dir():
                raise UsageError(f"--output {path} is a directory; give a file name.")
            self.sink = ResultsFile(path, fmt, _input_ids(source), resumable=False)  # a stream is not resumed
            if sys.stdout is not None:
                self.echo = Stdout()
                self.echo_fmt = "text" if _is_tty(sys.stdout) else fmt

    def claim(self) -> None:
        self.sink.claim("overwrite" if self.overwrite else "new", None)

    def open(self) -> None:
        self.sink.open()
        if header(self.fmt):
            self.sink.put(self.source, header(self.fmt))
        self._echo(header(self.echo_fmt))

    def write(self, record: WindowRecord) -> None:
        self.sink.put(self.source, render(record, self.fmt, self.written + 1))
        self.written += 1
        self._echo(render(record, self.echo_fmt, self.written))

    def _echo(self, text: str) -> None:
        if self.echo is None or not text:
            return
        try:
            self.echo.put(self.source, text)
        except (OSError, MalmmError):  # stdout gone or full: the file goes on alone
            self.echo = None

    def close(self) -> None:
        self.sink.close()


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _input_ids(source: str) -> set[tuple[int, int]]:
    """(device, inode) of a file source: -o must not name it."""
    try:
        st = os.stat(os.path.expanduser(source))
    except OSError:
        return set()
    return {(st.st_dev, st.st_ino)}


# ---- progress ---------------------------------------------------------------------------------


class WatchEvents:
    """What the live loop tells a listener (the terminal view implements it; this does nothing).
    `state` is the reader's sources.live.ReaderState; `memory` a models BankStatus."""

    def started(self, source: str, fps: float, every: float, capacity: int, cumulative: bool) -> None:
        """Reading starts (the source is being opened)."""

    def progress(self, stream_time: float, lag: float, frames: int, state: Any, memory: Any) -> None:
        """Frames fed so far, the stream time of the last, its lag, the reader's counts, the bank."""

    def stage(self, text: str) -> None:
        """What the loop does now, in words ("captioning 0:10-0:20")."""

    def waiting(self, state: Any) -> None:
        """No frame came for a while (the reader may be reconnecting: state.note says)."""

    def window(self, record: WindowRecord) -> None:
        """A window closed; its record is being written."""

    def close(self) -> None:
        """Give the terminal back (the end, an error, an interrupt)."""
