"""Writers: time formats, and subtitle files that stay valid whatever text the model writes."""

from __future__ import annotations

import html
import io
import re

import pytest
import srt
import webvtt

from malmm_cli.results.records import MemoryMeta, Result, SamplingMeta, SegmentText, VideoMeta
from malmm_cli.results.writers import clock, get_writer, short_clock


def _result(texts):
    segments = tuple(SegmentText(10.0 * i, 10.0 * (i + 1), t) for i, t in enumerate(texts))
    return Result(input="x.mp4", task="summarize", model="m", video=VideoMeta(30.0, 25.0, 64, 48),
                  sampling=SamplingMeta(1.0, 30, 0.0, 30.0), memory=MemoryMeta(4, 26), timings={},
                  segments=segments, summary="a --> b\nc")


def test_clock_formats():
    assert clock(3725.5) == "01:02:05.500" and clock(62.0004, ",") == "00:01:02,000"
    assert short_clock(62.5) == "1:02" and short_clock(3725) == "1:02:05"


def test_subtitles_stay_valid_with_awkward_model_text(tmp_path):
    awkward = ["", "line one\n\nline two", "an arrow --> inside", "   "]
    srt_out, vtt_out = io.StringIO(), io.StringIO()
    get_writer("srt", "summarize").write(_result(awkward), srt_out)
    get_writer("vtt", "summarize").write(_result(awkward), vtt_out)
    subs = list(srt.parse(srt_out.getvalue()))
    assert len(subs) == 4 and subs[1].content == "line one line two" and "-->" not in subs[2].content
    path = tmp_path / "x.vtt"
    path.write_text(vtt_out.getvalue())
    cues = webvtt.read(str(path))
    assert len(cues) == 4 and cues[3].start == "00:00:30.000" and cues[0].text == "..."


# ---- escaping is total: no text can forge a cue (issue 18, point 8) -------------------------------

# What a cue's text might hold to break out of its cue: every kind of line break, blank lines,
# arrows in disguise, cue numbers and timings, VTT blocks and tags, entities, controls, a BOM.
DANGEROUS = ["-->", "--->", "---->", "- ->", "-- >", "- >", "->", "-", ">", "<", "&", "&amp;", "&lt;", "&gt;",
             "<v8 x>", "and2<v8 ...>", "<i>", "</i>", "<b>", "<00:00:01.000>", "<c.red>", "\n", "\r", "\r\n",
             "\n\n", "\r\r", "\n \n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e", "\x00", "\x1b[31m",
             "\ufeff", "\t", " ", "  ", "NOTE", "NOTE ", "STYLE", "REGION", "WEBVTT", "1", "12", "3\n",
             "00:00:05,000", "00:00:05.000", "01:00:00,000", "99:59:59.999", "0:0:5,0", ":", ",", ".",
             "00:00:05,000 --> 01:00:00,000", "00:00:05.000 --> 01:00:00.000 line:0", "X1:0 X2:1 Y1:0 Y2:1",
             "word", "é", "漢字", "🙂", "{\\an8}", '"', "'", "#"]
FORGERIES = ["a ---> b", "the end\n\n2\n00:00:05,000 ---> 01:00:00,000\nforged",
             "x\n00:00:05.000 ---> 01:00:00.000\nforged", "1\n00:00:05,000 - > 01:00:00,000\nforged",
             "\n\nNOTE -- > x\n\n00:00:05.000 --> 01:00:00.000\nforged", "and2<v8 ...>", "a &amp; b"]


def _texts(seed: int, n: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [("".join(rng.choice(DANGEROUS) for _ in range(rng.randint(0, 12)))) for _ in range(n)]


def _visible(text: str) -> list[str]:
    """The characters a reader sees: not spaces, line breaks, controls or the BOM."""
    import unicodedata

    return [c for c in text if not c.isspace() and c != "\ufeff" and unicodedata.category(c) != "Cc"]


def _summary(texts, seed=0):
    """A summary result with one segment per text, at ms-exact random times."""
    import random

    rng = random.Random(seed)
    bounds = sorted(rng.sample(range(0, 10_000_000), 2 * len(texts)))
    segments = tuple(SegmentText(bounds[2 * i] / 1000, bounds[2 * i + 1] / 1000, t) for i, t in enumerate(texts))
    return Result(input="x.mp4", task="summarize", model="m", video=VideoMeta(1e4, 25.0, 64, 48),
                  sampling=SamplingMeta(1.0, 30, 0.0, 1e4), memory=MemoryMeta(4, 26), timings={},
                  segments=segments, summary=texts[0] if texts else "")


def _written(fmt, result) -> str:
    out = io.StringIO()
    get_writer(fmt, "summarize").write(result, out)
    return out.getvalue()


def _check_srt_cues(cues, result):
    from datetime import timedelta

    assert len(cues) == len(result.segments)
    for cue, seg in zip(cues, result.segments):
        assert (cue.start, cue.end) == (timedelta(seconds=seg.start), timedelta(seconds=seg.end))


@pytest.mark.parametrize("seed", range(6))
def test_no_text_forges_an_srt_cue(seed):
    texts = _texts(seed, 50) + FORGERIES
    result = _summary(texts, seed)
    cues = list(srt.parse(_written("srt", result)))
    _check_srt_cues(cues, result)
    for cue, text in zip(cues, texts):
        assert "\n" not in cue.content and not re.search(r"-[ -]*>", cue.content), (text, cue.content)
        # nothing a reader sees is lost or added, but the head of an arrow ('>' read as '›')
        assert _visible(cue.content.replace("\u203a", ">")) == (_visible(text) or list("...")), text


@pytest.mark.parametrize("seed", range(6))
def test_no_text_forges_a_vtt_cue_and_the_text_round_trips(seed):
    texts = _texts(100 + seed, 50) + FORGERIES
    result = _summary(texts, seed)
    vtt = webvtt.from_string(_written("vtt", result))
    assert len(vtt.captions) == len(texts)
    for cue, seg, text in zip(vtt.captions, result.segments, texts):
        assert (cue.start_time.in_milliseconds(), cue.end_time.in_milliseconds()) == (
            round(seg.start * 1000), round(seg.end * 1000))
        assert cue.voice is None and "<" not in cue.raw_text and "-->" not in cue.raw_text
        # the text round-trips: its character references decoded, only spacing changed
        assert html.unescape(cue.text) == " ".join("".join(_visible_or_space(text)).split()) or (
            not _visible(text) and cue.text == "...")


def _visible_or_space(text):
    import unicodedata

    return [" " if c == "\ufeff" or unicodedata.category(c) == "Cc" else c for c in text]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_ffmpeg_reads_exactly_the_written_cues(tmp_path, fmt):
    """ffmpeg takes any line holding "-->" (after three numbers) for a timing line: the issue's
    '--->' made it read a forged cue lasting an hour. Read back through ffmpeg to SRT."""
    import subprocess

    from tests.media import ffmpeg_exe

    for seed in range(3):
        texts = _texts(200 + seed, 40) + FORGERIES
        result = _summary(texts, seed)
        path = tmp_path / f"s{seed}.{fmt}"
        path.write_text(_written(fmt, result), encoding="utf-8")
        out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "srt", "-"], capture_output=True,
                             check=True)
        _check_srt_cues(list(srt.parse(out.stdout.decode("utf-8", errors="replace"))), result)
