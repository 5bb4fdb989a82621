"""Benchmark 2: the Q-Former step with memory (M=20) at real size, per frame, against ViT-g.

    python benchmarks/bench_qformer.py [--rounds 3] [--batch 4] [--threads N] [--fp32] [--straightforward]
                                       [--drift] [--profile] [--vision-dtype bf16|fp32]

Real sizes: Q-Former 12 x 768 with cross-attention to 1408-d features every other layer,
32 queries, a 12-token instruction; visual tokens 257 per frame. The bank is filled first
(steady state: every frame appends and compresses). Each round times ViT-g per frame (bf16,
or `--vision-dtype fp32`, a chunk of 16) and then each Q-Former variant, so a neighbour's load hits all of them alike,
and the fraction is taken per round: the cached-key/value step in bf16 (malmm's default for
a bf16 model), the same with ``--batch`` videos in lockstep (per frame), and optionally fp32
and the straightforward path (re-projecting the banks every frame). ``--profile`` prints
where the bf16 step's time goes; ``--drift`` compares bf16 with fp32 outputs over 200 frames.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import qformer_model, report, vision_model

M = 20
INSTRUCTION_TOKENS = 12


class Stepper:
    """A Q-Former with its banks filled (B videos in lockstep), ready to time one step."""

    def __init__(self, qformer, features: torch.Tensor, cache: bool, videos: int = 1):
        dtype = qformer.embeddings.layernorm.weight.dtype
        gen = torch.Generator().manual_seed(0)
        query_tokens = torch.randn(1, 32, 768, generator=gen).to(dtype).expand(videos, -1, -1)
        ids = torch.randint(1000, 2000, (videos, INSTRUCTION_TOKENS), generator=gen)
        # Each video its own frames: the features of the chunk, shifted per video.
        self.features = torch.stack([features.roll(v, dims=0) for v in range(videos)], dim=1).to(dtype)
        self.qformer, self.videos, self.t = qformer, videos, 0
        with torch.inference_mode():
            self.embeddings = qformer.embed(query_tokens, ids)
            self.memory = qformer.new_memory(M, cache_projections=cache)
            for _ in range(M + 2):  # fill the banks: from here on every frame compresses
                self.step()

    def step(self) -> None:
        frame = self.features[self.t % len(self.features)]  # [videos, P, C]
        self.qformer.step(self.embeddings, None, frame, self.memory)
        self.t += 1

    def seconds_per_frame(self, steps: int) -> float:
        """Wall time per video frame: one step serves ``videos`` frames."""
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
        return (time.perf_counter() - t0) / steps / self.videos


def profile_step(stepper: Stepper, steps: int = 4, rows: int = 15) -> str:
    """Where the step's time goes, by operator (torch.profiler, self CPU time)."""
    from torch.profiler import profile

    with torch.inference_mode(), profile() as prof:
        for _ in range(steps):
            stepper.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="videos in lockstep for the batched row (0: skip)")
    parser.add_argument("--fp32", action="store_true", help="also time the fp32 Q-Former")
    parser.add_argument("--straightforward", action="store_true", help="also time the path without cached K/V")
    parser.add_argument("--drift", action="store_true", help="bf16 against fp32 outputs over 200 frames")
    parser.add_argument("--profile", action="store_true", help="print the bf16 step's top operators")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--vision-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="the ViT's dtype (malmm picks the faster of the two on a CPU: fp32 on a Xeon without AMX)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vision_dtype = torch.bfloat16 if args.vision_dtype == "bf16" else torch.float32
    vit = vision_model(vision_dtype)
    pixels = torch.randn(16, 3, 224, 224).to(vision_dtype)
    with torch.inference_mode():
        features = vit(pixel_values=pixels).last_hidden_state.float()
    bf16 = qformer_model(torch.bfloat16)
    variants = {"bf16 cached": Stepper(bf16, features, True)}
    if args.batch > 1:
        variants[f"bf16 cached, {args.batch} videos in lockstep"] = Stepper(bf16, features, True, args.batch)
    if args.straightforward:
        variants["bf16 straightforward"] = Stepper(bf16, features, False)
    if args.fp32:
        fp32 = qformer_model(torch.float32)
        variants["fp32 cached"] = Stepper(fp32, features, True)
        if args.straightforward:
            variants["fp32 straightforward"] = Stepper(fp32, features, False)
    vision, times = [], {name: [] for name in variants}
    for _ in range(args.rounds):
        with torch.inference_mode():
            t0 = time.perf_counter()
            vit(pixel_values=pixels)
            vision.append((time.perf_counter() - t0) / 16)
        for name, stepper in variants.items():
            times[name].append(stepper.seconds_per_frame(max(2, 8 // stepper.videos)))
        print({"vision": round(vision[-1], 4), **{k: round(v[-1], 4) for k, v in times.items()}}, flush=True)
    results = {"M": M, "vision_dtype": args.vision_dtype, "vision_s_per_frame": [round(v, 4) for v in vision], "qformer": []}
    for name, values in times.items():
        fractions = [q / v for q, v in zip(values, vision)]
        row = {"variant": name, "s_per_frame": [round(x, 4) for x in values],
               "fraction_of_vision": [round(f, 4) for f in fractions],
               "fraction_median": round(statistics.median(fractions), 4)}
        results["qformer"].append(row)
        print(row, flush=True)
    if args.profile:
        table = profile_step(variants["bf16 cached"])
        print(table, flush=True)
        results["profile_bf16_step"] = table
    if args.drift:
        results["bf16_vs_fp32_output"] = bf16_drift()
        print(results["bf16_vs_fp32_output"], flush=True)
    flags = [f"--rounds {args.rounds}", f"--batch {args.batch}", f"--threads {args.threads}",
             f"--vision-dtype {args.vision_dtype}"] + [
        f"--{k}" for k in ("fp32", "straightforward", "drift", "profile") if getattr(args, k)]
    report(f"qformer_vision_{args.vision_dtype}", results, "python benchmarks/bench_qformer.py " + " ".join(flags))


if __name__ == "__main__":
    main()
