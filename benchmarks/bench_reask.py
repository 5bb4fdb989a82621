"""Benchmark 4: a second question about a seen video vs the first, at real vision size.

    python benchmarks/bench_reask.py [--frames 20] [--vision-dtype bf16|fp32]

The model has InstructBLIP's real ViT-g (bf16, or `--vision-dtype fp32`) and Q-Former (12 x 768) with random weights,
and the tiny LLM (the LLM's cost does not depend on whether the video was seen before, and
the question's cost is what re-asking saves). Both questions go through the same Analyzer
the CLI uses, with the on-disk feature cache: the first decodes and encodes the frames, the
second reads their features back and runs only the Q-Former (new instruction) and the LLM.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import qformer_model, report, vision_model


def real_vision_model(tmp: Path, qformer_dtype: torch.dtype, vision_dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

    from models import MALMM
    from models.tiny import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp / "tiny")
    small = InstructBlipForConditionalGeneration.from_pretrained(str(tiny))
    llm_width = small.config.text_config.hidden_size
    return MALMM(
        vision_model=vision_model(vision_dtype),
        query_tokens=torch.nn.Parameter(torch.randn(1, 32, 768) * 0.02),
        qformer=qformer_model(qformer_dtype),
        language_projection=torch.nn.Linear(768, llm_width).to(qformer_dtype),
        language_model=small.language_model,
        tokenizer=AutoTokenizer.from_pretrained(str(tiny)),
        qformer_tokenizer=AutoTokenizer.from_pretrained(str(tiny), subfolder="qformer_tokenizer"),
        memory_bank_length=10,
        name="real-vision",
    )


def main() -> None:
    from malmm_cli.engine.features import FeatureCache
    from malmm_cli.engine.presets import Generation
    from malmm_cli.engine.session import Session
    from malmm_cli.engine.tasks import Job, question_prompt
    from malmm_cli.sources.inputs import open_source

    from tests.media import bigbuckbunny_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--vision-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="the ViT's dtype (malmm picks the faster of the two on a CPU: fp32 on a Xeon without AMX)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = real_vision_model(tmp, model_qformer_dtype(),
                                  torch.bfloat16 if args.vision_dtype == "bf16" else torch.float32)
        session = Session.from_model(model, model_id="bench", cache=FeatureCache(tmp / "features"))
        source = open_source(str(bigbuckbunny_path()))
        runs = []
        for question in ("what is the rabbit doing?", "where does this take place?"):
            job = Job(task="ask", model_label="real-vision", memory=10,
                      generation=Generation(num_beams=5, max_new_tokens=10),
                      frames=args.frames, prompts=(question_prompt(question),), questions=(question,))
            t0 = time.perf_counter()
            result = session.analyze(source, job)
            runs.append({"question": question, "wall_s": round(time.perf_counter() - t0, 3), **result.timings})
            print(runs[-1], flush=True)
    results = {"frames": args.frames, "vision_dtype": args.vision_dtype, "first": runs[0], "second": runs[1],
               "speedup": round(runs[0]["wall_s"] / runs[1]["wall_s"], 1)}
    report(f"reask_{args.vision_dtype}", results,
           f"python benchmarks/bench_reask.py --frames {args.frames} --vision-dtype {args.vision_dtype}")


def model_qformer_dtype() -> torch.dtype:
    """The Q-Former dtype MALMM.from_pretrained picks for a bf16 model (see models/loading.py)."""
    from models.loading import qformer_dtype_for

    return qformer_dtype_for(torch.bfloat16)


if __name__ == "__main__":
    main()
