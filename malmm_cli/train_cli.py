"""`malmm train`: finetune MA-LMM on a labelled data file and write a checkpoint in the
official layout (loads with --checkpoint here and in the official code).

Everything that can be checked before the model loads is: the options, the data files, and
what -o may touch. The loop itself is malmm_cli/train.py; this module is the command and its
progress display.
"""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class TrainTask(str, Enum):
    classify = "classify"
    ask = "ask"
    caption = "caption"


def register(app, *, examples, command_class) -> None:
    """Add the `train` command to the Typer app (examples() builds epilogs, command_class is the help class)."""
    app.command("train", cls=command_class, epilog=examples(
        "malmm train train.csv --task classify --epochs 5 -o ckpt.pth",
        "malmm train train.csv --task classify --val val.csv --epochs 5 -o ckpt2.pth",
        "malmm train qa.jsonl --task ask --frames 20 --memory 10 -o qa.pth",
    ))(train)


def train(
    data: Annotated[Path, typer.Argument(
        metavar="DATA", show_default=False,
        help="CSV or JSONL: video,label (classify), video,question,answer (ask) or video,caption (caption); "
        "video paths relative to the file.")],
    task: Annotated[TrainTask, typer.Option(metavar="classify|ask|caption", show_default=False,
                                            help="What the model learns to answer.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="CKPT", show_default=False,
                                         help="Checkpoint file to write (.pth), saved after every epoch.")],
    val: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False, help="Validation data (same columns): loss, and accuracy for "
        "classify, after every epoch.")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False, help="Passes over the data. \\[default: per task, as the paper: 20, 5, 10]")] = None,
    lr: Annotated[Optional[float], typer.Option(
        metavar="LR", show_default=False, help="Peak learning rate. \\[default: 1e-4; caption 1e-5]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", metavar="N", show_default=False, help="Clips per step. \\[default: 16; ask 32]")] = None,
    frames: Annotated[Optional[int], typer.Option(
        metavar="N", show_default=False, help="Frames per clip, spread evenly. \\[default: per task]")] = None,
    fps: Annotated[Optional[float], typer.Option(
        metavar="FPS", show_default=False, help="Sample this many frames per second instead.")] = None,
    memory: Annotated[Optional[int], typer.Option(
        "--memory", metavar="M", show_default=False, help="Memory bank length; 0 = no memory. \\[default: per task]")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        metavar="TEXT", show_default=False, help="Instruction for classify and caption. \\[default: the task's]")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="MODEL", show_default=False,
        help="Preset, local directory or hub id. \\[default: $MALMM_MODEL, else instructblip-vicuna-7b]")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        metavar="FILE", show_default=False, help="Start from these MA-LMM weights (.pth).")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for shuffling and dropout.")] = 42,
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda", help="Where to train.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing CKPT.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the vision feature cache.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")] = False,
):
    """Finetune the Q-Former, query tokens, temporal embedding and projection on your clips
    (ViT and LLM frozen), as MA-LMM trains; write a checkpoint for --checkpoint."""
    raise typer.Exit(run_train(locals()))


# ---- checks before the model loads ------------------------------------------------------------


def _validate(o: dict) -> None:
    from .errors import UsageError
    from .runner import MAX_FPS, MAX_FRAMES, MAX_MEMORY

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
    there and nobody changed since (written.py); never a folder, a device, a pipe, a user's
    file, nor any input of the run (the data, the validation data, the starting checkpoint, a
    video). Takes the output's lock (a second training to the same file is refused at once)
    and returns it, to be closed when the run ends. Nothing is written here."""
    import stat

    from .errors import UsageError
    from .written import Record, file_content, lock

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

    from .errors import MalmmError, os_error_sentence
    from .runner import Terminated, _setup_logging, _sigterm_as_interrupt
    from .terminal import error_line, shown
    from .train import Interrupted

    _setup_logging(o["quiet"])
    o = dict(o, task=o["task"].value if isinstance(o["task"], Enum) else o["task"])
    try:
        *prepared, held = _prepare(o)
    except MalmmError as err:
        sys.stderr.write(error_line(err))
        return err.exit_code
    except OSError as err:  # a path the system refuses (a name over 255 bytes, a loop of links)
        sys.stderr.write(error_line(os_error_sentence(err)))
        return 2
    with _sigterm_as_interrupt():
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
    from .presets import resolve_model

    _validate(o)
    choice = resolve_model(o["model"])
    items = load_dataset(o["data"], o["task"])
    val_items = load_dataset(o["val"], o["task"]) if o["val"] is not None else None
    inputs = [Path(o["data"])] + ([Path(o["val"])] if o["val"] else []) + ([Path(o["checkpoint"])] if o["checkpoint"] else [])
    for name, rows in ((o["data"], items), (o["val"], val_items or [])):
        _check_videos(name, rows)
    if o["task"] == "classify":
        from .tasks import check_labels

        check_labels(tuple(dict.fromkeys(i.target for i in items + (val_items or []))), "The data's label set")
    inputs += [Path(i.video) for i in items + (val_items or [])]
    held = check_output(Path(o["output"]), o["overwrite"], inputs)
    return choice, items, val_items, held


def _check_videos(data: Path, items) -> None:
    """Every local video of the data exists: training needs all of them, so a missing one is
    a mistake in the data file, found before the model loads (URLs are fetched later)."""
    from .errors import UsageError
    from .inputs import is_url

    for item in items:
        if not is_url(item.video) and not Path(item.video).is_file():
            raise UsageError(f"{data}, data row {item.index + 1}: the video {item.video} does not exist.")


def _run(o: dict, choice, items, val_items):
    from types import SimpleNamespace

    from .errors import UsageError
    from .features import FeatureCache
    from .inputs import cache_root
    from .loader import model_id
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
    or a line per epoch (a log). Implements malmm_cli.train.TrainEvents."""

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
