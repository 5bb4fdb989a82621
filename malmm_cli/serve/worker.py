"""The model's one thread: requests wait in a bounded queue and are answered one at a time, in
arrival order; each video read is kept for the next question about it.

- One model, one thread. The engine (Session, its Analyzer) holds per-run state and the model
  is one set of weights, so nothing of it runs on two threads at once. Concurrent requests are
  not batched into one model step: lockstep batches equal a lone read only up to float
  rounding, and an answer must not depend on what else is in flight. What is batched is
  exact: requests for the same work on the same video (same question, same options) wait
  together and get the one answer.
- Read once. A video's state (engine Session.read: decoded and through the ViT once) stays,
  keyed by the file (real path, size, modification time) and its sampling, under an LRU
  budget of bytes (and of count: each holds an open file); a follow-up question replays it
  with neither decoding nor the ViT. Requests for the same video queued behind its first share
  that one read. An evicted video comes back from the feature cache, still without the ViT.
- Bounded. At most `max_queue` requests wait behind the one being answered (admit() refuses
  more, with a Retry-After from the recent time per answer). A request past its deadline, or
  whose client left, is dropped from the queue; one already running stops at the engine's next
  progress event (a chunk of frames, a stage), unless a queued request needs the same read.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from malmm_cli.messages import log
from malmm_cli.results.events import Events
from malmm_cli.sources.inputs import VideoSource

from .protocol import ApiError, Usage, Work
from .settings import MAX_KEPT_VIDEOS, ServeSettings

RETRY_AFTER_MAX_S = 60  # the openai client waits out a Retry-After of up to 60 s, then retries


class Abandoned(Exception):
    """Every request waiting for this work has gone (timed out, or its client left)."""


@dataclass(frozen=True)
class VideoId:
    """Which file a source is: a changed file is another video."""

    real_path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, source: VideoSource) -> VideoId:
        real = os.path.realpath(source.path)
        st = os.stat(real)
        return cls(real, st.st_size, st.st_mtime_ns)


@dataclass(eq=False)
class Ticket:
    """One request in the queue: its work, its job (as build_job made it from the options, before
    a checkpoint's trained defaults: what the record's job key is of), its opened video."""

    work: Work
    job: Any  # engine.tasks.Job
    job_key: str
    source: VideoSource
    video: VideoId
    sampling: tuple  # (fps, frames, start, end) as the job reads the video, a checkpoint's frames applied
    deadline: float  # time.monotonic()
    count_tokens: bool = False  # a chat completion: its usage is counted
    future: Future = field(default_factory=Future)
    cancelled: bool = False

    @property
    def live(self) -> bool:
        return not self.cancelled and time.monotonic() < self.deadline

    def cancel(self) -> None:
        self.cancelled = True

    def reading(self) -> tuple:
        """What its video's read is: the file and its sampling (fps None when frames are spread)."""
        return (self.video, *self.sampling)

    def same_work(self, other: Ticket) -> bool:
        return self.video == other.video and self.job == other.job

    def settle(self, outcome: Any = None, error: BaseException | None = None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(outcome)


@dataclass(frozen=True)
class Answer:
    """What a ticket gets: the record as `malmm TASK --json` writes it (its input and job key the
    request's own), and for a chat completion its token counts."""

    result: Any  # results.records.Result
    usage: Usage | None = None


class Watchdog(Events):
    """The engine's progress listener: at each event, work nobody waits for any more stops."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def started(self, *args) -> None:
        self.engine.check()

    def frames(self, *args) -> None:
        self.engine.check()

    def stage(self, text: str) -> None:
        self.engine.check()

    def reading(self, *args) -> None:
        self.engine.check()

    def features(self, *args) -> None:
        self.engine.check()


class Engine:
    """The session's one thread, its queue and its kept videos."""

    def __init__(self, session, settings: ServeSettings):
        self.session = session
        self.settings = settings
        self._lock = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._admitted = 0  # requests between admit() and their answer: queued, opening, running
        self._current: list[Ticket] = []
        self._reading: tuple | None = None  # the read under way: Ticket.reading() of its first ticket
        self._states: OrderedDict[tuple, Any] = OrderedDict()  # Ticket.reading() -> engine VideoState
        self._seconds_per_answer = 1.0  # moving average, for Retry-After
        self._stopping = False
        self.reads = 0  # videos read (decoded and through the ViT, or from the feature cache)
        self.answered = 0
        self._thread = threading.Thread(target=self._loop, name="malmm-engine", daemon=True)

    def start(self) -> None:
        self.session.events = Watchdog(self)
        self._thread.start()

    # ---- the request side (the server's event loop) ------------------------------------------

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Room for one more request, for as long as it lives; a 429 with Retry-After if the queue
        is full."""
        with self._lock:
            if self._admitted > self.settings.max_queue:
                wait = math.ceil(self._seconds_per_answer * (len(self._queue) + 1))
                wait = max(1, min(RETRY_AFTER_MAX_S, wait))
                raise ApiError(429, f"The server is busy (its queue is full: {self.settings.max_queue} waiting); try again "
                               f"in {wait} s.", headers={"Retry-After": str(wait)})
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    def submit(self, ticket: Ticket) -> None:
        with self._lock:
            if self._stopping:
                raise ApiError(503, "The server is shutting down.")
            self._queue.append(ticket)
            self._lock.notify()

    def status(self) -> dict:
        with self._lock:
            return {"queued": len(self._queue), "busy": bool(self._current), "kept_videos": len(self._states),
                    "kept_bytes": sum(s.nbytes for s in self._states.values()), "reads": self.reads,
                    "answered": self.answered}

    def stop(self, wait_s: float) -> None:
        """No more work: queued requests are dropped, the one running stops at its next event."""
        with self._lock:
            self._stopping = True
            for ticket in self._queue:
                ticket.cancel()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(wait_s)
        if not self._thread.is_alive():
            for state in self._states.values():
                state.close()
            self._states.clear()

    # ---- the model's thread ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise Abandoned when no one waits for the work under way (called from the engine)."""
        with self._lock:
            if any(t.live for t in self._current):
                return
            if self._reading is not None and any(t.live and t.reading() == self._reading for t in self._queue):
                return  # a queued request needs this read: it goes on, for that request
        raise Abandoned("every request for this work has gone")

    def _next_group(self) -> list[Ticket] | None:
        """The next ticket and every queued one for the same work (they get one answer); None
        when stopping with nothing left."""
        with self._lock:
            while not self._queue and not self._stopping:
                self._lock.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            twins = [t for t in self._queue if t.same_work(first)]
            for t in twins:
                self._queue.remove(t)
            group = [first, *twins]
            self._current = [t for t in group if t.live]
        for t in group:
            if not t.live:
                t.settle(error=Abandoned("the request timed out or its client left while it waited"))
        return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            live = [t for t in group if t.live]
            started = time.monotonic()
            try:
                if live:
                    self._answer(live)
            except Exception:  # noqa: BLE001 - a bug here must not end the thread every request waits on
                log.exception("the model's thread failed between requests")
            finally:
                self._seconds_per_answer = 0.8 * self._seconds_per_answer + 0.2 * (time.monotonic() - started)
                with self._lock:
                    self._current = []

    def _answer(self, group: list[Ticket]) -> None:
        first = group[0]
        try:
            job = self.session.resolve(first.job)
            state, fresh = self._state(first, job)
            result = state.answer(job)
            if fresh:  # this request paid for the read: its record says so, as a one-pass run's would
                timings = {k: round(v + state.timings.get(k, 0.0), 4) for k, v in result.timings.items()}
                result = replace(result, timings=timings)
            usage = self._usage(job, result) if any(t.count_tokens for t in group) else None
        except Exception as err:  # noqa: BLE001 - each waiting request is told; app.py says it in one sentence
            for t in group:
                t.settle(error=err)
        else:
            self.answered += len(group)
            for t in group:
                t.settle(Answer(replace(result, input=t.source.input, job=t.job_key), usage if t.count_tokens else None))
        finally:
            self._trim()

    def _state(self, ticket: Ticket, job) -> tuple[Any, bool]:
        """The kept state of the ticket's video, sampled as `job` samples, read now if not kept
        (then True)."""
        key = ticket.reading()
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
                return state, False
        with self._lock:
            self._reading = key
        try:
            fps, frames, start, end = ticket.sampling
            state = self.session.read(ticket.source, task=job.task, fps=fps, frames=frames, start=start, end=end)
        finally:
            with self._lock:
                self._reading = None
        self.reads += 1
        with self._lock:
            self._states[key] = state
        return state, True

    def _trim(self) -> None:
        """Drop the least recently used videos beyond the budget (after an answer: never one in use)."""
        with self._lock:
            while self._states and (sum(s.nbytes for s in self._states.values()) > self.settings.keep_bytes
                                    or len(self._states) > MAX_KEPT_VIDEOS):
                _, state = self._states.popitem(last=False)
                state.close()
                log.debug("dropped a kept video (the --keep budget)")

    def _usage(self, job, result) -> Usage:
        """Token counts as OpenAI's usage gives them: the prompt (the question's, and the visual
        tokens the LLM sees first) and the answer."""
        model = self.session.model
        prompt = len(model.tokenizer(job.prompts[0]).input_ids) + model.num_query_tokens
        answer = len(model.tokenizer(result.answers[0].answer, add_special_tokens=False).input_ids)
        return Usage(prompt, answer, answer >= job.generation.max_new_tokens)
