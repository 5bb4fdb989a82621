"""The batch commands on Ray (--ray): the same records as one process, from many workers.

The driver (this process) claims the output, sends each input to a worker and writes what
comes back: it stays the only writer, so --resume, Ctrl-C and error records mean what they
mean without Ray. Records are written in the order inputs finish. Workers get local inputs
as absolute paths (a shared filesystem must hold them at the same path on every node) and
URLs as they are; video bytes never travel through Ray. Records and error sentences keep
the input as the user spelled it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from .inputs import is_url
from .outputs import Output
from .results import ErrorResult, Result
from .terminal import shown


@dataclass(frozen=True)
class AnalyzerWork:
    """What each Ray worker builds once: the model and the job as the plain run has them,
    and `run(analyzer, job, item)` for each item. Picklable (it travels to the workers);
    subclasses change `run` (an eval's cases instead of inputs)."""

    choice: Any  # presets.ModelChoice
    opts: Any  # runner.CommonOptions
    job: Any  # tasks.Job, before the checkpoint's trained defaults (applied in the worker)
    given: dict = field(default_factory=dict)  # frames_set, memory_set: see runner._claim_and_run

    def __call__(self) -> Callable[[Any], Any]:
        from .runner import _analyzer, _setup_logging
        from .tasks import with_trained_defaults

        _setup_logging(quiet=False)  # warnings go to the worker's log (Ray's logs directory)
        analyzer = _analyzer(self.choice, replace(self.opts, quiet=True), 1)
        job = with_trained_defaults(self.job, analyzer.model.trained_config, **self.given)
        return partial(self.run, analyzer, job)

    def run(self, analyzer, job, item: tuple[str, str]) -> Result | ErrorResult:
        """One input, (spec as given, where this worker finds it): its Result or ErrorResult,
        exactly as the plain run makes them."""
        from .inputs import open_source
        from .runner import _failure, input_errors

        spec, where = item
        try:
            return analyzer.run(replace(open_source(where), input=spec), job)
        except input_errors() as err:
            # Sentences name the path the worker was given; the record names the user's spelling.
            return ErrorResult(spec, _failure(err).replace(where, spec) if where != spec else _failure(err))


def where(spec: str) -> str:
    """How a worker finds an input: URLs as they are, files by absolute path."""
    return spec if is_url(spec) else os.path.abspath(os.path.expanduser(spec))


def on_ray(opts, items: Sequence[Any], factory: Callable[[], Callable[[Any], Any]]) -> Iterator[tuple[Any, Any]]:
    """(item, outcome) for every item, in the order they finish, from a pool of workers on
    the Ray cluster that --ray names (sized by --workers, --cpus-per-worker,
    --gpus-per-worker). An outcome is what the factory's work returned, or a ray_exec.Failure.
    Close the generator (contextlib.closing) to end the workers and the Ray session."""
    from .ray_exec import PoolSpec, alive_nodes, plan_pool, ray_session, run_items, worker_env

    device = str(getattr(opts.device, "value", opts.device))
    spec = PoolSpec(opts.workers, opts.cpus_per_worker, opts.gpus_per_worker, use_gpus=device != "cpu")
    with ray_session(opts.ray) as ray:
        plan = plan_pool(alive_nodes(ray), spec, len(items))
        if not opts.quiet:
            fit = "" if plan.workers <= plan.fit else f"; {plan.fit} fit at once, the others wait for room"
            _note(f"Ray: {plan.workers} worker(s) on {plan.nodes} node(s), {plan.cpus:g} CPU(s) and {plan.gpus:g} "
                  f"GPU(s) each{fit}; each loads the model ...")
        yield from run_items(ray, items, factory, plan, env=worker_env(),
                             notify=None if opts.quiet else _note)


def run_on_ray(choice, job, todo: list[str], output: Output, opts, given: dict,
               work: type[AnalyzerWork] = AnalyzerWork) -> int:
    """The batch of runner._claim_and_run on Ray: records written here as inputs finish.
    `work` is what the workers run (a subclass of AnalyzerWork changes how an input is run)."""
    from .ray_exec import Failure
    from .runner import record, report_end

    failures = 0
    output.open()
    items = [(spec, where(spec)) for spec in todo]
    with contextlib.closing(on_ray(opts, items, work(choice, opts, job, given))) as finished:
        for n, ((spec, _), outcome) in enumerate(finished, 1):
            if isinstance(outcome, Failure):
                outcome = ErrorResult(spec, outcome.message)
            failures += record(output, spec, outcome)
            if not opts.quiet and isinstance(outcome, Result):
                _note(f"[{n}/{len(todo)}] {spec}: done, {outcome.sampling.frames} frames in "
                      f"{outcome.timings['total']:.1f} s")
    report_end(output, failures, opts)
    return 1 if failures else 0


def _note(line: str) -> None:
    sys.stderr.write(f"malmm: {shown(line)}\n")  # names a video: escaped for the terminal
    sys.stderr.flush()
