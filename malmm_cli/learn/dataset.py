"""Labelled data files for `malmm eval` and `malmm train`: a CSV or JSONL, one item per row.

Columns (CSV header or JSONL keys) per task:
  classify  video,label
  ask       video,question,answer
  caption   video,caption
Relative video paths are resolved against the data file's folder, so a data file and its clips
move together; URLs are kept as written. A video that does not exist is not an error here: the
eval reports it per item, like the batch commands do, so one bad clip does not stop a run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from malmm_cli.errors import UsageError
from malmm_cli.sources.inputs import is_url

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
    text = _read_text(path)
    rows = _jsonl_rows(path, text) if _is_jsonl(path, text) else _csv_rows(path, text, needed)
    base = path.resolve().parent
    items: list[Item] = []
    for line, row in rows:
        items.append(_item(path, line, row, needed, task, base, index=len(items)))
    if not items:
        raise UsageError(f"{path} has no data rows; it needs at least one row with {', '.join(needed)}.")
    return items


def _item(path: Path, line: int, row: dict, needed: tuple[str, ...], task: str, base: Path, *, index: int) -> Item:
    """One row -> Item; extra columns/keys are ignored so data files can carry notes."""
    values = {}
    for column in needed:
        value = row.get(column)
        if value is None:
            raise UsageError(f"{path}, line {line}: the '{column}' field is missing "
                             f"(the {task} task needs {', '.join(needed)}).")
        if not isinstance(value, str):
            raise UsageError(f"{path}, line {line}: the '{column}' field must be text, not {json.dumps(value)}.")
        if not value.strip():
            raise UsageError(f"{path}, line {line}: the '{column}' field is empty.")
        values[column] = value.strip()
    return Item(
        index=index,
        video=_resolve_video(values["video"], base),
        target=values[TARGET_COLUMNS[task]],
        question=values.get("question"),
    )


def _resolve_video(spec: str, base: Path) -> str:
    """URLs stay as written; local paths become absolute, relative ones against the data file's folder."""
    if is_url(spec):
        return spec
    video = Path(spec).expanduser()
    return str(video if video.is_absolute() else base / video)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise UsageError(f"The data file {path} does not exist.")
    if path.is_dir():
        raise UsageError(f"The data file {path} is a folder; pass a .csv or .jsonl file.")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often save a BOM
    except UnicodeDecodeError as e:
        raise UsageError(f"The data file {path} is not UTF-8 text (byte {e.start} cannot be read).") from None
    except OSError as e:
        raise UsageError(f"The data file {path} cannot be read ({e.strerror or e}).") from None


def _is_jsonl(path: Path, text: str) -> bool:
    """By extension; files with any other name are JSONL when their first non-blank character is '{'."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return True
    if suffix in (".csv", ".tsv"):
        return False
    return text.lstrip().startswith("{")


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}, line {line}: not valid JSON ({e.msg} at column {e.colno}).") from None
        if isinstance(row, list) and line == 1 and all(isinstance(x, dict) for x in row):
            raise UsageError(f"{path} holds one JSON list; write one object per line (JSON Lines) instead.")
        if not isinstance(row, dict):
            raise UsageError(f"{path}, line {line}: each line must be a JSON object, not {type(row).__name__}.")
        yield line, row


def _csv_rows(path: Path, text: str, needed: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank data row; the first row is the header naming the columns."""
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip().lower() for name in header]
        missing = [column for column in needed if column not in header]
        if missing:
            raise UsageError(
                f"{path}, line 1: the header has no '{missing[0]}' column; the first row must name the "
                f"columns {','.join(needed)}."
            )
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            if len(fields) > len(header):
                raise UsageError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields but the header has {len(header)} "
                    "(quote fields that contain commas)."
                )
            # a short row leaves its trailing columns missing, reported by name in _item
            yield reader.line_num, dict(zip(header, fields))
    except csv.Error as e:
        raise UsageError(f"{path}, line {reader.line_num}: not valid CSV ({e}).") from None
