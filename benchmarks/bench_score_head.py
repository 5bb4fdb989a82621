"""What scoring labels with fp32 log-probabilities costs, at Vicuna-7B sizes.

    python benchmarks/bench_score_head.py [--labels 180] [--tokens 6]

`MALMM.score` applies the LLM's output layer in fp32 (issue 8: labels are compared with each
other, and a bf16 logit carries about 3 significant digits). This times, side by side in one
run: the output layer (4096 -> 32001) on every candidate token in bf16 and in fp32 (including
the per-call fp32 copy of its weight), and one LLaMA-7B decoder layer in bf16 on the same
tokens, times 32, which is what the LLM pass over the candidates costs anyway. The default is
COIN's 180 labels at about 6 tokens each.
"""

from __future__ import annotations

import argparse

import torch

from common import report, timeit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=int, default=180)
    parser.add_argument("--tokens", type=int, default=6)
    args = parser.parse_args()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    rows = args.labels * args.tokens
    hidden = torch.randn(rows, 4096).bfloat16()
    head = (torch.randn(32001, 4096) * 0.02).bfloat16()
    bf16 = timeit(lambda: torch.nn.functional.linear(hidden, head).float().log_softmax(-1))
    fp32 = timeit(lambda: torch.nn.functional.linear(hidden.float(), head.float()).log_softmax(-1))

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg._attn_implementation = "sdpa"  # as MALMM loads it
    layer = LlamaDecoderLayer(cfg, layer_idx=0).bfloat16().eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(args.labels, args.tokens, 4096).bfloat16()
    position_ids = torch.arange(args.tokens)[None].expand(args.labels, -1)
    rope = LlamaRotaryEmbedding(cfg)
    with torch.inference_mode():
        cos_sin = rope(x, position_ids)
        one_layer = timeit(lambda: layer(x, position_embeddings=cos_sin, attention_mask=None))
    decoder = 32 * one_layer
    report("score_head", {
        "candidate_tokens": rows,
        "head_bf16_s": round(bf16, 3), "head_fp32_s": round(fp32, 3),
        "decoder_32_layers_bf16_s": round(decoder, 2),
        "fp32_head_extra_over_llm_pass": round((fp32 - bf16) / (decoder + bf16), 3),
    }, f"python benchmarks/bench_score_head.py --labels {args.labels} --tokens {args.tokens}")


if __name__ == "__main__":
    main()
