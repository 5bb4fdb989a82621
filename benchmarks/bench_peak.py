"""Issue 11: the machine's GEMM peak, and ViT-g's achieved FLOP rate as a fraction of it.

    python benchmarks/bench_peak.py [--rounds 5] [--chunk 16] [--vit-threads 2]

The "peak" of section 1 of BENCHMARKS.md was the best of four bf16 shapes at the default
thread count. This survey measures more: bf16 and fp32, `torch.matmul` (A[m,k] @ B[k,n]) and
`F.linear` (x @ W.T with W [n,k], the layout nn.Linear and so the ViT use), with 1 and 2
threads, on square shapes and on ViT-g's own GEMMs for a chunk of 16 frames (257 tokens each):
qkv 1408->4224, proj 1408->1408, MLP fc1 1408->6144, fc2 6144->1408. Every configuration is
timed once per round, rounds interleaved with ViT-g itself (bf16, one chunk) so that load
from other processes falls on both alike; each figure is the best round.

ViT-g/14 at 224 px does 520.7 GFLOP of matmul per frame (counted from the architecture in
benchmarks/common.py: 39 blocks of qkv, proj, fc1, fc2 and the two attention products on 257
tokens, plus the patch projection; LayerNorm, softmax and GELU add well under 1%).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time

import torch
import torch.nn.functional as F

from common import report, vision_flops_per_frame, vision_model

TOKENS = 257


def shapes(chunk: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of each surveyed GEMM: m rows, k inner, n output columns."""
    rows = TOKENS * chunk
    return {
        "1024^3": (1024, 1024, 1024),
        "2048^3": (2048, 2048, 2048),
        f"vit qkv {rows}x1408x4224": (rows, 1408, 4224),
        f"vit proj {rows}x1408x1408": (rows, 1408, 1408),
        f"vit fc1 {rows}x1408x6144": (rows, 1408, 6144),
        f"vit fc2 {rows}x6144x1408": (rows, 6144, 1408),
    }


def cpu_description() -> dict:
    """lscpu's model name and the matrix-extension flags that decide the bf16 rate."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", out)
    flags = set(re.search(r"Flags:\s*(.+)", out).group(1).split()) if "Flags:" in out else set()
    wanted = ["avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8", "avx_vnni"]
    return {"model_name": name.group(1).strip() if name else "unknown",
            "flags": {f: f in flags for f in wanted},
            "cpus": os.cpu_count()}


def gemm_operands(m: int, k: int, n: int, dtype: torch.dtype, op: str):
    """Operands with unit-scale values (no denormals); W is [n, k] for F.linear, B is [k, n] for matmul."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, k, dtype=dtype) if op == "linear" else torch.randn(k, n, dtype=dtype)
    return a, b


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=16, help="frames per ViT chunk (and the GEMM rows / 257)")
    parser.add_argument("--vit-threads", type=int, nargs="+", default=[2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    table = shapes(args.chunk)
    configs = [(dt, op, th, label) for th in args.threads for dt in (torch.bfloat16, torch.float32)
               for op in ("matmul", "linear") for label in table]
    operands = {}
    best: dict[tuple, float] = {}
    vit = vision_model(torch.bfloat16)
    pixels = torch.randn(args.chunk, 3, 224, 224).bfloat16()
    vit_flops = vision_flops_per_frame() * args.chunk
    vit_best: dict[int, float] = {}
    vit_rounds: dict[int, list[float]] = {t: [] for t in args.vit_threads}
    with torch.inference_mode():
        for th in args.vit_threads:  # warm-up: first call allocates and primes oneDNN
            torch.set_num_threads(th)
            vit(pixel_values=pixels[:2])
        for r in range(args.rounds):
            for dt, op, th, label in configs:
                torch.set_num_threads(th)
                m, k, n = table[label]
                key = (dt, op, label)
                if key not in operands:
                    operands[key] = gemm_operands(m, k, n, dt, op)
                a, b = operands[key]
                fn = (lambda: F.linear(a, b)) if op == "linear" else (lambda: torch.matmul(a, b))
                if r == 0:
                    fn()  # warm-up per configuration
                t = time_once(fn)
                cfg = (str(dt).replace("torch.", ""), op, th, label)
                best[cfg] = min(best.get(cfg, float("inf")), t)
            for th in args.vit_threads:
                torch.set_num_threads(th)
                t = time_once(lambda: vit(pixel_values=pixels).last_hidden_state)
                vit_rounds[th].append(round(t / args.chunk, 3))
                vit_best[th] = min(vit_best.get(th, float("inf")), t)
            print(f"round {r + 1}/{args.rounds}: ViT-g s/frame {[v[-1] for v in vit_rounds.values()]}", flush=True)

    gflops = {cfg: 2 * table[cfg[3]][0] * table[cfg[3]][1] * table[cfg[3]][2] / t / 1e9 for cfg, t in best.items()}
    rows = [{"dtype": d, "op": o, "threads": th, "shape": s, "gflops": round(g, 1)} for (d, o, th, s), g in gflops.items()]
    peaks = {}
    for d in ("bfloat16", "float32"):
        for th in args.threads:
            cands = {(o, s): g for (dd, o, t, s), g in gflops.items() if dd == d and t == th}
            (o, s), g = max(cands.items(), key=lambda kv: kv[1])
            peaks[f"{d}_{th}t"] = {"gflops": round(g, 1), "op": o, "shape": s}
    vit_runs = {}
    for th, t in vit_best.items():
        rate = vit_flops / t / 1e9
        peak = peaks[f"bfloat16_{th}t"]["gflops"] if th in args.threads else None
        any_peak = max(peaks[f"{d}_{th}t"]["gflops"] for d in ("bfloat16", "float32")) if th in args.threads else None
        vit_runs[f"{th}t"] = {"s_per_frame_best": round(t / args.chunk, 3), "s_per_frame_rounds": vit_rounds[th],
                              "gflops": round(rate, 1),
                              "fraction_of_bf16_peak": round(rate / peak, 3) if peak else None,
                              # without AMX, fp32 GEMMs can outrun bf16 ones: the machine's peak is the larger
                              "fraction_of_best_peak_any_dtype": round(rate / any_peak, 3) if any_peak else None}
    results = {"cpu": cpu_description(), "rounds": args.rounds, "chunk": args.chunk,
               "vit_gflop_per_frame": round(vision_flops_per_frame() / 1e9, 1),
               "peaks": peaks, "vit": vit_runs, "gemm": rows}
    command = (f"python benchmarks/bench_peak.py --rounds {args.rounds} --chunk {args.chunk} "
               f"--vit-threads {' '.join(map(str, args.vit_threads))}")
    report("peak", results, command)


if __name__ == "__main__":
    main()
