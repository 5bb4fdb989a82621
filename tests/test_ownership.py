"""Nothing lost, round two: -o replaces or adds to a file only while its content is what malmm
wrote there (a record of its digest, not a guess from its content); a crash at any point of a
write leaves the file malmm's; file names that are not UTF-8, or that hold newlines and escape
codes, are analysed, recorded and shown like any other; stdout that is full or closed is one
sentence; duplicates are named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from malmm_cli.engine import loader
from malmm_cli.results.records import MemoryMeta, Result, SamplingMeta, VideoMeta
from tests.cli import SAMPLE, malmm
from tests.cli import TINY as CLI_TINY
from tests.cli import records as text_records

TINY = [*CLI_TINY, "-q"]
FAST = ["--frames", "4", "--beams", "1", "--max-tokens", "2"]


def one_error(out, code: int, *words: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == code, out.stderr
    assert len(lines) == 1 and lines[0].startswith("malmm: error: "), out.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_model", refuse)


def _result(spec: str, text: str) -> Result:
    return Result(input=spec, task="caption", model="m", video=VideoMeta(1.0, 10.0, 8, 8),
                  sampling=SamplingMeta(None, 4, 0.0, 1.0), memory=MemoryMeta(4, 0), timings={}, text=text)


# ---- 1. only what malmm wrote, and nobody changed since ----------------------------------------


@pytest.mark.parametrize("name, content, extra", [
    ("notes.txt", "my own notes\n", []),                       # any UTF-8 .txt used to count as ours
    ("README.md", "# My project\n\nnotes\n", ["--format", "md"]),  # any .md starting with '#' too
    ("subs.srt", "1\n00:00:00,000 --> 00:00:01,000\nmy own subtitle\n\n", ["--format", "srt"]),
    ("subs.vtt", "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nmine\n\n", ["--format", "vtt"]),
])
def test_a_users_file_is_refused_even_with_overwrite_in_a_sentence_that_does_not_offer_it(
        tmp_path, no_model, name, content, extra):
    target = tmp_path / name
    target.write_text(content)
    command = "summarize" if extra else "caption"
    for mode in ([], ["--overwrite"]):
        line = one_error(malmm(command, SAMPLE, "-o", target, *TINY, *extra, *mode), 2, str(target),
                         "is not a results file written by malmm")
        assert "--overwrite" not in line and "already holds results" not in line
    assert target.read_text() == content


def test_malmms_own_file_edited_since_is_a_users_file(tmp_path):
    text, jsonl = tmp_path / "caption.txt", tmp_path / "r.jsonl"
    assert malmm("caption", SAMPLE, "-o", text, *TINY, *FAST).exit_code == 0
    assert malmm("caption", SAMPLE, "-o", jsonl, *TINY, *FAST).exit_code == 0
    # Untouched, they are malmm's: replaced with --overwrite, added to with --resume.
    assert malmm("caption", SAMPLE, "-o", text, *TINY, *FAST, "--overwrite").exit_code == 0
    assert malmm("caption", SAMPLE, "-o", jsonl, *TINY, *FAST, "--resume").exit_code == 0
    with open(text, "a") as f:
        f.write("my note on this caption\n")
    edited = jsonl.read_text().replace('"caption"', '"my caption"', 1)
    jsonl.write_text(edited)
    for target, modes in ((text, [[], ["--overwrite"]]), (jsonl, [[], ["--overwrite"], ["--resume"]])):
        before = target.read_bytes()
        for mode in modes:
            line = one_error(malmm("caption", SAMPLE, "-o", target, *TINY, *FAST, *mode), 2, str(target),
                             "changed since")
            assert "--overwrite" not in line
        assert target.read_bytes() == before


def test_a_crash_after_a_record_is_written_but_before_it_is_recorded_locks_nobody_out(tmp_path, monkeypatch):
    """Between the append and the record of the new digest, the record names both contents."""
    from malmm_cli.results import written
    from malmm_cli.results.outputs import Output

    path = tmp_path / "r.txt"
    out = Output("caption", path, None, False, ["a.mp4", "b.mp4"])
    out.claim("new")
    out.open()
    out.write(_result("a.mp4", "first"))
    real_save = written.Record.save

    def crash_after_the_append(self, kept, next=None):
        if next is None:
            raise RuntimeError("the process died here")
        real_save(self, kept, next)

    monkeypatch.setattr(written.Record, "save", crash_after_the_append)
    with pytest.raises(RuntimeError):
        out.write(_result("b.mp4", "second"))
    out.close()
    monkeypatch.setattr(written.Record, "save", real_save)
    assert path.read_text().count("== ") == 2  # both records are in the file
    again = Output("caption", path, None, False, ["a.mp4", "b.mp4"])
    again.claim("overwrite")  # still malmm's
    again.close()


def test_a_crash_in_the_middle_of_a_write_leaves_a_file_that_is_still_malmms(tmp_path, monkeypatch):
    """Half a record got out, then the process died: text is still replaceable with --overwrite,
    and JSON Lines resume, with the torn line cut off into a file beside them."""
    from malmm_cli.results import results_file
    from malmm_cli.results.outputs import Output

    for name, fmt in (("r.txt", None), ("r.jsonl", "json")):
        path = tmp_path / name
        out = Output("caption", path, fmt, False, ["a.mp4", "b.mp4"])
        out.claim("new", "0123456789abcdef")
        out.open()
        out.write(_result("a.mp4", "first"))
        real_write_all = results_file._write_all

        def die_halfway(fd, data):
            os.write(fd, data[: len(data) // 2])
            raise SystemExit("killed")

        monkeypatch.setattr(results_file, "_write_all", die_halfway)
        with pytest.raises(SystemExit):
            out.write(_result("b.mp4", "second \u2014 caf\u00e9"))
        monkeypatch.setattr(results_file, "_write_all", real_write_all)
        out.close()
        if fmt is None:
            again = Output("caption", path, fmt, False, ["a.mp4"])
            again.claim("overwrite")
            again.close()
            continue
        again = Output("caption", path, fmt, False, ["a.mp4", "b.mp4"])
        assert again.claim("resume", "0123456789abcdef") == {"a.mp4"}
        again.close()
        with open(path, encoding="utf-8") as f:
            assert [json.loads(line)["input"] for line in f] == ["a.mp4"]
        assert (tmp_path / "r.jsonl.torn").read_bytes().startswith(b'{"input": "b.mp4"')


def test_results_written_before_malmm_kept_records(tmp_path):
    """Files of older versions have no record: JSON Lines of records with job keys are verifiably
    malmm's and resume; text is anybody's."""
    from malmm_cli.results.written import RECORDS

    jsonl, text = tmp_path / "old.jsonl", tmp_path / "old.txt"
    assert malmm("caption", SAMPLE, "-o", jsonl, *TINY, *FAST).exit_code == 0
    assert malmm("caption", SAMPLE, "-o", text, *TINY, *FAST).exit_code == 0
    shutil.rmtree(Path(os.environ["MALMM_CACHE_DIR"]) / RECORDS)  # as if written by an older malmm
    out = malmm("caption", SAMPLE, "-o", jsonl, *CLI_TINY, *FAST, "--resume")
    assert out.exit_code == 0 and "1 input already done, 0 to go" in out.stderr
    assert malmm("caption", SAMPLE, "-o", jsonl, *TINY, *FAST, "--overwrite").exit_code == 0
    assert len(text_records(jsonl.read_text())) == 1
    one_error(malmm("caption", SAMPLE, "-o", text, *TINY, *FAST, "--overwrite"), 2, "not a results file")


# ---- 4. a file name where a directory is needed ------------------------------------------------


@pytest.mark.parametrize("name, fmt", [("all.srt", "srt"), ("subs.vtt", "vtt"), ("out.txt", "srt"),
                                       ("clip.mp4", "vtt")])
def test_a_file_name_where_one_file_per_video_is_needed_is_a_usage_error(tmp_path, no_model, name, fmt):
    second = tmp_path / "second.mp4"
    shutil.copy(SAMPLE, second)
    target = tmp_path / name
    one_error(malmm("summarize", SAMPLE, second, "--format", fmt, "-o", target, *TINY), 2, str(target),
              "-o DIRECTORY")
    assert not target.exists()


# ---- 6. file names that are not UTF-8 ------------------------------------------------------------


@pytest.fixture
def undecodable(tmp_path) -> tuple[Path, Path]:
    """A folder with a.mp4 and b<0xff>.mp4 (not UTF-8): (folder, the second as Python names it)."""
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.mp4")
    name = os.fsdecode(os.fsencode(folder) + b"/b\xff.mp4")
    shutil.copy(SAMPLE, name)
    return folder, Path(name)


def test_a_file_name_that_is_not_utf8_is_analysed_recorded_and_resumed(tmp_path, undecodable):
    folder, odd = undecodable
    output = tmp_path / "r.jsonl"
    out = malmm("caption", folder, "-o", output, *TINY, *FAST)
    assert out.exit_code == 0, out.stderr
    with open(output, encoding="utf-8") as f:  # strict: the file is valid UTF-8
        rows = [json.loads(line) for line in f]
    assert [os.fsencode(r["input"]) for r in rows] == [os.fsencode(folder / "a.mp4"), os.fsencode(odd)]
    assert b"b\\udcff.mp4" in output.read_bytes()  # JSON-escaped, as documented
    again = malmm("caption", folder, "-o", output, *CLI_TINY, *FAST, "--resume")
    assert again.exit_code == 0 and "2 inputs already done, 0 to go" in again.stderr
    batch = tmp_path / "batch.jsonl"
    assert malmm("caption", folder, "-o", batch, *TINY, *FAST, "--batch", "4").exit_code == 0
    assert len(text_records(batch.read_text(encoding="utf-8"))) == 2
    stdout = malmm("caption", folder, *TINY, *FAST, "--json")
    assert stdout.exit_code == 0
    assert [os.fsencode(r["input"]) for r in text_records(stdout.stdout_bytes.decode("utf-8"))][1] == os.fsencode(odd)
    text = malmm("caption", folder, *TINY, *FAST)
    assert text.exit_code == 0 and "== " + str(folder / "b\\xff.mp4") in text.stdout_bytes.decode("utf-8")
    subs = tmp_path / "subs"
    assert malmm("summarize", folder, "--format", "srt", "-o", subs, *TINY, "--fps", "1", "--every", "3",
                 "--max-tokens", "2", "--beams", "1").exit_code == 0
    assert sorted(os.listdir(os.fsencode(subs))) == [b".malmm-outputs.json", b"a.srt", b"b\xff.srt"]


# ---- 10. stdout full, closed, or gone ------------------------------------------------------------


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malmm_cli", *args], stderr=subprocess.PIPE, text=True,
                          timeout=180, **kwargs)


def test_stdout_on_a_full_device_is_one_sentence():
    with open("/dev/full", "w") as full:
        out = _cli("caption", str(SAMPLE), *TINY, *FAST, stdout=full)
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["malmm: error: Cannot write the results to standard output "
                                       "(no space left on device)."]


@pytest.mark.parametrize("command", [["caption", str(SAMPLE), *TINY, *FAST],
                                     ["eval", "data.csv", "--task", "classify", *TINY]])
def test_stdout_closed_is_one_sentence_before_anything_runs(command):
    out = _cli(*command, preexec_fn=lambda: os.close(1))
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["malmm: error: Standard output is closed, so results have nowhere to go; "
                                       "give -o FILE."]


def test_a_reader_that_leaves_stops_malmm_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "malmm_cli", "caption", str(SAMPLE), str(SAMPLE), *TINY, *FAST,
                             "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first record
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1 and err == b""


# ---- 11b, 11c. duplicates named; names and labels escaped on the terminal --------------------------


def test_duplicate_inputs_are_named_once(tmp_path):
    video = tmp_path / "a.mp4"
    shutil.copy(SAMPLE, video)
    link = tmp_path / "link.mp4"
    link.symlink_to(video)
    out = malmm("caption", video, link, video, *CLI_TINY, *FAST, "--json")
    assert out.exit_code == 0 and len(text_records(out.stdout)) == 1
    notes = [line for line in out.stderr.splitlines() if "duplicate inputs" in line]
    assert notes == [f"malmm: 2 duplicate inputs dropped (each video is read once): {link} (the same file as "
                     f"{video}), {video} (given twice)"]


def test_newlines_and_escape_codes_in_names_and_labels_never_reach_the_terminal_raw(tmp_path):
    evil = tmp_path / "x\n\x1b[2Jred.mp4"
    shutil.copy(SAMPLE, evil)
    out = malmm("classify", evil, *CLI_TINY, "--frames", "4", "--labels", "cat,bad\nlabel,\x1b]0;title\x07")
    assert out.exit_code == 0, out.stderr
    for stream in (out.stdout, out.stderr):
        assert "\x1b" not in stream and "\x07" not in stream
    assert all(line.startswith("malmm: ") for line in out.stderr.splitlines() if "FutureWarning" not in line
               and "forward_call" not in line)
    assert "bad\\nlabel" in out.stdout and "\\x1b]0;title\\x07" in out.stdout
    assert len(out.stdout.splitlines()) == 3  # one row per label
    assert "x\\n\\x1b[2Jred.mp4" in out.stderr
    missing = malmm("caption", tmp_path / "gone\n\x1bc.mp4", *TINY)  # ESC c: reset the terminal
    assert missing.stderr.count("\n") == 1 and "gone\\n\\x1bc.mp4 does not exist" in missing.stderr
    records = malmm("classify", evil, *TINY, "--frames", "4", "--labels", "cat,bad\nlabel", "--json")
    (record,) = text_records(records.stdout)
    assert record["input"] == str(evil) and {x["label"] for x in record["labels"]} == {"cat", "bad\nlabel"}
