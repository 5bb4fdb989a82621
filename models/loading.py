"""Loading MALMM: InstructBLIP weights in the Hugging Face layout, MA-LMM LAVIS overlays, quantization.

``src`` is a hub id (default ``Salesforce/instructblip-vicuna-7b``), a local directory in the
Hugging Face layout (model files, LLM tokenizer, ``qformer_tokenizer/``), or ``tiny-random``.
transformers reads the checkpoint (sharding, safetensors, the HF cache, ``HF_HUB_OFFLINE``,
bitsandbytes); the Q-Former weights then move into :class:`MemoryQFormer` with strict=True.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

from .errors import CheckpointError, ModelNotAvailableError
from .malmm import DEFAULT_MODEL, MALMM
from .qformer import MemoryQFormer
from .quantize import quantization_config, quantized_copy_dir, save_quantized
from .tiny import TINY_RANDOM, ensure_tiny_checkpoint

__all__ = ["load_malmm", "default_dtype", "resolve_device", "qformer_dtype_for", "OverlayReport", "convert_lavis_state_dict", "apply_overlay"]

log = logging.getLogger("malmm")

FULL_PRECISION_MODULES = ["query_tokens", "qformer", "language_projection"]


class _InstructBlipWeights(InstructBlipForConditionalGeneration):
    """InstructBLIP used as a weight container: transformers keeps the named modules in fp32
    whatever dtype the ViT and LLM load in (same weights, same parameter names)."""

    _keep_in_fp32_modules_strict = FULL_PRECISION_MODULES


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else torch.float32


def qformer_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The Q-Former runs in bf16 when the model does: 2.1x faster per frame than fp32 on this
    project's AVX512-BF16 CPU, with outputs at cosine >= 0.9997 to fp32 after 200 frames
    (BENCHMARKS.md). Under fp16 it stays fp32, as in the reference, for range. Bank merges
    and similarities are computed in float32 either way."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None/"auto": CUDA when PyTorch sees a GPU, else the CPU; a named device must exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotAvailableError("CUDA was requested but no CUDA GPU is available to PyTorch.")
    return device


def _is_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(hit, str)


def _load_weights(src: str, common: dict, quantization: str | None, quantized_cache: Path | None,
                  revision: str | None, dtype: torch.dtype, device: torch.device):
    """The InstructBLIP weights; quantized ones from a saved quantized copy when there is one
    (quantizing at load takes minutes at 7B, reloading a saved copy about a second)."""
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quantization is None or quantized_cache is None:
        return _InstructBlipWeights.from_pretrained(src, quantization_config=quantization_config(quantization, dtype),
                                                    **common, **kwargs)
    copy = quantized_copy_dir(quantized_cache, src, revision, quantization, device, dtype)
    if (copy / "config.json").exists():
        return _InstructBlipWeights.from_pretrained(str(copy), local_files_only=True, **kwargs)
    hf = _InstructBlipWeights.from_pretrained(src, quantization_config=quantization_config(quantization, dtype),
                                              **common, **kwargs)
    log.info("saving the %s weights to %s for faster loading next time", quantization, copy)
    save_quantized(hf, copy)
    return hf


def _load_hf(src: str, revision: str | None, quantization: str | None, quantized_cache: Path | None,
             dtype: torch.dtype, device: torch.device):
    """Model + both tokenizers, with one clear error when the weights cannot be had."""
    local = Path(src).is_dir()
    offline_ok = local or _is_cached(src, revision)
    common = {"revision": revision, "local_files_only": offline_ok}
    try:
        hf = _load_weights(src, common, quantization, quantized_cache, revision, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(src, **common)
        qformer_tokenizer = AutoTokenizer.from_pretrained(src, subfolder="qformer_tokenizer", **common)
    except OSError as err:
        if local:
            raise ModelNotAvailableError(f"'{src}' is not a complete InstructBLIP checkpoint: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded"
        raise ModelNotAvailableError(
            f"Model '{src}' is not in the Hugging Face cache and {why}; "
            f"download it with `hf download {src}` (or pass a local directory)."
        ) from err
    return hf, tokenizer, qformer_tokenizer


def _check_special_tokens(tokenizer, vocab_size: int) -> None:
    """Prompts start with BOS and answers stop at EOS; InstructBLIP-Vicuna uses "</s>" (id 2)
    for both, as LAVIS does. Fail loudly rather than generate with wrong ids."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise CheckpointError(f"the LLM tokenizer defines no {'BOS' if bos is None else 'EOS'} token")
    for name, tid in (("BOS", bos), ("EOS", eos)):
        if not 0 <= tid < vocab_size:
            raise CheckpointError(f"the LLM tokenizer's {name} id {tid} is outside the model's vocabulary")
    log.debug("LLM tokenizer: BOS %r (id %d), EOS %r (id %d)", tokenizer.bos_token, bos, tokenizer.eos_token, eos)


