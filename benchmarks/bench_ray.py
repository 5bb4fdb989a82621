"""Issue 13: what --ray costs and gives on one machine.

    python benchmarks/bench_ray.py [--rounds 2] [--inputs 8] [--calls 200]

In one local Ray (started as `--ray local` starts it):

- scheduling overhead per input: `run_items` over `--calls` items with a work function that
  returns its item at once, one worker; the wall time per item after the worker is ready
  (the driver's ray.wait loop, one remote call and its result each);
- throughput with 1 and 2 workers (one CPU each): caption on `--inputs` copies of the sample
  clip with tiny-random (runs/runners.py's SessionWorker, as `malmm caption --ray`
  runs it), alternating 1, 2, 1, 2 ... workers, best of `--rounds`. The time counts from
  the first result, so the workers' start (process, imports, model load) is reported apart.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, report

sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Echo:
    """Returns each item as it is: what is left is the cost of scheduling."""

    def __call__(self):
        return _echo


def _echo(item):
    return item


def scheduling_overhead(ray, ray_exec, calls: int) -> dict:
    plan = ray_exec.Plan(workers=1, cpus=1, gpus=0, fit=1, nodes=1)
    stamps = []
    for _ in ray_exec.run_items(ray, range(calls + 1), Echo(), plan):
        stamps.append(time.perf_counter())
    per_item = (stamps[-1] - stamps[0]) / calls  # from the first result: the worker is up
    return {"calls": calls, "per_input_ms": round(per_item * 1000, 2)}


def caption_batch(ray, ray_exec, clips: list[str], workers: int) -> tuple[float, float]:
    """(seconds from start to the first result, seconds from the first result to the last)."""
    from malmm_cli.engine.jobs import build_job
    from malmm_cli.engine.session import SessionOptions
    from malmm_cli.runs.runners import SessionWorker, where

    job = build_job("caption", "tiny-random")
    work = SessionWorker(SessionOptions(model="tiny-random", cache=False))
    plan = ray_exec.Plan(workers=workers, cpus=1, gpus=0, fit=workers, nodes=1)
    t0 = time.perf_counter()
    stamps = []
    items = [(c, where(c), i, job) for i, c in enumerate(clips)]  # as OnRay sends them
    for _, outcome in ray_exec.run_items(ray, items, work, plan):
        assert not hasattr(outcome, "error") and not hasattr(outcome, "message"), outcome
        stamps.append(time.perf_counter())
    return stamps[0] - t0, stamps[-1] - stamps[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    from malmm_cli.runs import ray_exec

    ray, _ = ray_exec.connect("local")
    try:
        overhead = scheduling_overhead(ray, ray_exec, args.calls)
        with tempfile.TemporaryDirectory() as tmp:
            sample = ROOT / "malmm_cli" / "data" / "sample.mp4"
            clips = [shutil.copy(sample, Path(tmp) / f"clip{i}.mp4") for i in range(args.inputs)]
            clips = [str(c) for c in clips]
            runs = {1: [], 2: []}
            for _ in range(args.rounds):
                for workers in (1, 2):
                    runs[workers].append(caption_batch(ray, ray_exec, clips, workers))
                    print(f"{workers} worker(s): start {runs[workers][-1][0]:.1f} s, "
                          f"then {runs[workers][-1][1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    # From the first result to the last: inputs - 1 of them (the first one's end starts the clock).
    best = {w: min(r[1] for r in runs[w]) for w in runs}
    rate = {w: (args.inputs - 1) / best[w] for w in best}
    report("ray", {
        "scheduling": overhead,
        "inputs": args.inputs,
        "start_s": {w: round(min(r[0] for r in runs[w]), 1) for w in runs},
        "batch_after_first_s": {w: [round(r[1], 2) for r in runs[w]] for w in runs},
        "inputs_per_min": {w: round(60 * rate[w], 1) for w in rate},
        "speedup_2_over_1": round(rate[2] / rate[1], 2),
    }, "python benchmarks/bench_ray.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
