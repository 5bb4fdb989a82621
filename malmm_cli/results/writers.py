"""Output writers, one registry: text (human), json (one object per line), srt, vtt, md, html.

Time formatting lives here and nowhere else; everything upstream is float seconds.
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
from pathlib import Path
from typing import TextIO

from malmm_cli.errors import UsageError
from malmm_cli.terminal import shown

from .records import ErrorResult, Result, to_json


def clock(seconds: float, sep: str = ".", hours: bool = True) -> str:
    """62.5 -> '00:01:02.500' (sep=',' for SRT)."""
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return (f"{h:02d}:" if hours or h else "") + f"{m:02d}:{s:02d}{sep}{ms:03d}"


def short_clock(seconds: float) -> str:
    """62.5 -> '1:02', 3725 -> '1:02:05': for headings and logs."""
    total = int(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def segment_line(seg) -> str:
    """'[0:00 - 0:20] text' and a newline: a summary's segment as text output shows it (and the
    progress, as each segment comes)."""
    return f"[{short_clock(seg.start)} - {short_clock(seg.end)}] {shown(seg.text, lines=True)}\n"


def header_line(name: str) -> str:
    """'== clip.mp4': the line before each input's results when text output holds several."""
    return f"== {shown(name)}\n"


class ResultWriter:
    """Writes results (and batch errors) to a text stream."""

    name = ""
    tasks: tuple[str, ...] = ("caption", "ask", "classify", "summarize")
    many_per_file = True  # whether several inputs can share one output file
    index_name: str | None = None  # per-video files in a folder: the name of a page that lists them

    def placed(self, folder: Path) -> ResultWriter:
        """This writer for output that goes into `folder` (what a page links to is relative to it)."""
        return self

    @property
    def extension(self) -> str:
        """The file name extension of this format (a file per video is named <video>.<this>)."""
        return f".{self.name}"

    def write(self, result: Result, out: TextIO, *, header: bool = False) -> None:
        raise NotImplementedError

    def write_error(self, error: ErrorResult, out: TextIO) -> None:
        """Errors go to the output only in machine formats; human formats report on stderr."""


class JsonWriter(ResultWriter):
    """One JSON object per input and per line (JSON Lines when there are several)."""

    name = "json"
    extension = ".json"

    def write(self, result, out, *, header=False):
        out.write(to_json(result.to_record()) + "\n")

    def write_error(self, error, out):
        out.write(to_json(error.to_record()) + "\n")


class TextWriter(ResultWriter):
    """What a person reads: the caption, the answers, a table of labels, the segments.

    It is often read on a terminal: file names, questions and labels are shown with their
    control characters escaped (terminal.shown), generated text keeps only its line breaks."""

    name = "text"
    extension = ".txt"

    def write(self, result, out, *, header=False):
        if header:
            out.write(header_line(result.input))
        if result.text is not None:
            out.write(shown(result.text, lines=True) + "\n")
        if result.answers is not None and len(result.answers) == 1 and not header:
            # One input, one question: the answer alone, so that $(malmm ask ...) is the answer.
            out.write(shown(result.answers[0].answer, lines=True) + "\n")
        else:
            for answer in result.answers or ():
                out.write(f"Q: {shown(answer.question)}\nA: {shown(answer.answer, lines=True)}\n")
        if result.labels:
            labels = [shown(s.label) for s in result.labels]
            width = max(map(len, labels))
            for rank, (label, s) in enumerate(zip(labels, result.labels), 1):
                out.write(f"{rank:>2}. {label:<{width}}  {s.score:6.1%}\n")
        if result.segments is not None:
            for seg in result.segments:
                out.write(segment_line(seg))
            out.write(f"Summary: {shown(str(result.summary), lines=True)}\n")
        if header:
            out.write("\n")


class MarkdownWriter(ResultWriter):
    name = "md"
    tasks = ("summarize",)

    def write(self, result, out, *, header=False):
        out.write(f"# {shown(result.input)}\n\n{result.summary}\n\n")  # a newline in a name would end the heading
        for seg in result.segments or ():
            out.write(f"## {short_clock(seg.start)} - {short_clock(seg.end)}\n\n{seg.text}\n\n")


