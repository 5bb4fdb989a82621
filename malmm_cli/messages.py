"""What a command says on stderr: the `malmm` logger, one-sentence errors, and notes.

Results go to stdout; everything here goes to stderr, prefixed with "malmm: ".
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("malmm")


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("malmm: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.propagate = False
    # Third-party chatter that says nothing actionable to a user of this tool.
    for name in ("bitsandbytes", "yt_dlp", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def error(message: str, about: str | None = None) -> None:
    """'malmm: error: SENTENCE', naming `about` (an input) unless the sentence already does
    ("clip.mp4 does not exist.")."""
    if about is not None and about not in message:
        message = f"{about}: {message}"
    sys.stderr.write(f"malmm: error: {message}\n")
    sys.stderr.flush()


def note(line: str) -> None:
    sys.stderr.write(f"malmm: {line}\n")
    sys.stderr.flush()
