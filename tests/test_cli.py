"""The command line end to end with --model tiny-random, on real and synthetic clips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import srt
import webvtt

from tests.cli import SAMPLE, TINY, malmm, records
from tests.media import bigbuckbunny_path, ffmpeg_exe, make_video
from tests.streams import FolderServer



def check_record(record: dict, task: str) -> None:
    """The result record schema of architecture.md."""
    assert record["task"] == task and isinstance(record["input"], str) and record["model"] == "tiny-random"
    video, sampling, memory, timings = record["video"], record["sampling"], record["memory"], record["timings"]
    assert set(video) == {"duration", "fps", "width", "height"} and video["duration"] > 0
    assert set(sampling) == {"fps", "frames", "start", "end"} and sampling["frames"] >= 1
    assert 0 <= sampling["start"] < sampling["end"] <= video["duration"] + 1e-6
    timeline = {"slots", "compressions_at"} if task == "summarize" else set()  # what the memory held, drawn
    assert set(memory) == {"length", "compressions"} | timeline and memory["compressions"] >= 0
    assert set(timings) == {"decode", "vision", "qformer", "llm", "total"}
    assert all(v >= 0 for v in timings.values())
    expected = {"caption": {"text"}, "ask": {"answers"}, "classify": {"labels", "label_set", "label_score"},
                "summarize": {"segments", "summary", "segmentation"}}[task]
    if task != "classify":  # generated text says how it was decoded
        expected = expected | {"generation"}
        assert set(record["generation"]) == {"num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
                                             "repetition_penalty"}
    optional = {"warnings"}
    made_by = {"malmm_version", "checkpoint", "device", "dtype", "quant", "created"}  # each line stands alone
    base = {"input", "task", "model", "video", "sampling", "memory", "timings", "prompt", "job"} | made_by
    assert isinstance(record["prompt"], str) and record["prompt"]  # the instruction the model was given
    assert set(record) - optional == base | expected
    assert set(record["dtype"]) == {"vision", "qformer", "llm"} and record["quant"] in ("none", "8bit", "4bit")


@pytest.fixture(scope="module")
def scenes_video(tmp_path_factory) -> Path:
    """12 s at 10 fps: three 4-second scenes (solid red, green, blue)."""
    path = tmp_path_factory.mktemp("scenes") / "scenes.mp4"
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 230)]
    frames = b"".join(np.full((48, 64, 3), c, np.uint8).tobytes() for c in colours for _ in range(40))
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48",
                    "-r", "10", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-qp", "10", str(path)],
                   input=frames, check=True)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two good videos (one nested), one corrupt .mp4, one text file."""
    root = tmp_path_factory.mktemp("videos")
    (root / "nested").mkdir()
    shutil.copy(SAMPLE, root / "a.mp4")
    make_video(root / "nested" / "b.mp4", fps=10, n_frames=30)
    (root / "corrupt.mp4").write_bytes(SAMPLE.read_bytes()[:2500])
    (root / "notes.txt").write_text("not a video")
    return root


# ---- each command -----------------------------------------------------------------------------


def test_caption_human_and_json_on_the_real_clip():
    clip = bigbuckbunny_path()
    human = malmm("caption", clip, *TINY, "-q", "--frames", "6")
    assert human.exit_code == 0 and human.stdout.strip() and human.stderr == ""
    out = malmm("caption", clip, *TINY, "-q", "--json", "--fps", "2")
    assert out.exit_code == 0
    (record,) = records(out.stdout)
    check_record(record, "caption")
    assert record["video"] == {"duration": pytest.approx(5.28), "fps": 25.0, "width": 1280, "height": 720}
    assert record["sampling"]["fps"] == 2.0 and record["text"].strip()


@pytest.mark.parametrize("fps", [1.0, 2.0, 5.0])
def test_frame_counts_match_duration_times_fps(fps):
    out = malmm("caption", SAMPLE, *TINY, "-q", "--json", "--fps", fps)
    (record,) = records(out.stdout)
    assert record["sampling"]["frames"] == round(6.0 * fps)
    assert record["memory"]["compressions"] == max(0, record["sampling"]["frames"] - 40)


def test_start_and_end_bound_the_sampling():
    (record,) = records(malmm("caption", SAMPLE, *TINY, "-q", "--json", "--fps", 2, "--start", 1, "--end", 4).stdout)
    assert record["sampling"] == {"fps": 2.0, "frames": 6, "start": 1.0, "end": 4.0}


