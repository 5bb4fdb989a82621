"""Issue 11: flat memory at real size: peak RSS of a 2-hour against a 10-minute video.

    python benchmarks/bench_flat_real.py [--long 7200] [--short 600] [--threads 1] [--sample-every 500] [--parallel] [--only short|long]

bench_flat.py measures peak RSS through the CLI with the tiny model, whose banks are small.
Here the memory path has InstructBLIP's real sizes: the Q-Former 12 x 768 (random weights,
bf16 as for a bf16 model on a CPU), visual tokens 257 x 1408, M=20, fed through
MALMM.new_stream / VideoStream.add_features, the same calls the CLI makes after the ViT. The
ViT is skipped: each frame's features are a fresh random tensor [1, 257, 1408], made per
frame and dropped after it (as the CLI drops a chunk's features once the stream has them).
The LLM, tokenizers and everything outside the Q-Former come from the tiny-random model: they
do not grow with the video.

Each video runs in its own child process (so ru_maxrss is that video's peak), 1 fps:
600 frames for 10 minutes, 7,200 for 2 hours. The child also samples its resident set every
`--sample-every` frames, to show whether memory levels off or creeps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, report


def real_size_model(threads: int):
    """tiny-random MALMM with the Q-Former, query tokens, temporal embedding and projection at real size (bf16)."""
    import torch
    from torch import nn

    from common import qformer_model
    from models.malmm import MALMM, TEMPORAL_SLOTS

    torch.set_num_threads(threads)
    model = MALMM.from_pretrained("tiny-random", dtype=torch.float32, device="cpu", memory_bank_length=20)
    dtype = torch.bfloat16
    model.qformer = qformer_model(dtype)
    model.query_tokens = nn.Parameter(torch.randn(1, 32, 768, dtype=dtype) * 0.02)
    model.num_query_tokens = 32
    model.temporal_embedding = nn.Embedding(TEMPORAL_SLOTS, 1408, dtype=dtype)
    nn.init.normal_(model.temporal_embedding.weight, std=0.02)
    llm_width = model.language_model.get_input_embeddings().weight.shape[1]
    model.language_projection = nn.Linear(768, llm_width, dtype=dtype)
    return model.eval()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_video(frames: int, threads: int, sample_every: int) -> dict:
    """Child process body: stream `frames` random frames through the real-size memory path."""
    import torch

    model = real_size_model(threads)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 257, 1408, generator=gen)
    samples = {}
    times = []
    with torch.inference_mode():
        stream = model.new_stream("what is happening in the video?", total_frames=frames)
        rss_before = rss_mb()
        t_start = time.perf_counter()
        for t in range(frames):
            t0 = time.perf_counter()
            features = (base + 0.3 * torch.randn(1, 257, 1408, generator=gen)).bfloat16()  # drifting content
            stream.add_features(features)
            del features
            times.append(time.perf_counter() - t0)
            if (t + 1) % sample_every == 0 or t + 1 == frames:
                samples[t + 1] = round(rss_mb(), 1)
                print(json.dumps({"frame": t + 1, "rss_mb": samples[t + 1],
                                  "s_per_frame_last": round(sum(times[-sample_every:]) / len(times[-sample_every:]), 4)}),
                      file=sys.stderr, flush=True)
        tokens = stream.visual_tokens()
        wall = time.perf_counter() - t_start
    assert torch.isfinite(tokens.float()).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": frames, "peak_rss_mb": round(peak, 1), "rss_after_model_mb": round(rss_before, 1),
            "rss_samples_mb": samples, "wall_s": round(wall, 1), "s_per_frame_mean": round(wall / frames, 4),
            "bank_length": stream.memory.length}


def start_child(frames: int, threads: int, sample_every: int) -> subprocess.Popen:
    """One video in a fresh interpreter; its last stdout line is run_video's result."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_flat_real as b; "
            f"print(json.dumps(b.run_video({frames}, {threads}, {sample_every})))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)


def finish_child(proc: subprocess.Popen, frames: int) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the {frames}-frame child failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", type=int, default=7200, help="frames of the long video (2 h at 1 fps)")
    parser.add_argument("--short", type=int, default=600, help="frames of the short video (10 min at 1 fps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--parallel", action="store_true",
                        help="run both videos at once (separate processes, so separate peaks): wall time of the long one")
    parser.add_argument("--only", choices=["short", "long"], help="run one of the two videos")
    args = parser.parse_args()
    videos = [(n, f) for n, f in (("short", args.short), ("long", args.long)) if args.only in (None, n)]
    runs = {}
    if args.parallel:
        procs = {name: start_child(frames, args.threads, args.sample_every) for name, frames in videos}
        for name, frames in videos:
            runs[name] = finish_child(procs[name], frames)
            print(name, json.dumps(runs[name]), flush=True)  # as soon as it is known
    else:
        for name, frames in videos:
            runs[name] = finish_child(start_child(frames, args.threads, args.sample_every), frames)
            print(name, json.dumps(runs[name]), flush=True)
    results = {"threads": args.threads, "runs": runs}
    if len(runs) == 2:
        results["peak_rss_long_over_short"] = round(runs["long"]["peak_rss_mb"] / runs["short"]["peak_rss_mb"], 3)
    command = (f"python benchmarks/bench_flat_real.py --long {args.long} --short {args.short} --threads {args.threads}"
               + (" --parallel" if args.parallel else "") + (f" --only {args.only}" if args.only else ""))
    report("flat_real" + (f"_{args.only}" if args.only else ""), results, command)


if __name__ == "__main__":
    main()
