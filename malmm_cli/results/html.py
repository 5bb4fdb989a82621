"""The summary as a page to look at (`summarize --format html`): one self-contained HTML file
per video, and an index page for a folder of them.

A page holds everything it shows: thumbnails as JPEG data URIs, the memory as inline SVG, the
SRT, VTT and JSON downloads as data: links, its CSS and script inline. The video itself is
linked by its path relative to the page, so the folder can move as a whole. Its
Content-Security-Policy allows exactly that: images from data: URIs, media from the page's own
place, and only the page's own style and script (by SHA-256), so nothing is loaded over the
network and no text that reached the page (file names, model output) can run as script even if
it were not escaped. It is escaped: the templates are rendered by Jinja2 with autoescape on.

Times are formatted by the writers' own clock (passed in as `clock`): writers.py owns time
formatting, and imports this module, not the other way round.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from malmm_cli import __version__
from malmm_cli.terminal import shown

from .chart import memory_chart
from .records import Result, to_json
from .thumbnails import thumbnails, video_file

Clock = Callable[[float], str]

ENTRY_ID = "malmm-entry"  # the report's data for an index page, as a JSON data block
_ENTRY = re.compile(rf'<script type="application/json" id="{ENTRY_ID}">(.*?)</script>', re.DOTALL)
_MIME = {"srt": "application/x-subrip", "vtt": "text/vtt", "json": "application/json"}


@cache
def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("malmm_cli.results", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


@cache
def _asset(name: str) -> str:
    return resources.files("malmm_cli.results").joinpath("templates", name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def policy(script: str | None) -> str:
    """The Content-Security-Policy of a page whose only style is report.css and whose only
    script is `script` (None: no script at all)."""
    scripts = _sha256(script) if script is not None else "'none'"
    return ("default-src 'none'; img-src data:; media-src 'self'; "
            f"style-src {_sha256(_asset('report.css'))}; script-src {scripts}; base-uri 'none'; form-action 'none'")


def _json_block(data: dict) -> str:
    """JSON that can stand inside <script type="application/json">: no '<', '>' or '&' raw, so
    nothing in it can close the element (they are \\u escapes, which JSON reads back as is)."""
    text = to_json(data)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _data_uri(text: str, mime: str) -> str:
    return f"data:{mime};charset=utf-8;base64," + base64.b64encode(text.encode("utf-8", "backslashreplace")).decode()


def _href(path: Path, folder: Path) -> str:
    """`path` as a link from a page in `folder`: relative (the folder can move with its videos),
    each byte of the name percent-encoded (spaces, '#', '?', bytes that are not UTF-8)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    except ValueError:  # another drive (Windows): no relative path exists
        rel = os.path.abspath(path)
    return quote(os.fsencode(rel))


def _title(spec: str) -> str:
    name = spec.rstrip("/").split("?")[0].rsplit("/", 1)[-1] or spec
    return shown(name)


def _percent(score: float) -> str:
    return f"{score:.1%}"


def settings_words(result: Result, clock: Clock) -> list[tuple[str, str]]:
    """(name, value) of what was asked, in words: sampling, memory, segments, labels, decoding."""
    sampling, words = result.sampling, []
    rate = (f"{sampling.fps:g} frame{'' if sampling.fps == 1 else 's'} per second" if sampling.fps is not None
            else f"{sampling.frames} frames spread evenly")
    whole = sampling.start <= 0 and sampling.end >= result.video.duration - 1e-6
    span = "" if whole else f", from {clock(sampling.start)} to {clock(sampling.end)}"
    words.append(("Frames", f"{sampling.frames} read, {rate}{span}"))
    words.append(("Memory", f"{result.memory.length} slots" if result.memory.length else "none (each frame alone)"))
    seg = result.segmentation
    if seg is not None:
        whole_seconds = seg.every is not None and seg.every >= 1 and float(seg.every).is_integer()
        words.append(("Chapters", "at scene changes" if seg.scenes else
                      f"every {clock(seg.every)}" if whole_seconds else f"every {seg.every:g} s"))
    if result.label_set is not None:
        words.append(("Labels", f"{result.label_set} (the top {_top_labels(result)} per chapter)"))
    if result.generation is not None:
        g = result.generation
        words.append(("Decoding", f"{g.num_beams} beams, at most {g.max_new_tokens} new tokens"))
    return words


