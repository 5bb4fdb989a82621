"""Benchmark 8: LLM generation per token at Vicuna-7B dimensions on this machine, bf16 / 8-bit / 4-bit.

    python benchmarks/bench_llm.py [--layers 32] [--new-tokens 8 24]

A LLaMA with Vicuna-7B's dimensions (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab
32001) and random weights is written once to bench-out/ (about 13.5 GB in bf16), then
loaded in a fresh process per precision the way MALMM loads its LLM (transformers +
bitsandbytes for 8/4-bit). Per-token time is the slope between two generation lengths
after a 64-token prompt with 32 visual-token embeddings in front, so the prefill cancels
out; measured for greedy decoding (one row per step) and for the paper's 5-beam search. Peak RSS of each process is reported too. `--layers` makes a shallower model (same
width) where a full one does not fit; per-token time then scales with depth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, report

OUT = ROOT / "bench-out"


def write_checkpoint(layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = OUT / f"llama7b-random-{layers}l"
    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32001, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16))
    model.save_pretrained(path, max_shard_size="2GB")
    return path


def measure(path: str, mode: str, lengths: tuple[int, int]) -> dict:
    """Runs in its own process: load in `mode`, time generation at two lengths."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = {"bf16": None,
             "8bit": BitsAndBytesConfig(load_in_8bit=True),
             "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.bfloat16)}[mode]
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant,
                                             device_map={"": "cpu"}).eval()
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    embeds = torch.cat([torch.randn(1, 32, 4096, generator=gen) * 0.02,  # 32 visual tokens
                        model.get_input_embeddings()(torch.randint(3, 32000, (1, 64), generator=gen)).float()], dim=1)
    embeds = embeds.to(torch.bfloat16)
    row = {"mode": mode, "load_s": round(load_s, 1)}
    with torch.inference_mode():
        for beams in (1, 5):  # greedy decoding: one row per step; the paper's 5-beam search: five
            times = {}
            for n in (lengths[0], *lengths):  # the first run warms up
                t0 = time.perf_counter()
                out = model.generate(inputs_embeds=embeds, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     num_beams=beams, pad_token_id=0)
                times[n] = time.perf_counter() - t0
                assert out.shape[1] == n
            row[f"s_per_token_beams{beams}"] = round((times[lengths[1]] - times[lengths[0]]) / (lengths[1] - lengths[0]), 3)
            row[f"first_{lengths[0]}_tokens_s_beams{beams}"] = round(times[lengths[0]], 2)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[4, 12])
    parser.add_argument("--modes", nargs="+", default=["bf16", "8bit", "4bit"])
    args = parser.parse_args()
    path = write_checkpoint(args.layers)
    rows = []
    for mode in args.modes:
        code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_llm import measure; "
                f"print(json.dumps(measure({str(path)!r}, {mode!r}, {tuple(args.new_tokens)!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    results = {"layers": args.layers, "hidden": 4096, "runs": rows}
    timed = [r for r in rows if "s_per_token_beams5" in r]
    for beams in (1, 5):
        if timed:
            results[f"fastest_beams{beams}"] = min(timed, key=lambda r: r[f"s_per_token_beams{beams}"])["mode"]
    report("llm", results, f"python benchmarks/bench_llm.py --layers {args.layers}")


if __name__ == "__main__":
    main()
