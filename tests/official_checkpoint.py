"""Tiny MA-LMM checkpoints built the way the official runner saves them.

The official code's ``runner_base._save_checkpoint`` saves ``model.state_dict()`` minus every
*parameter* with ``requires_grad=False``; buffers are kept. With the paper's run scripts
(``freeze_vit True``) the trainable parameters are the Q-Former (``Qformer.bert.*``; its LM
head is set to None), ``query_tokens``, ``llm_proj``, ``ln_vision`` and ``image_pe``; the buffers
are ``Qformer.bert.embeddings.position_ids`` and each LLaMA layer's persistent
``rotary_emb.inv_freq`` (LAVIS's modeling_llama). Beside ``model`` the file holds the
optimizer's state dict, the run config (OmegaConf as a plain dict), the AMP scaler's state
and the epoch. The key names below are LAVIS's, written from method.md's mapping in the
opposite direction, independently of models/overlay.py.
"""

from __future__ import annotations

from pathlib import Path

import torch


def lavis_name(hf_name: str) -> str | None:
    """LAVIS key of a trainable MALMM parameter (None: frozen in the paper's runs)."""
    if hf_name.startswith("qformer."):
        name = "Qformer.bert." + hf_name[len("qformer."):]
        name = name.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        name = name.replace(".crossattention.attention.", ".crossattention.self.")
        return name.replace(".attention.attention.", ".attention.self.")
    if hf_name == "query_tokens":
        return hf_name
    if hf_name == "temporal_embedding.weight":
        return "image_pe.weight"
    for hf, lavis in (("language_projection.", "llm_proj."), ("vision_model.post_layernorm.", "ln_vision.")):
        if hf_name.startswith(hf):
            return lavis + hf_name[len(hf):]
    return None


def trained_state(model, *, trained_frames: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """New values for every parameter MA-LMM trains, keyed by MALMM name. ``image_pe`` rows at
    and past ``trained_frames`` stay zero, as after real training (they never get a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for name, param in model.named_parameters():
        if lavis_name(name) is None:
            continue
        value = 0.05 * torch.randn(param.shape, generator=gen)
        if name == "temporal_embedding.weight":
            value[trained_frames:] = 0.0
        values[name] = value
    return values


def rotary_inv_freq(model) -> torch.Tensor:
    """LLaMA's rotary frequencies, computed as LAVIS's LlamaRotaryEmbedding does."""
    config = model.language_model.config
    dim = config.hidden_size // config.num_attention_heads
    base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def write_official_checkpoint(model, path: Path, *, num_frames: int, memory_bank_length: int,
                              values: dict[str, torch.Tensor] | None = None, inv_freq: torch.Tensor | None = None,
                              extra_keys: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Save a checkpoint in the official layout; returns the trained values by MALMM name."""
    values = values if values is not None else trained_state(model, trained_frames=num_frames)
    state = {lavis_name(name): value.clone() for name, value in values.items()}
    qformer = model.qformer.config
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(qformer.max_position_embeddings).expand((1, -1))
    freq = rotary_inv_freq(model) if inv_freq is None else inv_freq
    for i in range(model.language_model.config.num_hidden_layers):
        state[f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = freq.clone()
    state.update(extra_keys or {})

    # A real optimizer state: AdamW after one step over the trainable tensors.
    params = [torch.nn.Parameter(v.clone()) for v in values.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    config = {
        "model": {"arch": "blip2_vicuna_instruct", "model_type": "vicuna7b", "load_finetuned": False,
                  "load_pretrained": True, "num_query_token": 32, "vit_precision": "fp16", "freeze_vit": True,
                  "memory_bank_length": memory_bank_length, "num_frames": num_frames, "max_num_frames": 120,
                  "image_size": 224, "llm_model": "llm/vicuna-7b", "prompt": ""},
        "run": {"task": "classification", "init_lr": 1e-4, "max_epoch": 20, "num_beams": 5, "max_len": 20,
                "min_len": 1, "amp": True, "seed": 42},
        "datasets": {"coin_cls": {"num_frames": num_frames}},
    }
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "config": config, "scaler": scaler,
                "epoch": 4}, path)
    return values
