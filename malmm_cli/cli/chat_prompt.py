"""The terminal side of `malmm chat`: the prompt (prompt_toolkit: line editing, history, the
commands completed with Tab) and the transient status shown while an answer is computed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from malmm_cli.interrupts import Terminated
from malmm_cli.results.events import Events

from .chat_requests import COMMANDS

PROMPT = "> "


def prompt_lines(history: Path | None, *, input=None, output=None) -> Iterator[str]:
    """Lines typed at the prompt, until Ctrl-D or Ctrl-C at the prompt (or /quit, which the
    reader sees). `history`: the file that keeps earlier lines (None: this chat's only).
    `input`, `output`: prompt_toolkit's, for tests; by default the terminal (the prompt goes
    to stderr when stdout is redirected)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.output import create_output

    writable = history is not None and os.access(history.parent, os.W_OK) and (
        not history.exists() or os.access(history, os.W_OK))
    session = PromptSession(
        history=FileHistory(str(history)) if writable else InMemoryHistory(),
        auto_suggest=AutoSuggestFromHistory(),
        completer=WordCompleter(list(COMMANDS), sentence=True),  # the whole line: only "/..." completes
        input=input,
        output=output if output is not None or input is not None else create_output(always_prefer_tty=True),
    )
    while True:
        try:
            yield session.prompt(PROMPT)
        except EOFError:  # Ctrl-D
            return
        except KeyboardInterrupt as stop:  # Ctrl-C at the prompt ends the chat; SIGTERM ends it as it ends any command
            if isinstance(stop, Terminated):
                raise
            return


class Thinking(Events):
    """While an answer is computed: one transient line on stderr, the frames the Q-Former has
    replayed and then what the model does ("answering 1 question(s) …"). It listens to the
    session's progress events while it is shown, and leaves nothing on the screen."""

    def __init__(self, shown: bool, session):
        self.shown, self.session = shown, session
        self.status = None
        self.total = 0

    def __enter__(self) -> Thinking:
        if self.shown:
            from rich.console import Console

            self.status = Console(file=sys.stderr).status("thinking …", spinner="dots")
            self.status.start()
            self.session.events = self
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.session.events = Events()

    def started(self, source, info, sampling, capacity):
        self.total = len(sampling.indices)

    def frames(self, done, timestamp, memory):
        self._say(f"thinking: {done}/{self.total} frames")

    def stage(self, text):
        self._say(f"{text} …")

    def _say(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)

    def close(self):
        if self.status is not None:
            self.status.stop()
            self.status = None


def show_seconds(seconds: float) -> None:
    """What an answer took, dimmed, on stderr: follow-up questions are cheap, and this shows it."""
    from rich.console import Console

    Console(file=sys.stderr).print(f"({seconds:.2f} s)", style="dim", highlight=False)
