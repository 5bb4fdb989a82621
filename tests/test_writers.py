"""Writers: time formats, and subtitle files that stay valid whatever text the model writes."""

from __future__ import annotations

import io

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
    assert len(subs) == 4 and subs[1].content == "line one\nline two" and "-->" not in subs[2].content
    path = tmp_path / "x.vtt"
    path.write_text(vtt_out.getvalue())
    cues = webvtt.read(str(path))
    assert len(cues) == 4 and cues[3].start == "00:00:30.000" and cues[0].text == "..."
