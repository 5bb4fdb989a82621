"""What made a record (results.records.MadeBy): the weights' checkpoint, the device and each
part's precision, read off the loaded model."""

from __future__ import annotations

import functools
import hashlib
import os

from malmm_cli.results.records import MadeBy

CHECKPOINT_HEX = 16  # digits of the checkpoint's SHA-256 in a record: enough to tell two files apart


def made_by(model) -> MadeBy:
    """The MadeBy of records computed by `model` (a models.MALMM); its `created` is now, so take
    a copy with dataclasses.replace(..., created=records.now()) per record."""
    report = model.overlay_report
    checkpoint = None if report is None else {"path": str(report.path), "sha256": checkpoint_digest(report.path)}
    dtype = {"vision": _name(model.vision_dtype), "qformer": _name(model.qformer_dtype),
             "llm": _name(model.language_model.dtype)}
    return MadeBy(checkpoint=checkpoint, device=model.device.type, dtype=dtype, quant=model.quantization or "none")


def checkpoint_digest(path) -> str:
    """The first CHECKPOINT_HEX digits of the SHA-256 of the file at `path`. A checkpoint can be
    gigabytes: it is read once per process (and again only if its size or time changes)."""
    st = os.stat(path)
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:CHECKPOINT_HEX]


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")
