"""Benchmark 13: many videos at once, B videos in lockstep through one batched Q-Former step.

    python benchmarks/bench_lockstep.py [--batches 1 4 16] [--rounds 3] [--threads 1 2]

Q-Former frames per second (B frames per step) with M=20 and the banks full, for the
tiny-random model (fp32) and the real Q-Former (12 x 768, 257 x 1408 frame tokens, random
weights, bf16 as malmm runs it for a bf16 model). Every row has its own instruction (12
tokens) and its own drifting video. The batch sizes alternate within each round.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import qformer_model, report, tiny_qformer

M = 20
INSTRUCTION_TOKENS = 12


class Lockstep:
    """B videos with their banks filled, ready to time steps of one frame each."""

    def __init__(self, qformer, videos: int, frames: int = 8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        cfg, dtype = qformer.config, qformer.embeddings.layernorm.weight.dtype
        base = torch.randn(videos, 257, cfg.encoder_hidden_size, generator=gen)
        self.frames = torch.stack([base + 0.3 * t * torch.randn(base.shape, generator=gen) for t in range(frames)])
        self.frames = self.frames.to(dtype)  # [frames, B, P, C]
        query_tokens = (torch.randn(1, 32, cfg.hidden_size, generator=gen) * 0.5).to(dtype).expand(videos, -1, -1)
        ids = torch.randint(5, cfg.vocab_size, (videos, INSTRUCTION_TOKENS), generator=gen)
        self.qformer = qformer
        self.t = 0
        with torch.inference_mode():
            self.embeddings = qformer.embed(query_tokens, ids)
            self.memory = qformer.new_memory(M)
            for _ in range(M + 2):  # fill the banks: from here on every step compresses
                self.step()

    def step(self) -> None:
        self.qformer.step(self.embeddings, None, self.frames[self.t % len(self.frames)], self.memory)
        self.t += 1

    def seconds_per_step(self, steps: int) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
        return (time.perf_counter() - t0) / steps


def measure(qformer, batches: list[int], threads: list[int], rounds: int, steps: int) -> dict:
    runs = {b: Lockstep(qformer, b) for b in batches}
    times = {(n, b): [] for n in threads for b in batches}
    for _ in range(rounds):
        for n in threads:
            torch.set_num_threads(n)
            for b, run in runs.items():
                run.seconds_per_step(1)  # warm the thread team
                times[n, b].append(run.seconds_per_step(max(1, steps // b)))
    out = {}
    for n in threads:
        rows = {}
        for b in batches:
            best = min(times[n, b])
            rows[f"B{b}"] = {"s_per_step": [round(x, 5) for x in times[n, b]], "best_s_per_step": round(best, 5),
                             "frames_per_s": round(b / best, 2)}
        base = rows[f"B{batches[0]}"]["frames_per_s"]
        for row in rows.values():
            row["frames_per_s_vs_first"] = round(row["frames_per_s"] / base, 2)
        out[f"{n}_threads"] = rows
        print(n, "threads", {k: (v["frames_per_s"], v["frames_per_s_vs_first"]) for k, v in rows.items()}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    args = parser.parse_args()
    results = {"M": M, "instruction_tokens": INSTRUCTION_TOKENS}
    for size in args.sizes:
        qformer = tiny_qformer() if size == "tiny" else qformer_model(torch.bfloat16)
        steps = 64 if size == "tiny" else 16  # frames per timing, shared out as steps of B
        print(f"== {size}", flush=True)
        results[size] = measure(qformer, args.batches, args.threads, args.rounds, steps)
    report("lockstep", results, "python benchmarks/bench_lockstep.py " + " ".join(
        ["--batches", *map(str, args.batches), f"--rounds {args.rounds}", "--threads", *map(str, args.threads),
         "--sizes", *args.sizes]))


if __name__ == "__main__":
    main()
