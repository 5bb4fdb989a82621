"""Issue 11: `--batch B` end to end, videos/s at B = 1, 4, 16 through the CLI's Analyzer.

    python benchmarks/bench_batch.py [--size tiny|real] [--videos 16] [--frames 24] [--rounds 3]
                                     [--batches 1 4 16] [--cache]

What `malmm caption videos/ --batch B` runs, minus writing the records: B=1 is
`Analyzer.run` per video (the plain path), B>1 `Analyzer.run_batch` per group of B. The
videos are synthetic clips (testsrc, 64x48), each a different length (`--frames` down to
half of it), so a group ends with its longest video and the others leave it early.

- `--size tiny`: the tiny-random model, as loaded by the CLI (its thread policy included).
- `--size real`: InstructBLIP's real ViT-g and Q-Former (random weights) with the tiny LLM,
  as in bench_reask.py; with `--cache` the features are read from a warm feature cache (the
  re-asking case: a new question about videos already seen), so the Q-Former and the LLM are
  the work. Without `--cache` each run decodes and encodes every frame.

The batch sizes alternate within each round. Each B's captions are compared with B=1's (how
many are equal: in fp32 all of them; in bf16, rounding that differs with the batch can change
a word).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from common import report


def clips(folder: Path, videos: int, frames: int) -> list[Path]:
    import imageio_ffmpeg

    paths = []
    for i in range(videos):
        n = frames - (i * frames // 2) // max(1, videos - 1)  # frames down to frames / 2
        path = folder / f"clip{i:02d}.mp4"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc=duration={n}:size=64x48:rate=1", "-vf", f"hue=h={i * 37}", "-c:v", "libx264",
                        "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)], check=True)
        paths.append(path)
    return paths


def session_for(size: str, tmp: Path, cache: bool):
    """(session, job): tiny-random as the CLI loads it, or the real-size vision path."""
    from malmm_cli.engine.features import FeatureCache
    from malmm_cli.engine.session import Session, SessionOptions

    features = FeatureCache(tmp / "features") if cache else None
    if size == "tiny":
        session = Session(SessionOptions("tiny-random", cache=False))
        session.analyzer.cache = features
        return session, session.job("caption", fps=1, memory=10, beams=1, max_tokens=8)
    from bench_reask import model_qformer_dtype, real_vision_model

    from malmm_cli.engine.presets import Generation
    from malmm_cli.engine.tasks import Job

    model = real_vision_model(tmp, model_qformer_dtype())
    job = Job(task="caption", model_label="real-vision", memory=10, generation=Generation(num_beams=1, max_new_tokens=8),
              fps=1, frames=None, prompts=("what does the video describe?",))
    return Session.from_model(model, model_id="bench-real", cache=features), job


def run_all(session, job, paths: list[Path], batch: int) -> tuple[float, list[str], int]:
    """(wall s, captions in input order, frames read) for all videos at this batch size, through
    the runners the CLI uses (one by one, or --batch's lockstep)."""
    from malmm_cli.runs.runners import Lockstep, OneByOne

    specs = [str(p) for p in paths]
    t0 = time.perf_counter()
    results = dict(session.run(specs, job, runner=OneByOne() if batch == 1 else Lockstep(batch)))
    wall = time.perf_counter() - t0
    failed = [r for r in results.values() if not hasattr(r, "text")]
    if failed:
        raise RuntimeError(failed[0].error)
    ordered = [results[s] for s in specs]
    return wall, [r.text for r in ordered], sum(r.sampling.frames for r in ordered)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=24, help="frames of the longest clip (1 fps)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cache", action="store_true", help="read features from a warm feature cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = clips(tmp, args.videos, args.frames)
        session, job = session_for(args.size, tmp, args.cache)
        analyzer = session.analyzer
        wall, reference, frames = run_all(session, job, paths, 1)  # warm-up; with --cache it fills the cache
        print(f"warm-up (B=1): {wall:.2f} s, {frames} frames, threads {analyzer.threads}", flush=True)
        walls: dict[int, list[float]] = {b: [] for b in args.batches}
        same = {b: [] for b in args.batches}  # per round: captions equal to B=1's
        for r in range(args.rounds):
            order = args.batches if r % 2 == 0 else list(reversed(args.batches))
            for b in order:
                wall, texts, _ = run_all(session, job, paths, b)
                walls[b].append(wall)
                same[b].append(sum(a == x for a, x in zip(texts, reference)))
                print(f"round {r + 1} B={b}: {wall:.2f} s ({frames / wall:.1f} frames/s)", flush=True)
    best = {b: min(v) for b, v in walls.items()}
    res = {
        "size": args.size, "videos": args.videos, "frames_total": frames, "cache": args.cache,
        "threads": str(analyzer.threads), "torch_threads": torch.get_num_threads(),
        "wall_s_rounds": {b: [round(x, 3) for x in v] for b, v in walls.items()},
        "frames_per_s_best": {b: round(frames / best[b], 2) for b in best},
        "videos_per_min_best": {b: round(60 * args.videos / best[b], 1) for b in best},
        "gain_over_b1_median": {b: round(statistics.median(walls[1]) / statistics.median(v), 2)
                                for b, v in walls.items()} if 1 in walls else None,
        "dtypes": {"vision": str(analyzer.model.vision_dtype), "qformer": str(analyzer.model.qformer_dtype)},
        "captions_equal_to_b1_per_round": same,
    }
    report(f"batch_{args.size}{'_cached' if args.cache else ''}", res,
           f"python benchmarks/bench_batch.py --size {args.size} --videos {args.videos} --frames {args.frames} "
           f"--rounds {args.rounds} --batches {' '.join(map(str, args.batches))}" + (" --cache" if args.cache else ""))


if __name__ == "__main__":
    main()
