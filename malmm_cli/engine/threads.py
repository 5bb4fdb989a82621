"""How many CPU threads torch should use, given what else is running (issue 11).

torch runs its CPU ops on an OpenMP team of one thread per core. When other processes keep
cores busy, that team is oversubscribed: a team thread waiting at a barrier spins through its
time slice while the thread holding the work is descheduled. Small ops pay for that on every
call: on a 2-core machine beside two busy processes a tiny-random caption took 2.4-5.7x its
quiet time with two threads and 1.7x with one, and the real-size Q-Former step 0.67-0.72 s
with two threads against 0.55-0.58 s with one. Large GEMMs amortise the waits: the real ViT-g
beside the same load took 7.6 s per frame with two threads and 10.1 s with one
(BENCHMARKS.md, "Contention"). Hence two team sizes, chosen before each video: `light` (the
cores others leave free, at least one) for small ops, and `heavy` (all cores) for the
real-size ViT and LLM.

Linux only (it reads /proc); elsewhere, and whenever OMP_NUM_THREADS or MALMM_THREADS is set,
the counts are left as the user or torch set them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from malmm_cli.messages import plural

log = logging.getLogger("malmm")

THREADS_ENV = "MALMM_THREADS"
_SAMPLES = 5
_INTERVAL_S = 0.01


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _procs_running() -> int | None:
    """Runnable threads on the whole machine right now (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _own_running() -> int:
    """This process's runnable threads: its own OpenMP team may still be spinning."""
    running = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        running += stat[stat.rindex(")") + 2] == "R"
    return max(1, running)


def busy_elsewhere(samples: int = _SAMPLES, interval_s: float = _INTERVAL_S) -> float | None:
    """Cores kept busy by other processes: runnable threads not ours, averaged over a few
    samples (a single one catches passing blips). None where /proc cannot tell."""
    counts = []
    for i in range(samples):
        total = _procs_running()
        if total is None:
            return None
        counts.append(max(0, total - _own_running()))
        if i + 1 < samples:
            time.sleep(interval_s)
    return sum(counts) / len(counts)


def choose_threads(cores: int | None = None, busy: float | None = None) -> int | None:
    """The team size for the cores others leave free (at least 1), or None to leave torch's."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get(THREADS_ENV):
        return None
    cores = cores if cores is not None else usable_cores()
    busy = busy if busy is not None else busy_elsewhere()
    if busy is None:
        return None
    return max(1, min(cores, round(cores - busy)))


def configured_threads() -> int | None:
    """MALMM_THREADS, when set: the user's fixed choice (a positive integer)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    from malmm_cli.errors import UsageError

    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{THREADS_ENV} must be a positive whole number of threads, not {value!r}.")
    return int(value)


@dataclass(frozen=True)
class ThreadPlan:
    light: int  # small ops: the Q-Former step, everything of a small model
    heavy: int  # large GEMMs: the real-size ViT and LLM


def plan_threads(large_model: bool) -> ThreadPlan:
    """The team sizes for the next video (see the module docstring)."""
    import torch

    fixed = configured_threads()
    if fixed is not None:
        return ThreadPlan(fixed, fixed)
    current = torch.get_num_threads()
    light = choose_threads()
    if light is None:  # OMP_NUM_THREADS set, or no /proc: torch's own choice for everything
        return ThreadPlan(current, current)
    plan = ThreadPlan(light, usable_cores() if large_model else light)
    log.debug("CPU threads: %d for small ops, %d for large ones (%s usable)", plan.light, plan.heavy,
              plural(usable_cores(), "core"))
    return plan


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with an OpenMP team of `n` threads (cheap to change between ops)."""
    import torch

    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != previous:
            torch.set_num_threads(previous)
