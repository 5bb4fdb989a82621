"""Decoding throughput at a fixed sampling rate: malmm's stream_frames vs the ffmpeg CLI.

    python benchmarks/bench_decode.py                      # generates a 10-minute 640x360 clip
    python benchmarks/bench_decode.py --file movie.mp4 --rate 1 --repeats 5

Both sides decode the same file to RGB frames at `--rate` frames per second, in the same
run, interleaved (ffmpeg, ours with each worker count, repeat), so drifting machine load
hits both alike. ffmpeg: `ffmpeg -i FILE -vf fps=RATE -f rawvideo -pix_fmt rgb24 -` into
/dev/null. Ours: probe + plan_sampling + iterating stream_frames (frames land in numpy).
Reported: sampled frames per wall-clock second, source seconds per second, and the ratio
ours / ffmpeg per round and its median; with --memory-delay also peak RSS (VmHWM) when the
consumer is slower than decoding. Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from malmm_cli.sources import decoding, video  # noqa: E402


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_clip(path: Path, minutes: float, size: str, fps: int) -> None:
    """testsrc2 (moving pattern + counter) in H.264, x264 veryfast defaults (B-frames, keyint 250)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.mp4")
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
           f"testsrc2=size={size}:rate={fps}:duration={minutes * 60:g}",
           "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(tmp)]
    print("generating:", shlex.join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    os.replace(tmp, path)


def run_ffmpeg(path: Path, rate: float) -> tuple[float, int]:
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-vf", f"fps={rate:g}",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    nbytes = 0
    while chunk := proc.stdout.read(1 << 22):  # read it, as our side materialises frames too
        nbytes += len(chunk)
    if proc.wait() != 0:
        raise RuntimeError("ffmpeg failed")
    return time.perf_counter() - start, nbytes


def run_ours(path: Path, rate: float, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    info = video.probe(path)
    plan = video.plan_sampling(info, fps=rate)
    frames = 0
    with decoding.stream_frames(path, plan, info=info, workers=workers) as stream:
        for chunk in stream:
            frames += len(chunk.frames)
    return time.perf_counter() - start, frames


# Peak RSS with a consumer slower than decoding (as the model is): raw decord get_batch in a
# loop vs stream_frames. VmHWM, not ru_maxrss, which Linux carries over from the parent.
MEMORY_SCRIPT = r"""
import re, sys, time
import numpy as np
path, rate, delay, mode = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if mode == "decord":
    import decord
    vr = decord.VideoReader(path)
    idx = np.unique(np.searchsorted(vr.get_frame_timestamp(np.arange(len(vr)))[:, 0],
                                    np.arange(0, len(vr) / vr.get_avg_fps(), 1 / rate), side="right") - 1)
    for s in range(0, len(idx), 16):
        vr.get_batch(idx[s : s + 16]).asnumpy()
        time.sleep(delay)
else:
    from malmm_cli.sources import decoding, video
    info = video.probe(path)
    for chunk in decoding.stream_frames(path, video.plan_sampling(info, fps=rate), info=info, workers=int(mode)):
        time.sleep(delay)
print(int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024)
"""


def peak_memory(path: Path, rate: float, delay: float, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(rate), str(delay), mode],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, help="video to decode (default: generate one)")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the generated clip")
    ap.add_argument("--size", default="640x360", help="size of the generated clip")
    ap.add_argument("--source-fps", type=int, default=25, help="frame rate of the generated clip")
    ap.add_argument("--rate", type=float, default=1.0, help="sampling rate (frames per second)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="comma-separated decoder thread counts to time")
    ap.add_argument("--memory-delay", type=float, default=0.0,
                    help="also measure peak RSS with a consumer sleeping this long per 16-frame chunk")
    args = ap.parse_args()

    path = args.file
    if path is None:
        path = REPO / "bench-out" / f"decode_{args.minutes:g}min_{args.size}_{args.source_fps}fps.mp4"
        if not path.exists():
            make_clip(path, args.minutes, args.size, args.source_fps)
    info = video.probe(path)
    worker_counts = [int(w) for w in args.workers.split(",")]
    frame_bytes = info.width * info.height * 3

    rounds: list[dict[str, float]] = []
    sampled = 0
    for r in range(args.repeats):
        t_ff, nbytes = run_ffmpeg(path, args.rate)
        row = {"ffmpeg": t_ff}
        for w in worker_counts:
            row[f"w{w}"], sampled = run_ours(path, args.rate, w)
        rounds.append(row)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v:.2f}s" for k, v in row.items()), file=sys.stderr)
    ff_frames = nbytes // frame_bytes

    def line(name: str, times: list[float], frames: int) -> str:
        med = statistics.median(times)
        return (f"| {name} | {' / '.join(f'{t:.2f}' for t in times)} | {med:.2f} | {frames / med:.1f} "
                f"| {info.duration / med:.1f} |")

    cmd = "python " + shlex.join([sys.argv[0], *sys.argv[1:]])
    print(f"\nMeasured {dt.date.today().isoformat()} on {cpu_model()}, {os.cpu_count()} CPUs "
          f"(Python {platform.python_version()}, decord {video_decord_version()}).")
    print(f"Command: `{cmd}`. File: {path.name}, {info.width}x{info.height}, {info.fps:g} fps, "
          f"{info.duration:.0f} s, keyframes every {info.frame_count / max(1, len(info.key_frames)):.0f} frames; "
          f"sampling at {args.rate:g} fps.\n")
    print("| decoder | wall time per round (s) | median (s) | sampled frames/s | source s/s |")
    print("|---|---|---|---|---|")
    print(line("ffmpeg CLI (`-vf fps`, rgb24 to a pipe)", [r["ffmpeg"] for r in rounds], ff_frames))
    for w in worker_counts:
        print(line(f"malmm stream_frames, workers={w}", [r[f"w{w}"] for r in rounds], sampled))
    print()
    for w in worker_counts:
        ratios = [r["ffmpeg"] / r[f"w{w}"] for r in rounds]
        print(f"- throughput ratio ours/ffmpeg, workers={w}: per round "
              f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
    if args.memory_delay > 0:
        print(f"- peak RSS with a consumer taking {args.memory_delay:g} s per chunk: raw decord get_batch loop "
              f"{peak_memory(path, args.rate, args.memory_delay, 'decord')} MB; "
              + "; ".join(f"stream_frames workers={w} {peak_memory(path, args.rate, args.memory_delay, str(w))} MB"
                          for w in worker_counts))


def video_decord_version() -> str:
    import decord

    return decord.__version__


if __name__ == "__main__":
    main()
