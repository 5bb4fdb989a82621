"""Many inputs behind one interface: a runner takes a session and its units (an input and its
job) and yields each unit's outcome, a Result or an ErrorResult, in the order they finish.

- OneByOne: each input in turn, in this process.
- Lockstep(n): n videos at a time, one batched Q-Former step per frame for all of them.
- OnRay(address): a pool of Ray workers, each with its own session built from the session's
  picklable options (engine SessionOptions), one input at a time per worker.

The batch commands and `malmm eval` both run through them; the caller writes the records, so
it stays the only writer of the output whatever runs the work. With OnRay, local inputs
travel as absolute paths (a shared filesystem must hold them at the same path on every node)
and URLs as they are; video bytes never travel through Ray. Records and error sentences keep
the input as the user spelled it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from malmm_cli.engine.session import Session, SessionOptions, Unit
from malmm_cli.messages import note, plural, setup_logging
from malmm_cli.results.records import ErrorResult, Result
from malmm_cli.sources.inputs import is_url

Outcome = Result | ErrorResult


class Runner:
    """How many units are run. `run` yields (position in `units`, outcome) for every unit,
    exactly once, in the order they finish."""

    def run(self, session: Session, units: Sequence[Unit]) -> Iterator[tuple[int, Outcome]]:
        raise NotImplementedError


@dataclass(frozen=True)
class OneByOne(Runner):
    """Each input in turn, in this process."""

    def run(self, session: Session, units: Sequence[Unit]) -> Iterator[tuple[int, Outcome]]:
        for i, unit in enumerate(units):
            yield i, session.attempt(unit.input, unit.job)


@dataclass(frozen=True)
class Lockstep(Runner):
    """`size` videos at a time in lockstep (caption, ask, classify): each keeps its own memory,
    and its record is what reading it alone gives, up to float rounding. A group ends with its
    longest video."""

    size: int

    def run(self, session: Session, units: Sequence[Unit]) -> Iterator[tuple[int, Outcome]]:
        for start in range(0, len(units), self.size):
            for k, outcome in session.lockstep(units[start : start + self.size]):
                yield start + k, outcome


@dataclass(frozen=True)
class SessionWorker:
    """What each Ray worker runs: a session built once from the driver's options (the model
    loads here), then one unit at a time, exactly as the plain run makes its outcome.
    Picklable (it travels to the workers); a subclass may change `run`."""

    options: SessionOptions

    def __call__(self):
        setup_logging(quiet=False)  # warnings go to the worker's log (Ray's logs directory)
        session = Session(replace(self.options, quiet=True))
        session.model  # noqa: B018 - a worker that cannot load its model says so before taking work
        return partial(self.run, session)

    def run(self, session: Session, item: tuple) -> Outcome:
        """One unit: (the input as given, where this worker finds it, its position, its job)."""
        spec, found_at, _, job = item
        return session.attempt(found_at, job, name=spec)


def where(spec: str) -> str:
    """How a worker finds an input: URLs as they are, files by absolute path."""
    return spec if is_url(spec) else os.path.abspath(os.path.expanduser(spec))


@dataclass(frozen=True)
class OnRay(Runner):
    """A pool of Ray workers on the cluster at `address` (local, auto or HOST:PORT), sized by
    `workers`, `cpus_per_worker` and `gpus_per_worker` (None: chosen from the cluster). Each
    worker builds `worker(session.options)` once and takes one unit at a time, so a short video
    never waits behind a long one; a worker that dies is restarted and its unit tried again."""

    address: str
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    quiet: bool = False
    worker: Any = SessionWorker  # SessionOptions -> the picklable work factory each worker builds

    def run(self, session: Session, units: Sequence[Unit]) -> Iterator[tuple[int, Outcome]]:
        from .ray_exec import Failure, PoolSpec, alive_nodes, plan_pool, ray_session, run_items, worker_env

        items = [(unit.input, where(unit.input), i, unit.job) for i, unit in enumerate(units)]
        spec = PoolSpec(self.workers, self.cpus_per_worker, self.gpus_per_worker,
                        use_gpus=str(session.options.device) != "cpu")
        with ray_session(self.address) as ray:
            plan = plan_pool(alive_nodes(ray), spec, len(items))
            if not self.quiet:
                fit = "" if plan.workers <= plan.fit else f"; {plan.fit} fit at once, the others wait for room"
                note(f"Ray: {plural(plan.workers, 'worker')} on {plural(plan.nodes, 'node')}, "
                     f"{plural(plan.cpus, 'CPU')} and {plural(plan.gpus, 'GPU')} each{fit}; each loads the model ...")
            finished = run_items(ray, items, self.worker(session.options), plan, env=worker_env(),
                                 notify=None if self.quiet else note)
            with contextlib.closing(finished):
                for n, (item, outcome) in enumerate(finished, 1):
                    spec_as_given, _, i, _ = item
                    if isinstance(outcome, Failure):
                        outcome = ErrorResult(spec_as_given, outcome.message)
                    elif not self.quiet and isinstance(outcome, Result):
                        note(f"[{n}/{len(items)}] {spec_as_given}: done, {outcome.sampling.frames} frames in "
                             f"{outcome.timings['total']:.1f} s")
                    yield i, outcome
