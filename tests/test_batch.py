"""--batch N: videos read in lockstep give the records of reading each alone, through the CLI."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import pytest
import torch

from tests.cli import SAMPLE, TINY, malmm, records, stable
from tests.media import make_resolution_change, make_video

FAST = ["--fps", "2", "--memory", "3", "-q"]  # different lengths: 12, 6, 12 and 4 frames
GEN = ["--beams", "1", "--max-tokens", "4"]
TASKS = {
    "caption": ["caption", *GEN],
    "ask": ["ask", *GEN, "-Q", "where are they?"],  # the question comes after the input
    "classify": ["classify", "--labels", "cooking,dancing,running,swimming"],
}


@pytest.fixture(scope="module", autouse=True)
def fp32():
    """The model in fp32 whatever the CPU: where it has AVX512-BF16 malmm loads bf16, whose 3
    significant digits would let the batched GEMMs' different rounding flip a generated token."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("malmm_cli.engine.loader.default_dtype", lambda device: torch.float32)
        yield


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four clips of three lengths and two frame sizes, and a file that is not a video."""
    folder = tmp_path_factory.mktemp("clips")
    shutil.copy(SAMPLE, folder / "a.mp4")
    make_video(folder / "b.mp4", fps=10, n_frames=30)
    (folder / "c.mp4").write_bytes(b"not a video at all\n" * 10)
    shutil.copy(SAMPLE, folder / "d.mp4")
    make_video(folder / "e.mp4", fps=5, n_frames=8, size=(96, 64))
    return folder


def command(task: str, folder, *extra) -> list:
    name, *options = TASKS[task]
    if task == "ask":
        return [name, folder, "what is happening?", *options, *TINY, *FAST, *extra]
    return [name, folder, *options, *TINY, *FAST, *extra]


def by_input(recs: list[dict]) -> dict[str, dict]:
    """Records keyed by input, timings left out (they are the run's, not the video's)."""
    return {r["input"]: stable(r) for r in recs}


def assert_same_records(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, record in expected.items():
        other = dict(got[name])
        if "labels" in record:  # probabilities: equal up to the rounding of batched GEMMs
            mine, theirs = other.pop("labels"), record["labels"]
            assert [x["label"] for x in mine] == [x["label"] for x in theirs], name
            assert [x["score"] for x in mine] == pytest.approx([x["score"] for x in theirs], abs=1e-4), name
            record = {k: v for k, v in record.items() if k != "labels"}
        assert other == record, name


@pytest.fixture(scope="module")
def alone(clips):
    """Each task's plain run over the folder: {task: (exit code, records by input)}."""
    runs = {}
    for task in TASKS:
        out = malmm(*command(task, clips, "--json", "--no-cache"))
        runs[task] = out.exit_code, by_input(records(out.stdout))
    return runs


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("size", [2, 5])
def test_a_batch_gives_the_records_of_each_video_read_alone(clips, alone, task, size, tmp_path):
    out_file = tmp_path / "batch.jsonl"
    out = malmm(*command(task, clips, "--batch", size, "-o", out_file, "--no-cache"))
    code, expected = alone[task]
    assert code == out.exit_code == 1  # c.mp4 is not a video: its error record, and the rest go on
    got = by_input(records(out_file.read_text()))
    assert len(got) == 5
    assert_same_records(got, expected)
    bad = got[str(clips / "c.mp4")]["error"]
    assert bad in out.stderr and "Traceback" not in out.stderr
    # The videos did not all take the same number of frames: the shorter ones ended early.
    assert {r["sampling"]["frames"] for r in got.values() if "sampling" in r} == {4, 6, 12}


def test_a_batch_fills_the_feature_cache_and_reads_it_back(clips, tmp_path, monkeypatch):
    monkeypatch.setenv("MALMM_CACHE_DIR", str(tmp_path / "cache"))
    first = records(malmm(*command("caption", clips, "--batch", 3, "--json")).stdout)
    again = records(malmm(*command("caption", clips, "--batch", 3, "--json")).stdout)
    videos = [r for r in again if "error" not in r]
    assert len(videos) == 4
    # d.mp4 is a copy of a.mp4: in the second group it already finds a.mp4's features.
    assert all(r["timings"]["vision"] > 0 for r in first if "error" not in r and not r["input"].endswith("d.mp4"))
    assert all(r["timings"]["vision"] == 0 for r in videos)  # every video's features came from the cache
    assert by_input(again) == by_input(first)


