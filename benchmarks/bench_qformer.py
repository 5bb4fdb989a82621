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


def bf16_drift(frames: int = 200, probes=(10, 50, 100, 200)) -> dict:
    """How far the bf16 Q-Former's output drifts from the fp32 one (same weights) over a stream."""
    import copy

    fp32 = qformer_model(torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    frame = torch.randn(257, 1408, generator=gen)
    out = {}
    with torch.inference_mode():
        qt, ids = torch.randn(1, 32, 768, generator=gen) * 0.5, torch.randint(1000, 2000, (1, 12), generator=gen)
        streams = []
        for model, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
            streams.append((model, model.embed(qt.to(dtype), ids), model.new_memory(M), dtype))
        for t in range(1, frames + 1):
            frame = frame + 0.3 * torch.randn(257, 1408, generator=gen)  # content drifting over time
            outs = [m.step(e, None, frame[None].to(d), mem)[:, :32].float() for m, e, mem, d in streams]
            if t in probes:
                a, b = outs
                out[f"frame_{t}"] = {
                    "max_abs_err_over_max_abs": round(float((a - b).abs().max() / a.abs().max()), 4),
                    "mean_cosine": round(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()), 5)}
    return out


def vision_per_frame() -> tuple[torch.Tensor, float]:
    """ViT-g features of 16 frames (for the banks) and its seconds per frame in bf16."""
    vit = vision_model(torch.bfloat16)
    pixels = torch.randn(16, 3, 224, 224).bfloat16()
    with torch.inference_mode():
        features = vit(pixel_values=pixels).last_hidden_state.float()
        return features, timeit(lambda: vit(pixel_values=pixels), repeat=2) / 16


def main() -> None:
    features, vision_s = vision_per_frame()
    results = {"M": M, "vision_s_per_frame": round(vision_s, 4), "qformer": []}
    for dtype in (torch.float32, torch.bfloat16):
        qformer = qformer_model(dtype)
        for cache in (True, False):
            s = qformer_per_frame(qformer, features, cache)
            row = {"dtype": str(dtype).replace("torch.", ""), "cached_kv": cache, "s_per_frame": round(s, 4),
                   "fraction_of_vision": round(s / vision_s, 4)}
            results["qformer"].append(row)
            print(row, flush=True)
    results["bf16_vs_fp32_output"] = bf16_drift()
    print(results["bf16_vs_fp32_output"], flush=True)
    report("qformer", results, "python benchmarks/bench_qformer.py")


if __name__ == "__main__":
    main()
