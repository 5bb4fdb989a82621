"""Many inputs behind one interface: one by one, --batch lockstep, or --ray workers.

``from malmm_cli.runs import OneByOne, Lockstep, OnRay`` (runs/runners.py); the batch
commands' driver, from options to exit code, is runs/command.py.
"""

_PUBLIC = ("Runner", "OneByOne", "Lockstep", "OnRay", "SessionWorker")
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        from . import runners

        return getattr(runners, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
