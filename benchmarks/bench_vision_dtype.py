"""ViT-g per frame in bf16 against fp32 on this CPU, side by side in one process.

    python benchmarks/bench_vision_dtype.py [--rounds 2] [--chunk 16]

Where a CPU has AVX512-BF16 but no AMX, oneDNN's bf16 GEMMs may run below its fp32 ones
(BENCHMARKS.md section 14a); this times the whole ViT-g on a chunk of frames in both dtypes,
alternating, with the same weights (the bf16 model is the fp32 one rounded), and reports
how far apart the features are.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import report, vision_flops_per_frame, vision_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    fp32 = vision_model(torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    pixels = torch.randn(args.chunk, 3, 224, 224)
    times: dict[str, list[float]] = {"bfloat16": [], "float32": []}
    outputs = {}
    with torch.inference_mode():
        for r in range(args.rounds):
            order = [("bfloat16", bf16), ("float32", fp32)]
            for name, model in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                out = model(pixel_values=pixels.to(model.dtype)).last_hidden_state
                times[name].append(round((time.perf_counter() - t0) / args.chunk, 3))
                outputs[name] = out.float()
                print(f"round {r + 1}: {name} {times[name][-1]} s/frame", flush=True)
    a, b = outputs["bfloat16"], outputs["float32"]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    flops = vision_flops_per_frame()
    results = {
        "threads": torch.get_num_threads(),
        "chunk": args.chunk,
        "s_per_frame": times,
        "gflops_best": {k: round(flops / min(v) / 1e9, 1) for k, v in times.items()},
        "bf16_over_fp32_time": round(min(times["bfloat16"]) / min(times["float32"]), 3),
        "features_min_token_cosine": round(float(cos.min()), 5),
    }
    report("vision_dtype", results, f"python benchmarks/bench_vision_dtype.py --rounds {args.rounds} --chunk {args.chunk}")


if __name__ == "__main__":
    main()
