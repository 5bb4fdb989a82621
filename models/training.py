"""Finetuning MA-LMM: a differentiable forward over a batch of clips, the LLM loss on the
answer, and checkpoints in the layout the official runner saves.

The inference path (:meth:`MemoryQFormer.step` with :class:`MemoryBank`) updates its banks in
place under inference_mode, one video at a time. Training needs gradients and batches of
different clips, so this module runs the same order of operations (method.md) functionally,
with each bank a plain tensor [B, T, N, C] plus counts [B, T, N] and the pure :func:`compress`:

  for each frame t:  f_t = features[:, t] + PE[t]
    each layer l:    self-attention of its input h over [Z^l ; h], then Z^l <- [Z^l ; h]
    cross layers:    the 32 queries attend over [V ; f_t] flattened
    then:            V <- [V ; f_t]; every bank longer than M is compressed once (MBC) to M

The weights are the model's own modules (projections, output blocks, feed-forward), so what
this trains is exactly what inference runs. As in the official training code (the LAVIS fork,
``blip2.py`` and ``blip2_vicuna_instruct.py``) bank entries are stored detached: the loss
reaches the weights through the last frame's pass, whose attention reads the banks through
the current key/value projections, but not back through earlier frames. Earlier frames
therefore run without autograd: a clip of T frames costs T-1 inference steps and one step
with gradients, and activation memory does not grow with T.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .malmm import MALMM, TEMPORAL_SLOTS, temporal_slot
from .memory_bank import compress
from .overlay import hf_to_lavis_key
from .qformer import MemoryQFormer, QFormerMultiHeadAttention

__all__ = [
    "TRAINED_GROUPS", "LN_VISION", "Instructions", "freeze_for_training", "trained_parameters",
    "tokenize_instructions", "apply_ln_vision", "query_output", "visual_tokens", "answer_log_likelihood", "answer_loss", "candidate_log_likelihoods",
    "lavis_state_dict", "official_config", "save_checkpoint", "llm_token_ids",
]

# What MA-LMM finetunes (method.md); the ViT and the LLM stay frozen.
TRAINED_GROUPS = ("qformer.", "query_tokens", "language_projection.", "temporal_embedding.")
# The official code trains ln_vision too (the ViT's last LayerNorm, frozen only with the ViT's
# blocks in LAVIS's freeze_vit); here it is an option (trained_parameters(ln_vision=True)).
LN_VISION = "vision_model.post_layernorm."
ANSWER_MAX_TOKENS = 256  # LAVIS max_output_txt_len: answer + EOS, cut on the right


# ---- what is trained ----------------------------------------------------------------------


def trained_parameters(model: nn.Module, *, ln_vision: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything MA-LMM trains, in the model's order; with
    ``ln_vision``, the ViT's last LayerNorm too (as the official code trains it)."""
    groups = TRAINED_GROUPS + ((LN_VISION,) if ln_vision else ())
    return [(n, p) for n, p in model.named_parameters() if n.startswith(groups)]


