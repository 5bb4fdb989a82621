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
    from malmm_cli.engine.tasks import LABEL_SET_NAMES
    from malmm_cli.errors import UsageError

    for name in ("epochs", "batch_size", "accum", "views"):
        if o.get(name) is not None and o[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be 1 or more.")
    if o["lr"] is not None and not (math.isfinite(o["lr"]) and 0 < o["lr"] <= 1):
        raise UsageError("--lr must be a number above 0 and at most 1 (the paper uses 1e-4 and 1e-5).")
    if o["fps"] is not None and o["frames"] is not None:
        raise UsageError("Use either --fps or --frames, not both.")
    if o["fps"] is not None and not (math.isfinite(o["fps"]) and 0 < o["fps"] <= MAX_FPS):
        raise UsageError(f"--fps must be above 0 and at most {MAX_FPS:g} frames per second.")
    if o["frames"] is not None and not 1 <= o["frames"] <= MAX_FRAMES:
        raise UsageError(f"--frames must be from 1 to {MAX_FRAMES:,}.")
    if o["memory"] is not None and not 0 <= o["memory"] <= MAX_MEMORY:
        raise UsageError(f"--memory must be from 0 (no memory) to {MAX_MEMORY}.")
    if o.get("concat") and o["memory"] is not None:
        raise UsageError("--concat has no memory bank: leave out --memory (or leave out --concat).")
    if o["prompt"] is not None and (o["task"] == "ask" or not o["prompt"].strip()):
        raise UsageError("--prompt is empty." if o["prompt"].strip() == "" else
                         "--prompt goes with classify and caption; ask builds each prompt from its question.")
    if o.get("label_set") is not None:
        if o["task"] != "classify":
            raise UsageError("--label-set goes with --task classify.")
        if o["label_set"] not in LABEL_SET_NAMES:
            raise UsageError(f"Unknown --label-set '{o['label_set']}': choose one of {', '.join(LABEL_SET_NAMES)}.")
        if o["prompt"] is not None:
            raise UsageError("--prompt goes without --label-set: a built-in label set trains with the paper's prompt.")
    if o.get("views") is not None and o.get("augment") is False:
        raise UsageError("--views counts augmented views; --no-augment trains on one plain view.")
    _validate_run(o)


def _validate_run(o: dict) -> None:
    from malmm_cli.errors import UsageError

    from .recipe import CAPTION_PRESETS

    if o.get("preset") is not None and (o["task"] != "caption" or o["preset"] not in CAPTION_PRESETS):
        raise UsageError(f"--preset is for --task caption: one of {', '.join(CAPTION_PRESETS)}.")
    if o.get("resume") and o["checkpoint"] is not None:
        raise UsageError("--resume continues from CKPT's own weights; leave out --checkpoint.")
    if o.get("resume") and o["overwrite"]:
        raise UsageError("Use either --resume (continue the run in CKPT) or --overwrite (start again), not both.")
    if o["checkpoint"] is not None and not Path(o["checkpoint"]).is_file():
        raise UsageError(f"--checkpoint '{o['checkpoint']}' does not exist.")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(output: Path, overwrite: bool, inputs: list[Path], kind: str = "checkpoint") -> int:
    """-o may name a new file, an empty one, or, with --overwrite (or --resume), a checkpoint
    malmm wrote there and nobody changed since (results/written.py); never a folder, a device,
    a pipe, a user's file, nor any input of the run (the data, the validation data, the starting
    checkpoint, a video). The same for the files beside it (CKPT.last.pth, CKPT.metrics.jsonl:
    `kind`). Takes the file's lock (a second training to the same file is refused at once) and
    returns it, to be closed when the run ends. Nothing is written here."""
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
            what = "a checkpoint" if kind == "checkpoint" else "a metrics log"
            if not Record(output, kind).holds(file_content(output)):
                raise UsageError(f"{output} exists and is not {what} that malmm wrote (or it was changed "
                                 "since); choose another -o, or move it away.")
            if not overwrite:
                raise UsageError(f"{output} holds {what} that malmm wrote; pass --overwrite to replace it, "
                                 "--resume to continue its training, or choose another -o.")
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
            where = shown(str(_progress_file(o)))
            kept = (f"the progress so far is saved in {where} (malmm train ... --resume continues it)"
                    if stop.saved else "nothing was saved")
            sys.stderr.write(f"malmm: interrupted {stop.where}; {kept}\n")
            return 143 if isinstance(stop.cause, Terminated) else 130
        finally:
            for fd in held:  # the outputs' locks
                os.close(fd)
    if not o["quiet"]:
        _say_saved(o, report)
    return 0


def _progress_file(o: dict) -> Path:
    from .checkpoints import last_path

    return last_path(Path(o["output"])) if o["val"] is not None else Path(o["output"])


def _say_saved(o: dict, report) -> None:
    from malmm_cli.terminal import shown

    from .checkpoints import last_path, metrics_path

    options, out = report.options, Path(o["output"])
    sampling = f"frames {options.frames or options.fps}, " + ("no memory (--concat)" if options.concat else
                                                              f"memory {options.memory}")
    if report.best_epoch is not None:
        sys.stderr.write(f"malmm: saved {shown(str(out))} (the best epoch, {report.best_epoch} of {options.epochs}; "
                         f"{sampling}); the last in {shown(str(last_path(out)))}; "
                         f"metrics in {shown(str(metrics_path(out)))}\n")
    else:
        from malmm_cli.messages import plural

        counted = f"{plural(options.epochs, 'epoch')}, {plural(report.steps, 'step')}"
        sys.stderr.write(f"malmm: saved {shown(str(out))} ({counted}; {sampling}); metrics in "
                         f"{shown(str(metrics_path(out)))}\n")


def _prepare(o: dict):
    """Options, model choice, data and outputs, all checked before anything heavy."""
    from malmm_cli.engine.presets import resolve_model

    from .checkpoints import written_paths
    from .dataset import check_videos, load_dataset

    _validate(o)
    choice = resolve_model(o["model"])
    items = load_dataset(o["data"], o["task"])
    val_items = load_dataset(o["val"], o["task"]) if o["val"] is not None else None
    inputs = [Path(o["data"])] + ([Path(o["val"])] if o["val"] else []) + ([Path(o["checkpoint"])] if o["checkpoint"] else [])
    check_videos(items)
    check_videos(val_items or [])
    if o["task"] == "classify":
        from malmm_cli.engine.tasks import check_labels

        check_labels(tuple(dict.fromkeys(i.target for i in items + (val_items or []))), "The data's label set")
    inputs += [Path(i.video) for i in items + (val_items or [])]
    held = []
    try:
        for path in written_paths(Path(o["output"]), o["val"] is not None):
            kind = "metrics" if path.suffix == ".jsonl" else "checkpoint"
            held.append(check_output(path, o["overwrite"] or bool(o.get("resume")), inputs, kind))
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return choice, items, val_items, held


GIVEN = ("epochs", "lr", "batch_size", "accum", "frames", "fps", "memory", "prompt", "label_set", "views",
         "preset", "seed")


def _options(o: dict):
    """The run's TrainOptions from the command line (None: the defaults, recipe.py)."""
    from .recipe import TrainOptions

    flags = {name: o.get(name) for name in GIVEN if o.get(name) is not None}
    return TrainOptions(task=o["task"], concat=bool(o.get("concat")), ln_vision=bool(o.get("train_ln_vision")),
                        augment=o.get("augment") is not False, **flags)


def _resumed(o: dict):
    """--resume: the options, weights and state of the run CKPT holds (checkpoints.read_resume),
    any option given now that differs refused."""
    import torch

    from malmm_cli.errors import UsageError

    from .checkpoints import check_same_run, read_resume
    from .recipe import TrainOptions

    source, info, state = read_resume(Path(o["output"]))
    given = {name: o.get(name) for name in GIVEN if name != "epochs"}  # more (or fewer) epochs: the run's end moves
    given.update(concat=True if o.get("concat") else None, ln_vision=True if o.get("train_ln_vision") else None,
                 augment=o.get("augment"))
    saved = check_same_run(info, given, Path(o["data"]), Path(o["val"]) if o["val"] else None)
    options = TrainOptions(**{**saved, "epochs": o.get("epochs") or saved.get("epochs")})
    if state.epoch >= options.epochs:
        raise UsageError(f"--resume: the training in {o['output']} is complete ({options.epochs} epochs).")
    optimizer = torch.load(source, map_location="cpu", weights_only=True)["optimizer"]
    return source, options, {"state": state, "optimizer": optimizer}


def _run(o: dict, choice, items, val_items):
    from types import SimpleNamespace

    from malmm_cli.engine.features import FeatureCache
    from malmm_cli.engine.loader import model_id
    from malmm_cli.errors import UsageError
    from malmm_cli.sources.inputs import cache_root

    from .train import load_for_training, train
    from .train_view import make_train_events

    device = None if o["device"] == "auto" else o["device"]
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not '{device}'.")
    start, options, resume = o["checkpoint"], _options(o), None
    if o.get("resume"):
        start, options, resume = _resumed(o)
    events = make_train_events(o["quiet"])
    if not o["quiet"]:
        sys.stderr.write(f"malmm: loading {choice.label} for training ...\n")
    model = load_for_training(choice.source, checkpoint=start, device=device)
    cache = None if o["no_cache"] else FeatureCache(cache_root() / "features")
    ident = model_id(choice, SimpleNamespace(checkpoint=start), model)
    info = {"model": choice.label, "data": str(Path(o["data"]).resolve()),
            "val": str(Path(o["val"]).resolve()) if o["val"] else None,
            "checkpoint": str(o["checkpoint"]) if o["checkpoint"] else None}
    if resume is not None:
        info["checkpoint"] = _previous_start(start)
    return train(model, items, options, o["output"], val_items=val_items, cache=cache, model_id=ident,
                 events=events, run_info=info, resume=resume)


def _previous_start(source: Path):
    """The --checkpoint the resumed run started from (as its checkpoint says)."""
    import torch

    saved = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    return ((saved.get("config") or {}).get("malmm") or {}).get("checkpoint")