def test_ask_answers_every_question_in_one_pass():
    out = malmm("ask", SAMPLE, "what is shown?", "-Q", "what colour is it?", "-Q", "who wins?", *TINY, "-q", "--json")
    assert out.exit_code == 0
    (record,) = records(out.stdout)
    check_record(record, "ask")
    assert [a["question"] for a in record["answers"]] == ["what is shown?", "what colour is it?", "who wins?"]
    assert record["sampling"]["frames"] == 20  # the paper's QA setting
    human = malmm("ask", SAMPLE, "what is shown?", "-Q", "who wins?", *TINY, "-q")
    assert human.stdout.startswith("Q: what is shown?\nA: ")  # several questions: labelled


@pytest.mark.parametrize("task, n_labels", [("coin", 180), ("breakfast", 10), ("lvu_genre", 4), ("lvu_way_speaking", 5)])
def test_classify_ranks_the_whole_label_set(task, n_labels):
    out = malmm("classify", SAMPLE, "--task", task, "--top-k", 500, *TINY, "-q", "--json", "--frames", 8)
    assert out.exit_code == 0, out.stderr
    (record,) = records(out.stdout)
    check_record(record, "classify")
    scores = [x["score"] for x in record["labels"]]
    assert len(scores) == n_labels and record["label_set"] == task
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert scores == sorted(scores, reverse=True)


def test_classify_top_k_and_custom_labels(tmp_path):
    out = malmm("classify", SAMPLE, "--labels", "cat, dog,bird,dog", *TINY, "-q", "--json", "--frames", 4, "-k", 2)
    (record,) = records(out.stdout)
    assert len(record["labels"]) == 2 and record["label_set"] == "custom"
    assert {x["label"] for x in record["labels"]} <= {"cat", "dog", "bird"}
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# my labels\nmaking tea\nplaying football\n\nwashing a dog\n")
    human = malmm("classify", SAMPLE, "--labels", labels_file, *TINY, "-q", "--frames", 4)
    lines = human.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(" 1. ") and lines[0].endswith("%")
    assert {line[4:].rsplit(None, 1)[0].strip() for line in lines} == {"making tea", "playing football", "washing a dog"}


def _assert_tiles(segments, start, end):
    assert segments[0]["start"] == pytest.approx(start) and segments[-1]["end"] == pytest.approx(end)
    for a, b in zip(segments, segments[1:]):
        assert a["end"] == pytest.approx(b["start"])  # no gaps, no overlaps
    assert all(s["start"] < s["end"] and s["text"].strip() for s in segments)


def test_summarize_every_tiles_the_video_in_all_formats(tmp_path):
    out = malmm("summarize", SAMPLE, "--every", 2.5, *TINY, "-q", "--json")
    (record,) = records(out.stdout)
    check_record(record, "summarize")
    _assert_tiles(record["segments"], 0.0, 6.0)
    assert [s["start"] for s in record["segments"]] == [0.0, 2.5, 5.0] and record["summary"].strip()

    srt_out = malmm("summarize", SAMPLE, "--every", 2, *TINY, "-q", "--format", "srt").stdout
    subs = list(srt.parse(srt_out))
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [(0, 2), (2, 4), (4, 6)]

    vtt_file = tmp_path / "sample.vtt"
    assert malmm("summarize", SAMPLE, "--every", 2, *TINY, "-q", "-o", vtt_file).exit_code == 0
    captions = webvtt.read(str(vtt_file))
    assert [(c.start, c.end) for c in captions] == [("00:00:00.000", "00:00:02.000"), ("00:00:02.000", "00:00:04.000"),
                                                    ("00:00:04.000", "00:00:06.000")]
    md = malmm("summarize", SAMPLE, "--every", 3, *TINY, "-q", "--format", "md").stdout
    assert md.startswith(f"# {SAMPLE}\n") and "## 0:00 - 0:03" in md and "## 0:03 - 0:06" in md
    text = malmm("summarize", SAMPLE, "--every", 3, *TINY, "-q").stdout
    assert text.count("[0:0") == 2 and "Summary: " in text


