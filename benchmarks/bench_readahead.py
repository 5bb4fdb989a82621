"""Issue 18: how far decord reads a video file ahead of the frames asked for, by file length.

    python benchmarks/bench_readahead.py [--minutes 10 60 120 240] [--hogs 0] [--end 5:00] [--cli]

It measures decord's reader, which malmm's decoder used until section 26 of BENCHMARKS.md
(files are now decoded with PyAV's FileFrames, which reads only what it decodes); decord
still probes every file (`open_reader`), so the measurement still runs.

Part 1 (always): for each synthetic testsrc video (64x48, 2 fps, H.264, as bench_flat_cli.py
makes them), a decord reader (the settings malmm's decoder used: `open_reader`, FFmpeg's
thread count) seeks to each of the first keyframes and takes one chunk as malmm's decoder does
(16 frames, every second frame: --fps 1 on a 2 fps video). The bytes the process read from
the file during that get_batch (rchar of /proc/self/io) are the compressed packets decord
pulled in: a chunk needs about 30 KB of them.

Why it reads more: decord's GetBatch pushes one packet per loop turn and takes a frame only if
its decoder thread has one ready (FFMPEGThreadedDecoder::Pop returns at once while no frame is
queued), so while that thread is behind, the caller keeps reading packets into an unbounded
queue, up to the end of the file. They are freed at the next seek (malmm parked its readers),
so what was held at a time is one get_batch's read-ahead per decoder worker: bounded by the
rest of the file on a short video, and by how long the decoding thread lags (longer on a busy
machine) on a long one.

Part 2 (--cli): peak RSS (ru_maxrss) of `malmm caption VIDEO --model tiny-random --fps 1
--end E` on each video, an empty feature cache each: the same frames, so any difference
comes from the file's length.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_flat_cli import HOG, synthetic_video
from common import ROOT, report


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def read_ahead(video: Path, chunks: int = 6) -> dict:
    """MB read from the file by one 16-frame get_batch after a seek to each of the first keyframes."""
    from malmm_cli.sources.video import open_reader

    reader = open_reader(video)
    keys = [int(k) for k in reader.get_key_indices()][:chunks]
    mb = []
    for key in keys:
        reader.seek(key)
        before = rchar()
        reader.get_batch(list(range(key, min(key + 32, len(reader)), 2)))
        mb.append(round((rchar() - before) / 2**20, 2))
    return {"file_mb": round(video.stat().st_size / 2**20, 1), "mb_read_per_chunk": mb,
            "max_mb": max(mb), "median_mb": float(np.median(mb))}


def cli_peak(video: Path, tmp: Path, end: str) -> float:
    cache = tmp / f"cache-{video.stem}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    (cache / "models").symlink_to(tmp / "models", target_is_directory=True)
    cmd = [sys.executable, "-m", "malmm_cli", "caption", str(video), "--model", "tiny-random", "--fps", "1",
           "-q", "--quant", "none", "--end", end]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "MALMM_CACHE_DIR": str(cache)})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return round(usage.ru_maxrss / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60, 120, 240])
    parser.add_argument("--hogs", type=int, default=0, help="CPU hogs beside the measurements")
    parser.add_argument("--cli", action="store_true", help="also peak RSS of malmm caption --end E per video")
    parser.add_argument("--end", default="5:00")
    parser.add_argument("--repeat", type=int, default=3, help="CLI runs per video (videos in turn)")
    parser.add_argument("--keep", type=Path, help="make the videos and model here and keep them")
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = args.keep or Path(scratch)
            tmp.mkdir(parents=True, exist_ok=True)
            videos = {}
            for minutes in args.minutes:
                videos[minutes] = tmp / f"testsrc-{minutes:g}min.mp4"
                if not videos[minutes].exists():
                    synthetic_video(videos[minutes], minutes)
            results: dict = {"hogs": args.hogs, "read_ahead": {f"{m:g} min": read_ahead(v) for m, v in videos.items()}}
            if args.cli:
                from models.tiny import ensure_tiny_checkpoint, tiny_random_dir

                os.environ["MALMM_CACHE_DIR"] = str(tmp)
                ensure_tiny_checkpoint(tiny_random_dir())
                del os.environ["MALMM_CACHE_DIR"]
                peaks: dict[str, list[float]] = {f"{m:g} min": [] for m in videos}
                for _ in range(args.repeat):
                    for m, v in videos.items():
                        peaks[f"{m:g} min"].append(cli_peak(v, tmp, args.end))
                results["cli_end"] = args.end
                results["cli_peak_rss_mb"] = peaks
            results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        for p in hogs:
            p.kill()
            p.wait()
    report("readahead", results, "python benchmarks/bench_readahead.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
