"""Frames -> answers: the model for a command, the session that reads a source once and keeps
it, the one-pass loop, the feature cache, tasks and presets, and the CPU thread policy.

The public API is the session (engine/session.py): ``from malmm_cli.engine import Session``.
It is imported on first use, so that the command line can import presets.py from this package
without the model code.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers and type checkers; at run time on first use (below)
    from .session import Session, SessionOptions, Unit, VideoState

__all__ = ["Session", "SessionOptions", "Unit", "VideoState"]


def __getattr__(name: str):
    if name in __all__:
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
