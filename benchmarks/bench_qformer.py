"""Benchmark 2: the Q-Former step with memory (M=20) at real size, per frame, against ViT-g.

    python benchmarks/bench_qformer.py

Real sizes: Q-Former 12 x 768 with cross-attention to 1408-d features every other layer,
32 queries, a 12-token instruction; visual tokens 257 per frame. The bank is filled first
(steady state: every frame appends and compresses). Reported side by side in one run:
ViT-g per frame (bf16, chunk of 16) and the Q-Former step with cached key/value banks and
with the straightforward path (re-projecting the banks every frame), in fp32 and bf16.
"""

from __future__ import annotations

import torch

from common import qformer_model, report, timeit, vision_model

M = 20
INSTRUCTION_TOKENS = 12


def qformer_per_frame(qformer, features: torch.Tensor, cache: bool, frames: int = 10) -> float:
    dtype = qformer.embeddings.layernorm.weight.dtype
    query_tokens = torch.randn(1, 32, 768, dtype=dtype)
    ids = torch.randint(1000, 2000, (1, INSTRUCTION_TOKENS))
    with torch.inference_mode():
        embeddings = qformer.embed(query_tokens, ids)
        key_mask = torch.ones(1, 32 + INSTRUCTION_TOKENS, dtype=torch.bool)
        memory = qformer.new_memory(M, cache_projections=cache)
        for t in range(M + 2):  # fill the banks: from here on every frame compresses
            qformer.step(embeddings, key_mask, features[t % len(features)][None].to(dtype), memory)
        step = iter(range(10**6))

        def one():
            t = next(step)
            qformer.step(embeddings, key_mask, features[t % len(features)][None].to(dtype), memory)

        return timeit(lambda: [one() for _ in range(frames)], repeat=3, warmup=0) / frames


def main() -> None:
    vit = vision_model(torch.bfloat16)
    pixels = torch.randn(16, 3, 224, 224).bfloat16()
    with torch.inference_mode():
        features = vit(pixel_values=pixels).last_hidden_state.float()  # real features for the banks
        vision_s = timeit(lambda: vit(pixel_values=pixels), repeat=2) / 16
    del vit
    results = {"M": M, "vision_s_per_frame": round(vision_s, 4), "qformer": []}
    for dtype in (torch.float32, torch.bfloat16):
        qformer = qformer_model(dtype)
        for cache in (True, False):
            s = qformer_per_frame(qformer, features, cache)
            row = {"dtype": str(dtype).replace("torch.", ""), "cached_kv": cache, "s_per_frame": round(s, 4),
                   "fraction_of_vision": round(s / vision_s, 4)}
            results["qformer"].append(row)
            print(row, flush=True)
    report("qformer", results, "python benchmarks/bench_qformer.py")


if __name__ == "__main__":
    main()
