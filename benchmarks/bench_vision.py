"""Benchmark 1: the vision stage at real ViT-g size, as a fraction of the machine's bf16 peak.

    python benchmarks/bench_vision.py [--chunks 1 4 8 16]

Measures, in one run: the best bf16 GEMM rate over large shapes (the peak), then
MALMM.encode_frames-equivalent ViT-g + post-LayerNorm on chunks of frames in bf16 (and
fp32 for reference), reporting frames/s and achieved FLOP/s / peak.
"""

from __future__ import annotations

import argparse

import torch

from common import bf16_matmul_peak, report, timeit, vision_flops_per_frame, vision_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    peak, gemm = bf16_matmul_peak()
    flops = vision_flops_per_frame()
    results = {"bf16_gemm_peak_gflops": round(peak / 1e9, 1),
               "gemm_gflops": {k: round(v / 1e9, 1) for k, v in gemm.items()},
               "vision_gflop_per_frame": round(flops / 1e9, 1), "runs": []}
    for dtype in (torch.bfloat16, torch.float32):
        model = vision_model(dtype)
        for n in args.chunks if dtype == torch.bfloat16 else [8]:
            pixels = torch.randn(n, 3, 224, 224).to(dtype)
            with torch.inference_mode():
                t = timeit(lambda m=model, x=pixels: m(pixel_values=x).last_hidden_state, repeat=args.repeat)
            rate = n * flops / t
            results["runs"].append({"dtype": str(dtype).replace("torch.", ""), "chunk": n,
                                    "s_per_frame": round(t / n, 3), "gflops": round(rate / 1e9, 1),
                                    "fraction_of_bf16_peak": round(rate / peak, 3)})
            print(results["runs"][-1], flush=True)
        del model
    report("vision", results, "python benchmarks/bench_vision.py --chunks " + " ".join(map(str, args.chunks)))


if __name__ == "__main__":
    main()