def test_summarize_scenes_cuts_where_the_picture_changes(scenes_video):
    out = malmm("summarize", scenes_video, "--scenes", "--fps", 2, *TINY, "-q", "--json")
    (record,) = records(out.stdout)
    segments = record["segments"]
    _assert_tiles(segments, 0.0, 12.0)
    cuts = [s["start"] for s in segments[1:]]
    assert len(cuts) == 2 and cuts[0] == pytest.approx(4.0, abs=0.5) and cuts[1] == pytest.approx(8.0, abs=0.5)


def test_summarize_vision_runs_once_per_frame(scenes_video, monkeypatch):
    """However many segments, each sampled frame goes through the ViT exactly once."""
    from models import MALMM

    calls = []
    original = MALMM.encode_frames

    def counting(self, pixels):
        calls.append(pixels.shape[0])
        return original(self, pixels)

    monkeypatch.setattr(MALMM, "encode_frames", counting)
    for extra in (["--every", "1.5"], ["--scenes"]):
        calls.clear()
        out = malmm("summarize", scenes_video, *extra, "--fps", 2, *TINY, "-q", "--json", "--no-cache")
        (record,) = records(out.stdout)
        assert sum(calls) == record["sampling"]["frames"] == 24
        assert len(record["segments"]) >= 3


def test_srt_with_several_inputs_needs_an_output_directory(tmp_path):
    out = malmm("summarize", SAMPLE, bigbuckbunny_path(), *TINY, "-q", "--format", "srt")
    assert out.exit_code == 2 and "-o DIRECTORY" in out.stderr
    target = tmp_path / "subs"
    target.mkdir()
    out = malmm("summarize", SAMPLE, bigbuckbunny_path(), *TINY, "-q", "--format", "srt", "--every", 2, "-o", target)
    assert out.exit_code == 0
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == ["bigbuckbunny.srt", "sample.srt"]
    assert (target / ".malmm-outputs.json").is_file()  # which input each file was written for (--resume)
    assert len(list(srt.parse((target / "bigbuckbunny.srt").read_text()))) == 3


# ---- batches, errors, resume, interrupts ------------------------------------------------------


def test_folder_with_a_corrupt_file_gives_two_results_and_one_error(folder, tmp_path):
    output = tmp_path / "out.jsonl"
    out = malmm("caption", folder, *TINY, "-q", "--frames", 4, "-o", output)
    assert out.exit_code == 1
    rows = records(output.read_text())
    assert [Path(r["input"]).name for r in rows] == ["a.mp4", "corrupt.mp4", "b.mp4"]  # stable, recursive order
    good = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r]
    assert len(good) == 2 and len(bad) == 1 and set(bad[0]) == {"input", "error", "malmm_version", "created", "job"}
    for r in good:
        check_record(r, "caption")
    assert "corrupt.mp4" in bad[0]["error"] and bad[0]["error"].endswith(".")
    assert "Traceback" not in out.stderr and bad[0]["error"] in out.stderr


def test_resume_does_no_new_work(folder, tmp_path):
    output = tmp_path / "done.jsonl"
    good = [folder / "a.mp4", folder / "nested" / "b.mp4"]
    assert malmm("caption", *good, *TINY, "-q", "--frames", 4, "-o", output).exit_code == 0
    before = output.read_text()
    again = malmm("caption", *good, *TINY, "--frames", 4, "-o", output, "--resume")
    assert again.exit_code == 0 and output.read_text() == before
    assert "2 inputs already done, 0 to go" in again.stderr and "loading" not in again.stderr


def test_resume_retries_failures_and_keeps_earlier_records(folder, tmp_path):
    output = tmp_path / "mixed.jsonl"
    malmm("caption", folder, *TINY, "-q", "--frames", 4, "-o", output)
    again = malmm("caption", folder, *TINY, "--frames", 4, "-o", output, "--resume")
    assert again.exit_code == 1 and "1 to go" in again.stderr
    rows = records(output.read_text())
    assert len(rows) == 4 and sum("error" in r for r in rows) == 2


