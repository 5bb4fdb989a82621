"""Issue 11: how much slower malmm gets beside other CPU-bound work (a busy machine).

    python benchmarks/bench_contention.py [--rounds 3] [--hogs 2] [--configs '' MALMM_THREADS=2] [--real-size]

Runs `malmm caption CLIP --model tiny-random --fps 2 --no-cache -q` on a 70 s synthetic clip,
alternating quiet runs and runs beside `--hogs` busy-looping processes (pure Python, one
core each), and reports wall times and their ratio per round, for each environment in
`--configs` (given to the malmm process only), interleaved round by round so that thread
policies are compared in the same run.

`--real-size` also times the real-size ViT-g (bf16, a chunk of 4 frames) and Q-Former memory
step (bf16, M=20) with one thread and with all cores, quiet and beside the hogs, and reports
the team sizes malmm's plan (malmm_cli/threads.py) picks beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, report

HOG = "while True: pass"


def clip(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.media import make_video

    path = folder / "clip70s.mp4"
    make_video(path, fps=25, n_frames=25 * 70, size=(160, 120))
    return path


def run_once(path: Path, env: dict[str, str], cache: str) -> float:
    cmd = [sys.executable, "-m", "malmm_cli", "caption", str(path), "--model", "tiny-random", "--fps", "2",
           "--no-cache", "-q", "--beams", "1", "--max-tokens", "5"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **env, "MALMM_CACHE_DIR": cache})
    return time.perf_counter() - t0


def _qformer_step_timer():
    """Seconds per memory step of the real-size Q-Former (bf16, M=20, bank full)."""
    import torch

    from common import qformer_model

    qformer = qformer_model(torch.bfloat16)
    embeddings = torch.randn(1, 32 + 10, 768).bfloat16()
    feats = torch.randn(30, 257, 1408).bfloat16()

    def per_step() -> float:
        memory = qformer.new_memory(20, True)
        with torch.inference_mode():
            for i in range(25):  # fill the bank and start compressing
                qformer.step(embeddings, None, feats[i : i + 1], memory)
            t0 = time.perf_counter()
            for i in range(25, 30):
                qformer.step(embeddings, None, feats[i : i + 1], memory)
        return (time.perf_counter() - t0) / 5

    return per_step


def real_size_under_contention(hogs: int, repeat: int) -> dict:
    """ViT-g (a chunk of 4 frames) and the Q-Former step, quiet and beside the hogs, with one
    thread and with all cores, and the team sizes malmm's plan picks there."""
    import torch

    from common import timeit, vision_model
    from malmm_cli.engine.threads import plan_threads, usable_cores

    vit, pixels = vision_model(torch.bfloat16), torch.randn(4, 3, 224, 224).bfloat16()
    qformer_step = _qformer_step_timer()

    def measure(threads: int) -> dict:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            frame = timeit(lambda: vit(pixel_values=pixels).last_hidden_state, repeat=repeat) / 4
        return {"vit_s_per_frame": round(frame, 3), "qformer_s_per_step": round(qformer_step(), 3)}

    cores = usable_cores()
    results = {"cores": cores, "quiet": {f"{n}_threads": measure(n) for n in sorted({1, cores})}}
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        time.sleep(0.5)
        plan = plan_threads(large_model=True)
        results["busy"] = {f"{n}_threads": measure(n) for n in sorted({1, cores})}
    finally:
        for p in procs:
            p.kill()
            p.wait()
    results["plan_beside_hogs"] = {"light (Q-Former step)": plan.light, "heavy (ViT, LLM)": plan.heavy}
    return results


def parse_config(text: str) -> dict[str, str]:
    """'A=1,B=2' -> {'A': '1', 'B': '2'}; '' -> {} (malmm's own policy)."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["", "MALMM_THREADS=2"],
                        help="environments for the malmm process, compared round by round; '' is malmm's "
                        "policy, MALMM_THREADS=2 the fixed two-thread team it replaced")
    parser.add_argument("--real-size", action="store_true", help="also the real-size ViT-g and Q-Former step")
    args = parser.parse_args()
    configs = {c or "policy": parse_config(c) for c in args.configs}
    series = {name: {"quiet_s": [], "busy_s": []} for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        path = clip(Path(tmp))
        run_once(path, {}, tmp)  # builds tiny-random, warms the page cache
        for _ in range(args.rounds):
            for name, env in configs.items():  # interleaved: the machine's drift hits every config alike
                series[name]["quiet_s"].append(round(run_once(path, env, tmp), 2))
                hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
                try:
                    time.sleep(0.5)
                    series[name]["busy_s"].append(round(run_once(path, env, tmp), 2))
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
    for data in series.values():
        ratios = [b / q for q, b in zip(data["quiet_s"], data["busy_s"])]
        data["ratio_per_round"] = [round(r, 2) for r in ratios]
        data["median_ratio"] = round(statistics.median(ratios), 2)
    results = {"hogs": args.hogs, "tiny_random_caption_70s_at_2fps": series}
    if args.real_size:
        results["real_size"] = real_size_under_contention(args.hogs, args.rounds)
    report("contention", results, "python benchmarks/bench_contention.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
