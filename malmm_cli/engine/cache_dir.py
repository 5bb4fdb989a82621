"""What the malmm cache folder holds, by kind, and tidying it (`malmm cache`): the size of each
kind, clearing kinds, pruning what has not been used for a while.

Everything here can be made again, at a cost: features by the vision encoder, downloads from
their URLs, quantized weights by quantizing, tiny-random by building it. The records of what
malmm wrote (outputs) are the exception: without them malmm treats its own output files as the
user's and replaces none of them (the safe way to be wrong), so they go only when named.

Another malmm may be using the cache meanwhile: an item is renamed out of sight before it is
deleted (a reader holding it open keeps reading), and a record whose lock a running malmm holds
is left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

if os.name == "posix":
    import fcntl


@dataclass(frozen=True)
class Kind:
    name: str  # as `malmm cache clear NAME` takes it
    place: str  # under the cache folder: a folder of items, or one file
    words: str  # what it is, for a person
    noun: str  # what one item is called
    nouns: str  # and more than one
    by_default: bool = True  # cleared by `malmm cache clear` without names


KINDS = {k.name: k for k in (
    Kind("features", "features", "vision features", "entry", "entries"),
    Kind("downloads", "downloads", "downloaded videos", "file", "files"),
    Kind("quantized", "quantized", "quantized LLM weights", "model", "models"),
    Kind("models", "models", "built models (tiny-random)", "model", "models"),
    Kind("precision", "precision.json", "--quant auto's timings", "file", "files"),
    Kind("outputs", "outputs", "records of the files malmm wrote", "record", "records", by_default=False),
)}


@dataclass(frozen=True)
class Usage:
    kind: Kind
    path: Path
    items: int
    bytes: int


def items(root: Path, kind: Kind) -> list[Path]:
    """The items of a kind: the entries of its folder (hidden work files aside), or its one file."""
    place = root / kind.place
    if not place.is_dir():
        return [place] if place.is_file() else []
    found = [p for p in place.iterdir() if not p.name.startswith(".")]
    return [p for p in found if p.suffix == ".json"] if kind.name == "outputs" else found


def size(path: Path) -> int:
    """Bytes under `path` (a file, or a folder's files; links are not followed)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    except FileNotFoundError:  # removed meanwhile by another malmm
        return 0


def usage(root: Path) -> list[Usage]:
    """Each kind: its place, how many items, how many bytes (hidden work files included)."""
    out = []
    for kind in KINDS.values():
        place = root / kind.place
        out.append(Usage(kind, place, len(items(root, kind)), size(place) if place.exists() else 0))
    return out


def remove(root: Path, kinds: list[Kind], older_than: float | None = None) -> tuple[int, int]:
    """Remove the items of `kinds` (with `older_than`, those not modified or used for that many
    seconds); returns (items removed, bytes freed)."""
    now, removed, freed = time.time(), 0, 0
    for kind in kinds:
        for item in items(root, kind):
            try:
                if older_than is not None and now - item.lstat().st_mtime < older_than:
                    continue
            except FileNotFoundError:
                continue
            bytes_ = size(item)
            if _remove(item, lockable=kind.name == "outputs"):
                removed, freed = removed + 1, freed + bytes_
    return removed, freed


def _remove(item: Path, lockable: bool) -> bool:
    """Rename `item` out of sight, then delete it; False if it is gone already or in use."""
    if lockable and _locked(item):
        return False
    hidden = item.with_name(f".{item.name}.{os.getpid()}.trash")
    try:
        os.rename(item, hidden)
    except FileNotFoundError:
        return False
    if hidden.is_dir() and not hidden.is_symlink():
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        hidden.unlink(missing_ok=True)
    return True


def _locked(record: Path) -> bool:
    """Whether a running malmm holds the lock of this record of an output (results/written.py)."""
    if os.name != "posix":
        return False
    try:
        fd = os.open(record, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # releases the lock taken just now
    return False


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'30d', '12h', '2w', '90m', '45s' -> seconds; a ValueError in words otherwise."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        seconds = float(number) * _UNITS[unit or "d"]
    except ValueError:
        raise ValueError(f"'{text}' is not an age: give a number and a unit, as in 30d, 12h, 2w or 90m.") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"'{text}' is not an age: it must be 0 or more and finite.")
    return seconds


# ---- the command's words ------------------------------------------------------------------


def show_usage(as_json: bool) -> int:
    """`malmm cache`: a line per kind, then where the folder is."""
    import json

    from malmm_cli.messages import plural
    from malmm_cli.sources.inputs import cache_root
    from malmm_cli.sources.space import human_bytes

    root = cache_root()
    found = usage(root)
    if as_json:
        for u in found:
            print(json.dumps({"kind": u.kind.name, "what": u.kind.words, "path": str(u.path), "items": u.items,
                              "bytes": u.bytes}))
        return 0
    width = max(len(u.kind.name) for u in found)
    for u in found:
        print(f"{u.kind.name:<{width}}  {human_bytes(u.bytes):>9}  {plural(u.items, u.kind.noun, u.kind.nouns):<12}  {u.kind.words}")
    print(f"{'total':<{width}}  {human_bytes(sum(u.bytes for u in found)):>9}  in {root}")
    return 0


def remove_kinds(names: list[str], older_than: float | None) -> int:
    """`malmm cache clear|prune`: remove the kinds named (none: every kind cleared by default)."""
    import sys

    from malmm_cli.messages import plural
    from malmm_cli.sources.inputs import cache_root
    from malmm_cli.sources.space import human_bytes

    unknown = [n for n in names if n not in KINDS]
    if unknown:
        print(f"malmm: error: Unknown kind '{unknown[0]}'; the kinds are {', '.join(KINDS)}.", file=sys.stderr)
        return 2
    kinds = [KINDS[n] for n in dict.fromkeys(names)] if names else [k for k in KINDS.values() if k.by_default]
    root = cache_root()
    removed, freed = remove(root, kinds, older_than)
    what = ", ".join(k.name for k in kinds)
    print(f"malmm: removed {plural(removed, 'item')} ({human_bytes(freed)}) of {what} in {root}", file=sys.stderr)
    return 0
