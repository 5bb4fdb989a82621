"""`malmm train`, from its options to the exit code: finetune MA-LMM on a labelled data file
and write a checkpoint in the official layout (loads with --checkpoint here and in the
official code).

Everything that can be checked before the model loads is: the options, the data files, and
what -o may touch. The loop itself is learn/train.py; this module is the run and its
progress display (the command's options: cli/train.py).
"""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from pathlib import Path


# ---- checks before the model loads ------------------------------------------------------------


def _validate(o: dict) -> None:
    from malmm_cli.engine.jobs import MAX_FPS, MAX_FRAMES, MAX_MEMORY
    from malmm_cli.errors import UsageError

    if o["epochs"] is not None and o["epochs"] < 1:
        raise UsageError("--epochs must be 1 or more.")
    if o["lr"] is not None and not (math.isfinite(o["lr"]) and 0 < o["lr"] <= 1):
        raise UsageError("--lr must be a number above 0 and at most 1 (the paper uses 1e-4 and 1e-5).")
    if o["batch_size"] is not None and o["batch_size"] < 1:
        raise UsageError("--batch-size must be 1 or more.")
    if o["fps"] is not None and o["frames"] is not None:
        raise UsageError("Use either --fps or --frames, not both.")
    if o["fps"] is not None and not (math.isfinite(o["fps"]) and 0 < o["fps"] <= MAX_FPS):
        raise UsageError(f"--fps must be above 0 and at most {MAX_FPS:g} frames per second.")
    if o["frames"] is not None and not 1 <= o["frames"] <= MAX_FRAMES:
        raise UsageError(f"--frames must be from 1 to {MAX_FRAMES:,}.")
    if o["memory"] is not None and not 0 <= o["memory"] <= MAX_MEMORY:
        raise UsageError(f"--memory must be from 0 (no memory) to {MAX_MEMORY}.")
    if o["prompt"] is not None and (o["task"] == "ask" or not o["prompt"].strip()):
        raise UsageError("--prompt is empty." if o["prompt"].strip() == "" else
                         "--prompt goes with classify and caption; ask builds each prompt from its question.")
    if o["checkpoint"] is not None and not Path(o["checkpoint"]).is_file():
        raise UsageError(f"--checkpoint '{o['checkpoint']}' does not exist.")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(output: Path, overwrite: bool, inputs: list[Path]) -> int:
    """-o may name a new file, an empty one, or, with --overwrite, a checkpoint malmm wrote
    there and nobody changed since (results/written.py); never a folder, a device, a pipe, a
    user's file, nor any input of the run (the data, the validation data, the starting
    checkpoint, a video). Takes the output's lock (a second training to the same file is
    refused at once) and returns it, to be closed when the run ends. Nothing is written here."""
    import stat

    from malmm_cli.errors import UsageError
    from malmm_cli.results.written import Record, file_content, lock

    if output.is_dir():
        raise UsageError(f"-o {output} is a folder; name the checkpoint file to write, e.g. {output / 'ckpt.pth'}.")
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: the folder {output.parent} does not exist.")
    mine = _identity(output)
    if mine is not None and any(_identity(p) == mine for p in inputs):
        raise UsageError(f"-o {output} is one of this run's inputs; write the checkpoint to another file.")
    if mine is not None and not stat.S_ISREG(os.stat(output).st_mode):
        raise UsageError(f"-o {output} is not a regular file (a device, a pipe or a socket); name the checkpoint "
                         "file to write.")
    held = lock(output, f"-o {output} is being written by another malmm process; wait for it to finish or choose "
                        "another -o.")
    try:
        if mine is not None and os.path.getsize(output) > 0:
            if not Record(output, "checkpoint").holds(file_content(output)):
                raise UsageError(f"{output} exists and is not a checkpoint that malmm wrote (or it was changed "
                                 "since); choose another -o, or move it away.")
            if not overwrite:
                raise UsageError(f"{output} holds a checkpoint that malmm wrote; pass --overwrite to replace it, "
                                 "or choose another -o.")
            if not os.access(output, os.W_OK):
                raise UsageError(f"{output} cannot be replaced (not writable).")
        if not os.access(Path(os.path.realpath(output)).parent, os.W_OK):
            raise UsageError(f"-o {output}: the folder {output.parent} is not writable.")
    except BaseException:
        os.close(held)
        raise
    return held


# ---- the run ------------------------------------------------------------------------------------


def run_train(o: dict) -> int:
    """The command: 0 done, 1 a video or the model failed, 2 a usage error, 130/143 interrupted
    (the progress so far saved)."""
    from models import ModelError

    from malmm_cli.errors import MalmmError, os_error_sentence
    from malmm_cli.interrupts import Terminated, sigterm_as_interrupt
    from malmm_cli.messages import setup_logging
    from malmm_cli.terminal import error_line, shown

    from .train import Interrupted

    setup_logging(o["quiet"])
    o = dict(o, task=o["task"].value if isinstance(o["task"], Enum) else o["task"])
    try:
        *prepared, held = _prepare(o)
    except MalmmError as err:
        sys.stderr.write(error_line(err))
        return err.exit_code
    except OSError as err:  # a path the system refuses (a name over 255 bytes, a loop of links)
        sys.stderr.write(error_line(os_error_sentence(err)))
        return 2
    with sigterm_as_interrupt():
        try:
            report = _run(o, *prepared)
        except (MalmmError, ModelError) as err:
            sys.stderr.write(error_line(err))
            return getattr(err, "exit_code", 1)
        except OSError as err:  # a disk that filled up, a folder that went away
            sys.stderr.write(error_line(f"training stopped: {os_error_sentence(err)}"))
            return 1
        except Interrupted as stop:
            kept = f"the progress so far is saved in {shown(str(o['output']))}" if stop.saved else "nothing was saved"
            sys.stderr.write(f"malmm: interrupted {stop.where}; {kept}\n")
            return 143 if isinstance(stop.cause, Terminated) else 130
        finally:
            os.close(held)  # the output's lock
    if not o["quiet"]:
        last = report.epochs[-1]
        sys.stderr.write(f"malmm: saved {shown(str(o['output']))} ({last.epochs} epochs, {report.steps} steps; "
                         f"frames {report.options.frames or report.options.fps}, memory {report.options.memory})\n")
    return 0


