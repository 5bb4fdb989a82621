"""Many inputs behind one interface: one by one, --batch lockstep, or --ray workers.

``from malmm_cli.runs import OneByOne, Lockstep, OnRay`` (runs/runners.py); the batch
commands' driver, from options to exit code, is runs/command.py.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers and type checkers; at run time on first use (below)
    from .runners import Lockstep, OnRay, OneByOne, Runner, SessionWorker

__all__ = ["Runner", "OneByOne", "Lockstep", "OnRay", "SessionWorker"]


def __getattr__(name: str):
    if name in __all__:
        from . import runners

        return getattr(runners, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
