"""--ray: batches on a local Ray give the records of the plain run, and survive dying workers.

One local Ray serves the whole module (started as `--ray local` starts it, on 127.0.0.1
only); the commands run in this process and join it. Work functions defined here travel to
the workers by value, so the workers need not import this file.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import importlib.util

import pytest

from malmm_cli.runs import ray_exec
from malmm_cli.runs.runners import SessionWorker
from tests.cli import SAMPLE, TINY, malmm, records, stable
from tests.media import make_video

# Not imported here: ray_exec sets up a local Ray before ray is first imported.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

FAST = ["--frames", "8", "--memory", "4", "--beams", "1", "--max-tokens", "3", "-q"]
TWO = ["--workers", "2", "--cpus-per-worker", "1"]


@pytest.fixture(scope="module")
def local_ray():
    """The module's Ray, started by ray_exec as `--ray local` starts it; stopped at the end,
    leaving none of its processes behind."""
    import psutil

    session, started = ray_exec.connect("local")
    assert started, "no Ray may be running in the test process before this module"
    session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    me = psutil.Process()
    yield session
    ours = [p for p in me.children(recursive=True) if _is_ray(p)]
    session.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=15)
    assert not alive, f"Ray processes left running: {[p.info for p in alive]}"


def _is_ray(process) -> bool:
    try:
        return "ray" in " ".join(process.cmdline()).lower() or process.name() in ("raylet", "gcs_server")
    except Exception:  # noqa: BLE001 - a process that ended meanwhile is not left running
        return False


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A folder of three real clips (two lengths, two frame sizes) and one file that is not a video."""
    folder = tmp_path_factory.mktemp("clips")
    shutil.copy(SAMPLE, folder / "a.mp4")
    make_video(folder / "b.mp4", fps=10, n_frames=30)
    shutil.copy(SAMPLE, folder / "c.mp4")
    (folder / "d.mp4").write_bytes(b"not a video at all\n" * 10)
    return folder


def without_timings(recs: list[dict]) -> dict[str, dict]:
    return {r["input"]: stable(r) for r in recs}


@pytest.fixture(scope="module")
def plain(clips):
    """The plain run over the folder: (exit code, stderr, records by input without timings)."""
    out = malmm("caption", clips, *TINY, *FAST, "--json")
    return out.exit_code, out.stderr, without_timings(records(out.stdout))


# ---- safety ------------------------------------------------------------------------------------