def _prepare(o: dict):
    """Options, model choice, data and output, all checked before anything heavy."""
    from .dataset import load_dataset
    from malmm_cli.engine.presets import resolve_model

    _validate(o)
    choice = resolve_model(o["model"])
    items = load_dataset(o["data"], o["task"])
    val_items = load_dataset(o["val"], o["task"]) if o["val"] is not None else None
    inputs = [Path(o["data"])] + ([Path(o["val"])] if o["val"] else []) + ([Path(o["checkpoint"])] if o["checkpoint"] else [])
    for name, rows in ((o["data"], items), (o["val"], val_items or [])):
        _check_videos(name, rows)
    if o["task"] == "classify":
        from malmm_cli.engine.tasks import check_labels

        check_labels(tuple(dict.fromkeys(i.target for i in items + (val_items or []))), "The data's label set")
    inputs += [Path(i.video) for i in items + (val_items or [])]
    held = check_output(Path(o["output"]), o["overwrite"], inputs)
    return choice, items, val_items, held


def _check_videos(data: Path, items) -> None:
    """Every local video of the data exists: training needs all of them, so a missing one is
    a mistake in the data file, found before the model loads (URLs are fetched later)."""
    from malmm_cli.errors import UsageError
    from malmm_cli.sources.inputs import is_url

    for item in items:
        if not is_url(item.video) and not Path(item.video).is_file():
            raise UsageError(f"{item.where or data}: the video {item.video} does not exist.")


def _run(o: dict, choice, items, val_items):
    from types import SimpleNamespace

    from malmm_cli.errors import UsageError
    from malmm_cli.engine.features import FeatureCache
    from malmm_cli.sources.inputs import cache_root
    from malmm_cli.engine.loader import model_id
    from .train import TrainOptions, load_for_training, train

    options = TrainOptions(task=o["task"], epochs=o["epochs"], lr=o["lr"], batch_size=o["batch_size"],
                           frames=o["frames"], fps=o["fps"], memory=o["memory"], prompt=o["prompt"], seed=o["seed"])
    device = None if o["device"] == "auto" else o["device"]
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not '{device}'.")
    events = make_train_events(o["quiet"])
    if not o["quiet"]:
        sys.stderr.write(f"malmm: loading {choice.label} for training ...\n")
    model = load_for_training(choice.source, checkpoint=o["checkpoint"], device=device)
    cache = None if o["no_cache"] else FeatureCache(cache_root() / "features")
    ident = model_id(choice, SimpleNamespace(checkpoint=o["checkpoint"]), model)
    info = {"model": choice.label, "data": str(Path(o["data"]).resolve()),
            "checkpoint": str(o["checkpoint"]) if o["checkpoint"] else None}
    return train(model, items, options, o["output"], val_items=val_items, cache=cache, model_id=ident,
                 events=events, run_info=info)


# ---- progress on stderr -----------------------------------------------------------------------


def make_train_events(quiet: bool):
    """Rich progress bars on a terminal, a line per epoch otherwise, nothing with --quiet."""
    from rich.console import Console

    from .train import TrainEvents

    if quiet:
        return TrainEvents()
    return TrainView(Console(stderr=True))


def _epoch_line(stats) -> str:
    parts = [f"epoch {stats.epoch}/{stats.epochs}: loss {stats.train_loss:.4f}"]
    if stats.val_loss is not None:
        parts.append(f"val loss {stats.val_loss:.4f}")
    if stats.val_accuracy is not None:
        parts.append(f"val accuracy {100 * stats.val_accuracy:.1f}%")
    parts.append(f"{stats.seconds:.1f} s")
    return " · ".join(parts)


class TrainView:
    """A bar for the vision features, then one per epoch with the running loss (a terminal),
    or a line per epoch (a log). Implements learn.train.TrainEvents."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self.task = None
        if self.live:
            self.progress.start()

    def features(self, done: int, total: int) -> None:
        if self.live:
            if self.task is None:
                self.task = self.progress.add_task("vision features", total=total, info="")
            self.progress.update(self.task, completed=done)
        elif done == total:
            self.console.print(f"malmm: vision features of {total} clips ready", highlight=False)

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        if self.live:
            self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, info="")

    def step(self, done: int, loss: float, lr: float) -> None:
        if self.live:
            self.progress.update(self.task, completed=done, info=f"loss {loss:.4f} · lr {lr:.1e}")

    def epoch_finished(self, stats) -> None:
        line = _epoch_line(stats)
        if self.live:
            self.progress.update(self.task, info=line.split(": ", 1)[1])
        else:
            self.console.print(f"malmm: {line}", highlight=False)

    def close(self) -> None:
        if self.live:
            self.progress.stop()
