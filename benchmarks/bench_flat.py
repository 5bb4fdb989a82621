"""Benchmark 3: constant cost per frame and constant memory, however long the video.

    python benchmarks/bench_flat.py [--frames 1000] [--skip-rss]

(a) The memory path at real size (Q-Former 12 x 768 in bf16, visual tokens 257 x 1408, M=20):
    wall time per frame around frame 100 and around frame 1,000 (median of 20 frames each).
    The ViT costs the same for every frame by construction; what could grow is the memory.
(b) Peak RSS of `malmm caption --fps 1 --model tiny-random` on a 10-minute and a 2-hour
    synthetic video (small frames), each in a fresh process (ru_maxrss of the child), with the
    feature cache off (`--no-cache`) and on (the default: its entry is written as the video
    is read).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, qformer_model, report


def per_frame_times(frames: int, probes: tuple[int, ...], window: int = 20) -> dict[int, float]:
    qformer = qformer_model(torch.bfloat16)  # the default for a bf16 model (models.loading.qformer_dtype_for)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(257, 1408, generator=gen)
    times: dict[int, list[float]] = {p: [] for p in probes}
    with torch.inference_mode():
        embeddings = qformer.embed(torch.randn(1, 32, 768).bfloat16(), torch.randint(1000, 2000, (1, 12)))
        key_mask = None  # one unpadded instruction
        memory = qformer.new_memory(20)
        for t in range(frames):
            frame = (base + 0.3 * torch.randn(257, 1408, generator=gen))[None].bfloat16()  # drifting content
            t0 = time.perf_counter()
            qformer.step(embeddings, key_mask, frame, memory)
            dt = time.perf_counter() - t0
            for p in probes:
                if p - window // 2 <= t < p + window // 2:
                    times[p].append(dt)
    return {p: statistics.median(v) for p, v in times.items()}


def synthetic_video(path: Path, minutes: float) -> None:
    """testsrc at 2 fps, 64x48: long in time, cheap to make and to decode."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc=duration={minutes * 60}:size=64x48:rate=2", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(path)], check=True)


def peak_rss_mb(video: Path, cache: Path, use_cache: bool = False) -> tuple[float, float]:
    """(peak RSS of a fresh `malmm caption` process in MB, wall seconds)."""
    cmd = [sys.executable, "-m", "malmm_cli", "caption", str(video), "--model", "tiny-random", "--fps", "1", "-q",
           *([] if use_cache else ["--no-cache"])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, MALMM_CACHE_DIR=str(cache)), cwd=ROOT)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss did not move: measure each video in a fresh parent process")
    return peak / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    probes = (100, args.frames - 10)
    t = per_frame_times(args.frames, probes)
    results = {"memory_path_s_per_frame": {f"frame_{p}": round(v, 4) for p, v in t.items()},
               "late_over_early": round(t[probes[1]] / t[probes[0]], 3)}
    print(results, flush=True)
    if not args.skip_rss:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            rss = {}
            videos = {}
            for name, minutes in (("10min", 10), ("2h", 120)):
                videos[name] = tmp / f"{name}.mp4"
                synthetic_video(videos[name], minutes)
            for use_cache in (False, True):
                for name, minutes in (("10min", 10), ("2h", 120)):
                    # Each measurement in its own parent so ru_maxrss is that child's peak; a fresh
                    # cache each time, so the entry is written, not read.
                    cache = tmp / f"cache-{name}-{use_cache}"
                    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_flat import "
                            f"peak_rss_mb; from pathlib import Path; print(*peak_rss_mb(Path({str(videos[name])!r}), "
                            f"Path({str(cache)!r}), {use_cache}))")
                    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                    mb, wall = map(float, out.stdout.split())
                    key = f"{name}_{'cache' if use_cache else 'no_cache'}"
                    rss[key] = {"frames": int(minutes * 60), "peak_rss_mb": round(mb, 1), "wall_s": round(wall, 1)}
                    print(key, rss[key], flush=True)
        results["cli_peak_rss"] = rss
        for mode in ("no_cache", "cache"):
            results[f"rss_2h_over_10min_{mode}"] = round(rss[f"2h_{mode}"]["peak_rss_mb"] / rss[f"10min_{mode}"]["peak_rss_mb"], 3)
    report("flat", results, "python benchmarks/bench_flat.py --frames " + str(args.frames))


if __name__ == "__main__":
    main()