def test_local_ray_listens_on_loopback_only(local_ray):
    import psutil

    listening = []
    for process in psutil.Process().children(recursive=True):
        try:
            listening += [c.laddr.ip for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening, "Ray's servers were not found"
    assert set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    assert local_ray.util.get_node_ip_address() == "127.0.0.1"


# ---- the commands ------------------------------------------------------------------------------


def test_a_folder_on_ray_gives_the_plain_runs_records(local_ray, clips, plain, tmp_path):
    out = tmp_path / "ray.jsonl"
    on_ray = malmm("caption", clips, *TINY, *FAST, "--ray", "local", *TWO, "-o", out)
    code, _, expected = plain
    assert code == on_ray.exit_code == 1  # d.mp4 is not a video
    got = without_timings(records(out.read_text()))
    assert got == expected and len(got) == 4
    bad = got[str(clips / "d.mp4")]["error"]
    assert bad in on_ray.stderr and "Traceback" not in on_ray.stderr  # said on stderr, as without Ray


def test_a_worker_that_cannot_load_the_model_stops_the_run_in_one_sentence(local_ray, clips, tmp_path):
    out = tmp_path / "none.jsonl"
    result = malmm("caption", clips / "a.mp4", "--model", "nobody/no-such-model", *FAST, "--ray", "local",
                   "--workers", "1", "-o", out)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("malmm: error: A Ray worker could not start: "), lines
    assert "nobody/no-such-model" in lines[-1] and "Traceback" not in result.stderr
    assert not out.exists()  # nothing written, nothing left behind


def test_ray_options_are_checked_before_anything_starts(clips):
    for args, words in ((["--workers", "2"], "--workers goes with --ray"),
                        (["--ray", "nowhere"], "--ray must be local, auto or HOST:PORT"),
                        (["--ray", "local", "--cpus-per-worker", "0"], "--cpus-per-worker must be a number above 0"),
                        (["--ray", "127.0.0.1:1"], "No Ray cluster answers at 127.0.0.1:1")):
        out = malmm("caption", clips / "a.mp4", *TINY, *args)
        assert out.exit_code == 2 and words in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_ctrl_c_keeps_valid_records_that_resume_completes(local_ray, clips, tmp_path, monkeypatch):
    monkeypatch.chdir(clips.parent)  # inputs spelled relative: the records keep that spelling
    inputs = [f"{clips.name}/{n}.mp4" for n in "abc"]
    out = tmp_path / "r.jsonl"

    def interrupt_after_first_record():
        while not (out.exists() and out.read_text().count("\n") >= 1):
            time.sleep(0.02)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt_after_first_record, daemon=True).start()
    stopped = malmm("caption", *inputs, *TINY, *FAST, "--ray", "local", "--workers", "1", "-o", out)
    assert stopped.exit_code == 130 and "interrupted" in stopped.stderr
    kept = records(out.read_text())  # every line a whole record
    assert 1 <= len(kept) < 3
    resumed = malmm("caption", *inputs, *TINY, *FAST, "--ray", "local", "--workers", "1", "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert sorted(r["input"] for r in records(out.read_text())) == inputs  # each once


# ---- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KilledMidInput(SessionWorker):
    """The real analysis, except that the first run of b.mp4 stops after its first frames and
    waits to be killed (kill -9 from the test); its pid goes to `marker` when it is there."""

    marker: str = ""

    def run(self, session, item):
        if item[0].endswith("b.mp4") and not os.path.exists(self.marker):
            session.events = _WaitForKill(self.marker)
        return super().run(session, item)


class _WaitForKill:
    def __init__(self, marker: str):
        self.marker = marker

    def __getattr__(self, name):
        return lambda *a, **k: None

    def frames(self, *a):
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(60)


def test_a_worker_killed_mid_input_loses_and_repeats_no_record(local_ray, clips, plain, tmp_path):
    from malmm_cli.engine.session import Session, Unit
    from malmm_cli.results.jobkey import job_key
    from malmm_cli.results.outputs import Output
    from malmm_cli.runs import command
    from malmm_cli.runs.runners import OnRay

    marker = tmp_path / "pid"

    def kill_when_there():
        while not marker.exists() or not marker.read_text():
            time.sleep(0.02)
        os.kill(int(marker.read_text()), signal.SIGKILL)

    threading.Thread(target=kill_when_there, daemon=True).start()
    specs = [str(clips / f"{n}.mp4") for n in "abc"]
    opts = command.CommonOptions(model="tiny-random", frames=8, memory=4, beams=1, max_tokens=3, quiet=True,
                                 output=tmp_path / "k.jsonl", ray="local", workers=1)
    choice = command.resolve_model(opts.model)
    job = command.build_job("caption", choice.label, **opts.job_options())
    output = Output("caption", opts.output, None, False, specs)
    output.claim("new", job_key(job, choice, None))
    runner = OnRay("local", workers=1, quiet=True, worker=_bound(KilledMidInput, marker=str(marker)))
    try:
        code = command.write_outcomes(Session(opts.session_options()), [Unit(s, job) for s in specs], runner,
                                      output, quiet=True)
    finally:
        output.close()
    assert marker.exists(), "the worker was never killed"
    got = records(opts.output.read_text())
    assert code == 0 and sorted(r["input"] for r in got) == specs  # each once, none lost
    assert without_timings(got) == {spec: plain[2][spec] for spec in specs}


def _bound(cls, **extra):
    """cls with extra fields fixed, called as OnRay calls its worker class."""
    return lambda options: cls(options, **extra)


@dataclass(frozen=True)
class Sleepy:
    """A light work function: (name, seconds) -> name after sleeping; "poison" kills its worker."""

    def __call__(self):
        return self.work

    @staticmethod
    def work(item):
        name, seconds = item
        if name == "poison":
            os.kill(os.getpid(), signal.SIGKILL)
        if name == "bug":
            raise KeyError("no such thing")
        time.sleep(seconds)
        return name


def _plan(workers: int) -> ray_exec.Plan:
    return ray_exec.Plan(workers=workers, cpus=1, gpus=0, fit=workers, nodes=1)


def test_results_come_in_completion_order_and_none_waits_behind_a_long_one(local_ray):
    items = [("long", 4.0), ("s1", 0.0), ("s2", 0.0), ("s3", 0.0), ("s4", 0.0)]
    done = [name for _, name in ray_exec.run_items(local_ray, items, Sleepy(), _plan(2))]
    assert sorted(done) == sorted(name for name, _ in items)
    assert done[-1] == "long"


def test_an_input_that_kills_every_worker_becomes_an_error_record(local_ray):
    notes = []
    items = [("poison", 0.0), ("ok", 0.0), ("bug", 0.0)]
    outcomes = dict(ray_exec.run_items(local_ray, items, Sleepy(), _plan(1), notify=notes.append))
    assert outcomes[("ok", 0.0)] == "ok"
    assert outcomes[("poison", 0.0)] == ray_exec.Failure(outcomes[("poison", 0.0)].message)
    assert "the worker died 3 times" in outcomes[("poison", 0.0)].message
    assert outcomes[("bug", 0.0)] == ray_exec.Failure("unexpected KeyError: 'no such thing'")
    assert sum("queued again" in n for n in notes) == 2 and any("ready again" in n for n in notes)


# ---- malmm eval --ray ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, tiny_model):
    """Four synthetic clips (tests/synthetic.py) and a broken one in a classify data file, and
    a checkpoint (official layout) trained at 3 frames with memory 2."""
    from tests.official_checkpoint import write_official_checkpoint
    from tests.synthetic import make_dataset

    root = tmp_path_factory.mktemp("evaldata")
    data = make_dataset(root, labels=("cat", "dog"), train_per_label=0, test_per_label=2, n_frames=8)
    (root / "broken.mp4").write_bytes(b"not a video at all\n" * 10)
    with open(data.test, "a") as f:
        f.write("broken.mp4,dog\n")
    write_official_checkpoint(tiny_model, root / "ckpt.pth", num_frames=3, memory_bank_length=2)
    return data.test, root / "broken.mp4", root / "ckpt.pth"


def test_eval_on_ray_scores_as_the_plain_eval(local_ray, eval_data, tmp_path):
    data, broken, ckpt = eval_data
    args = ["eval", data, "--task", "classify", *TINY, "--checkpoint", ckpt, "-q", "--json"]
    plain = malmm(*args, "-o", tmp_path / "plain.jsonl")
    on_ray = malmm(*args, "--ray", "local", *TWO, "-o", tmp_path / "ray.jsonl")
    assert plain.exit_code == on_ray.exit_code == 1, on_ray.stderr  # the broken row

    def by_index(path):
        return {r["index"]: stable(r) for r in records(path.read_text())}

    expected, got = by_index(tmp_path / "plain.jsonl"), by_index(tmp_path / "ray.jsonl")
    assert got == expected and len(got) == 5  # the same predictions, scores and ranks, item by item
    assert got[4]["input"] == broken.name and "error" in got[4]  # the data file's spelling of the video
    assert got[4]["error"] in on_ray.stderr and "Traceback" not in on_ray.stderr

    def final(out):
        (record,) = records(out.stdout)
        return {k: v for k, v in record.items() if k != "predictions"}  # the -o file's name

    assert final(on_ray) == final(plain)
    # The checkpoint's own frames and memory, applied by the workers, are in the final record.
    assert (final(on_ray)["n"], final(on_ray)["errors"], final(on_ray)["frames"], final(on_ray)["memory"]) == (4, 1, 3, 2)


def test_eval_ray_options_are_checked_before_anything_starts(eval_data):
    out = malmm("eval", eval_data[0], "--task", "classify", *TINY, "--workers", "2")
    assert out.exit_code == 2 and "--workers goes with --ray" in out.stderr and "Traceback" not in out.stderr
