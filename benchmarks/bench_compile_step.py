"""Issue 11: torch.compile over the memory step (tiny-random, fp32), against eager.

    python benchmarks/bench_compile_step.py [--frames 40] [--rounds 3] [--threads 1]

`torch.compile(MemoryQFormer.step, dynamic=False)` with the banks full (M=20, every frame
compresses), as bench_step.py sets it up. Reports the first call's time (the compile), how
many graphs dynamo compiled over the next frames (a new graph per frame means its guards
see something that changes every frame; dynamo prints each failed guard on stderr), then eager
and compiled per-step times, interleaved round by round, and the largest difference of
their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_step import Case, per_frame
from common import report, tiny_qformer


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._logging.set_logs(recompiles=True)  # dynamo prints each recompile's failed guard on stderr

    eager_case, compiled_case = Case(tiny_qformer()), Case(tiny_qformer())  # same seeds: same weights, same frames
    step = compiled_case.qformer.step
    compiled = torch.compile(step, dynamic=False)
    compiled_case.qformer.step = compiled
    res: dict = {"threads": args.threads, "frames": args.frames}
    with torch.inference_mode():
        t0 = time.perf_counter()
        out_c = compiled_case.memory_step(0)
        res["first_call_s"] = round(time.perf_counter() - t0, 2)
        out_e = eager_case.memory_step(0)
        res["max_abs_diff_first_frame"] = (out_c - out_e).abs().max().item()
        res["graphs_after_first_call"] = graphs()
        t0 = time.perf_counter()
        for t in range(1, 12):
            compiled_case.memory_step(t)
            eager_case.memory_step(t)
        res["s_for_next_11_frames"] = round(time.perf_counter() - t0, 2)
        res["graphs_after_12_frames"] = graphs()
        rounds = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            pairs = (("eager", eager_case), ("compiled", compiled_case))
            for name, case in pairs if r % 2 == 0 else pairs[::-1]:
                rounds[name].append(per_frame(case.memory_step, args.frames))
            print(f"round {r + 1}: eager {rounds['eager'][-1] * 1e3:.2f} compiled "
                  f"{rounds['compiled'][-1] * 1e3:.2f} ms/step", flush=True)
        res["graphs_at_end"] = graphs()
    res["ms_per_step_rounds"] = {k: [round(x * 1e3, 3) for x in v] for k, v in rounds.items()}
    res["compiled_over_eager_median"] = round(statistics.median(rounds["compiled"]) / statistics.median(rounds["eager"]), 3)
    report("compile_step_tiny", res, f"python benchmarks/bench_compile_step.py --frames {args.frames} "
           f"--rounds {args.rounds} --threads {args.threads}")


if __name__ == "__main__":
    main()
