"""Stopping a command: SIGTERM taken the way Ctrl-C is, and errors that an interrupt caused.

A command that writes results stops the same way on Ctrl-C and on SIGTERM: the records
written stay, the output's lock is released, and the exit code says which (130, 143).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken down the same path as Ctrl-C: records kept, lock released, exit 143."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While a command runs, SIGTERM raises Terminated (and is noted in the list yielded); the
    previous handler comes back after.
    A second SIGTERM during the clean-up is ignored, so it is not cut short (SIGKILL still works)."""
    fired: list[int] = []  # yielded: SIGTERM's number once it came
    if threading.current_thread() is not threading.main_thread():
        yield fired  # handlers can only be set from the main thread
        return

    def on_sigterm(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield fired
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def exit_code(stop: BaseException, fired: list[int]) -> int:
    """130 for Ctrl-C, 143 for SIGTERM. Ray's ray.wait turns any exception from a signal
    handler into a plain KeyboardInterrupt: whether SIGTERM fired says which it was."""
    return 143 if isinstance(stop, Terminated) or fired else 130


def reraise_interrupt(err: BaseException) -> None:
    """An error raised while an interrupt was being handled (cleanup that could not finish) is
    the interrupt's doing, not the input's: the batch stops as the interrupt asked."""
    seen: set[int] = set()
    cause = err.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        seen.add(id(cause))
        cause = cause.__context__