def _top_labels(result: Result) -> int:
    return max((len(s.labels) for s in result.segments or () if s.labels), default=0)


def _checkpoint(result: Result) -> str | None:
    """The checkpoint a record names, if it names one (records made with --checkpoint)."""
    value = result.made_by.checkpoint if result.made_by is not None else None
    if isinstance(value, dict):
        value = " ".join(str(v) for k, v in value.items() if k in ("path", "sha256") and v)
    return shown(str(value)) if value else None


def _created(result: Result) -> str:
    """When the record was made (its made_by), else now; shown to the minute."""
    if result.made_by is not None and result.made_by.created:
        try:
            made = datetime.datetime.fromisoformat(result.made_by.created)
        except ValueError:
            return result.made_by.created
        return made.strftime("%Y-%m-%d %H:%M %Z").strip()
    return _now()


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def report_context(result: Result, *, folder: Path, downloads: dict[str, str], clock: Clock) -> dict:
    """Everything the report template shows, as plain values (Jinja escapes them)."""
    video = video_file(result.input)
    segments = result.segments or ()
    middles = [(s.start + s.end) / 2 for s in segments]
    pictures = thumbnails(video, middles) if video is not None else [None] * len(segments)
    chapters = []
    for seg, middle, picture in zip(segments, middles, pictures):
        chapters.append(dict(
            start=f"{seg.start:.3f}", end=f"{seg.end:.3f}", begins=clock(seg.start), ends=clock(seg.end),
            middle=clock(middle), text=seg.text, thumbnail=picture,
            labels=[dict(label=s.label, score=f"{s.score:.4f}", percent=_percent(s.score)) for s in seg.labels or ()]))
    stem = Path(_title(result.input)).stem or "summary"
    created = _created(result)
    return dict(
        title=_title(result.input), source=shown(result.input), model=shown(result.model),
        checkpoint=_checkpoint(result), duration=clock(result.video.duration), created=created,
        settings=settings_words(result, clock), summary=result.summary or "",
        url=result.input if result.input.startswith(("http://", "https://")) else None,
        video_src=_href(video, folder) if video is not None else None,
        chapters=chapters, chart=memory_chart(result, clock),
        downloads=[dict(name=f"{stem}.{fmt}", kind=fmt.upper(), href=_data_uri(text, _MIME[fmt]))
                   for fmt, text in downloads.items()],
        warnings=[shown(w) for w in result.warnings], version=__version__,
        entry=dict(v=1, input=result.input, title=_title(result.input), duration=result.video.duration,
                   chapters=len(segments), summary=result.summary or "", model=result.model,
                   thumbnail=next((p for p in pictures if p), None), created=created),
    )


def render_report(result: Result, *, folder: Path, downloads: dict[str, str], clock: Clock) -> str:
    """The report page of one summary. `folder`: where the page goes (its link to the video is
    relative to it); `downloads`: format name (srt, vtt, json) -> the same summary in it."""
    context = report_context(result, folder=folder, downloads=downloads, clock=clock)
    from markupsafe import Markup

    script = _asset("report.js")
    return _environment().get_template("report.html.j2").render(
        **context, entry_json=Markup(_json_block(context.pop("entry"))), css=Markup(_asset("report.css")),
        script=Markup(script), csp=policy(script))


def report_entry(text: str) -> dict | None:
    """What an index page lists of a report page (its title, duration, first thumbnail,
    summary), read back from the page's data block; None if `text` is not a report of ours."""
    match = _ENTRY.search(text)
    if match is None:
        return None
    try:
        entry = json.loads(match.group(1))
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and entry.get("v") == 1 else None


def render_index(entries: Sequence[tuple[str, dict]], *, clock: Clock) -> str:
    """The index page of a folder of reports: (file name, report_entry) of each, in order."""
    from markupsafe import Markup

    rows = []
    for name, entry in entries:
        thumb = entry.get("thumbnail")
        rows.append(dict(
            href=quote(os.fsencode(name)), title=shown(str(entry.get("title", name))),
            duration=clock(float(entry.get("duration") or 0)), chapters=int(entry.get("chapters") or 0),
            summary=str(entry.get("summary", "")),
            thumbnail=thumb if isinstance(thumb, str) and thumb.startswith("data:image/jpeg;base64,") else None))
    return _environment().get_template("index.html.j2").render(
        rows=rows, css=Markup(_asset("report.css")), csp=policy(None), version=__version__,
        created=_now())
