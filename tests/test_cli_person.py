"""The CLI as a person meets it: help pages, their examples, times, answers on stdout, summaries."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import numpy as np
import pytest

from malmm_cli.engine.tasks import fixed_segments
from malmm_cli.times import parse_time
from tests.cli import SAMPLE, TINY, help_examples, help_text, malmm, records
from tests.media import make_video

COMMANDS = [["caption"], ["ask"], ["classify"], ["summarize"], ["models", "list"], ["models", "download"],
            ["models", "path"], ["doctor"]]
# Pages checked for wording; train's and eval's examples run in tests/test_train.py and tests/test_eval.py
# (they need data files).
HELP_PAGES = COMMANDS + [["train"], ["eval"]]


@pytest.mark.parametrize("command", HELP_PAGES, ids=" ".join)
def test_help_pages_speak_words_not_python_types(command):
    text = help_text(command)
    for jargon in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list[", "{", "}"):
        assert jargon not in text, (jargon, text)
    assert help_examples(text), "every command shows examples"
    for line in help_examples(text):  # one example per line, nothing that reads like a pipe
        assert " | " not in line and line.count("malmm ") == 1


def flat(text: str) -> str:
    """A help page as one line of words, without the panels' box drawing."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_defaults_are_shown_where_they_are_not_obvious():
    summarize = flat(help_text(["summarize"]))
    assert "Segment length: seconds, MM:SS or HH:MM:SS. [default: 60]" in summarize
    assert "[default: txt, or from the -o extension]" in summarize
    assert "[default: $MALMM_MODEL, else instructblip-vicuna-7b]" in summarize
    assert "one JSON object per model" in flat(help_text(["models", "list"]))


@pytest.fixture
def example_dir(tmp_path, monkeypatch):
    """The files the examples name, made from the sample clip; MALMM_MODEL picks tiny-random so
    that every example runs exactly as printed."""
    for name in ("video.mp4", "clip.mp4", "lecture.mp4"):
        shutil.copy(SAMPLE, tmp_path / name)
    make_video(tmp_path / "movie.mp4", fps=1, n_frames=130, size=(64, 48))  # 2:10, for --start 1:30 --end 2:00
    (tmp_path / "videos").mkdir()
    shutil.copy(SAMPLE, tmp_path / "videos" / "a.mp4")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MALMM_MODEL", "tiny-random")
    return tmp_path


NEEDS_NETWORK = {"malmm models download instructblip-vicuna-7b"}


@pytest.mark.slow
def test_every_example_in_every_help_runs_as_printed(example_dir):
    ran = 0
    for command in COMMANDS:
        for example in help_examples(help_text(command)):
            args = shlex.split(example)[1:]
            out = malmm(*args, "-q") if args[0] in ("caption", "ask", "classify", "summarize") else malmm(*args)
            if example in NEEDS_NETWORK:  # tests never reach the network: it must fail in one sentence
                assert out.exit_code == 1 and "HF_HUB_OFFLINE is set" in out.stderr, (example, out.stderr)
            else:
                assert out.exit_code == 0, (example, out.stderr)
            ran += 1
    assert ran >= 17


# ---- times as people write them ------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("12.5", 12.5), ("1:30", 90.0), ("01:02:03.5", 3723.5), ("0:00.25", 0.25), (".5", 0.5),
    ("600", 600.0), (" 2:00 ", 120.0),
])
def test_times_parse(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["1:75", "1:60:00", "abc", "-5", "1::2", "inf", "nan", "", "1:2:3:4"])
def test_bad_times_are_refused(text):
    with pytest.raises(ValueError, match="is not a"):
        parse_time(text)


def test_times_on_the_command_line():
    rec = records(malmm("caption", SAMPLE, *TINY, "-q", "--json", "--start", "0:01", "--end", "0:04.5",
                        "--fps", 2, "--beams", 1, "--max-tokens", 2).stdout)[0]
    assert (rec["sampling"]["start"], rec["sampling"]["end"], rec["sampling"]["frames"]) == (1.0, 4.5, 7)
    out = malmm("caption", SAMPLE, *TINY, "-q", "--start", "1:75")  # in-process: Click's own rendering
    assert out.exit_code == 2 and "'1:75' is not a time: minutes and seconds after a colon must be below 60" in flat(
        out.stderr)


def test_an_end_past_a_videos_end_clamps_in_a_batch(tmp_path):
    short = tmp_path / "short.mp4"
    make_video(short, fps=10, n_frames=30)  # 3 s, where SAMPLE lasts 6 s
    out = malmm("caption", SAMPLE, short, *TINY, "-q", "--json", "--end", "5", "--fps", 2, "--beams", 1,
                "--max-tokens", 2)
    assert out.exit_code == 0, out.stderr
    long_rec, short_rec = sorted(records(out.stdout), key=lambda r: r["video"]["duration"], reverse=True)
    assert long_rec["sampling"]["end"] == 5.0 and "warnings" not in long_rec
    assert short_rec["sampling"]["end"] == short_rec["video"]["duration"]
    assert any("past the end of the video" in w for w in short_rec["warnings"])


