"""The files a training run writes, and the state that lets `malmm train --resume` continue it.

- ``-o CKPT``: without ``--val`` the last epoch; with ``--val`` the best epoch by the task metric
  (the official runner's ``checkpoint_best.pth``, ``runner_base.py`` lines 400-409);
- ``CKPT.last.pth`` (``ckpt.pth`` -> ``ckpt.last.pth``), with ``--val`` only: the last epoch (the
  official ``checkpoint_latest.pth``);
- ``CKPT.metrics.jsonl`` (``ckpt.metrics.jsonl``): one JSON line per epoch (losses, the metric,
  the learning rate, time), rewritten whole after each epoch.

Every checkpoint is the official layout (``{"model", "optimizer", "config", "scaler", "epoch"}``,
models/training.py); ``config["malmm"]`` holds what the run was (options, data, prompt, label
set) and ``state``: the epoch and step it got to, the optimizer steps taken, the best epoch so
far and the history. Batches are drawn from the seed and the epoch alone, so a resumed run
takes the batches the uninterrupted one would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malmm_cli.errors import MalmmError, UsageError, write_failure
from malmm_cli.results.records import to_json
from malmm_cli.results.written import replace_file


def last_path(output: Path) -> Path:
    return output.with_suffix(".last.pth")


def metrics_path(output: Path) -> Path:
    return output.with_suffix(".metrics.jsonl")


def written_paths(output: Path, with_val: bool) -> list[Path]:
    """What the run writes: -o, its .last.pth (with --val) and its .metrics.jsonl."""
    return [output] + ([last_path(output)] if with_val else []) + [metrics_path(output)]


@dataclass
class TrainState:
    """Where a run is: epoch (0-based) and optimizer steps done in it, steps in all, the best
    epoch so far (1-based, its score), and each finished epoch's line of the metrics log."""

    epoch: int = 0
    step: int = 0
    steps: int = 0
    best_epoch: int | None = None
    best_score: float | None = None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "steps": self.steps, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "history": list(self.history)}

    @classmethod
    def from_dict(cls, data: Any) -> TrainState:
        if not isinstance(data, dict):
            raise UsageError("The checkpoint holds no training state to resume (it was not written by malmm train, "
                             "or by an older malmm).")
        return cls(int(data.get("epoch", 0)), int(data.get("step", 0)), int(data.get("steps", 0)),
                   data.get("best_epoch"), data.get("best_score"), list(data.get("history") or []))


def save(path: Path, write) -> None:
    """Write a checkpoint atomically, its content recorded (results/written.py): the file malmm
    wrote is the one a later `--overwrite` or `--resume` may replace, and no other. A write that
    fails (a full disk) leaves the previous one in place and is one sentence."""
    try:
        replace_file(path, write, "checkpoint")
    except (OSError, RuntimeError) as err:  # torch reports a short write as RuntimeError
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        raise MalmmError(f"The checkpoint could not be written to {path} "
                         f"({write_failure(err, path.parent)}); {kept}.") from None


def write_metrics(path: Path, history: list[dict]) -> None:
    """The metrics log, one line per finished epoch, replaced whole (a reader never sees half)."""
    text = "".join(to_json(line) + "\n" for line in history)
    try:
        replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "metrics")
    except OSError as err:
        raise MalmmError(f"The metrics log could not be written to {path} ({write_failure(err, path.parent)}).") \
            from None


def read_resume(output: Path) -> tuple[Path, dict, TrainState]:
    """The checkpoint to resume from (CKPT.last.pth when the run had --val, else CKPT), its
    `config["malmm"]` and its state; a UsageError when there is none."""
    import torch

    last = last_path(output)
    source = last if last.is_file() else output
    if not source.is_file():
        raise UsageError(f"--resume: there is no {output} (nor {last}) to continue; start without --resume.")
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: one sentence
        raise UsageError(f"--resume: {source} cannot be read as a checkpoint ({str(err).splitlines()[0][:200]}).") \
            from None
    info = (saved.get("config") or {}).get("malmm") if isinstance(saved, dict) else None
    if not isinstance(info, dict) or "state" not in info:
        raise UsageError(f"--resume: {source} holds no training state (it was not written by this malmm train).")
    if info.get("val") and source != last:
        raise UsageError(f"--resume: {last} (the run's last epoch) is missing; {output} holds its best epoch only.")
    return source, info, TrainState.from_dict(info["state"])


def check_same_run(info: dict, given: dict, data: Path, val: Path | None) -> dict:
    """The options of the run being resumed; an option given now that differs is refused (a
    different learning rate or batch would not continue that run, it would start another)."""
    if info.get("data") != str(data.resolve()):
        raise UsageError(f"--resume: that training read {info.get('data')}, not {data.resolve()}.")
    if (info.get("val") or None) != (str(val.resolve()) if val else None):
        raise UsageError("--resume: give the same --val as the run being resumed "
                         f"({info.get('val') or 'none'}).")
    saved = dict(info.get("options") or {})
    for name, value in given.items():
        if value is not None and name in saved and saved[name] != value:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--resume: {flag} {_shown(value)} differs from the run being resumed "
                             f"({_shown(saved[name])}); leave it out, or start a new run.")
    return saved


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else str(value)
