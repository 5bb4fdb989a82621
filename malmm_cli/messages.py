"""What a command says on stderr: the `malmm` logger, one-sentence errors, and notes.

Results go to stdout; everything here goes to stderr, prefixed with "malmm: ", with names and
labels shown escaped (terminal.py): a file name may hold a newline or an escape sequence.
"""

from __future__ import annotations

import logging
import sys

from .terminal import ShownFormatter, error_line, shown

log = logging.getLogger("malmm")


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Warnings on stderr; with `quiet` errors only; with `verbose` also what malmm does and why
    (feature cache hits, thread plans, decoder retries, a failed input's traceback)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShownFormatter("malmm: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING)
    log.propagate = False
    # Third-party chatter that says nothing actionable to a user of this tool.
    for name in ("bitsandbytes", "yt_dlp", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def error(message: str, about: str | None = None) -> None:
    """'malmm: error: SENTENCE', naming `about` (an input) unless the sentence already does
    ("clip.mp4 does not exist.")."""
    if about is not None and about not in message:
        message = f"{about}: {message}"
    sys.stderr.write(error_line(message))
    sys.stderr.flush()


def note(line: str) -> None:
    sys.stderr.write(f"malmm: {shown(line)}\n")
    sys.stderr.flush()


def plural(n: float, noun: str, nouns: str | None = None) -> str:
    """'1 question', '2 questions', '0.5 GPUs': a count and its noun, in agreement."""
    many = nouns or f"{noun}s"
    number = str(n) if isinstance(n, int) else f"{n:g}"
    return f"{number} {noun if n == 1 else many}"
