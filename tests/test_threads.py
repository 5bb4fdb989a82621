"""The CPU thread policy: small ops on the cores other processes leave free (issue 11)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from malmm_cli.errors import UsageError
from malmm_cli.engine import threads
from malmm_cli.engine.threads import ThreadPlan, choose_threads, plan_threads, torch_threads


@pytest.fixture(autouse=True)
def _no_thread_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, busy, expected", [(2, 0.0, 2), (2, 2.0, 1), (2, 0.8, 1), (2, 0.4, 2), (8, 3.0, 5),
                                                   (4, 9.0, 1)])
def test_the_team_takes_the_cores_others_leave_free(cores, busy, expected):
    assert choose_threads(cores=cores, busy=busy) == expected


def test_the_user_s_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(cores=2, busy=2.0) is None  # left as the user set it
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert plan_threads(large_model=True) == ThreadPlan(3, 3)
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv(threads.THREADS_ENV, bad)
        with pytest.raises(UsageError, match="MALMM_THREADS must be a positive whole number"):
            plan_threads(large_model=False)


def test_large_ops_keep_every_core_small_ones_yield(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 2.0)  # two busy processes
    assert plan_threads(large_model=True) == ThreadPlan(light=1, heavy=2)
    assert plan_threads(large_model=False) == ThreadPlan(light=1, heavy=1)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    assert plan_threads(large_model=True) == ThreadPlan(2, 2)


def test_torch_threads_sets_and_restores():
    torch.set_num_threads(1)
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_busy_processes_are_seen_and_our_own_threads_are_not():
    idle = threads.busy_elsewhere()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        busy = threads.busy_elsewhere(samples=10)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert busy >= 1.5 and busy >= idle + 1.0, (idle, busy)


def test_a_cli_run_beside_busy_processes_uses_one_thread_for_small_ops(monkeypatch):
    """The analyzer plans threads per video: beside two busy processes on two cores, the tiny
    model (small ops only) runs on one thread."""
    from tests.cli import SAMPLE, TINY, malmm

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 2.0)
    seen = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), original(n)))
    out = malmm("caption", SAMPLE, *TINY, "-q", "--frames", 3, "--beams", 1, "--max-tokens", 2, "--no-cache")
    assert out.exit_code == 0, out.stderr
    assert seen and set(seen) == {1}
