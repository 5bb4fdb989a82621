"""Shared pieces for the benchmarks: the machine, timing, and random-weight models at the real
InstructBLIP-Vicuna-7B sizes (costs do not depend on the weights' values)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    try:
        cpu = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
        cpu = cpu.group(1).strip() if cpu else platform.processor()
    except OSError:
        cpu = platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "avx512_bf16" in flags
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{', avx512_bf16' if bf16 else ''}{gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, results: dict, command: str) -> None:
    """Print a result block and append it (JSON) to bench-out/ for BENCHMARKS.md."""
    payload = {"benchmark": name, "machine": machine(), "command": command,
               "date": time.strftime("%Y-%m-%d"), **results}
    print(json.dumps(payload, indent=2))
    out = ROOT / "bench-out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every weight from N(0, 0.02) (LayerNorm weights 1): fast, no denormals."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def tiny_qformer():
    """The memory Q-Former of tiny-random, in fp32 (per-frame overhead, where FLOPs are negligible)."""
    from models import MALMM

    return MALMM.from_pretrained("tiny-random", dtype=torch.float32).qformer


def vision_model(dtype: torch.dtype):
    """EVA ViT-g/14 as in InstructBLIP: 39 blocks, width 1408, 257 tokens (transformers' defaults)."""
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    with torch.device("meta"):
        model = InstructBlipVisionModel(InstructBlipVisionConfig())
    model = model.to_empty(device="cpu").to(dtype).eval()
    randomize(model)
    return model


def vision_flops_per_frame(cfg=None) -> float:
    """Matmul FLOPs of one 224x224 frame through ViT-g (2 per multiply-add)."""
    from transformers import InstructBlipVisionConfig

    cfg = cfg or InstructBlipVisionConfig()
    n, d, m, L = (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d  # qkv+proj, MLP, scores + weighted sum
    patch = 2 * (n - 1) * 3 * cfg.patch_size**2 * d
    return L * per_layer + patch


def qformer_model(dtype: torch.dtype = torch.float32):
    """The InstructBLIP Q-Former: 12 layers, width 768, cross-attention to 1408 every other layer."""
    from transformers import InstructBlipQFormerConfig

    from models.qformer import MemoryQFormer

    cfg = InstructBlipQFormerConfig(vocab_size=30523, encoder_hidden_size=1408)
    with torch.device("meta"):
        model = MemoryQFormer(cfg, num_query_tokens=32)
    model = model.to_empty(device="cpu").to(dtype).eval()
    randomize(model)
    model.embeddings.position_ids = torch.arange(cfg.max_position_embeddings)[None]
    return model


def bf16_matmul_peak(repeat: int = 3) -> tuple[float, dict]:
    """Best measured bf16 GEMM rate (FLOP/s) over large shapes, including ViT-g's own."""
    shapes = {"4096^3": (4096, 4096, 4096), "vit mlp 8 frames": (8 * 257, 1408, 6144),
              "vit mlp 16 frames": (16 * 257, 1408, 6144), "2048x8192x2048": (2048, 8192, 2048)}
    rates = {}
    for label, (m, k, n) in shapes.items():
        a = torch.randn(m, k).bfloat16()
        b = torch.randn(k, n).bfloat16()
        t = timeit(lambda: torch.mm(a, b), repeat=repeat)
        rates[label] = 2 * m * k * n / t
    return max(rates.values()), rates