def test_ctrl_c_keeps_finished_records_and_resume_completes_them(clips, alone, tmp_path):
    out_file = tmp_path / "r.jsonl"

    def interrupt_after_first_record():
        while not (out_file.exists() and out_file.read_text().count("\n") >= 1):
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    watcher = threading.Thread(target=interrupt_after_first_record, daemon=True)
    watcher.start()
    stopped = malmm(*command("caption", clips, "--batch", 2, "-o", out_file, "--no-cache"))
    watcher.join(timeout=60)
    kept = records(out_file.read_text())
    assert stopped.exit_code == 130 and "interrupted;" in stopped.stderr
    assert 1 <= len(kept) < 5
    resumed = malmm(*command("caption", clips, "--batch", 2, "-o", out_file, "--resume", "--no-cache"))
    assert resumed.exit_code == 1  # the broken file again
    got = records(out_file.read_text())
    assert len(got) == 5 and len({r["input"] for r in got}) == 5  # nothing lost, nothing twice
    assert_same_records(by_input(got), alone["caption"][1])


@pytest.mark.parametrize("args, words", [
    (["--batch", "0"], "--batch must be from 1 to 64 videos"),
    (["--batch", "65"], "--batch must be from 1 to 64 videos"),
    (["--batch", "2", "--ray", "local"], "--batch goes without --ray"),
])
def test_batch_mistakes_are_one_sentence(clips, args, words):
    out = malmm("caption", clips / "a.mp4", *TINY, *args)
    assert out.exit_code == 2 and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_summaries_do_not_take_batch(clips):
    out = malmm("summarize", clips / "a.mp4", *TINY, "--batch", "2")
    assert out.exit_code == 2 and "--batch" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, clips):
    """classify and ask data over synthetic clips, each ask row its own question, one broken video."""
    import json

    from tests.synthetic import make_dataset

    root = tmp_path_factory.mktemp("evaldata")
    data = make_dataset(root, labels=("cat", "dog"), train_per_label=1, test_per_label=3, n_frames=8)
    videos = [row.split(",")[0] for row in data.test.read_text().splitlines()[1:]]
    shutil.copy(clips / "c.mp4", root / "broken.mp4")
    classify = root / "val.csv"
    classify.write_text(data.test.read_text() + "broken.mp4,cat\n")
    questions = ["what is it?", "what colour is the screen?", "is there noise?", "who is there?"]
    ask = root / "qa.jsonl"
    ask.write_text("".join(json.dumps({"video": v, "question": questions[i % 4], "answer": "cat"}) + "\n"
                           for i, v in enumerate(videos + ["broken.mp4"])))
    return {"classify": classify, "ask": ask}


@pytest.mark.parametrize("task", ["classify", "ask"])
def test_eval_in_batches_gives_the_same_predictions(eval_data, task, tmp_path):
    runs = {}
    for batch in (1, 3):
        out_file = tmp_path / f"b{batch}.jsonl"
        out = malmm("eval", eval_data[task], "--task", task, *TINY, "--frames", 4, *(GEN if task == "ask" else ()),
                    "-q", "--no-cache", "--batch", batch, "-o", out_file, "--json")
        assert out.exit_code == 1, out.stderr  # the broken video
        rows = sorted(records(out_file.read_text()), key=lambda r: r["index"])
        (final,) = records(out.stdout)
        runs[batch] = rows, final
    (alone, final1), (batched, final3) = runs[1], runs[3]
    assert len(alone) == 7 and sum("error" in r for r in alone) == 1
    if task == "ask":
        assert len({r["question"] for r in batched}) == 4  # a batch holds different questions
    for a, b in zip(alone, batched):
        a, b = stable(a), stable(b)
        if "top5" in a:
            assert [x["label"] for x in a.pop("top5")] == [x["label"] for x in b.pop("top5")]
        assert a == b
    assert final1["accuracy"] == final3["accuracy"] and final1["n"] == final3["n"] == 6


