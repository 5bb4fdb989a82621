"""`malmm eval --ray`: the cases of an eval on Ray workers, scored as one process scores them.

Each worker loads the model once and runs evaluate.run_case, as the plain eval does; the
driver (eval_cli) stays the only writer of the predictions and computes the metrics. Cases
travel with their video as ray_batch.where() spells it (an absolute path every node finds on
the shared filesystem, or the URL); what comes back is mapped to the data file's case by its
index, so records and error sentences name the video as the data file does.

Kept apart from eval_cli so that `malmm --help` does not import what Ray needs.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace
from typing import Any

from .ray_batch import AnalyzerWork, on_ray, where
from .terminal import shown


@dataclass(frozen=True)
class EvalWork(AnalyzerWork):
    """What each worker runs: one eval case -> (its record, the job as this worker ran it).

    The job comes back because only a worker knows it whole: a checkpoint's trained frame
    count and memory length replace the task defaults once the model has loaded, and the
    final record reports them (the driver never loads the model)."""

    def run(self, analyzer, job, item):
        from .evaluate import run_case

        return run_case(analyzer, job, item), job


def run_cases_on_ray(choice, job, todo, opts, given: dict, on_record) -> Any:
    """Run the cases `todo` on the Ray cluster that opts.ray names; `on_record(case, record)`
    gets each case's record (the data file's spelling of its video) as it finishes, in the
    order they finish. Returns the job as the workers ran it (`job` itself if none ran one)."""
    from .evaluate import error_record
    from .ray_exec import Failure

    by_index = {case.index: case for case in todo}
    sent = [replace(case, video=where(case.video)) for case in todo]
    ran = job
    with contextlib.closing(on_ray(opts, sent, EvalWork(choice, opts, job, given))) as finished:
        for n, (item, outcome) in enumerate(finished, 1):
            case = by_index[item.index]
            if isinstance(outcome, Failure):
                record = error_record(case, outcome.message)
            else:
                record, ran = outcome
                record = _as_given(record, case, item.video)
            on_record(case, record)
            if not opts.quiet and "error" not in record:  # a failure is said by on_record
                _note(f"[{n}/{len(todo)}] {case.video}: done")
    return ran


def _as_given(record: dict, case, sent: str) -> dict:
    """A worker's record with the video as the data file names it (its "input", and any
    error sentence that named the path the worker was given)."""
    record = {**record, "input": case.video}
    if "error" in record and sent != case.video:
        record["error"] = record["error"].replace(sent, case.video)
    return record


def _note(line: str) -> None:
    sys.stderr.write(f"malmm: {shown(line)}\n")  # names a video: escaped for the terminal
    sys.stderr.flush()
