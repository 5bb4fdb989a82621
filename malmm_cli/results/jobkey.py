"""Which work a result is: a short digest of everything that decides what a command computes
for an input, written into each record so that --resume skips only inputs done the same way.

The digest is taken from the options as given (resolved against the task defaults), before
the model loads: --resume must know what is done without loading a model, and a re-run of
the same command line must find its own records. A finetuned checkpoint may still change
the frame count and memory length once loaded (engine.tasks.with_trained_defaults); those
follow from the checkpoint's identity and from which of the two options the user gave
(job.trained_defaults), so both are part of the digest. How the numbers are computed (device, precision, --quant, the feature
cache) is not: the same request on another machine is the same work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

JOB_KEY_VERSION = 1  # bump when the meaning of a Job field changes, so old records are redone
JOB_KEY_HEX = 16


def job_key(job, choice, checkpoint: Path | None) -> str:
    """16 hex digits of sha256 over a canonical JSON of the job (an engine.tasks.Job, as built
    from the options: before a checkpoint's trained defaults), the model (a ModelChoice) and the
    checkpoint."""
    # The whole Job, not a list of its fields: a field added to it later changes the digest
    # (old records are redone) instead of being forgotten (other work taken for done). The
    # one exception, trained_defaults, goes in under the checkpoint as it always has: without
    # a checkpoint it changes nothing.
    fields = asdict(replace(job, model_label=_model_identity(choice)))
    trained = fields.pop("trained_defaults")
    for f in dataclasses.fields(job):  # fields added later count only once set (records made before stay done)
        if f.metadata.get("key_if_set") and fields[f.name] == f.default:
            del fields[f.name]
    material = {"v": JOB_KEY_VERSION, "job": fields}
    if checkpoint is not None:
        material["checkpoint"] = {**file_identity(checkpoint), "frames_set": "frames" not in trained,
                                  "memory_set": "memory" not in trained}
        from_checkpoint = sorted({"labels", "prompt"} & set(trained))  # classify's label set or prompt
        if from_checkpoint:
            material["checkpoint"]["from_it"] = from_checkpoint
    text = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:JOB_KEY_HEX]


def _model_identity(choice) -> str:
    # Presets and hub ids name their weights; a local folder is named by where it really is,
    # so ./m and /abs/m are one model.
    if choice.preset is None and Path(choice.source).is_dir():
        return os.path.realpath(choice.source)
    return choice.label


def file_identity(path: Path) -> dict:
    """Real path, size and modification time: a checkpoint can be gigabytes, too many to hash
    per command, and replacing or editing the file changes its mtime. Moving or touching it
    makes --resume redo work, the safe way to be wrong."""
    real = os.path.realpath(os.path.expanduser(path))
    try:
        st = os.stat(real)
    except OSError:  # loading the model says what is wrong with it; no record can match this
        return {"path": real}
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