def freeze_for_training(model: MALMM, *, ln_vision: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Gradients for the Q-Former, query tokens, projection and temporal embedding only (and
    ln_vision with ``ln_vision``), in float32 (AdamW on bf16 weights loses small updates); the
    Q-Former in train mode (dropout, as LAVIS trains it), the ViT and the LLM in eval mode.
    Returns the trained parameters. A trained ln_vision reads features computed before it
    (``encode_frames(pre_norm=True)``, then :func:`apply_ln_vision`)."""
    if model.qformer_dtype != torch.float32:
        model.set_qformer_dtype(torch.float32)
    if ln_vision:
        model.vision_model.post_layernorm.float()
    trained = dict(trained_parameters(model, ln_vision=ln_vision))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    model.eval()
    model.qformer.train()
    return list(trained.items())


# ---- the Q-Former over a batch of clips -----------------------------------------------------


@dataclass(frozen=True)
class Instructions:
    """A batch of Q-Former instructions, tokenized as :class:`VideoStream` does."""

    input_ids: torch.Tensor  # [B, L]
    key_mask: torch.Tensor | None  # [B, Q + L] bool, False at padding; None when nothing is padded


def apply_ln_vision(model: MALMM, features: torch.Tensor) -> torch.Tensor:
    """ln_vision over features cached before it ([..., P, C]), in float32 as LAVIS computes it
    (its LayerNorm casts to fp32), differentiably: what a trainable ln_vision needs."""
    norm = model.vision_model.post_layernorm
    return F.layer_norm(features.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


def tokenize_instructions(model: MALMM, instructions: Sequence[str]) -> Instructions:
    tok = model.qformer_tokenizer(list(instructions), padding="longest", truncation=True,
                                  max_length=model.max_text_tokens, return_tensors="pt")
    ids = tok.input_ids.to(model.device)
    mask = torch.cat([torch.ones(ids.shape[0], model.num_query_tokens, dtype=torch.bool, device=ids.device),
                      tok.attention_mask.to(ids.device).bool()], dim=1)
    return Instructions(ids, None if bool(mask.all()) else mask)


@dataclass(frozen=True)
class _Bank:
    """A memory bank as values: entries [B, T, N, C] (None when empty) and counts [B, T, N]."""

    entries: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def with_entry(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T + 1, N, C]: the stored entries, then x [B, N, C] (what attention reads)."""
        x = x.unsqueeze(1)
        return x if self.entries is None else torch.cat([self.entries, x], dim=1)

    def add(self, x: torch.Tensor, capacity: int, detach: bool) -> _Bank:
        """The bank after storing x [B, N, C] and compressing back to `capacity` entries."""
        if capacity == 0:
            return _Bank()
        x = x.detach() if detach else x
        ones = torch.ones(x.shape[:2], dtype=torch.long, device=x.device).unsqueeze(1)
        entries = self.with_entry(x)
        counts = ones if self.counts is None else torch.cat([self.counts, ones], dim=1)
        if entries.shape[1] > capacity:  # one over at most: the bank was within capacity before
            entries, counts = compress(entries, counts)
        return _Bank(entries, counts)


def _attend(attn: QFormerMultiHeadAttention, hidden: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None,
            dropout: float) -> torch.Tensor:
    """hidden [B, L, H] attends over kv [B, S, H_kv] through the module's projections; mask
    [B, S] bool (True = attend) or None. Dropout on the attention probabilities, as BERT."""
    B, L, H = hidden.shape
    heads = attn.num_heads
    q = attn.query(hidden).view(B, L, heads, H // heads).transpose(1, 2)  # [B, heads, L, d]
    k = attn.key(kv).view(B, kv.shape[1], heads, H // heads).transpose(1, 2)  # [B, heads, S, d]
    v = attn.value(kv).view(B, kv.shape[1], heads, H // heads).transpose(1, 2)
    if dropout:
        # Written out: torch's fused CPU attention with dropout ran 2.3x slower than this.
        scores = torch.matmul(q * (H // heads) ** -0.5, k.transpose(-1, -2))  # [B, heads, L, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.matmul(F.dropout(scores.softmax(dim=-1), dropout, training=True), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return out.transpose(1, 2).reshape(B, L, H)


def _step(qformer: MemoryQFormer, embeddings: torch.Tensor, key_mask: torch.Tensor | None, frame: torch.Tensor,
          visual: _Bank, query: list[_Bank], capacity: int, detach: bool):
    """One frame for a batch of clips: frame [B, P, C]. Returns (hidden [B, N, H], banks after it)."""
    Q = qformer.num_query_tokens
    dropout = qformer.config.attention_probs_dropout_prob if qformer.training else 0.0
    visual_kv = visual.with_entry(frame).flatten(1, 2)  # [B, (T + 1) * P, C]: bank, then this frame
    hidden, after = embeddings, []
    for layer, bank in zip(qformer.encoder.layer, query):
        kv = bank.with_entry(hidden)  # [B, T + 1, N, H], time-major, so the text mask repeats per entry
        mask = None if key_mask is None else key_mask.repeat(1, kv.shape[1])
        out = layer.attention.output(_attend(layer.attention.attention, hidden, kv.flatten(1, 2), mask, dropout),
                                     hidden)
        after.append(bank.add(hidden, capacity, detach))  # the bank keeps the layer's input
        if layer.has_cross_attention:
            queries = out[:, :Q]
            cross = _attend(layer.crossattention.attention, queries, visual_kv, None, dropout)
            out = torch.cat([layer.crossattention.output(cross, queries), out[:, Q:]], dim=1)
        hidden = layer.feed_forward(out, Q)
    return hidden, visual.add(frame, capacity, detach), after


def query_output(model: MALMM, features: torch.Tensor, instructions: Instructions | Sequence[str],
                 memory_bank_length: int, *, detach_memory: bool = True, concat: bool = False) -> torch.Tensor:
    """The Q-Former output [B, 32, H] after the last frame of each clip, differentiably.

    features: [B, T, P, C] vision features (``MALMM.encode_frames``) of B clips of T frames;
    instructions: one per clip. Frame t uses temporal row t (clips over 120 frames share rows
    as :func:`temporal_slot` maps them), the rows that training writes into the checkpoint.
    ``detach_memory=False`` backpropagates through every frame instead (not what MA-LMM does).
    ``concat=True``: the no-memory baseline (:class:`models.streams.ConcatStream`), [B, T * 32, H].
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [B, T, P, C], got {tuple(features.shape)}")
    if not isinstance(instructions, Instructions):
        instructions = tokenize_instructions(model, instructions)
    qformer = model.qformer
    B, T = features.shape[:2]
    if instructions.input_ids.shape[0] != B:
        raise ValueError(f"{instructions.input_ids.shape[0]} instructions for {B} clips")
    embeddings = qformer.embed(model.query_tokens.expand(B, -1, -1), instructions.input_ids)
    if concat:
        return _concat_output(model, features, embeddings, instructions.key_mask)
    visual, query = _Bank(), [_Bank() for _ in qformer.encoder.layer]
    grad = torch.is_grad_enabled()
    for t in range(T):
        with torch.set_grad_enabled(grad and (t == T - 1 or not detach_memory)):
            row = model.temporal_embedding.weight[temporal_slot(t, T, None)]
            frame = features[:, t].to(model.device, model.qformer_dtype) + row  # [B, P, C]
            hidden, visual, query = _step(qformer, embeddings, instructions.key_mask, frame, visual, query,
                                          memory_bank_length, detach_memory)
    return hidden[:, : model.num_query_tokens]


def _concat_output(model: MALMM, features: torch.Tensor, embeddings: torch.Tensor,
                   key_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T * 32, H]: every frame through the Q-Former on its own (no banks, no temporal
    position), all B * T frames as one batch, with gradients through all of them (the official
    no-memory path, blip2_vicuna_instruct.py lines 211-235 and 250-252)."""
    B, T = features.shape[:2]
    Q = model.num_query_tokens
    rows = features.to(model.device, model.qformer_dtype).flatten(0, 1)  # [B * T, P, C], clip-major
    mask = None if key_mask is None else key_mask.repeat_interleave(T, dim=0)
    hidden, _, _ = _step(model.qformer, embeddings.repeat_interleave(T, dim=0), mask, rows, _Bank(),
                         [_Bank() for _ in model.qformer.encoder.layer], 0, True)
    return hidden[:, :Q].reshape(B, T * Q, -1)


def visual_tokens(model: MALMM, features: torch.Tensor, instructions: Instructions | Sequence[str],
                  memory_bank_length: int, **kwargs) -> torch.Tensor:
    """[B, 32, D_llm]: what the LLM sees of each clip (projection of :func:`query_output`)."""
    return model.language_projection(query_output(model, features, instructions, memory_bank_length, **kwargs))


# ---- the LLM loss ---------------------------------------------------------------------------


def llm_token_ids(model: MALMM, prompts: Sequence[str], answers: Sequence[str]):
    """Prompt ids (BOS first) and answer ids (EOS last) as the training forward feeds them: the
    prompt's last max_text_tokens tokens, BOS included, the answer's first 256 with EOS."""
    tok = model.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # LAVIS's training forward keeps the prompt's last max_txt_len tokens, BOS included
    # (truncation_side left); its generate() does not cut the prompt, nor does MALMM.generate.
    keep = max(1, model.max_text_tokens - 1)
    prompt_ids = [[bos] + ids[-keep:] for ids in tok(list(prompts), add_special_tokens=False).input_ids]
    answer_ids = [(ids + [eos])[:ANSWER_MAX_TOKENS] for ids in tok(list(answers), add_special_tokens=False).input_ids]
    return prompt_ids, answer_ids


def answer_log_likelihood(model: MALMM, visual: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]):
    """log p(answer tokens, then EOS | visual tokens, BOS + prompt), summed per row: ([B], tokens [B]).

    The LLM input is [visual tokens][BOS prompt][answer EOS], right-padded, as LAVIS trains
    it (its targets are -100 on the visual tokens, the prompt and the padding); here only the
    answer positions go through the output layer, in float32 like :meth:`MALMM.score`.
    """
    if not (visual.shape[0] == len(prompts) == len(answers)):
        raise ValueError(f"{visual.shape[0]} clips, {len(prompts)} prompts and {len(answers)} answers")
    prompt_ids, answer_ids = llm_token_ids(model, prompts, answers)
    B, Q, device = visual.shape[0], visual.shape[1], visual.device
    rows = [p + a for p, a in zip(prompt_ids, answer_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((B, width), model.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, Q + width, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, device=device)
        mask[b, : Q + len(row)] = 1
    text = model.language_model.get_input_embeddings()(ids)
    inputs = torch.cat([visual.to(text.dtype), text], dim=1)  # [B, Q + width, D]
    hidden = model.language_model.get_decoder()(inputs_embeds=inputs, attention_mask=mask,
                                                use_cache=False).last_hidden_state
    # Answer token j of row b sits at Q + len(prompt_b) + j and is predicted one position earlier.
    row_of = torch.tensor([b for b, a in enumerate(answer_ids) for _ in a], device=device)
    at = torch.tensor([Q + len(p) + j - 1 for p, a in zip(prompt_ids, answer_ids) for j in range(len(a))],
                      device=device)
    target = torch.tensor([t for a in answer_ids for t in a], device=device)
    head = model.language_model.get_output_embeddings()
    with torch.autocast(device.type, enabled=False):
        logits = F.linear(hidden[row_of, at].float(), head.weight.float(),
                          None if head.bias is None else head.bias.float())
        picked = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    total = torch.zeros(B, dtype=torch.float32, device=device).index_add(0, row_of, picked)
    return total, torch.tensor([len(a) for a in answer_ids], device=device)


def answer_loss(model: MALMM, visual: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Mean negative log-likelihood per answer token over the batch (LAVIS's LLM loss)."""
    total, tokens = answer_log_likelihood(model, visual, prompts, answers)
    return -total.sum() / tokens.sum()


@torch.no_grad()
def candidate_log_likelihoods(model: MALMM, visual: torch.Tensor, prompts: Sequence[str],
                              candidates: Sequence[str], *, rows_per_pass: int = 64) -> torch.Tensor:
    """[B, K]: log-likelihood of each candidate answer for each clip, what :meth:`MALMM.score`
    computes for one stream, here for a batch of clips' visual tokens."""
    B, K = visual.shape[0], len(candidates)
    flat_visual = visual.repeat_interleave(K, dim=0)
    flat_prompts = [p for p in prompts for _ in range(K)]
    flat_answers = list(candidates) * B
    out = []
    for start in range(0, B * K, rows_per_pass):
        stop = start + rows_per_pass
        out.append(answer_log_likelihood(model, flat_visual[start:stop], flat_prompts[start:stop],
                                         flat_answers[start:stop])[0])
    return torch.cat(out).view(B, K).cpu()


# ---- checkpoints in the official layout -------------------------------------------------------


def _llm_inv_freq(model: MALMM) -> torch.Tensor | None:
    for name, buffer in model.language_model.named_buffers():
        if name.endswith("rotary_emb.inv_freq"):
            return buffer
    return None


def lavis_state_dict(model: MALMM, *, ln_vision: bool = False) -> dict[str, torch.Tensor]:
    """What the official runner saves as ``model``: every trained parameter under its LAVIS
    key (float32, on the CPU; ``ln_vision.*`` when it was trained), plus the buffers that stay
    in a LAVIS state dict, the Q-Former's ``position_ids`` and each LLaMA layer's rotary
    ``inv_freq``."""
    state = {}
    for name, param in trained_parameters(model, ln_vision=ln_vision):
        key = hf_to_lavis_key(name)
        if key is None:  # every trained group has a LAVIS name; this would be a bug
            raise ValueError(f"no LAVIS key for the trained parameter {name}")
        state[key] = param.detach().to("cpu", torch.float32).clone()
    qformer = model.qformer.config
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(qformer.max_position_embeddings).unsqueeze(0)
    inv_freq = _llm_inv_freq(model)
    if inv_freq is not None:
        for i in range(model.language_model.config.num_hidden_layers):
            state[f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.detach().float().cpu().clone()
    return state


def official_config(model: MALMM, *, num_frames: int, memory_bank_length: int, run: dict | None = None,
                    extra: dict | None = None) -> dict:
    """The run config as the official runner stores it (``config.to_dict()``): the ``model``
    part names the frames and memory the weights were trained with, which MA-LMM's code and
    ``MALMM.from_pretrained(checkpoint=...)`` both read. ``extra`` goes under ``malmm``."""
    config = {
        "model": {
            "arch": "blip2_vicuna_instruct", "model_type": "vicuna7b", "load_finetuned": False,
            "load_pretrained": True, "num_query_token": model.num_query_tokens, "vit_precision": "fp16",
            "freeze_vit": True, "memory_bank_length": int(memory_bank_length), "num_frames": int(num_frames),
            "max_num_frames": TEMPORAL_SLOTS, "image_size": model.image_spec.size[0], "prompt": "",
            "max_txt_len": int(model.max_text_tokens),
        },
        "run": dict(run or {}),
    }
    if extra:
        config["malmm"] = dict(extra)
    return config


def save_checkpoint(path: str | Path, model: MALMM, *, config: dict, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, ln_vision: bool = False) -> Path:
    """Write ``{"model", "optimizer", "config", "scaler", "epoch"}`` as the official runner
    does, atomically: a temporary file beside `path`, renamed over it when complete, so an
    interrupted or failed write never leaves a torn checkpoint (nor replaces a good one)."""
    path = Path(path)
    obj = {
        "model": lavis_state_dict(model, ln_vision=ln_vision),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": config,
        "scaler": None,  # bf16 autocast needs no loss scaling (LAVIS saves None without a scaler)
        "epoch": int(epoch),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
