"""Issue 11: torch.compile (inductor, frozen weights) for the ViT, against eager, on a CPU.

    python benchmarks/bench_compile_vit.py [--size real|tiny] [--chunk 16] [--last 5] [--rounds 3]
                                           [--dynamic] [--no-freezing] [--dtype bf16|fp32]

What it measures, in one process:
- compile time: the first call of the compiled ViT on a full chunk (`--chunk` frames), then
  the first call on the smaller last chunk of a video (`--last` frames): with static shapes
  that is a recompile (counted from dynamo's counters); `--dynamic` compiles one graph with
  a symbolic frame count instead; padding the last chunk to a full one is timed as the third
  option (it costs the padded frames' compute once per video, and no recompile);
- steady state: eager and compiled on the same full chunk, interleaved round by round after
  warm-up; s/frame per round, best and median, and the ratio;
- outputs: max abs and max relative (to the largest magnitude) difference of the compiled
  features against eager, on the full and on the last chunk;
- break-even: compile time / per-frame saving, in frames (one 1 fps frame per second of video).

`torch._inductor.config.freezing = True` folds the weights into the graph as constants (the
ViT's weights never change while it runs), which lets inductor prepack them for oneDNN.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import report, vision_model


def tiny_vision(dtype: torch.dtype):
    """The tiny-random model's ViT (same module class as the real one, toy width)."""
    from models.malmm import MALMM

    return MALMM.from_pretrained("tiny-random", dtype=dtype, device="cpu").vision_model.eval()


def features_fn(vit):
    """pixels -> last_hidden_state: what MALMM.encode_frames returns."""
    def run(pixels: torch.Tensor) -> torch.Tensor:
        return vit(pixel_values=pixels).last_hidden_state
    return run


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    err = (a - b).abs().max().item()
    return {"max_abs": err, "max_rel_to_max_magnitude": err / a.abs().max().item(),
            "cosine_min_per_token": torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min().item()}


def graphs_compiled() -> int:
    """Graphs dynamo has compiled so far in this process: a new input shape under static shapes adds one."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--last", type=int, default=5, help="frames in the last, smaller chunk of a video")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dynamic", action="store_true", help="compile with a symbolic frame count")
    parser.add_argument("--no-freezing", action="store_true")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="the ViT's dtype (malmm picks the faster of the two at load, see section 14a)")
    args = parser.parse_args()

    import torch._inductor.config as inductor_config

    inductor_config.freezing = not args.no_freezing
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    vit = vision_model(dtype) if args.size == "real" else tiny_vision(dtype)
    eager = features_fn(vit)
    compiled = torch.compile(features_fn(vit), dynamic=True if args.dynamic else False, mode=args.mode)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(args.chunk, 3, 224, 224, generator=gen).to(dtype)
    last = full[: args.last].clone()
    res: dict = {"size": args.size, "chunk": args.chunk, "last": args.last, "dynamic": args.dynamic,
                 "freezing": not args.no_freezing, "mode": args.mode, "dtype": args.dtype}
    with torch.no_grad():
        ref_full, t_eager_first = timed(eager, full)
        out_full, res["compile_s_full_chunk"] = timed(compiled, full)
        graphs_after_full = graphs_compiled()
        ref_last = eager(last)
        out_last, res["first_call_s_last_chunk"] = timed(compiled, last)
        res["graphs_compiled"] = {"after_full_chunk": graphs_after_full, "after_last_chunk": graphs_compiled()}
        # Option: pad the last chunk to a full one (no new graph), take its first `last` rows.
        padded = torch.cat([last, last.new_zeros(args.chunk - args.last, *last.shape[1:])])
        out_pad, res["padded_last_chunk_s"] = timed(compiled, padded)
        res["graphs_compiled"]["after_padded"] = graphs_compiled()
        res["diff_full"] = difference(ref_full, out_full)
        res["diff_last"] = difference(ref_last, out_last)
        res["diff_last_padded"] = difference(ref_last, out_pad[: args.last])
        print({k: res[k] for k in ("compile_s_full_chunk", "first_call_s_last_chunk", "graphs_compiled")}, flush=True)
        rounds = {"eager": [], "compiled": []}
        last_rounds = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for name, fn in (("eager", eager), ("compiled", compiled)) if r % 2 == 0 else (("compiled", compiled), ("eager", eager)):
                _, t = timed(fn, full)
                rounds[name].append(t / args.chunk)
                _, t = timed(fn, last)
                last_rounds[name].append(t / args.last)
            print(f"round {r + 1}: eager {rounds['eager'][-1]:.3f} compiled {rounds['compiled'][-1]:.3f} s/frame", flush=True)
    res["s_per_frame_full_rounds"] = {k: [round(x, 4) for x in v] for k, v in rounds.items()}
    res["s_per_frame_last_rounds"] = {k: [round(x, 4) for x in v] for k, v in last_rounds.items()}
    best = {k: min(v) for k, v in rounds.items()}
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ratios = [c / e for c, e in zip(rounds["compiled"], rounds["eager"])]
    res["compiled_over_eager_per_round"] = [round(x, 3) for x in ratios]
    res["compiled_over_eager_best"] = round(best["compiled"] / best["eager"], 3)
    res["compiled_over_eager_median"] = round(med["compiled"] / med["eager"], 3)
    saving = med["eager"] - med["compiled"]
    res["eager_first_call_s"] = round(t_eager_first, 2)
    compile_cost = res["compile_s_full_chunk"] - args.chunk * med["compiled"]  # beyond the run itself
    res["break_even_frames"] = round(compile_cost / saving) if saving > 0 else None
    report(f"compile_vit_{args.size}_{args.dtype}{'_dynamic' if args.dynamic else ''}", res,
           "python benchmarks/bench_compile_vit.py " + " ".join(
               [f"--size {args.size}", f"--chunk {args.chunk}", f"--last {args.last}", f"--rounds {args.rounds}", f"--dtype {args.dtype}"]
               + (["--dynamic"] if args.dynamic else []) + (["--no-freezing"] if args.no_freezing else [])))


if __name__ == "__main__":
    main()