def test_bad_inputs_are_one_sentence_and_nonzero(tmp_path):
    cases = [
        (["caption", tmp_path / "missing.mp4"], 2, "does not exist"),
        (["caption", tmp_path], 1, "no video"),
        (["caption", SAMPLE, "--start", 10], 1, "after the end"),
        (["caption", SAMPLE, "--fps", 0], 2, "--fps must be above 0"),
        (["caption", SAMPLE, "--fps", "inf"], 2, "--fps must be a finite number"),
        (["caption", SAMPLE, "--memory", 1000000], 2, "--memory must be from 0 (no memory) to 256"),
        (["caption", SAMPLE, "--frames", 10**7], 2, "--frames must be from 1 to 1,000,000"),
        (["caption", SAMPLE, "--beams", 0], 2, "--beams must be from 1 to 16"),
        (["ask", SAMPLE, "why?", "--max-tokens", 5000], 2, "--max-tokens must be from 1 to 1024"),
        (["summarize", SAMPLE, "--every", "0.000000001"], 2, "--every must be at least 0.5 s"),
        (["ask", SAMPLE, "...!!!"], 2, "has no words"),
        (["caption", SAMPLE, "--fps", 1, "--frames", 3], 2, "either --fps or --frames"),
        (["caption", SAMPLE, "--memory", -1], 2, "--memory"),
        (["classify", SAMPLE], 2, "exactly one of --task"),
        (["classify", SAMPLE, "--task", "nope"], 2, "Unknown task 'nope'"),
        (["classify", SAMPLE, "--labels", "onlyone"], 2, "at least two"),
        (["summarize", SAMPLE, "--every", 5, "--scenes"], 2, "either --every or --scenes"),
        (["caption", SAMPLE, "--resume"], 2, "--resume needs --output"),
        (["caption", "ftp://example.com/x.mp4"], 1, "only http and https"),
    ]
    for args, code, words in cases:
        out = malmm(*args, *TINY, "-q")
        assert out.exit_code == code, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("malmm: error: ") and words in lines[0], (args, out.stderr)
    unknown_model = malmm("caption", SAMPLE, "--model", "no such model", "-q")
    assert unknown_model.exit_code == 2 and "Unknown model" in unknown_model.stderr


def _start_batch_and_wait_for_second_input(tmp_path):
    """A real process captioning the sample clip, then a 60 s one. Returns once the first record
    is in the output and the second input has started, so a signal sent then lands mid-batch."""
    longer = tmp_path / "long.mp4"
    make_video(longer, fps=25, n_frames=25 * 60, size=(96, 64))
    output = tmp_path / "partial.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "malmm_cli", "caption", str(SAMPLE), str(longer), *TINY,
           "--fps", "25", "--no-cache", "-o", str(output)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []

    def read():
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            output.exists() and output.read_text().count("\n") >= 1 and any("[2/2]" in x for x in lines)):
        time.sleep(0.05)
    assert proc.poll() is None, "".join(lines)

    def stopped() -> str:
        proc.wait(timeout=60)
        reader.join(timeout=10)
        return "".join(lines)

    return proc, output, stopped


def test_ctrl_c_stops_cleanly_and_keeps_finished_records(tmp_path):
    proc, output, stopped = _start_batch_and_wait_for_second_input(tmp_path)
    proc.send_signal(signal.SIGINT)
    err = stopped()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; 1 result kept" in err
    (row,) = records(output.read_text())
    assert row["input"] == str(SAMPLE) and "text" in row and output.read_text().endswith("\n")


# ---- URLs ---------------------------------------------------------------------------------------


