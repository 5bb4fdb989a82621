"""Benchmark 7: `malmm --help` wall time, and time to the first processed frame with tiny-random.

    python benchmarks/bench_startup.py

Each figure is the median of several fresh processes. Time to first frame is measured from
process start to the progress line reporting the first frame (non-terminal stderr prints
one per processed chunk; --frames 1 makes the first chunk a single frame).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, report

SAMPLE = ROOT / "malmm_cli" / "data" / "sample.mp4"


def help_time(runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "malmm_cli", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_frame_time(cache: Path, runs: int = 5) -> tuple[float, float]:
    """(seconds to the first frame's progress line, seconds to exit) for a caption run."""
    env = dict(os.environ, MALMM_CACHE_DIR=str(cache))
    first, total = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "malmm_cli", "caption", str(SAMPLE), "--model", "tiny-random",
                                 "--frames", "1", "--no-cache"], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT)
        for line in proc.stderr:
            if "1/1 frames" in line:
                first.append(time.perf_counter() - t0)
        proc.wait()
        total.append(time.perf_counter() - t0)
    return statistics.median(first), statistics.median(total)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # One warm-up run writes the tiny checkpoint into this cache.
        subprocess.run([sys.executable, "-m", "malmm_cli", "models", "download", "tiny-random"], check=True,
                       capture_output=True, env=dict(os.environ, MALMM_CACHE_DIR=tmp))
        first, total = first_frame_time(Path(tmp))
    results = {"help_s": round(help_time(), 3), "tiny_random_first_frame_s": round(first, 2),
               "tiny_random_caption_total_s": round(total, 2)}
    report("startup", results, "python benchmarks/bench_startup.py")


if __name__ == "__main__":
    main()
