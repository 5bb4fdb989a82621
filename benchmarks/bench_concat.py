"""Benchmark 5: MA-LMM's memory against the concatenation baseline, at 8, 32, 64 and 128 frames.

    python benchmarks/bench_concat.py [--frames 8 32 64 128] [--llm-layers 8]

Baseline: transformers' InstructBlipVideoForConditionalGeneration, which runs every frame
through the ViT and Q-Former at once and hands the LLM 32 tokens per frame. Ours: MALMM
streaming the same frames in chunks of 16 through the memory bank (M=20): 32 tokens in all.
Both use the same random weights at real size for the ViT-g (bf16) and Q-Former, and an LLM
at Vicuna-7B width (4096, 32 heads, MLP 11008) with `--llm-layers` of its 32 layers so the
128-frame baseline fits in this machine's 23 GiB (memory for the LLM's activations and KV
cache grows with depth; its weights are reported separately). Each configuration runs in a
fresh process; peak RSS is the kernel's high-water mark (VmHWM), reset once the model is
built, so it covers the run, not the construction. The task: one 16-token prompt, one
generated token (the prefill, where the sequence lengths differ).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import report


def _config(llm_layers: int):
    from transformers import InstructBlipVideoConfig

    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32002, max_position_embeddings=8192,
                bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return InstructBlipVideoConfig(vision_config={}, qformer_config={"vocab_size": 30523}, text_config=text,
                                   num_query_tokens=32, video_token_index=32001)


PROMPT = "what does the video describe? describe the scene, the people and what they do in detail."


def run(method: str, frames: int, llm_layers: int) -> dict:
    """In a fresh process: build the model, then run one prefill over `frames` frames."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, InstructBlipVideoForConditionalGeneration

    from models.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # the tiny checkpoint's tokenizers: ids fit these vocabularies
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(str(tiny))
        qformer_tokenizer = AutoTokenizer.from_pretrained(str(tiny), subfolder="qformer_tokenizer")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    hf = InstructBlipVideoForConditionalGeneration(_config(llm_layers)).eval()
    torch.set_default_dtype(torch.float32)
    model = _malmm_from(hf, tokenizer, qformer_tokenizer) if method == "malmm" else None
    pixels = torch.randn(frames, 3, 224, 224, generator=torch.Generator().manual_seed(1)).bfloat16()
    ready_gb = _reset_peak_rss()  # the model is built: from here the peak is the run's
    t0 = time.perf_counter()
    with torch.inference_mode():
        if method == "concat":
            prompt = torch.tensor([[tokenizer.bos_token_id] + tokenizer(PROMPT, add_special_tokens=False).input_ids])
            input_ids = torch.cat([torch.full((1, 32 * frames), 32001), prompt], dim=1)
            q = qformer_tokenizer([PROMPT], return_tensors="pt")
            hf.generate(pixel_values=pixels[None], qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask,
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False)
            llm_tokens = input_ids.shape[1]
        else:
            stream = model.new_stream([PROMPT], total_frames=frames)
            for start in range(0, frames, 16):
                stream.add_frames(pixels[start : start + 16])
            model.generate(stream, max_new_tokens=1, num_beams=1)
            llm_tokens = model._prefix(stream, None)[0].shape[1]
    peak_gb = _rss_gb("VmHWM")
    return {"method": method, "frames": frames, "llm_input_tokens": llm_tokens,
            "model_rss_gb": round(ready_gb, 2), "peak_rss_gb": round(peak_gb, 2),
            "peak_over_model_gb": round(peak_gb - ready_gb, 2), "wall_s": round(time.perf_counter() - t0, 1)}


def _rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; return that RSS in GB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_gb("VmRSS")


def _malmm_from(hf, tokenizer, qformer_tokenizer):
    """MALMM on the same modules (the Q-Former's weights move into the memory Q-Former)."""
    import torch

    from models import MALMM
    from models.qformer import MemoryQFormer

    with torch.device("meta"):  # no second copy of the weights: the module takes the HF tensors
        qformer = MemoryQFormer(hf.config.qformer_config, num_query_tokens=32)
    qformer.load_state_dict(hf.qformer.state_dict(), strict=True, assign=True)
    qformer.embeddings.position_ids = torch.arange(hf.config.qformer_config.max_position_embeddings)[None]
    del hf.qformer
    return MALMM(vision_model=hf.vision_model, query_tokens=hf.query_tokens, qformer=qformer,
                 language_projection=hf.language_projection, language_model=hf.language_model,
                 tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, memory_bank_length=20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--llm-layers", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for frames in args.frames:
        for method in ("concat", "malmm"):
            code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_concat import run; "
                    f"print(json.dumps(run({method!r}, {frames}, {args.llm_layers})))")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"method": method, "frames": frames, "error": proc.stderr.strip().splitlines()[-1][:300]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report("concat", {"llm_layers": args.llm_layers, "runs": rows},
           "python benchmarks/bench_concat.py --llm-layers " + str(args.llm_layers))


if __name__ == "__main__":
    main()
