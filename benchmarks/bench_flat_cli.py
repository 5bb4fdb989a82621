"""Issue 18: peak RSS of `malmm caption` on a long against a short video, through the CLI.

    python benchmarks/bench_flat_cli.py [--short 10] [--long 120] [--fps 1] [--loads 0 2]
        [--paths first no-cache hit] [--model tiny-random|real-qformer] [--trees DIR ...] [--together] [--repeat 1]

Each measurement is one `malmm caption VIDEO --fps F -q` process (the CLI's whole path: probe,
decode threads, preprocess, ViT, feature cache, Q-Former, LLM) on a synthetic testsrc video
(64x48, 2 fps, H.264), with its own MALMM_CACHE_DIR. The model is built once beforehand, never
by a measured run. Three paths:

- first: an empty feature cache, so the run writes the video's entry as it reads it;
- no-cache: `--no-cache`;
- hit: the cache that `first` left, so the run reads the features back.

`--loads` lists how many CPU hogs (`python -c "while True: pass"`, one core each) run beside
the measurements (0 = quiet). Short and long runs alternate, so both see the same load.
`--trees` lists source trees (checkouts) to compare, e.g. main without a fix and a branch with
it: each run is `python -m malmm_cli` of that tree (PYTHONPATH=tree), and the trees alternate
run by run, so they too see the same load.

Peak RSS is the kernel's (ru_maxrss of that process, from wait4): no sample can miss it. A
psutil sampler (every 50 ms, the process and any children) splits the resident set at its
sampled peak into anonymous memory and file-backed pages (shared libraries, and any mapped
file; psutil's `shared` = RssFile + RssShmem), gives the largest sample in each tenth of the
run's time (is the peak the model's loading, or the video's decoding?), and records the load
average.

`--model real-qformer` runs a stand-in at InstructBLIP's sizes where memory could grow with
the video: the real Q-Former (12 x 768, cross-attention to 257 x 1408 visual tokens, M per the
task) and a ViT whose output is 257 tokens x 1408 wide (one layer, so 7,200 frames fit in
the time here), with the tiny LLM and tokenizers. Its features (257 x 1408 per frame) go
through the same feature cache as ViT-g's would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, report

HOG = "while True: pass"
PATHS = ("first", "no-cache", "hit")


def synthetic_video(path: Path, minutes: float) -> Path:
    """testsrc at 2 fps, 64x48: long in time, cheap to make and to decode."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc=duration={minutes * 60}:size=64x48:rate=2", "-c:v", "libx264", "-preset",
                    "ultrafast", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def build_real_qformer(path: Path) -> Path:
    """The stand-in checkpoint: tiny-random with the real Q-Former and a 1-layer ViT 1408 wide."""
    import torch
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    from models.tiny import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(path.parent / "tiny-for-standin")
    config = json.loads((tiny / "config.json").read_text())
    config["vision_config"].update(hidden_size=1408, intermediate_size=1408, num_hidden_layers=1,
                                   num_attention_heads=16)
    config["qformer_config"].update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, max_position_embeddings=512,
                                    cross_attention_frequency=2, encoder_hidden_size=1408)
    for key in ("architectures", "transformers_version", "_name_or_path"):
        config.pop(key, None)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig.from_dict(config)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    for f in tiny.iterdir():  # tokenizers and processor: not the config, weights or tiny's marker
        if f.name in ("config.json", "model.safetensors", "malmm_tiny.json"):
            continue
        (shutil.copytree if f.is_dir() else shutil.copy)(f, path / f.name)
    shutil.rmtree(tiny)
    return path


class Sampler(threading.Thread):
    """RSS of a process and its children every `interval` s: the sample with the largest total."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"rss_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0}
        self.series: list[tuple[float, float]] = []  # (seconds since start, RSS MB) of every sample
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                infos = [p.memory_info() for p in procs]
            except psutil.NoSuchProcess:
                break
            rss = sum(i.rss for i in infos) / 2**20
            self.series.append((time.monotonic(), rss))
            if rss > self.peak["rss_mb"]:
                shared = sum(i.shared for i in infos) / 2**20
                self.peak = {"rss_mb": round(rss, 1), "anon_mb": round(rss - shared, 1), "file_mb": round(shared, 1)}
            time.sleep(self.interval)

    def by_tenth(self) -> list[float]:
        """The largest sampled RSS (MB) in each tenth of the run's time: where the peak falls
        (loading the model, or the video's decoding) and whether the decoding part grows."""
        if not self.series:
            return []
        t0, t1 = self.series[0][0], self.series[-1][0]
        tenths = [0.0] * 10
        for t, rss in self.series:
            k = min(9, int(10 * (t - t0) / max(t1 - t0, 1e-9)))
            tenths[k] = max(tenths[k], round(rss, 1))
        return tenths


def run_cli(tree: Path, video: Path, cache: Path, model: str, fps: float, no_cache: bool) -> dict:
    cmd = [sys.executable, "-m", "malmm_cli", "caption", str(video), "--model", model, "--fps", str(fps), "-q",
           "--quant", "none", *(["--no-cache"] if no_cache else [])]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(tree), "MALMM_CACHE_DIR": str(cache)})
    sampler = Sampler(proc.pid)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "sampled_at_peak": sampler.peak,
            "sampled_max_by_tenth_mb": sampler.by_tenth(),
            "wall_s": round(wall, 1), "loadavg_at_start": " ".join(map(str, load))}