def test_evaluate_in_python_takes_batch(eval_data, tiny_model):
    from malmm_cli.learn.dataset import load_dataset
    from malmm_cli.learn.evaluate import evaluate

    items = load_dataset(eval_data["ask"], "ask")
    reports = {}
    for batch in (1, 3):
        seen: list[dict] = []
        reports[batch] = evaluate(tiny_model, items, "ask", frames=4, beams=1, max_tokens=2, batch=batch,
                                  on_record=seen.append).to_record()
        assert len(seen) == 7 and sum("error" in r for r in seen) == 1
    assert reports[1] == reports[3]


def test_a_video_failing_mid_batch_gets_its_error_and_the_others_go_on(clips, alone, tmp_path, monkeypatch):
    from malmm_cli.engine.analyze import Analyzer
    from malmm_cli.errors import VideoError

    features = Analyzer._features

    def failing_after_a_chunk(self, run, **decoding):
        chunks = features(self, run, **decoding)
        if not run.source.input.endswith("a.mp4"):
            yield from chunks
            return
        yield next(chunks)
        chunks.close()
        raise VideoError(f"{run.source.input}: the decoder gave up after its first chunk.")

    monkeypatch.setattr(Analyzer, "_features", failing_after_a_chunk)
    out_file = tmp_path / "mid.jsonl"
    out = malmm(*command("caption", clips, "--batch", 5, "-o", out_file, "--no-cache"))
    got = by_input(records(out_file.read_text()))
    assert out.exit_code == 1 and len(got) == 5
    failed = str(clips / "a.mp4")
    assert got[failed]["error"].endswith("the decoder gave up after its first chunk.")
    assert got[failed]["error"] in out.stderr and "Traceback" not in out.stderr
    expected = {k: v for k, v in alone["caption"][1].items() if k != failed}
    assert_same_records({k: v for k, v in got.items() if k != failed}, expected)


def test_a_failing_batch_step_fails_its_group_and_the_next_group_runs(clips, alone, tmp_path, monkeypatch):
    from models.malmm import VideoBatch

    step = VideoBatch.add_features
    calls = []

    def fails_in_the_first_group(self, features, active=None):
        calls.append(self.videos)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return step(self, features, active)

    monkeypatch.setattr(VideoBatch, "add_features", fails_in_the_first_group)
    out_file = tmp_path / "group.jsonl"
    out = malmm(*command("caption", clips, "--batch", 3, "-o", out_file, "--no-cache"))
    got = by_input(records(out_file.read_text()))
    assert out.exit_code == 1 and len(got) == 5 and "Traceback" not in out.stderr
    first_group = [str(clips / f"{n}.mp4") for n in "abc"]  # c.mp4 failed on its own, before the step
    assert all("error" in got[k] for k in first_group)
    assert "out of memory (simulated)" in got[first_group[0]]["error"]
    later = [str(clips / f"{n}.mp4") for n in "de"]
    assert_same_records({k: got[k] for k in later}, {k: alone["caption"][1][k] for k in later})


def test_a_batch_and_a_solo_run_read_the_same_frames_when_the_resolution_changes(tmp_path):
    """Issue 18 (11a): on a VP9 stream whose frame size changes mid-file, --batch read 59
    frames where a solo run read 41 (decord's threaded VP9 decoding failed at different places
    for one worker reading the whole plan and two reading short runs). Both read the whole
    plan now: every frame decodes (tests/test_video.py checks they are the right ones)."""
    video = tmp_path / "changes.webm"
    make_resolution_change(video, [(160, 120), (320, 240)], n_frames=125, codec="libvpx-vp9",
                           extra_args=["-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8"])
    (solo,) = records(malmm("caption", video, *TINY, *GEN, "--json", "--no-cache", "-q").stdout)
    batch = records(malmm("caption", video, SAMPLE, *TINY, *GEN, "--json", "--no-cache", "--batch", 2, "-q").stdout)
    assert [r["input"] for r in batch] == [str(video), str(SAMPLE)]
    planned = 80  # caption's frame count, all of a 10-second video's 250 frames being there to take
    assert solo["sampling"]["frames"] == batch[0]["sampling"]["frames"] == planned
    assert "warnings" not in solo and "warnings" not in batch[0]