# Subtitle text: the model writes anything, so a cue's text is escaped until no character of it
# can start a cue, a timing line or a block. A cue's text is one line: every line break
# (\n, \r, \x85, U+2028, ...), control character and BOM becomes a space, so no blank line can
# end the cue and no line of it can stand at a line start where a parser looks for a cue
# number or timings. And it holds no timing arrow: in VTT no '>' is raw at all ('&', '<' and
# '>' are character references, so "<v8 ...>" is text, not a voice tag); in SRT, which has
# no escapes, the '>' of anything a parser could read as an arrow ('-' then spaces or dashes
# then '>': "-->", "--->", "- >") becomes '›'.
_ARROW = re.compile(r"-[ -]*>")


def _one_line(text: str) -> str:
    """Text on one line: line breaks, control characters and BOMs as spaces, runs of spaces as one."""
    text = "".join(" " if c == "\ufeff" or unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())  # str.split also splits at U+2028, U+2029, U+0085 and U+001C-U+001F


def _no_arrow(text: str) -> str:
    return _ARROW.sub(lambda m: m.group(0)[:-1] + "\u203a", text)


def srt_text(text: str) -> str:
    """A cue's text as SRT holds it safely: one line, no arrow ('...' for no text)."""
    return _no_arrow(_one_line(text)) or "..."


def vtt_text(text: str) -> str:
    """A cue's text as WebVTT holds it safely: one line, '&', '<', '>' as character references."""
    return html.escape(_one_line(text), quote=False) or "..."


class SrtWriter(ResultWriter):
    """SubRip: numbered cues. SRT has no comments, so the overall summary is left out."""

    name = "srt"
    tasks = ("summarize",)
    many_per_file = False

    def write(self, result, out, *, header=False):
        for i, seg in enumerate(result.segments or (), 1):
            out.write(f"{i}\n{clock(seg.start, ',')} --> {clock(seg.end, ',')}\n{srt_text(seg.text)}\n\n")


class VttWriter(ResultWriter):
    """WebVTT: the overall summary goes in a NOTE block, segments as cues."""

    name = "vtt"
    tasks = ("summarize",)
    many_per_file = False

    def write(self, result, out, *, header=False):
        out.write("WEBVTT\n\n")
        if result.summary:
            # A comment: one line without an arrow (a blank line or "-->" would end it); no
            # character references, which a comment does not decode.
            out.write(f"NOTE Summary: {_no_arrow(_one_line(result.summary))}\n\n")
        for seg in result.segments or ():
            out.write(f"{clock(seg.start)} --> {clock(seg.end)}\n{vtt_text(seg.text)}\n\n")


class HtmlWriter(ResultWriter):
    """A self-contained page per video (results/html.py): player, chapters with thumbnails,
    the memory drawn, and the same summary as SRT, VTT and JSON downloads. In a folder of
    them, index.html lists them all."""

    name = "html"
    tasks = ("summarize",)
    many_per_file = False
    index_name = "index.html"

    def __init__(self, folder: Path | None = None):
        self.folder = folder  # where the page goes; None: the current directory

    def placed(self, folder):
        return HtmlWriter(folder)

    def write(self, result, out, *, header=False):
        from .html import render_report

        downloads = {}
        for fmt in ("srt", "vtt", "json"):
            buf = io.StringIO()
            WRITERS[fmt].write(result, buf)
            downloads[fmt] = buf.getvalue()
        out.write(render_report(result, folder=self.folder or Path("."), downloads=downloads, clock=short_clock))

    def index_entry(self, text: str) -> dict | None:
        """What the index shows of a page this writer wrote (None: not such a page)."""
        from .html import report_entry

        return report_entry(text)

    def index_page(self, entries: list[tuple[str, dict]]) -> str:
        """The index of pages: (file name, index_entry) of each."""
        from .html import render_index

        return render_index(entries, clock=short_clock)


WRITERS: dict[str, ResultWriter] = {w.name: w for w in (TextWriter(), JsonWriter(), MarkdownWriter(), SrtWriter(), VttWriter(),
                                                        HtmlWriter())}
EXTENSIONS = {".json": "json", ".jsonl": "json", ".txt": "text", ".md": "md", ".srt": "srt", ".vtt": "vtt",
              ".html": "html", ".htm": "html"}


def get_writer(fmt: str, task: str) -> ResultWriter:
    writer = WRITERS.get(fmt)
    if writer is None:
        raise UsageError(f"Unknown format '{fmt}': choose one of {', '.join(WRITERS)}.")
    if task not in writer.tasks:
        raise UsageError(f"--format {fmt} is for summaries; use text or json for {task}.")
    return writer