def fresh_cache(root: Path, name: str, models: Path) -> Path:
    """A MALMM_CACHE_DIR of its own, sharing the models built beforehand (tiny-random lives there)."""
    cache = root / name
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(models, target_is_directory=True)
    return cache


def run_one(args, tmp: Path, video: Path, model: str, models: Path, path: str, label: str) -> dict:
    """One measured run; `hit` reads the entry that this tree's `first` run left (made now if none)."""
    tree = args.trees[int(label.rsplit("-", 1)[1])]
    name = video.stem
    if path == "hit":
        cache = tmp / f"cache-{label}-first-{name}"
        if not (cache / "features").is_dir():
            cache = fresh_cache(tmp, f"cache-{label}-first-{name}", models)
            run_cli(tree, video, cache, model, args.fps, False)
    else:
        cache = fresh_cache(tmp, f"cache-{label}-{path}-{name}", models)
    return run_cli(tree, video, cache, model, args.fps, path == "no-cache")


def measure(args, tmp: Path, videos: dict[str, Path], model: str, models: Path, hogs: int, rnd: int) -> dict:
    """Every (path, video, tree) once beside `hogs` CPU hogs: one after another (short, then
    long; the trees in turn), or with --together all at once (the hits after the others, as
    they read the entries the first runs write): all then run under the same load."""
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    runs = [(path, name, t) for path in args.paths for name in videos for t in range(len(args.trees))]
    waves = [[r for r in runs if r[0] != "hit"], [r for r in runs if r[0] == "hit"]] if args.together else \
        [[r] for r in runs]
    rows: dict[str, dict] = {path: {str(t): {} for t in args.trees} for path in args.paths}

    def one(run: tuple[str, str, int]) -> None:
        path, name, t = run
        row = rows[path][str(args.trees[t])]
        row[name] = run_one(args, tmp, videos[name], model, models, path, f"{hogs}-{rnd}-{t}")
        print(f"hogs={hogs} round={rnd} {path} {name} {args.trees[t]}: {json.dumps(row[name])}", flush=True)

    try:
        time.sleep(1.0 if hogs else 0.0)  # let the hogs take their cores before the first run
        for wave in filter(None, waves):
            with ThreadPoolExecutor(len(wave)) as pool:
                list(pool.map(one, wave))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for by_tree in rows.values():
        for row in by_tree.values():
            row["long_over_short"] = round(row["long"]["peak_rss_mb"] / row["short"]["peak_rss_mb"], 3)
    return rows


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the hogs and the run
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", type=float, default=10, help="minutes of the short video")
    parser.add_argument("--long", type=float, default=120, help="minutes of the long video")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 2], help="CPU hogs beside the runs")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--model", choices=("tiny-random", "real-qformer"), default="tiny-random")
    parser.add_argument("--trees", type=Path, nargs="+", default=[ROOT], help="source trees to compare, in turn")
    parser.add_argument("--together", action="store_true", help="all runs of a load at once (see measure)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="make the videos and model here and keep them")
    args = parser.parse_args()
    args.trees = [t.resolve() for t in args.trees]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        videos = {}
        for name, minutes in (("short", args.short), ("long", args.long)):
            videos[name] = tmp / f"testsrc-{minutes:g}min.mp4"
            if not videos[name].exists():
                synthetic_video(videos[name], minutes)
        models = tmp / "models"
        if args.model == "tiny-random":
            from models.tiny import ensure_tiny_checkpoint, tiny_random_dir

            os.environ["MALMM_CACHE_DIR"] = str(tmp)  # tiny_random_dir() -> tmp/models/tiny-random-vN
            ensure_tiny_checkpoint(tiny_random_dir())
            del os.environ["MALMM_CACHE_DIR"]
            model = "tiny-random"
        else:
            model = str(tmp / "real-qformer")
            if not (tmp / "real-qformer" / "config.json").exists():
                build_real_qformer(tmp / "real-qformer")
            models.mkdir(exist_ok=True)
        results = {"videos_minutes": {"short": args.short, "long": args.long}, "fps": args.fps, "model": args.model,
                   "trees": [str(t) for t in args.trees], "rounds": []}
        for rnd in range(args.repeat):
            results["rounds"].append({f"hogs_{h}": measure(args, tmp, videos, model, models, h, rnd)
                                      for h in args.loads})
    command = "python benchmarks/bench_flat_cli.py " + " ".join(sys.argv[1:])
    report(f"flat_cli_{args.model}", results, command)


if __name__ == "__main__":
    main()
