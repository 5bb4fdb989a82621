"""Outputs never destroy data: -o refuses inputs and files that are not ours, results are
replaced only with --overwrite, one process per output, whole records, stable per-video names."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from malmm_cli.engine import loader
from malmm_cli.results import outputs
from malmm_cli.results.outputs import INDEX_NAME, input_key, plan_names, recorded_inputs
from malmm_cli.results.results_file import legacy_results
from tests.cli import SAMPLE, malmm
from tests.cli import TINY as CLI_TINY
from tests.cli import records as text_records
from tests.media import make_video

TINY = [*CLI_TINY, "-q"]
FAST = ["--frames", "4"]
SUMMARY = ["--every", "2", "--fps", "2"]


def one_error(out, code: int, *words: str) -> str:
    """The run failed with `code` and exactly one `malmm: error:` sentence holding `words`."""
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == code, out.stderr
    assert len(lines) == 1 and lines[0].startswith("malmm: error: "), out.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


def records(path: Path) -> list[dict]:
    return text_records(path.read_text())


@pytest.fixture
def no_model(monkeypatch):
    """Refusals come before any model loads: loading one fails the test."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_model", refuse)


@pytest.fixture
def videos(tmp_path) -> dict[str, Path]:
    """Two different clips named x.mp4 in two folders, plus a.mp4 and b.mp4."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    shutil.copy(SAMPLE, tmp_path / "one" / "x.mp4")
    make_video(tmp_path / "two" / "x.mp4", fps=10, n_frames=30)  # 3 s: its subtitles differ
    shutil.copy(SAMPLE, tmp_path / "a.mp4")
    make_video(tmp_path / "b.mp4", fps=10, n_frames=30)
    return {"x1": tmp_path / "one" / "x.mp4", "x2": tmp_path / "two" / "x.mp4",
            "a": tmp_path / "a.mp4", "b": tmp_path / "b.mp4"}


# ---- 1. -o never names an input or a file that is not ours ----------------------------------


def test_output_naming_an_input_is_refused_and_the_video_is_untouched(videos, no_model, tmp_path):
    video = videos["a"]
    before = video.read_bytes()
    link = tmp_path / "link.mp4"
    link.symlink_to(video)
    for extra in ([], ["--overwrite"], ["--json"], ["--format", "srt"]):
        one_error(malmm("summarize", video, "-o", video, *TINY, *extra), 2, str(video), "is one of the inputs")
    one_error(malmm("summarize", link, "-o", video, *TINY), 2, "is one of the inputs")  # same file, other name
    assert video.read_bytes() == before


def test_a_video_caught_by_a_shell_glob_is_never_overwritten(videos, no_model):
    """`malmm caption -o *.mp4` expands to `-o a.mp4 b.mp4`: a.mp4 is not an input, but a video."""
    before = videos["a"].read_bytes()
    for extra in ([], ["--overwrite"], ["--json"], ["--json", "--resume"]):
        one_error(malmm("caption", videos["b"], "-o", videos["a"], *TINY, *extra), 2,
                  "is not a results file written by malmm")
    assert videos["a"].read_bytes() == before


@pytest.mark.parametrize("name, content, extra", [
    ("notes.json", "my own notes\n", ["--json"]),        # text, but not JSON records
    ("data.jsonl", '{"id": 1, "input": "x"}\n', []),    # JSON, but not ours
    ("notes.md", "just some text\n", ["--format", "md"]),  # not markdown we write
    ("summary.srt", "hello\n", ["--format", "srt"]),     # not a subtitle file
    ("captions", "no extension\n", []),                   # text results are recognised by .txt
])
def test_existing_files_that_are_not_ours_are_refused_even_with_overwrite(tmp_path, no_model, name, content, extra):
    target = tmp_path / name
    target.write_text(content)
    command = "summarize" if "--format" in extra else "caption"
    for mode in ([], ["--overwrite"]):
        one_error(malmm(command, SAMPLE, "-o", target, *TINY, *extra, *mode), 2, "is not a results file")
    assert target.read_text() == content


def test_what_counts_as_ours_without_a_record():
    """Files that older versions wrote have no record of their digest: JSON Lines of our records,
    each with its job key, are verifiably ours; nothing else is (text, md, srt, vtt included)."""
    job = b', "job": "0123456789abcdef"}'
    record = b'{"input": "a.mp4", "task": "caption", "text": "caf\xc3\xa9"' + job + b"\n"
    assert legacy_results(record + b'{"input": "b.mp4", "error": "x."' + job + b"\n")
    assert legacy_results(record + record[:30])  # cut short by an interrupt
    assert legacy_results(record + record[:30] + b"\n" + record)  # older versions went on after a fresh line
    assert not legacy_results(b"")  # empty is simply used, elsewhere
    assert not legacy_results(b'{"input": "a.mp4", "text": "x"}\n')  # no job key: not verifiably ours
    assert not legacy_results(b'{"id": 1, "input": "x", "job": "0123456789abcdef"}\n')
    assert not legacy_results(record + b"my own notes\n")
    assert not legacy_results(b"\x00\x00\x00\x18ftypmp42")


# ---- 2. existing results: --resume appends, --overwrite replaces, neither refuses ------------


def test_existing_results_need_resume_or_overwrite(tmp_path, videos):
    output = tmp_path / "results.jsonl"
    assert malmm("caption", videos["a"], "-o", output, *TINY, *FAST).exit_code == 0
    before = output.read_bytes()
    one_error(malmm("caption", videos["b"], "-o", output, *TINY, *FAST), 2, "--resume", "--overwrite")
    assert output.read_bytes() == before
    assert malmm("caption", videos["b"], "-o", output, *TINY, *FAST, "--overwrite").exit_code == 0
    assert [r["input"] for r in records(output)] == [str(videos["b"])]
    assert malmm("caption", videos["a"], videos["b"], "-o", output, *TINY, *FAST, "--resume").exit_code == 0
    assert [r["input"] for r in records(output)] == [str(videos["b"]), str(videos["a"])]
    one_error(malmm("caption", videos["a"], "-o", output, *TINY, "--resume", "--overwrite"), 2, "not both")
    one_error(malmm("caption", videos["a"], *TINY, "--overwrite"), 2, "--overwrite needs --output")


def test_text_results_are_replaced_only_with_overwrite(tmp_path):
    output = tmp_path / "caption.txt"
    assert malmm("caption", SAMPLE, "-o", output, *TINY, *FAST).exit_code == 0
    before = output.read_text()
    assert before.strip()
    one_error(malmm("caption", SAMPLE, "-o", output, *TINY, *FAST), 2, "--overwrite", "--resume")
    assert output.read_text() == before
    assert malmm("caption", SAMPLE, "-o", output, *TINY, *FAST, "--overwrite").exit_code == 0
    assert output.read_text() == before  # replaced by the same caption, not appended to


def test_an_empty_output_file_is_simply_used(tmp_path):
    output = tmp_path / "empty.jsonl"
    output.touch()
    assert malmm("caption", SAMPLE, "-o", output, *TINY, *FAST).exit_code == 0
    assert len(records(output)) == 1


def test_a_run_that_cannot_start_leaves_no_empty_file(tmp_path, monkeypatch):
    from malmm_cli.errors import UsageError

    def fail(*a, **k):
        raise UsageError("Unknown model 'x'.")

    monkeypatch.setattr(loader, "load_model", fail)
    output = tmp_path / "new.jsonl"
    one_error(malmm("caption", SAMPLE, "-o", output, *TINY), 2, "Unknown model")
    assert not output.exists()


# ---- 3. one process per output --------------------------------------------------------------


def test_a_second_writer_of_the_same_output_is_refused_at_once(tmp_path, no_model):
    output = tmp_path / "busy.jsonl"
    output.write_text('{"input": "other.mp4", "text": "kept"}\n')
    before = output.read_bytes()
    with open(output, "rb") as held:  # what a running malmm holds on its output
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for mode in (["--resume"], ["--overwrite"]):
            one_error(malmm("caption", SAMPLE, "-o", output, *TINY, *mode), 2, "another malmm process")
    assert output.read_bytes() == before
    subs = tmp_path / "subs"
    subs.mkdir()
    fd = os.open(subs, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_error(malmm("summarize", SAMPLE, "--format", "srt", "-o", subs, *TINY), 2, "another malmm process")
    finally:
        os.close(fd)


# ---- 4. whole records, torn lines, full disks -------------------------------------------------


def test_each_record_is_one_write(tmp_path, videos, monkeypatch):
    calls = []
    real_write = os.write

    def counting(fd, data):
        calls.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(outputs.os, "write", counting)
    output = tmp_path / "r.jsonl"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    out = malmm("caption", videos["a"], videos["b"], broken, "-o", output, *TINY, *FAST)
    assert out.exit_code == 1  # the broken input is an error record
    assert len(calls) == 3 and all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in calls)
    assert output.read_bytes() == b"".join(calls)


def test_resume_cuts_a_torn_last_line_off_into_a_file_beside_it(tmp_path, videos):
    """A last line cut inside a UTF-8 character used to stay in the file, before the new records:
    a UTF-8 reader, jq or pandas then failed on the whole file."""
    output = tmp_path / "torn.jsonl"
    assert malmm("caption", videos["a"], "-o", output, *TINY, *FAST).exit_code == 0
    whole = output.read_bytes()
    torn = json.dumps({"input": str(videos["b"]), "text": "caf\u00e9 \u2014 cr\u00e8me"}, ensure_ascii=False).encode()
    cut = torn[: torn.index("\u2014".encode()) + 1]  # the first byte of a 3-byte character
    output.write_bytes(whole + cut)
    out = malmm("caption", videos["a"], videos["b"], "-o", output, "--model", "tiny-random", *FAST, "--resume")
    assert out.exit_code == 0, out.stderr
    assert "1 input already done, 1 to go" in out.stderr  # the torn line does not count as done
    aside = tmp_path / "torn.jsonl.torn"
    assert aside.read_bytes() == cut  # nothing lost: the cut bytes are kept, and the warning says where
    assert f"{output} ended in a line cut short" in out.stderr and str(aside) in out.stderr
    data = output.read_bytes()
    assert data.startswith(whole) and data.endswith(b"}\n")
    with open(output, encoding="utf-8") as f:  # strict UTF-8, every line a whole record
        rows = [json.loads(line) for line in f]
    assert [r["input"] for r in rows] == [str(videos["a"]), str(videos["b"])] and "text" in rows[1]
    # Torn again (a second crash): the first fragment is kept, the second goes beside it.
    output.write_bytes(data + cut)
    again = malmm("caption", videos["a"], videos["b"], "-o", output, "--model", "tiny-random", *FAST, "--resume")
    assert again.exit_code == 0 and "2 inputs already done, 0 to go" in again.stderr
    assert (tmp_path / "torn.jsonl.torn-2").read_bytes() == cut and aside.read_bytes() == cut
    assert output.read_bytes() == data


def test_a_full_disk_is_one_sentence_and_earlier_records_stay_whole(tmp_path, videos, monkeypatch):
    real_write = os.write
    marker = str(videos["b"]).encode()

    def disk_fills_up(fd, data):
        if marker in bytes(data):
            real_write(fd, bytes(data)[: len(data) // 2])  # part of the record gets out first
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(outputs.os, "write", disk_fills_up)
    output = tmp_path / "full.jsonl"
    out = malmm("caption", videos["a"], videos["b"], "-o", output, *TINY, *FAST)
    line = one_error(out, 1, str(output), "no space left on device", "1 result")
    assert line.endswith("kept.")
    (row,) = records(output)  # the half-written record was cut off again
    assert row["input"] == str(videos["a"]) and output.read_bytes().endswith(b"}\n")


def test_ctrl_c_in_the_middle_of_a_write_waits_for_the_whole_record(tmp_path, monkeypatch):
    from malmm_cli.results.outputs import Output
    from malmm_cli.results.records import MemoryMeta, Result, SamplingMeta, VideoMeta

    result = Result(input="a.mp4", task="caption", model="m", video=VideoMeta(1.0, 10.0, 8, 8),
                    sampling=SamplingMeta(None, 4, 0.0, 1.0), memory=MemoryMeta(4, 0), timings={},
                    text="caf\u00e9 " * 200)
    output = Output("caption", tmp_path / "r.jsonl", None, False, ["a.mp4"])
    output.claim("new")
    output.open()
    real_write = os.write

    def interrupted(fd, data):
        n = real_write(fd, bytes(data)[: len(data) // 2])  # the OS takes half the record...
        monkeypatch.setattr(outputs.os, "write", real_write)
        os.kill(os.getpid(), signal.SIGINT)  # ...and Ctrl-C comes
        return n

    monkeypatch.setattr(outputs.os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):  # it comes through, once the record is whole
        output.write(result)
    output.close()
    assert output.written == 1
    (row,) = records(tmp_path / "r.jsonl")
    assert row["text"] == result.text


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_dev_full_gives_one_sentence():
    one_error(malmm("caption", SAMPLE, "-o", "/dev/full", "--json", *TINY, *FAST), 1, "no space left on device")


# ---- 5. per-video files: stable, unique names, owned by their input ------------------------


def test_names_are_plain_when_unambiguous_and_hashed_otherwise():
    def names(specs, index=None):
        return plan_names(specs, {s: input_key(s) for s in specs}, "srt", index or {})

    assert names(["/v/a.mp4", "/v/b.mp4"]) == {"/v/a.mp4": "a.srt", "/v/b.mp4": "b.srt"}
    both = names(["/one/x.mp4", "/two/x.mp4"])
    assert names(["/two/x.mp4", "/one/x.mp4"]) == both  # the order of the inputs does not matter
    assert len(set(both.values())) == 2 and all(n.startswith("x.") and len(n) == len("x.12345678.srt")
                                                for n in both.values())
    # A stem shaped like a hashed name is always hashed, so it cannot take another input's name.
    hashed_x = both["/one/x.mp4"]
    lookalike = "/v/" + hashed_x.replace(".srt", ".mp4")
    assert names([lookalike])[lookalike] != hashed_x
    assert names(["/v/X.mp4", "/w/x.mp4"])["/v/X.mp4"] != "X.srt"  # one file on case-insensitive disks
    # A name once given stays; a plain name owned by another input is not taken.
    index = {"x.srt": input_key("/one/x.mp4")}
    assert names(["/one/x.mp4", "/two/x.mp4"], index)["/one/x.mp4"] == "x.srt"
    assert names(["/two/x.mp4"], index)["/two/x.mp4"] == both["/two/x.mp4"]


def _summarize_srt(*inputs, out_dir, mode=()):
    return malmm("summarize", *inputs, *SUMMARY, "--format", "srt", "-o", out_dir, "--model", "tiny-random",
                 *mode)


def test_same_named_videos_keep_their_own_files_across_runs(tmp_path, videos):
    subs = tmp_path / "subs"
    assert _summarize_srt(videos["x1"], videos["x2"], out_dir=subs).exit_code == 0
    index = json.loads((subs / INDEX_NAME).read_text())["files"]
    files = {Path(key): name for name, key in index.items()}
    assert set(files) == {videos["x1"].resolve(), videos["x2"].resolve()}
    content = {name: (subs / name).read_text() for name in files.values()}
    assert content[files[videos["x1"].resolve()]].count("-->") == 3  # 6 s in 2 s cues
    assert content[files[videos["x2"].resolve()]].count("-->") == 2  # 3 s
    # Other order, one more input: nothing is taken for done that is not that input's own file.
    out = _summarize_srt(videos["x2"], videos["a"], videos["x1"], out_dir=subs, mode=["--resume"])
    assert out.exit_code == 0 and "2 inputs already done, 1 to go" in out.stderr
    assert {n: (subs / n).read_text() for n in files.values()} == content
    # Alone in a later run, an input still finds its own file.
    again = _summarize_srt(videos["x2"], out_dir=subs, mode=["--resume"])
    assert again.exit_code == 0 and "1 input already done, 0 to go" in again.stderr


def test_a_file_named_like_another_inputs_old_name_is_not_taken_for_done(tmp_path, videos):
    """Names used to be x.srt, x-2.srt by order: x-2.srt of two/x.mp4 blocked x-2.mp4."""
    subs = tmp_path / "subs"
    assert _summarize_srt(videos["x1"], videos["x2"], out_dir=subs).exit_code == 0
    literally = tmp_path / "x-2.mp4"
    shutil.copy(videos["b"], literally)
    out = _summarize_srt(literally, videos["x1"], out_dir=subs, mode=["--resume"])
    assert out.exit_code == 0 and "1 input already done, 1 to go" in out.stderr
    assert (subs / "x-2.srt").read_text().count("-->") == 2


def test_per_video_files_not_written_for_that_input_are_kept(tmp_path, videos):
    """A hand-made subtitle file where malmm would write one is refused whatever the options: it
    used to be replaced with --overwrite."""
    subs = tmp_path / "subs"
    subs.mkdir()
    hand_made = "1\n00:00:00,000 --> 00:00:01,000\nmy own subtitle\n\n"
    (subs / "a.srt").write_text(hand_made)
    for mode in ([], ["--resume"], ["--overwrite"]):
        line = one_error(_summarize_srt(videos["a"], videos["b"], out_dir=subs, mode=mode), 2, "a.srt",
                         "is not a srt file that malmm wrote", "move it away")
        assert "--overwrite" not in line
    assert (subs / "a.srt").read_text() == hand_made and not (subs / "b.srt").exists()
    (subs / "a.srt").rename(tmp_path / "mine.srt")
    assert _summarize_srt(videos["a"], videos["b"], out_dir=subs).exit_code == 0
    assert _summarize_srt(videos["a"], videos["b"], out_dir=subs, mode=["--overwrite"]).exit_code == 0
    assert (subs / "a.srt").read_text().count("-->") == 3
    (subs / "b.srt").write_bytes(b"\x00\x00\x00\x18ftypmp42")  # a video that got an .srt name
    one_error(_summarize_srt(videos["a"], videos["b"], out_dir=subs, mode=["--overwrite"]), 2,
              "b.srt", "is not a srt file that malmm wrote")
    assert (subs / "b.srt").read_bytes() == b"\x00\x00\x00\x18ftypmp42"
    (subs / "b.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nmalmm's, then edited\n\n")
    one_error(_summarize_srt(videos["a"], videos["b"], out_dir=subs, mode=["--overwrite"]), 2,
              "b.srt", "(or it was changed since)")


def test_per_video_output_over_an_existing_file_is_refused(tmp_path, videos, no_model):
    target = tmp_path / "subs"
    target.write_text("a file, not a folder")
    one_error(_summarize_srt(videos["a"], videos["b"], out_dir=target), 2, "needs -o DIRECTORY")
    assert target.read_text() == "a file, not a folder"


# ---- 6. --resume knows work apart: same input, task and options ------------------------------

GEN = ["--beams", "1", "--max-tokens", "2"]


def _stderr_run(*args):
    """Run malmm (not quiet, so --resume reports); the run must succeed."""
    out = malmm(*args, *CLI_TINY)
    assert out.exit_code == 0, out.stderr
    return out.stderr


def test_another_task_on_the_same_file_is_not_taken_for_done(tmp_path):
    """caption, then classify --resume on the same file and -o, used to say "0 to go"."""
    output = tmp_path / "r.jsonl"
    _stderr_run("caption", SAMPLE, *FAST, *GEN, "-o", output)
    err = _stderr_run("classify", SAMPLE, "--task", "breakfast", *FAST, "-o", output, "--resume")
    assert "0 inputs already done, 1 to go (1 of them recorded in" in err
    caption, classify = records(output)
    assert caption["task"] == "caption" and classify["task"] == "classify" and classify["label_set"] == "breakfast"
    assert len({caption["job"], classify["job"]}) == 2 and all(len(r["job"]) == 16 for r in (caption, classify))
    # Each finds its own record now: nothing more is done, nor loaded.
    err = _stderr_run("classify", SAMPLE, "--task", "breakfast", *FAST, "-o", output, "--resume")
    assert "1 input already done, 0 to go\n" in err and "loading" not in err
    err = _stderr_run("caption", SAMPLE, *FAST, *GEN, "-o", output, "--resume")
    assert "1 input already done, 0 to go\n" in err and "loading" not in err
    assert len(records(output)) == 2


@pytest.fixture
def qformer_checkpoint():
    """Writes an MA-LMM overlay for the tiny model: one Q-Former tensor, all `value`."""
    import torch

    def write(path: Path, value: float = 0.0) -> Path:
        torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.bias": torch.full((32,), value)}}, path)
        return path

    return write


def _fast(task: str, args: list[str]) -> list[str]:
    """`args` with 4 frames and 2 tokens by beam 1, unless they set those themselves."""
    sampling = [] if {"--frames", "--fps"} & set(args) else FAST
    generation = [] if task == "classify" or "--max-tokens" in args else GEN
    return [*args, *sampling, *generation]


@pytest.mark.parametrize("task, first, then", [
    ("ask", ["what is it?"], ["what is it now?"]),
    ("ask", ["what is it?"], ["what is it?", "-Q", "where is it?"]),
    ("caption", ["--frames", "4"], ["--frames", "5"]),
    ("caption", ["--frames", "4"], ["--fps", "1"]),
    ("caption", ["--memory", "4"], ["--memory", "5"]),
    ("caption", ["--prompt", "what is shown?"], ["--prompt", "what happens?"]),
    ("caption", [], ["--start", "1"]),
    ("caption", [], ["--end", "5"]),
    ("caption", ["--beams", "1", "--max-tokens", "2"], ["--beams", "1", "--max-tokens", "3"]),
    ("caption", [], ["--checkpoint", "CKPT"]),
    ("classify", ["--labels", "cat,dog"], ["--labels", "cat,bird"]),
    ("classify", ["--labels", "cat,dog"], ["--labels", "cat,dog", "--prompt", "which animal?"]),
    ("classify", ["--task", "breakfast"], ["--task", "coin"]),
    ("classify", ["--task", "breakfast"], ["--task", "breakfast", "--top-k", "2"]),
    ("summarize", ["--fps", "2", "--every", "2"], ["--fps", "2", "--every", "3"]),
    ("summarize", ["--fps", "2", "--every", "2"], ["--fps", "2", "--scenes"]),
])
def test_options_that_change_the_result_make_resume_redo_the_input(tmp_path, qformer_checkpoint, task, first, then):
    output = tmp_path / "r.jsonl"
    then = [str(qformer_checkpoint(tmp_path / "c.pth")) if x == "CKPT" else x for x in then]
    _stderr_run(task, SAMPLE, *_fast(task, first), "-o", output)
    err = _stderr_run(task, SAMPLE, *_fast(task, then), "-o", output, "--resume")
    assert "0 inputs already done, 1 to go (1 of them recorded in" in err
    assert len(records(output)) == 2
    err = _stderr_run(task, SAMPLE, *_fast(task, first), "-o", output, "--resume")  # the first record still counts
    assert "1 input already done, 0 to go\n" in err


def test_another_checkpoint_or_the_same_one_changed_is_other_work(tmp_path, qformer_checkpoint, monkeypatch):
    output = tmp_path / "r.jsonl"
    one, two = qformer_checkpoint(tmp_path / "one.pth", 0.0), qformer_checkpoint(tmp_path / "two.pth", 1.0)
    assert one.stat().st_size == two.stat().st_size
    run = ("caption", SAMPLE, *FAST, *GEN, "-o", output)
    _stderr_run(*run, "--checkpoint", one)
    assert "0 inputs already done, 1 to go" in _stderr_run(*run, "--checkpoint", two, "--resume")
    # The same file by another name, and options that do not change the result: done.
    monkeypatch.chdir(tmp_path)
    same = _stderr_run(*run, "--checkpoint", "one.pth", "--no-cache", "--quant", "none", "--device", "cpu", "--resume")
    assert "1 input already done, 0 to go" in same
    qformer_checkpoint(one, 2.0)  # retrained in place: same name, same size, a new mtime
    os.utime(one, ns=(one.stat().st_atime_ns, one.stat().st_mtime_ns + 1_000_000_000))
    assert "0 inputs already done, 1 to go" in _stderr_run(*run, "--checkpoint", one, "--resume")
    assert len({r["job"] for r in records(output)}) == 3


def test_what_a_checkpoint_sets_when_the_options_do_not_is_other_work(tmp_path, tiny_model):
    """A finetuned checkpoint's memory length applies where --memory is not given: the same
    options otherwise, but other work than --memory 40 (the caption default)."""
    from tests.official_checkpoint import write_official_checkpoint

    checkpoint = tmp_path / "finetuned.pth"
    write_official_checkpoint(tiny_model, checkpoint, num_frames=4, memory_bank_length=3)
    output = tmp_path / "r.jsonl"
    run = ("caption", SAMPLE, *FAST, *GEN, "--checkpoint", checkpoint, "-o", output)
    _stderr_run(*run, "--memory", "40")
    assert "0 inputs already done, 1 to go" in _stderr_run(*run, "--resume")
    assert "1 input already done, 0 to go" in _stderr_run(*run, "--resume")  # the same command finds its own
    assert [r["memory"]["length"] for r in records(output)] == [40, 3]


def test_a_failed_input_retried_is_counted_once(tmp_path, videos):
    output, later = tmp_path / "r.jsonl", tmp_path / "later.mp4"
    later.write_bytes(b"\x00" * 1000)  # not a video yet: an error record
    first = malmm("caption", videos["a"], later, *FAST, *GEN, "-o", output, *CLI_TINY)
    assert first.exit_code == 1 and "wrote 1 result" in first.stderr and "1 input failed" in first.stderr
    shutil.copy(videos["b"], later)
    err = _stderr_run("caption", videos["a"], later, *FAST, *GEN, "-o", output, "--resume")
    assert "1 input already done, 1 to go\n" in err and "wrote 1 result" in err and " failed" not in err
    rows = records(output)
    assert [(r["input"], "error" in r) for r in rows] == [(str(videos["a"]), False), (str(later), True),
                                                          (str(later), False)]
    assert len({r["job"] for r in rows}) == 1  # error records carry the job too
    # An error record and a success for one input: one done input, in this run's inputs only.
    assert "2 inputs already done, 0 to go\n" in _stderr_run("caption", videos["a"], later, *FAST, *GEN,
                                                                 "-o", output, "--resume")
    assert "1 input already done, 0 to go\n" in _stderr_run("caption", later, *FAST, *GEN, "-o", output,
                                                                 "--resume")


def test_a_record_without_a_job_key_is_done_again(tmp_path):
    """Records without a job key (an older malmm's, or written from Python without one) cannot say
    which work they are: they are not done."""
    from malmm_cli.results.outputs import Output

    output = tmp_path / "r.jsonl"
    _stderr_run("caption", SAMPLE, *FAST, *GEN, "-o", output)
    (old,) = records(output)
    del old["job"]
    rewrite = Output("caption", output, "json", True, [str(SAMPLE)])  # malmm's own writing: recorded
    rewrite.claim("overwrite")
    rewrite.open()
    rewrite.write_record(old)
    rewrite.close()
    err = _stderr_run("caption", SAMPLE, *FAST, *GEN, "-o", output, "--resume")
    assert "0 inputs already done, 1 to go (1 of them recorded in" in err and "older malmm" in err
    assert [("job" in r) for r in records(output)] == [False, True]


def test_per_video_files_from_other_options_are_written_again(tmp_path, videos):
    subs = tmp_path / "subs"
    run = ("summarize", videos["a"], videos["b"], "--fps", "2", *GEN, "--format", "srt", "-o", subs, *CLI_TINY)
    assert malmm(*run, "--every", "2").exit_code == 0
    assert (subs / "a.srt").read_text().count("-->") == 3  # 6 s in 2 s cues
    again = malmm(*run, "--every", "3", "--resume")
    assert again.exit_code == 0, again.stderr
    assert "0 inputs already done, 2 to go (2 of them have files in" in again.stderr
    assert (subs / "a.srt").read_text().count("-->") == 2  # 6 s in 3 s cues
    again = malmm(*run, "--every", "3", "--resume")
    assert again.exit_code == 0 and "2 inputs already done, 0 to go\n" in again.stderr
    # An index from before job keys and digests says whose files they are, neither how they were
    # made nor what they held: they may have been edited since, so they are not replaced.
    index = json.loads((subs / INDEX_NAME).read_text())
    old = json.dumps({"files": index["files"]})
    (subs / INDEX_NAME).write_text(old)
    content = (subs / "a.srt").read_text()
    one_error(malmm(*run, "--every", "2", "--resume"), 2, "a.srt", "is not a srt file that malmm wrote", "move it away")
    assert (subs / INDEX_NAME).read_text() == old and (subs / "a.srt").read_text() == content


def test_a_file_being_replaced_is_taken_for_neither_work(tmp_path, monkeypatch):
    """A per-video file written again for other work loses its old job key before it is
    replaced: if the write fails (or the run dies) in between, --resume redoes it."""
    from malmm_cli.results.outputs import Output, OutputWriteError
    from malmm_cli.results.records import MemoryMeta, Result, SamplingMeta, SegmentText, VideoMeta

    specs = ["/v/a.mp4", "/v/b.mp4"]

    def result(spec: str, text: str) -> Result:
        return Result(input=spec, task="summarize", model="m", video=VideoMeta(2.0, 10.0, 8, 8),
                      sampling=SamplingMeta(2.0, 4, 0.0, 2.0), memory=MemoryMeta(4, 0), timings={},
                      segments=(SegmentText(0.0, 2.0, text),), summary=text)

    def done(job: str, mode: str = "resume") -> tuple[Output, set[str]]:
        out = Output("summarize", tmp_path / "subs", "srt", False, specs)
        return out, out.claim(mode, job)

    out, _ = done("old", "new")
    for spec in specs:
        out.write(result(spec, "old work"))
    out.close()
    out, nothing = done("new")
    assert nothing == set() and out.other_work_note(specs).startswith("2 of them")
    real_replace = os.replace

    def disk_full_for_srt(src, dst):
        if str(dst).endswith(".srt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", disk_full_for_srt)
    with pytest.raises(OutputWriteError):
        out.write(result(specs[0], "new work"))
    out.close()
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert "old work" in (tmp_path / "subs" / "a.srt").read_text()
    for job, expected in (("old", {specs[1]}), ("new", set())):
        out, found = done(job)
        out.close()
        assert found == expected, job


def test_a_model_folder_is_one_model_by_any_path(tmp_path, monkeypatch):
    from malmm_cli.results.jobkey import job_key
    from malmm_cli.engine.presets import ModelChoice
    from malmm_cli.engine.tasks import Job

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)

    def key(label: str) -> str:
        return job_key(Job(task="caption", model_label=label, memory=4), ModelChoice(label, label, None), None)

    assert key("m") == key("./m") == key(str(tmp_path / "m")) != key("tiny-random")