def load_malmm(
    src: str = DEFAULT_MODEL,
    *,
    memory_bank_length: int = 20,
    checkpoint: str | Path | None = None,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    strict_checkpoint: bool = True,
    qformer_dtype: torch.dtype | None = None,
    quantized_cache: str | Path | None = None,
) -> MALMM:
    """Build a :class:`MALMM` from InstructBLIP weights.

    memory_bank_length: M, the bank capacity; 0 = no memory (each frame on its own).
    checkpoint: optional MA-LMM LAVIS ``.pth`` whose weights overlay the loaded ones.
    quantization: None, "8bit" or "4bit": bitsandbytes on the LLM only.
    dtype: of the ViT and LLM (default: bf16 where fast, else fp32).
    qformer_dtype: of the Q-Former, query tokens, projection and temporal embedding
        (default: :func:`qformer_dtype_for`); they are loaded from the checkpoint in float32
        first, whatever the choice.
    device: "cpu", "cuda", "cuda:1", or None/"auto".
    quantized_cache: a directory where quantized weights are saved after the first quantized
        load and read back afterwards (keyed by model, mode, device and library versions).
    """
    from transformers.utils import logging as hf_logging

    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if src == TINY_RANDOM:
        src = str(ensure_tiny_checkpoint())
    hf_logging.disable_progress_bar()
    hf, tokenizer, qformer_tokenizer = _load_hf(
        src, revision, quantization, Path(quantized_cache) if quantized_cache else None, dtype, device
    )
    _check_special_tokens(tokenizer, hf.config.text_config.vocab_size)

    qformer = MemoryQFormer(hf.config.qformer_config, num_query_tokens=hf.config.num_query_tokens)
    qformer.to(device=device, dtype=torch.float32)
    qformer.load_state_dict(hf.qformer.state_dict(), strict=True)
    del hf.qformer
    model = MALMM(
        vision_model=hf.vision_model,
        query_tokens=hf.query_tokens,
        qformer=qformer,
        language_projection=hf.language_projection,
        language_model=hf.language_model,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        memory_bank_length=memory_bank_length,
        name=src,
    )
    model.quantization = quantization
    model.overlay_report = None
    if checkpoint is not None:
        model.overlay_report = load_overlay(model, checkpoint, strict=strict_checkpoint)
    model.set_qformer_dtype(qformer_dtype or qformer_dtype_for(dtype))
    return model


# ---- MA-LMM LAVIS overlays ------------------------------------------------------------

_QFORMER_RENAMES = [
    ("Qformer.bert.", "qformer."),
    ("embeddings.LayerNorm.", "embeddings.layernorm."),
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
]
_VISION_RENAMES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
]
_QKV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")
_DROPPED = {"Qformer.bert.embeddings.position_ids"}


