"""A model that is not downloaded yet is fetched only when there is room for it and the user
asked for it: `malmm models download`, --yes, or a yes on a terminal. Without MALMM_MODEL the
default is a 32 GB download, which must never start unasked. Torch-free."""

from __future__ import annotations

import sys
from pathlib import Path

from malmm_cli.errors import MalmmError


class DownloadRefused(MalmmError):
    """The model is not here, and is not to be fetched now (no room, or not asked for)."""


def needs_download(choice) -> bool:
    """Whether loading `choice` would fetch it from the hub now (not local, not cached, not offline)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or Path(choice.source).is_dir() or choice.source == "tiny-random":
        return False
    return not isinstance(try_to_load_from_cache(choice.source, "config.json"), str)


def check_download(choice, *, confirm: bool, ask=None) -> None:
    """Before a model is fetched: room for it on the disk, and, with `confirm` (the command line
    without --yes), the user's yes: asked on a terminal (`ask`: a function of the question that
    returns the answer; default: a line of stdin), refused in one sentence elsewhere. Raises
    DownloadRefused when it is not to be fetched."""
    from huggingface_hub import constants

    from malmm_cli.sources.space import free_bytes, human_bytes

    cache = Path(constants.HF_HUB_CACHE)
    size = choice.preset.download_bytes if choice.preset else None
    free = free_bytes(cache)
    if size is not None and free is not None and free < size * 1.05:  # a little room beside the weights
        raise DownloadRefused(
            f"{choice.label} needs about {human_bytes(size)} in {cache}, and {human_bytes(free)} are free there; "
            "make room, or set HF_HOME to a disk that has it.")
    if not confirm:
        return
    what = f"{choice.label} ({human_bytes(size)})" if size else choice.label
    if ask is None and not (sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()):
        raise DownloadRefused(
            f"{what} is not downloaded yet; fetch it with `malmm models download {choice.label}`, or add --yes to "
            f"fetch it now (MALMM_MODEL=tiny-random tries malmm without it).")
    question = f"malmm: {what} is not downloaded yet; fetch it now into {cache}? [y/N] "
    answer = (ask or _ask_terminal)(question)
    if answer.strip().lower() not in ("y", "yes"):
        raise DownloadRefused(f"{choice.label} was not downloaded; `malmm models download {choice.label}` "
                                     "fetches it when you are ready.")


def _ask_terminal(question: str) -> str:
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline()
