"""The step and --batch benchmarks of this tree against an older commit, side by side in one run.

    python benchmarks/compare_commits.py [--old edec91f] [--rounds 3] [--single-thread]

The old commit is checked out in a temporary `git worktree`. Each round runs, for each tree in
turn (the order alternating round by round, so that a neighbour's load hits both alike), that
tree's own `bench_step.py` (the memory Q-Former step, tiny and real size) and `bench_batch.py`
(tiny-random through the CLI's path, B = 1 and 4, cold cache and warm cache). Each benchmark
writes its figures to the tree's bench-out/; the best of the rounds is compared per figure,
new / old (below 1: faster now), and so is the median.

On a shared machine, wall times swing with the neighbours' load. `--single-thread` runs every
benchmark with one thread (MALMM_THREADS=1, OMP_NUM_THREADS=1, bench_step --threads 1), and
each run's CPU time (user + system, from getrusage) is compared too: a process's own CPU time
moves much less with the load around it than its wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name of the bench-out file, the script's arguments, (figure path, "lower" or "higher" is better)...)
BENCHES = [
    ("step", ["bench_step.py", "--rounds", "3", "--threads", "1", "2", "--sizes", "tiny", "real"],
     [(f"{size}/{n}_threads/memory_best_ms", "lower") for size in ("tiny", "real") for n in (1, 2)]),
    ("batch_tiny", ["bench_batch.py", "--size", "tiny", "--videos", "8", "--frames", "24", "--rounds", "2",
                    "--batches", "1", "4"],
     [("frames_per_s_best/1", "higher"), ("frames_per_s_best/4", "higher")]),
    ("batch_tiny_cached", ["bench_batch.py", "--size", "tiny", "--videos", "8", "--frames", "24", "--rounds", "2",
                           "--batches", "1", "4", "--cache"],
     [("frames_per_s_best/1", "higher"), ("frames_per_s_best/4", "higher")]),
]


def figure(payload: dict, path: str) -> float:
    value = payload
    for key in path.split("/"):
        value = value[key]
    return float(value)


def run(tree: Path, name: str, args: list[str], single: bool) -> tuple[dict, float]:
    """(the benchmark's figures, CPU seconds the run took, its children included)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if single:
        env.update(MALMM_THREADS="1", OMP_NUM_THREADS="1")
        args = [a if not (args[0] == "bench_step.py" and a == "2") else "1" for a in args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as cache:
        env["MALMM_CACHE_DIR"] = cache
        subprocess.run([sys.executable, str(tree / "benchmarks" / args[0]), *args[1:]], cwd=tree / "benchmarks",
                       env=env, check=True, capture_output=True, text=True, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads((tree / "bench-out" / f"{name}.json").read_text()), cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="edec91f")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single-thread", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.old], check=True,
                       capture_output=True)
        try:
            trees = {"old": old, "new": REPO}
            seen: dict[tuple, list[float]] = {}
            machine = ""
            for r in range(args.rounds):
                order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
                for name, bench_args, figures in BENCHES:
                    for which in order:
                        payload, cpu = run(trees[which], name, bench_args, args.single_thread)
                        machine = payload["machine"]
                        for path, _ in figures:
                            if args.single_thread and "2_threads" in path:
                                continue
                            seen.setdefault((name, path, which), []).append(figure(payload, path))
                        seen.setdefault((name, "cpu_s", which), []).append(cpu)
                    print(f"round {r + 1}: {name} done", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False,
                           capture_output=True)
    print(f"\nmachine: {machine}\nold: {args.old}, new: this tree; {args.rounds} rounds"
          + (", one thread" if args.single_thread else "") + "\n")
    print("| benchmark | figure | old best | new best | new / old, best | new / old, median | old max/min |")
    print("|---|---|---|---|---|---|---|")
    for name, _, figures in BENCHES:
        for path, better in [*figures, ("cpu_s", "lower")]:
            if (name, path, "old") not in seen:
                continue
            o, n = seen[(name, path, "old")], seen[(name, path, "new")]
            pick = min if better == "lower" else max
            print(f"| {name} | {path} ({better} is better) | {pick(o):.3f} | {pick(n):.3f} | "
                  f"{pick(n) / pick(o):.3f} | {statistics.median(n) / statistics.median(o):.3f} | "
                  f"{max(o) / min(o):.2f} |")
    print("\nall rounds:", json.dumps({f"{k[0]}:{k[1]}:{k[2]}": [round(x, 3) for x in v] for k, v in seen.items()}))


if __name__ == "__main__":
    main()
