"""Disk space, before something large is written: free bytes where a folder is (or would be
created), and sizes in words."""

from __future__ import annotations

import shutil
from pathlib import Path


def free_bytes(folder: Path) -> int | None:
    """Bytes free on the disk that holds `folder`, or its nearest existing parent (it may not
    exist yet); None if that cannot be told."""
    for place in (folder, *folder.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def human_bytes(n: float) -> str:
    """1_234_567 -> '1.2 MB' (powers of 1000, as download sizes are given)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