def lavis_to_hf_key(key: str) -> str | None:
    """The MALMM parameter name of a LAVIS MA-LMM key, or None if it has no counterpart."""
    if key.startswith("Qformer.bert."):
        for old, new in _QFORMER_RENAMES:
            key = key.replace(old, new)
        return key
    if key == "query_tokens":
        return key
    if key == "image_pe.weight":
        return "temporal_embedding.weight"
    for prefix, new in (("llm_proj.", "language_projection."), ("ln_vision.", "vision_model.post_layernorm.")):
        if key.startswith(prefix):
            return new + key[len(prefix) :]
    for pattern, repl in _VISION_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_lavis_state_dict(lavis: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LAVIS keys -> MALMM names. Returns (converted, keys with no counterpart)."""
    converted, unexpected, qkv = {}, [], {}
    for key, value in lavis.items():
        if key in _DROPPED:
            continue
        bias = _QKV_BIAS.match(key)
        if bias:
            qkv.setdefault(int(bias.group(1)), {})[bias.group(2)] = value
            continue
        name = lavis_to_hf_key(key)
        if name is None:
            unexpected.append(key)
        else:
            converted[name] = value
    for layer, parts in qkv.items():
        if set(parts) != {"q", "v"}:
            unexpected.extend(f"visual_encoder.blocks.{layer}.attn.{p}_bias" for p in parts)
            continue
        # EVA-CLIP has q and v biases but no k bias; HF stores the concatenation.
        q, v = parts["q"], parts["v"]
        converted[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return converted, unexpected


@dataclass
class OverlayReport:
    """What an overlay changed: every key is accounted for."""

    path: str
    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # no counterpart, or a shape that does not fit
    not_in_checkpoint: list[str] = field(default_factory=list)  # MA-LMM-trained groups left as loaded

    def summary(self) -> str:
        text = f"{len(self.loaded)} tensors loaded from {self.path}"
        if self.not_in_checkpoint:
            text += f"; not in the checkpoint (kept): {', '.join(self.not_in_checkpoint)}"
        if self.unexpected:
            text += f"; unexpected: {', '.join(self.unexpected[:5])}" + (" ..." if len(self.unexpected) > 5 else "")
        return text


def read_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A LAVIS ``.pth`` (``{"model": state_dict, ...}`` or a bare state dict), never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for non-checkpoint files; all mean the same here
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' holds no state dict (expected a dict of tensors under 'model')")
    return state


@torch.no_grad()
def apply_overlay(model: MALMM, converted: dict[str, torch.Tensor], report: OverlayReport) -> OverlayReport:
    params = dict(model.named_parameters())
    for name, value in sorted(converted.items()):
        target = params.get(name)
        if target is None or tuple(target.shape) != tuple(value.shape):
            shape = "missing" if target is None else f"shape {tuple(value.shape)} != {tuple(target.shape)}"
            report.unexpected.append(f"{name} ({shape})")
            continue
        target.copy_(value.to(target.dtype))
        report.loaded.append(name)
    groups = {"Q-Former": "qformer.", "query tokens": "query_tokens", "projection": "language_projection.",
              "temporal position embedding": "temporal_embedding."}
    report.not_in_checkpoint = [g for g, prefix in groups.items() if not any(k.startswith(prefix) for k in report.loaded)]
    return report


def load_overlay(model: MALMM, path: str | Path, *, strict: bool = True) -> OverlayReport:
    """Overlay a MA-LMM LAVIS checkpoint; unexpected keys raise (strict) or are reported."""
    converted, unexpected = convert_lavis_state_dict(read_lavis_checkpoint(path))
    report = OverlayReport(str(path), unexpected=list(unexpected))
    if strict:
        # Check everything before changing anything, so a bad file leaves the model as it was.
        params = dict(model.named_parameters())
        bad = report.unexpected + [
            k for k, v in converted.items() if k not in params or tuple(params[k].shape) != tuple(v.shape)
        ]
        if bad:
            raise CheckpointError(
                f"checkpoint '{path}' has {len(bad)} key(s) that do not fit the model, e.g. {', '.join(bad[:3])}"
            )
    apply_overlay(model, converted, report)
    log.info("overlay: %s", report.summary())
    if report.unexpected:
        log.warning("overlay %s: %d unexpected key(s): %s", path, len(report.unexpected), ", ".join(report.unexpected[:5]))
    return report
