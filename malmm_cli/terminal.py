"""Text as the terminal shows it: names and labels come from the user's files, and a file name
may hold a newline, an escape sequence or bytes that are not UTF-8. Printed raw, a newline
breaks a line in two (a progress line, a table row, an error sentence), and an escape code
moves the cursor, recolours, or retitles the terminal. So everything on stderr, and text
output, shows them as escapes instead; JSON records keep the real text (json escapes it).

A file name that is not valid UTF-8 reaches Python with each bad byte as a lone surrogate
(os.fsdecode's surrogateescape: b"\\xff" -> "\\udcff"); it is shown as that byte, `\\xff`.
"""

from __future__ import annotations

import logging
import re

# C0 controls, DEL and C1 controls (ESC starts a sequence, and so does the one-byte CSI, U+009B);
# the bidirectional overrides and isolates, which reorder what is shown after them; lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shown(text: str, *, lines: bool = False) -> str:
    """`text` safe to print: control characters, bidi overrides and undecodable bytes as escapes
    (`\\n`, `\\x1b`, `\\xff`, `\\u202e`). With `lines`, newlines and tabs stay (a generated
    caption's own line breaks); a name or a label never keeps them."""
    return (_UNSAFE_BUT_LINES if lines else _UNSAFE).sub(_escape, text)


def error_line(err: object) -> str:
    """The one line an error is shown as on stderr."""
    return f"malmm: error: {shown(str(err))}\n"


class ShownFormatter(logging.Formatter):
    """A log formatter whose lines show names escaped (a warning names a file or a label)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shown(super().formatMessage(record))
