"""Times as people write them on the command line: `90`, `1:30`, `1:02:03.5` (seconds inside).

Torch-free: the CLI parses options with it before anything heavy loads.
"""

from __future__ import annotations

import math
import re

_CLOCK = re.compile(r"^(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?|\.\d+)$")


def parse_time(text: str) -> float:
    """SS, MM:SS or HH:MM:SS, seconds with optional decimals -> seconds (float).

    With colons, minutes and seconds must be below 60 (`1:75` is a typo, not 2:15); a bare
    number of seconds may be any size (`600`). Raises ValueError with the reason.
    """
    value = text.strip()
    match = _CLOCK.match(value)
    if not match:
        raise ValueError(f"'{text}' is not a time: write seconds (90, 12.5), MM:SS (1:30) or HH:MM:SS (1:02:03.5)")
    hours, minutes, seconds = match.groups()
    s = float(seconds)
    if minutes is not None and (s >= 60 or (hours is not None and int(minutes) >= 60)):
        raise ValueError(f"'{text}' is not a time: minutes and seconds after a colon must be below 60")
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + s
    if not math.isfinite(total):
        raise ValueError(f"'{text}' is not a finite time")
    return total
