"""What a line typed in `malmm chat` asks for, and how its answer is shown.

A line is a question, or a command: /caption, /classify, /summarize, /save, /help, /quit.
Commands take the options of the commands they stand for (/classify --labels, /summarize
--every), parsed by argparse. Torch-free, like the rest of the command line's parsing.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import TextIO

from malmm_cli.errors import UsageError
from malmm_cli.results.records import ErrorResult, Result, to_json
from malmm_cli.results.writers import TextWriter, short_clock
from malmm_cli.terminal import shown
from malmm_cli.times import parse_time

HELP = """\
Type a question and press Enter: the answer comes from the video read once
(no decoding, no vision encoder again). Commands:
  /caption [--prompt TEXT]              describe the video
  /classify TASK [--top-k K]            rank a built-in label set (coin,
                                        breakfast, lvu_genre, ...)
  /classify --labels a,b,c [--top-k K] [--prompt TEXT]
                                        rank your own labels (or a file)
  /summarize [--every TIME | --scenes] [--prompt TEXT]
                                        timestamped segments and a summary
  /save [--overwrite] FILE              write this chat's records so far
                                        (JSON Lines)
  /help                                 this text
  /quit                                 leave (or Ctrl-D)
Ctrl-C cancels an answer. Up and Down recall earlier lines."""


@dataclass(frozen=True)
class Request:
    """One line: a question (task "ask"), an analysis command, or a chat command (help, quit, save)."""

    task: str  # ask | caption | classify | summarize | save | help | quit
    args: dict = field(default_factory=dict)  # the task's own options, as build_job takes them


class _Parser(argparse.ArgumentParser):
    """argparse for one command's options: a mistake raises a UsageError (one sentence) instead
    of printing usage and exiting the process."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see /help).")


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _top_k(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if k < 1:
        raise argparse.ArgumentTypeError("K must be 1 or more")
    return k


def _parsers() -> dict[str, _Parser]:
    caption = _Parser(prog="/caption", add_help=False)
    caption.add_argument("--prompt")
    classify = _Parser(prog="/classify", add_help=False)
    classify.add_argument("label_task", nargs="?", metavar="TASK")
    classify.add_argument("--labels")
    classify.add_argument("--top-k", "-k", dest="top_k", type=_top_k)
    classify.add_argument("--prompt")
    summarize = _Parser(prog="/summarize", add_help=False)
    summarize.add_argument("--every", type=_time)
    summarize.add_argument("--scenes", action="store_true")
    summarize.add_argument("--prompt")
    save = _Parser(prog="/save", add_help=False)
    save.add_argument("path", metavar="FILE")
    save.add_argument("--overwrite", action="store_true")
    return {"caption": caption, "classify": classify, "summarize": summarize, "save": save}


COMMANDS = ("/caption", "/classify", "/summarize", "/save", "/help", "/quit")


def parse_line(line: str) -> Request | None:
    """The request on `line`, or None for a blank line; a UsageError for a command misspelt or
    misused."""
    text = line.strip()
    if not text:
        return None
    if not text.startswith("/"):
        return Request("ask", {"questions": [text]})
    name, _, rest = text[1:].partition(" ")
    if name in ("quit", "exit", "help"):
        if rest.strip():
            raise UsageError(f"/{name} takes nothing after it.")
        return Request("quit" if name == "exit" else name)
    parsers = _parsers()
    if name not in parsers:
        raise UsageError(f"Unknown command /{name}: {', '.join(COMMANDS)} (see /help).")
    try:
        words = shlex.split(rest)
    except ValueError as err:  # an unclosed quote
        raise UsageError(f"/{name}: {err} (see /help).") from None
    args = {k: v for k, v in vars(parsers[name].parse_args(words)).items() if v is not None}
    if name == "classify" and ("label_task" in args) == ("labels" in args):
        raise UsageError("/classify takes a built-in label set (/classify coin) or your own (/classify --labels "
                         "a,b,c), one of the two.")
    return Request(name, args)


# ---- answers as they are shown -------------------------------------------------------------


def _flat(text: str) -> str:
    """Text on one line, safe to print: runs of white space (line breaks too) as one space."""
    return shown(" ".join(str(text).split()))


def one_line(result: Result) -> str:
    """An answer as one line (stdout when stdin is not a terminal: one line per line read)."""
    if result.answers is not None:
        return _flat(" ".join(a.answer for a in result.answers))
    if result.labels is not None:
        return ", ".join(f"{_flat(s.label)} ({s.score:.1%})" for s in result.labels)
    if result.segments is not None:
        parts = [f"[{short_clock(s.start)}-{short_clock(s.end)}] {_flat(s.text)}" for s in result.segments]
        return " | ".join(parts + [f"summary: {_flat(result.summary or '')}"])
    return _flat(result.text or "")


def show(result: Result, out: TextIO, *, json_: bool, line: bool) -> None:
    """Print an answer: a JSON record, one line, or as `malmm TASK` prints it on a terminal."""
    if json_:
        out.write(to_json(result.to_record()) + "\n")
    elif line:
        out.write(one_line(result) + "\n")
    else:
        TextWriter().write(result, out)
    out.flush()


def show_error(failed: ErrorResult, out: TextIO, *, json_: bool) -> None:
    """A line that failed, where its answer would be: its error record, or an empty line."""
    out.write((to_json(failed.to_record()) if json_ else "") + "\n")
    out.flush()