# ---- one input, one question: the answer alone -------------------------------------------------


def test_one_question_prints_the_answer_alone():
    fast = [*TINY, "-q", "--frames", 3, "--beams", 1, "--max-tokens", 3]
    alone = malmm("ask", SAMPLE, "what is it?", *fast)
    assert alone.exit_code == 0 and len(alone.stdout.splitlines()) == 1 and not alone.stdout.startswith("Q: ")
    labelled = malmm("ask", SAMPLE, "what is it?", "-Q", "where?", *fast).stdout.splitlines()
    assert labelled[0] == "Q: what is it?" and labelled[1] == f"A: {alone.stdout.strip()}" and labelled[2] == "Q: where?"


# ---- summaries -----------------------------------------------------------------------------------


def test_a_sliver_at_the_end_joins_the_last_segment():
    times = np.arange(0, 6.0, 0.1)
    kept = fixed_segments(0.0, 6.0, 2.6, times)  # last window 0.8 s >= 2.6 / 4: its own segment
    assert [(s.start, s.end) for s in kept] == [(0.0, 2.6), (2.6, 5.2), (5.2, 6.0)]
    joined = fixed_segments(0.0, 6.0, 2.8, times)  # last window 0.4 s < 2.8 / 4: joins the one before
    assert [(s.start, s.end) for s in joined] == [(0.0, 2.8), (2.8, 6.0)]
    assert sum(len(s.frames) for s in joined) == len(times)
    assert [(s.start, s.end) for s in fixed_segments(0.0, 1.0, 60.0, times[:10])] == [(0.0, 1.0)]


@pytest.mark.parametrize("fmt", ["txt", "text"])
def test_summaries_as_txt(fmt, tmp_path):
    out = malmm("summarize", SAMPLE, *TINY, "-q", "--every", "0:03", "--format", fmt, "--beams", 1,
                "--max-tokens", 2)
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("[0:00 - 0:03] ") and lines[1].startswith("[0:03 - 0:06] ")
    assert lines[2].startswith("Summary: ")
    written = tmp_path / "lecture.txt"
    assert malmm("summarize", SAMPLE, *TINY, "-q", "--every", 3, "-o", written, "--beams", 1,
                 "--max-tokens", 2).exit_code == 0
    assert written.read_text().splitlines()[0].startswith("[0:00 - 0:03] ")


def test_srt_has_no_sliver_cue(tmp_path):
    import srt

    path = tmp_path / "s.srt"
    out = malmm("summarize", SAMPLE, *TINY, "-q", "--every", 2.8, "-o", path, "--beams", 1, "--max-tokens", 2)
    assert out.exit_code == 0, out.stderr
    cues = list(srt.parse(path.read_text()))
    assert len(cues) == 2 and cues[-1].end.total_seconds() == pytest.approx(6.0, abs=0.01)
    assert min((c.end - c.start).total_seconds() for c in cues) >= 2.8


def test_the_json_record_of_a_summary_is_unchanged_by_txt():
    rec = records(malmm("summarize", SAMPLE, *TINY, "-q", "--json", "--every", 3, "--beams", 1,
                        "--max-tokens", 2).stdout)[0]
    assert json.loads(json.dumps(rec))["segments"][0]["start"] == 0.0 and re.match(r".*", rec["summary"])


@pytest.mark.slow
def test_the_readme_quick_start_runs_on_a_fresh_install(tmp_path, monkeypatch):
    """The README's first runnable block, as a new user pastes it (without the URL line: tests
    never reach the network); it must not need the 32 GB model."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "MALMM_MODEL=tiny-random" in b)
    for name in ("movie.mp4", "video.mp4", "lecture.mp4"):
        shutil.copy(SAMPLE, tmp_path / name)
    (tmp_path / "videos").mkdir()
    shutil.copy(SAMPLE, tmp_path / "videos" / "a.mp4")
    monkeypatch.chdir(tmp_path)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[0] == "export MALMM_MODEL=tiny-random"
    monkeypatch.setenv("MALMM_MODEL", "tiny-random")
    ran = 0
    for command in commands[1:]:
        if "http" in command:
            continue
        args = shlex.split(command)
        assert args[0] == "malmm"
        out = malmm(*args[1:])
        assert out.exit_code == 0, (command, out.stderr)
        ran += 1
    assert ran == 6 and (tmp_path / "lecture.srt").exists() and (tmp_path / "results.jsonl").exists()
