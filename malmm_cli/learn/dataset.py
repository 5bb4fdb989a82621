"""Labelled data files for `malmm eval` and `malmm train`: a CSV or JSONL, one item per row.

Columns (CSV header or JSONL keys) per task:
  classify  video,label
  ask       video,question,answer
  caption   video,caption
Relative video paths are resolved against the data file's folder, so a data file and its clips
move together; URLs are kept as written (records show every video as the file writes it).
Whether the videos exist is checked by the commands before any model loads
(:func:`check_videos`): train and eval both refuse a data file that names a missing local
video, with its file and line, and report a video that exists but cannot be read per item.

CSV follows the csv module's quoting rules strictly: a quoted field may hold commas, doubled
quotes and line breaks; a quote left open, or text after a closing quote, is an error naming
the line (an open quote would otherwise swallow the rows after it into one field). A line
break inside a caption, question or answer becomes one space (the model reads and writes
one-line text); a video or a label cannot span lines. Reads are bounded (sources/textfiles.py).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from malmm_cli.errors import UsageError
from malmm_cli.sources.inputs import is_url
from malmm_cli.sources.textfiles import MAX_LABEL_CHARS, MAX_ROWS, MAX_TEXT_CHARS, check_length, lines, open_regular

# task -> (target column, needs a question column)
TARGET_COLUMNS = {"classify": "label", "ask": "answer", "caption": "caption"}
TASKS = tuple(TARGET_COLUMNS)


@dataclass(frozen=True)
class Item:
    """One labelled example: what to run (video, question) and what it should give (target)."""

    index: int  # 0-based row number among the data rows, stable across runs (the --resume key)
    video: str  # absolute local path, or a URL as written
    target: str  # the label, answer or caption
    question: str | None = None  # ask only
    # How the row is written, for records and messages; not part of what the item is.
    spec: str = field(default="", compare=False)  # the video as the data file writes it
    where: str = field(default="", compare=False)  # "FILE, line N"

    @property
    def shown(self) -> str:
        """The video as the data file names it (its absolute path if it was built by hand)."""
        return self.spec or self.video


def columns(task: str) -> tuple[str, ...]:
    """The required columns of a data file for `task`, in the order the docs list them."""
    if task not in TARGET_COLUMNS:
        raise UsageError(f"Unknown task '{task}'; use one of: {', '.join(TASKS)}.")
    if task == "ask":
        return ("video", "question", "answer")
    return ("video", TARGET_COLUMNS[task])


def load_dataset(path: str | Path, task: str) -> list[Item]:
    """Read a CSV or JSONL data file into Items; any problem is one UsageError naming file and line."""
    needed = columns(task)
    path = Path(path).expanduser()
    base = path.resolve().parent
    items: list[Item] = []
    with open_regular(path, "data file") as f:
        text = lines(f, path)
        blank, first = 0, None
        for line in text:
            if line.strip():
                first = line
                break
            blank += 1
        if first is not None:
            text = itertools.chain(itertools.repeat("\n", blank), [first], text)  # line numbers stay the file's
            if _is_jsonl(path, first):
                rows = _jsonl_rows(path, text)
            else:
                rows = _csv_rows(path, text, needed)
            for where, row in rows:
                if len(items) == MAX_ROWS:
                    raise UsageError(f"{path} has more than {MAX_ROWS:,} data rows; split it into smaller files.")
                items.append(_item(where, row, needed, task, base, index=len(items)))
    if not items:
        raise UsageError(f"{path} has no data rows; it needs at least one row with {', '.join(needed)}.")
    return items


def _item(where: str, row: dict, needed: tuple[str, ...], task: str, base: Path, *, index: int) -> Item:
    """One row -> Item; extra columns/keys are ignored so data files can carry notes. `where`
    is "FILE, line N" (or "lines N-M" for a CSV row with line breaks in a quoted field)."""
    values = {}
    for column in needed:
        value = row.get(column)
        if value is None:
            raise UsageError(f"{where}: the '{column}' field is missing "
                             f"(the {task} task needs {', '.join(needed)}).")
        if not isinstance(value, str):
            raise UsageError(f"{where}: the '{column}' field must be text, not {_shown(value)}.")
        values[column] = _field(where, column, value)
    return Item(
        index=index,
        video=_resolve_video(values["video"], base),
        target=values[TARGET_COLUMNS[task]],
        question=values.get("question"),
        spec=values["video"],
        where=where,
    )


# Line boundaries as str.splitlines sees them, with the spaces around them: one run -> one space.
_LINE_BREAKS = re.compile(r"(?:[ \t]*(?:\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029])[ \t]*)+")
_ONE_LINE = ("video", "label")  # a path, a class name: a line break there is a quote left open


def _field(where: str, column: str, value: str) -> str:
    """A field's text: stripped; free text on one line; bounded in length (sources/textfiles.py)."""
    value = value.strip()
    if not value:
        raise UsageError(f"{where}: the '{column}' field is empty.")
    if _LINE_BREAKS.search(value):
        if column in _ONE_LINE:
            raise UsageError(f"{where}: the '{column}' field spans several lines; a {column} is one line "
                             "(is a quote left open?).")
        value = _LINE_BREAKS.sub(" ", value)
    if column == "label":
        check_length(value, MAX_LABEL_CHARS, where, "label")
    elif column != "video":
        check_length(value, MAX_TEXT_CHARS, where, column)
    return value


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _resolve_video(spec: str, base: Path) -> str:
    """URLs stay as written; local paths become absolute, relative ones against the data file's folder."""
    if is_url(spec):
        return spec
    video = Path(spec).expanduser()
    return str(video if video.is_absolute() else base / video)


