"""Benchmark 12: the per-frame fixed cost of the memory step against a plain Q-Former forward.

    python benchmarks/bench_step.py [--rounds 7] [--threads 1 2] [--sizes tiny real]

The plain forward is transformers' memoryless ``InstructBlipQFormerModel`` on the same weights:
one frame, no banks (what InstructBLIP runs per image). The memory step is malmm's
``MemoryQFormer.step`` at M=20 with the banks full, so every measured frame attends over 21
entries, appends and compresses. Sizes: the tiny-random model (4 x 32, 257 tokens of width
32, fp32), where the step is nearly all fixed cost, and InstructBLIP's real Q-Former (12 x 768,
257 x 1408 frame tokens, random weights, bf16 as malmm runs it for a bf16 model). Plain and
memory alternate within each round, and the thread counts alternate round by round, so a
neighbour's load hits both alike; the ratio is taken per round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import qformer_model, report, tiny_qformer

M = 20
INSTRUCTION_TOKENS = 12


def plain_model(qformer):
    """transformers' Q-Former with the same config and weights."""
    from transformers import InstructBlipQFormerModel

    dtype = qformer.embeddings.layernorm.weight.dtype
    hf = InstructBlipQFormerModel(qformer.config).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(qformer.state_dict(), strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return hf


class Case:
    """One model size: the plain forward and the memory step as callables over a frame index."""

    def __init__(self, qformer, frames: int = 32, seed: int = 0, memory: int = M):
        gen = torch.Generator().manual_seed(seed)
        cfg = qformer.config
        dtype = qformer.embeddings.layernorm.weight.dtype
        self.hf = plain_model(qformer)
        base = torch.randn(257, cfg.encoder_hidden_size, generator=gen)
        # Drifting content, so that compression has real choices to make.
        self.frames = torch.stack([base + 0.3 * t * torch.randn(base.shape, generator=gen) for t in range(frames)])
        self.frames = self.frames.to(dtype)
        self.query_tokens = (torch.randn(1, 32, cfg.hidden_size, generator=gen) * 0.5).to(dtype)
        self.ids = torch.randint(5, cfg.vocab_size, (1, INSTRUCTION_TOKENS), generator=gen)
        self.qformer = qformer
        with torch.inference_mode():
            self.embeddings = qformer.embed(self.query_tokens, self.ids)
            self.memory = qformer.new_memory(memory)
            for t in range(memory + 2):  # fill the banks: from here on every frame compresses
                self.memory_step(t)

    def plain(self, t: int):
        return self.hf(input_ids=self.ids, query_embeds=self.query_tokens,
                       encoder_hidden_states=self.frames[t % len(self.frames)][None])

    def memory_step(self, t: int):
        return self.qformer.step(self.embeddings, None, self.frames[t % len(self.frames)][None], self.memory)


def per_frame(fn, frames: int) -> float:
    t0 = time.perf_counter()
    for t in range(frames):
        fn(t)
    return (time.perf_counter() - t0) / frames


def measure(case: Case, threads: list[int], rounds: int, frames: int) -> dict:
    rows = {n: {"plain": [], "memory": []} for n in threads}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in threads:
                torch.set_num_threads(n)
                per_frame(case.memory_step, 2)  # warm the team after a thread change
                rows[n]["plain"].append(per_frame(case.plain, frames))
                rows[n]["memory"].append(per_frame(case.memory_step, frames))
    out = {}
    for n, r in rows.items():
        ratios = [m / p for m, p in zip(r["memory"], r["plain"])]
        out[f"{n}_threads"] = {
            "plain_ms": [round(x * 1e3, 3) for x in r["plain"]],
            "memory_ms": [round(x * 1e3, 3) for x in r["memory"]],
            "plain_best_ms": round(min(r["plain"]) * 1e3, 3),
            "memory_best_ms": round(min(r["memory"]) * 1e3, 3),
            "ratio_of_best": round(min(r["memory"]) / min(r["plain"]), 3),
            "ratio_median_per_round": round(statistics.median(ratios), 3),
        }
        print(n, "threads", out[f"{n}_threads"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    parser.add_argument("--memory", type=int, nargs="+", default=[M],
                        help="bank lengths M (0: no memory, the step attends to the current frame only, as the "
                        "plain forward does: what remains is the step's own overhead)")
    args = parser.parse_args()
    results = {"M": args.memory, "instruction_tokens": INSTRUCTION_TOKENS}
    for size in args.sizes:
        qformer = tiny_qformer() if size == "tiny" else qformer_model(torch.bfloat16)
        frames = 40 if size == "tiny" else 4
        for memory in args.memory:
            print(f"== {size}, M={memory}", flush=True)
            key = size if memory == M else f"{size}_M{memory}"
            results[key] = measure(Case(qformer, memory=memory), args.threads, args.rounds, frames)
    name = "step" if args.memory == [M] else "step_" + "_".join(f"M{m}" for m in args.memory)
    report(name, results, "python benchmarks/bench_step.py " + " ".join(
        [f"--rounds {args.rounds}", "--threads", *map(str, args.threads), "--sizes", *args.sizes,
         "--memory", *map(str, args.memory)]))


if __name__ == "__main__":
    main()
