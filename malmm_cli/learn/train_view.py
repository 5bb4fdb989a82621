"""`malmm train`'s progress on stderr: a bar for the vision features, then one per epoch with a
step counter, the running loss and the time left (a terminal); in a log, a line every few
seconds inside each epoch (`epoch 2/6: step 40/120 · loss 3.2100 · 0:45 left`) and one per
epoch. Nothing with --quiet. Implements learn.train.TrainEvents."""

from __future__ import annotations

import time

from .train import TrainEvents

LOG_EVERY_S = 10.0  # in a log, a step line at most this often (and none for an epoch shorter than that)


def clock(seconds: float) -> str:
    """0:45, 12:03, 1:02:03."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def epoch_line(stats) -> str:
    parts = [f"epoch {stats.epoch}/{stats.epochs}: loss {stats.train_loss:.4f}"]
    if stats.val_loss is not None:
        parts.append(f"val loss {stats.val_loss:.4f}")
    if stats.val_metric is not None:
        name = {"accuracy": "val accuracy", "exact_match": "val exact match", "cider": "val CIDEr"}[stats.metric_name]
        parts.append(f"{name} {100 * stats.val_metric:.1f}" + ("%" if stats.metric_name != "cider" else ""))
    if stats.best:
        parts.append("best so far")
    parts.append(f"{stats.seconds:.1f} s")
    return " · ".join(parts)


def make_train_events(quiet: bool, console=None):
    """The view for a run: nothing with --quiet, else a TrainView on stderr."""
    if quiet:
        return TrainEvents()
    from rich.console import Console

    return TrainView(console or Console(stderr=True))


class TrainView(TrainEvents):
    """Rich progress bars on a terminal, lines in a log."""

    def __init__(self, console, log_every: float = LOG_EVERY_S):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console
        self.live = console.is_terminal
        self.log_every = log_every
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("·"),
                                 TimeRemainingColumn(), TextColumn("left"), console=console)
        self.task = None
        self.epoch, self.epochs, self.steps, self.base = 0, 0, 0, None
        self.started = self.last_line = 0.0
        if self.live:
            self.progress.start()

    def features(self, done: int, total: int) -> None:
        if self.live:
            if self.task is None:
                self.task = self.progress.add_task("vision features", total=total, info="")
            self.progress.update(self.task, completed=done)
        elif done == total:
            self.console.print(f"malmm: vision features of {total} clips ready", highlight=False, soft_wrap=True)

    def epoch_started(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps, self.base = epoch, epochs, steps, None
        self.started = self.last_line = time.monotonic()
        if self.live:
            self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, info="")

    def step(self, done: int, loss: float, lr: float) -> None:
        if self.live:
            self.progress.update(self.task, completed=done, info=f"loss {loss:.4f} · lr {lr:.1e}")
            return
        now = time.monotonic()
        if self.base is None:  # a resumed epoch starts past its first steps
            self.base = done - 1
        if done < self.steps and now - self.last_line >= self.log_every:
            self.last_line = now
            left = (now - self.started) / (done - self.base) * (self.steps - done)
            self.console.print(f"malmm: epoch {self.epoch + 1}/{self.epochs}: step {done}/{self.steps} · "
                               f"loss {loss:.4f} · {clock(left)} left", highlight=False, soft_wrap=True)

    def epoch_finished(self, stats) -> None:
        line = epoch_line(stats)
        if self.live:
            self.progress.update(self.task, info=line.split(": ", 1)[1])
        else:
            self.console.print(f"malmm: {line}", highlight=False, soft_wrap=True)  # a log line is one line

    def close(self) -> None:
        if self.live:
            self.progress.stop()