def _is_jsonl(path: Path, first: str) -> bool:
    """By extension; files with any other name are JSONL when their first non-blank character is '{'."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return True
    if suffix in (".csv", ".tsv"):
        return False
    return first.lstrip().startswith("{")


def _jsonl_rows(path: Path, text: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """("FILE, line N", object) for each non-blank line."""
    for number, raw in enumerate(text, start=1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
        except RecursionError:
            raise UsageError(f"{where}: the JSON is nested too deeply to read; each line must be a flat "
                             "object of text fields.") from None
        except ValueError as e:  # e.g. an integer of more than 4,300 digits
            raise UsageError(f"{where}: not valid JSON ({e}).") from None
        if isinstance(row, list) and number == 1 and all(isinstance(x, dict) for x in row):
            raise UsageError(f"{path} holds one JSON list; write one object per line (JSON Lines) instead.")
        if not isinstance(row, dict):
            raise UsageError(f"{where}: each line must be a JSON object, not {type(row).__name__}.")
        yield where, row


def _csv_rows(path: Path, text: Iterator[str], needed: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """("FILE, line N", row) for each non-blank data row; the first row is the header naming the
    columns. strict: a quote left open at the end of the file, or text after a closing quote,
    is an error rather than a field that silently takes in what follows."""
    reader = csv.reader(text, strict=True)
    header: list[str] | None = None
    last = 0  # the line the previous row ended on: a row starts on the next one
    try:
        for fields in reader:
            first, last = last + 1, reader.line_num
            if not any(field.strip() for field in fields):
                continue
            where = f"{path}, line {first}" if first == last else f"{path}, lines {first}-{last}"
            if header is None:
                header = [name.strip().lower() for name in fields]
                missing = [column for column in needed if column not in header]
                if missing:
                    raise UsageError(f"{where}: the header has no '{missing[0]}' column; the first row must name "
                                     f"the columns {','.join(needed)}.")
                continue
            if len(fields) > len(header):
                raise UsageError(f"{where}: {len(fields)} fields but the header has {len(header)} "
                                 "(quote fields that contain commas).")
            # a short row leaves its trailing columns missing, reported by name in _item
            yield where, dict(zip(header, fields))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise UsageError(f"{path}, line {last + 1}: a quote opened on this row is never closed, so the "
                             f"rest of the file (to line {reader.line_num}) would be one field; close the "
                             "quote.") from None
        raise UsageError(f"{path}, line {reader.line_num}: not valid CSV ({e}); a field with a quote or "
                         "a comma in it must be quoted whole, its quotes doubled.") from None


def check_videos(items, label: str = "") -> None:
    """Every local video of the data exists (URLs are fetched later): a missing one is a
    mistake in the data file, refused before any model loads with its file and line. One
    policy for train and eval (a video that exists but cannot be decoded is eval's error
    record, and stops training)."""
    for item in items:
        if not is_url(item.video) and not Path(item.video).is_file():
            where = item.where or f"{label or 'the data'}, row {item.index + 1}"
            raise UsageError(f"{where}: the video {item.shown} does not exist"
                             + (f" ({item.video})." if item.shown != item.video else "."))