def test_a_url_is_downloaded_and_captioned(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(SAMPLE, served / "clip.mp4")
    with FolderServer(served) as www:
        url = f"{www.base}/clip.mp4"
        out = malmm("caption", url, *TINY, "-q", "--json", "--frames", 4)
        assert out.exit_code == 0, out.stderr
        (record,) = records(out.stdout)
        assert record["input"] == url and record["video"]["width"] == 160


# ---- help, models, doctor, live view ----------------------------------------------------------


def test_help_is_instant_and_never_imports_torch():
    code = (
        "import sys\n"
        "from malmm_cli.cli.app import main\n"
        "for argv in (['malmm', '--help'], ['malmm', 'caption', '--help'], ['malmm', 'caption'],"
        " ['malmm', 'caption', 'x.mp4', '--fps', '-1'], ['malmm', 'classify', 'x.mp4', '--task', 'nope']):\n"
        "    sys.argv = argv\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr


@pytest.mark.parametrize("command", ["caption", "ask", "classify", "summarize", "doctor", "models list",
                                     "models download", "models path"])
def test_every_command_help_shows_an_example(command):
    out = malmm(*command.split(), "--help")
    assert out.exit_code == 0 and "Example" in out.stdout


def test_models_commands(tmp_path):
    assert malmm("models", "download", "tiny-random").exit_code == 0
    path = malmm("models", "path", "tiny-random")
    assert path.exit_code == 0 and Path(path.stdout.strip(), "config.json").exists()
    rows = records(malmm("models", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    # tiny-random is built here, never downloaded (issue 24): available, but not "downloaded"
    assert by_name["tiny-random"]["available"] is True and by_name["tiny-random"]["downloaded"] is False
    listed = malmm("models", "list").stdout
    assert "tiny-random  built here, " in listed and "downloaded" not in listed.split("tiny-random", 1)[1]
    assert by_name["instructblip-vicuna-7b"]["source"] == "Salesforce/instructblip-vicuna-7b"
    missing = malmm("models", "path", "instructblip-vicuna-7b")
    assert missing.exit_code == 1 and "malmm models download instructblip-vicuna-7b" in missing.stderr
    where = malmm("models", "path")
    assert where.exit_code == 0 and "vision features:" in where.stdout and "Hugging Face models:" in where.stdout
    assert os.environ["MALMM_CACHE_DIR"] in where.stdout


def test_doctor_runs_tiny_random_end_to_end():
    out = malmm("doctor")
    assert out.exit_code == 0, out.stdout
    assert "end to end" in out.stdout and "all good" in out.stdout


def test_progress_lines_when_stderr_is_not_a_terminal():
    out = malmm("caption", SAMPLE, *TINY, "--frames", 50)
    lines = out.stderr.splitlines()
    assert any("50 frames from 0:00 to 0:06, memory 40 slots" in line for line in lines)
    assert any("50/50 frames, video at 0:05 of 0:06, memory 40/40 slots · 10 compressions" in line for line in lines)
    assert out.stdout.strip() and "malmm:" not in out.stdout  # results on stdout, progress on stderr


def test_live_view_shows_the_memory_bank():
    import io

    from rich.console import Console

    from malmm_cli.results.progress import RichEvents, memory_line, slot_chart
    from malmm_cli.sources.video import plan_sampling, probe
    from models.memory_bank import BankStatus

    info = probe(SAMPLE)
    sampling = plan_sampling(info, fps=10)
    buf = io.StringIO()
    events = RichEvents(Console(file=buf, force_terminal=True, width=120), total_inputs=1)
    events.started(str(SAMPLE), info, sampling, capacity=4)
    status = BankStatus(4, 4, 20, 16, (8.0, 6.0, 4.0, 2.0), ((0, 9), (6, 14), (12, 17), (18, 19)))
    events.frames(20, 1.9, status)
    events.close()
    assert "4/4 slots · 16 compressions · oldest slot 0:00-0:00" in memory_line(status, sampling.timestamps)
    assert slot_chart(status.slot_frames) == "█▆▄▂"
    assert "memory bank" in buf.getvalue() and "16 compressions" in buf.getvalue()


def test_a_corrupt_file_gives_exactly_one_line_on_stderr(tmp_path):
    """Seen from a real process: decord's native "ERROR opening" line must not leak through."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bigbuckbunny_path().read_bytes()[:5000])
    out = subprocess.run([sys.executable, "-m", "malmm_cli", "caption", str(broken), *TINY, "-q"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [f"malmm: error: {broken} cannot be opened as a video: the file is truncated or corrupt."]


# ---- signals and locks at unlucky moments -------------------------------------------------------


def test_sigterm_stops_like_ctrl_c_and_the_output_is_locked_until_then(tmp_path):
    proc, output, stopped = _start_batch_and_wait_for_second_input(tmp_path)
    busy = malmm("caption", SAMPLE, *TINY, "-q", "-o", output, "--resume")  # a second process, same output
    assert busy.exit_code == 2 and "another malmm process" in busy.stderr, busy.stderr
    proc.send_signal(signal.SIGTERM)
    err = stopped()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted; 1 result kept" in err
    (row,) = records(output.read_text())
    assert row["input"] == str(SAMPLE) and "text" in row
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    again = malmm("caption", SAMPLE, *TINY, "--fps", "25", "--no-cache", "-o", output, "--resume")  # lock gone
    assert again.exit_code == 0 and "1 input already done, 0 to go" in again.stderr
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers put back


def _interrupt_decoder_start(monkeypatch, when: str) -> None:
    """Ctrl-C inside the decoder's thread start-up: before the first thread runs, or while it starts."""
    real_start = threading.Thread.start

    def start(self):
        if self.name == "malmm-decode-0":
            if when == "while starting":
                real_start(self)
            raise KeyboardInterrupt
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)


@pytest.mark.parametrize("when", ["before starting", "while starting"])
def test_ctrl_c_while_decoder_threads_start_is_a_clean_interrupt(monkeypatch, when):
    """It used to join a thread that had not started: RuntimeError, exit 1 instead of 130."""
    from malmm_cli.sources.decoding import stream_frames
    from malmm_cli.sources.video import plan_sampling, probe

    info = probe(SAMPLE)
    _interrupt_decoder_start(monkeypatch, when)
    with pytest.raises(KeyboardInterrupt):
        with stream_frames(SAMPLE, plan_sampling(info, fps=5), info=info, workers=2) as frames:
            for _ in frames:
                pass
    monkeypatch.undo()
    deadline = time.time() + 10
    while time.time() < deadline and any(t.name.startswith("malmm-decode") for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name.startswith("malmm-decode") for t in threading.enumerate())


def test_ctrl_c_while_decoding_starts_exits_130(tmp_path, monkeypatch):
    _interrupt_decoder_start(monkeypatch, "before starting")
    output = tmp_path / "out.jsonl"
    out = malmm("caption", SAMPLE, *TINY, "-q", "--frames", 4, "--no-cache", "-o", output)
    assert out.exit_code == 130, out.stderr
    assert out.stderr.splitlines() == [f"malmm: interrupted; 0 results kept in {output}"]


# ---- mistakes a person makes on the command line: one sentence each ---------------------------


@pytest.mark.parametrize("args, needle", [
    (["caption", str(SAMPLE), "--memory", "1e23"], "Invalid value for '--memory'"),  # a TypeError traceback once
    (["caption", str(SAMPLE), "--nope"], "No such option: --nope"),
    (["caption"], "Missing argument"),
    (["caption", str(SAMPLE), "--start", "1:75"], "'1:75' is not a time"),
    (["summarize", str(SAMPLE), "--every", "1e-9"], "'1e-9' is not a time"),  # 23 GB once
    (["caption", str(SAMPLE), "--start", "nan"], "'nan' is not a time"),
])
def test_command_line_mistakes_are_one_sentence_from_the_console_script(args, needle):
    out = subprocess.run([sys.executable, "-m", "malmm_cli", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "╭" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("malmm: error: ") and needle in line


@pytest.mark.parametrize("case, code, needle", [
    ("./nope", 2, "The model folder './nope' does not exist."),
    ("empty", 1, "is an empty folder, not a model"),
    ("notes", 1, "it has no config.json"),
    ("corrupt", 1, "are corrupt or truncated"),
    ("file", 2, "is a file; give a model folder"),
])
def test_models_that_cannot_be_used_are_one_sentence(tmp_path, monkeypatch, case, code, needle):
    from models.tiny import ensure_tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    if case == "empty":
        (tmp_path / case).mkdir()
    elif case == "notes":
        (tmp_path / case).mkdir()
        (tmp_path / case / "README.txt").write_text("my notes")
    elif case == "corrupt":
        shutil.copytree(ensure_tiny_checkpoint(), tmp_path / case)
        weights = tmp_path / case / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif case == "file":
        (tmp_path / case).write_text("not a model")
    out = malmm("caption", SAMPLE, "--model", case, "-q")
    assert out.exit_code == code, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("malmm: error: ") and needle in line


def test_models_download_without_network_is_one_sentence(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import httpx

    def unreachable(self, repo_id, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "list_repo_files", unreachable)
    out = malmm("models", "download", "instructblip-vicuna-7b")
    assert out.exit_code == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "malmm: error: could not download 'Salesforce/instructblip-vicuna-7b': the Hugging Face hub could not be "
        "reached (no network connection?); the download can be resumed later with the same command.")
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(self, repo_id, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(HfApi, "list_repo_files", offline)
    out = malmm("models", "download", "instructblip-vicuna-7b")
    assert out.exit_code == 1 and out.stderr.strip().splitlines()[-1] == (
        "malmm: error: could not download 'Salesforce/instructblip-vicuna-7b': HF_HUB_OFFLINE is set.")
