"""A user's own text files (data files, label files) and the bounds on the text they hold.

Every read is bounded: only regular files (a FIFO with no writer would block, /dev/zero never
ends), lines of at most MAX_LINE_CHARS, at most MAX_ROWS rows and MAX_LABELS labels, and text
fields of a bounded length, checked in characters before a model loads (a 50 MB label aborted
the tokenizer) and in tokens once its tokenizer is there (every label is scored as a whole
candidate: its tokens go through the LLM and its float32 output layer). Each bound is one
sentence and exit 2.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from malmm_cli.errors import UsageError

MAX_LINE_CHARS = 65_536  # one line of a data or label file (the csv module's own field limit is 131,072)
MAX_ROWS = 1_000_000  # data rows (MSRVTT's 200,000 captions fit five times)
MAX_LABELS = 10_000  # a label set: each label is scored for every video (COIN has 180, Kinetics 700)
MAX_LABEL_CHARS = 200  # one label, before the tokenizer sees it
MAX_TEXT_CHARS = 2_000  # a caption, question or answer (training cuts answers at 256 tokens anyway)
MAX_LABEL_TOKENS = 64  # one label in the model's tokens (COIN's longest: 6 with Vicuna's tokenizer)

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISCHR, "a device"),
          (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path, what: str) -> BinaryIO:
    """`path` opened for reading in binary, or a UsageError: missing, not a regular file,
    unreadable. Opened without blocking, then checked on the open descriptor: opening a FIFO
    that has no writer would otherwise wait forever, and a file swapped in between a check
    and the open cannot slip through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(f"The {what} {path} does not exist.") from None
    except OSError as e:
        raise UsageError(f"The {what} {path} cannot be read ({e.strerror or type(e).__name__}).") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            hint = "pass a .csv or .jsonl file" if what == "data file" else "pass a file"
            raise UsageError(f"The {what} {path} is {kind}; {hint} (only regular files are read).")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def lines(f: BinaryIO, path: Path, *, max_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """The file's lines as text, each with its line ending, split on "\\n" only (a U+2028 or a
    lone "\\r" inside a JSON string or a quoted CSV field stays where it is); the UTF-8 BOM
    spreadsheets write is dropped. A line over `max_chars` characters or one that is not UTF-8
    is a UsageError naming it; no more than one line's worth is ever read ahead."""
    number = 0
    while True:
        raw = f.readline(4 * max_chars + 1)  # UTF-8: at most 4 bytes per character
        if not raw:
            return
        number += 1
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            if len(raw) > 4 * max_chars and e.start >= len(raw) - 3:  # a character cut by the read size
                raise _too_long(path, number, max_chars) from None
            raise UsageError(f"{path}, line {number}: not UTF-8 text (byte {e.start + 1} of the line cannot be "
                             "read); save the file as UTF-8.") from None
        if len(text) > max_chars or (len(raw) > 4 * max_chars and not raw.endswith(b"\n")):
            raise _too_long(path, number, max_chars)
        yield text


def _too_long(path: Path, number: int, max_chars: int) -> UsageError:
    return UsageError(f"{path}, line {number} is longer than {max_chars:,} characters; is it the right file?")


def check_length(text: str, limit: int, where: str, what: str) -> None:
    """A text field of at most `limit` characters, or a UsageError: `where` names the file and
    line (or the option), `what` the field."""
    if len(text) > limit:
        raise UsageError(f"{where}: the {what} is {len(text):,} characters long; the limit is {limit:,}.")


def check_label_tokens(tokenizer, labels: Iterable[str], where: str = "--labels") -> None:
    """Every label at most MAX_LABEL_TOKENS tokens of the model's tokenizer (labels are already
    at most MAX_LABEL_CHARS characters, so tokenizing them is cheap)."""
    labels = list(labels)
    counts = tokenizer(labels, add_special_tokens=False).input_ids
    for label, ids in zip(labels, counts):
        if len(ids) > MAX_LABEL_TOKENS:
            shown = label if len(label) <= 40 else label[:37] + "..."
            raise UsageError(f"{where}: the label {shown!r} is {len(ids)} tokens long for this model; "
                             f"labels are scored whole, and the limit is {MAX_LABEL_TOKENS}.")
