"""Hand memory that the process has freed back to the system while a long video runs (issue 18).

glibc's malloc keeps freed memory mapped for reuse: the main heap gives back only what is free
at its top, the arenas of other threads (decoder threads, FFmpeg's own, the
OpenMP team) only what is free at theirs. Every chunk of frames allocates and frees the same
few large buffers (frames, pixels, features, 10-25 MB each), and where they land varies with
how the threads interleave; so the free memory that stays resident is the high-water mark
of an irregular pattern. It rises with the number of chunks, and faster when other work on
the machine makes the threads interleave in more ways: beside two busy processes, peak RSS
was 1.15-1.19x higher for a 2-hour video than for a 10-minute one without this, 1.08-1.09x
with it (BENCHMARKS.md, section 25).

`release_free_memory` (glibc's malloc_trim(0)) returns every whole free page of every arena
to the system, so between chunks only live memory stays resident. A no-op where the C
library has no malloc_trim (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return free heap pages to the system; True if the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
