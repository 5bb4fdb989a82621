"""Loading MALMM: InstructBLIP weights in the Hugging Face layout, MA-LMM overlays, quantization.

``src`` is a hub id (default ``Salesforce/instructblip-vicuna-7b``), a local directory in the
Hugging Face layout (model files, LLM tokenizer, ``qformer_tokenizer/``, the processor config),
or ``tiny-random``. transformers reads the checkpoint (sharding, safetensors, the HF cache,
``HF_HUB_OFFLINE``, bitsandbytes); the Q-Former weights then move into :class:`MemoryQFormer`
with strict=True. MA-LMM checkpoints as the official runner saves them overlay the result
(models/overlay.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

from .constants import DEFAULT_MEMORY_BANK_LENGTH, DEFAULT_MODEL, ImageSpec
from .errors import CheckpointError, ModelNotAvailableError
from .overlay import (OverlayReport, apply_overlay, convert_lavis_state_dict, lavis_to_hf_key,
                      load_overlay)
from .qformer import MemoryQFormer
from .quantize import quantization_config, quantized_copy_dir, save_quantized
from .tiny import TINY_RANDOM, ensure_tiny_checkpoint

__all__ = ["load_malmm", "default_dtype", "resolve_device", "qformer_dtype_for", "OverlayReport",
           "convert_lavis_state_dict", "apply_overlay", "lavis_to_hf_key", "load_overlay", "DEFAULT_MEMORY_BANK_LENGTH"]

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


def faster_cpu_dtype(rows: int, width: int, hidden: int, rounds: int = 3) -> torch.dtype:
    """bf16 or fp32, whichever runs a [rows x width] x [width x hidden] linear (the ViT's MLP
    shape) faster on this CPU, best of `rounds` each, alternating; about a quarter second at
    ViT-g's size. CPUs differ: with AMX, or on AMD Zen 4, bf16 GEMMs run at up to twice the
    fp32 rate; on an Intel Xeon with AVX512-BF16 but no AMX they ran at half of it, and ViT-g
    took 3.69 s per frame in bf16 against 2.15 s in fp32 (BENCHMARKS.md section 14a)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    w = torch.randn(hidden, width, generator=gen) * width**-0.5
    args = {torch.bfloat16: (x.bfloat16(), w.bfloat16()), torch.float32: (x, w)}
    best = dict.fromkeys(args, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for dtype, (a, b) in args.items():
                t0 = time.perf_counter()
                torch.nn.functional.linear(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return torch.bfloat16 if best[torch.bfloat16] <= best[torch.float32] else torch.float32


def qformer_dtype_for(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The Q-Former, projection and temporal embedding run in fp32 as in the official code
    (outside autocast), except on a CPU with a bf16 model: there bf16 is 2.1x faster per frame
    with outputs at cosine >= 0.9997 to fp32 after 200 frames (BENCHMARKS.md; tested). On a
    GPU the step is small next to the ViT, so fp32 costs little. Bank merges and
    similarities are computed in float32 either way."""
    on_cpu = torch.device(device).type == "cpu"
    return torch.bfloat16 if dtype == torch.bfloat16 and on_cpu else torch.float32


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


def _check_local_dir(path: Path) -> None:
    """A local model folder gets a precise sentence before transformers gives a vague one."""
    if not any(path.iterdir()):
        raise ModelNotAvailableError(f"'{path}' is an empty folder, not a model.")
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotAvailableError(f"'{path}' is not an InstructBLIP model folder: it has no config.json.")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError) as err:
        raise ModelNotAvailableError(f"'{config}' is not a valid model config (not a JSON object).") from err
    if model_type != "instructblip":
        raise ModelNotAvailableError(f"'{path}' holds a {model_type or 'untyped'!s} model, not InstructBLIP.")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / name).is_file() for name in weights):
        raise ModelNotAvailableError(f"'{path}' has no model weights (model.safetensors or pytorch_model.bin).")


def _load_hf(src: str, revision: str | None, local_only: bool, quantization: str | None,
             quantized_cache: Path | None, dtype: torch.dtype, device: torch.device):
    """Model + both tokenizers, with one clear error when the weights cannot be had."""
    from safetensors import SafetensorError

    local = Path(src).is_dir()
    if local:
        _check_local_dir(Path(src))
    common = {"revision": revision, "local_files_only": local_only}
    try:
        hf = _load_weights(src, common, quantization, quantized_cache, revision, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(src, **common)
        qformer_tokenizer = AutoTokenizer.from_pretrained(src, subfolder="qformer_tokenizer", **common)
    except SafetensorError as err:
        raise CheckpointError(f"the weights of '{src}' are corrupt or truncated ({_first_line(err)}); "
                              "download or copy them again.") from err
    except OSError as err:
        if local:
            raise ModelNotAvailableError(f"'{src}' is not a complete InstructBLIP checkpoint: {_first_line(err)}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded"
        raise ModelNotAvailableError(
            f"Model '{src}' is not in the Hugging Face cache and {why}; "
            f"download it with `hf download {src}` (or pass a local directory)."
        ) from err
    return hf, tokenizer, qformer_tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _check_special_tokens(tokenizer, vocab_size: int) -> None:
    """Prompts start with BOS and answers stop at EOS. InstructBLIP-Vicuna uses "</s>" (id 2)
    for both, as LAVIS does (the hub tokenizer has bos_token="</s>"); a tokenizer whose BOS is
    LLaMA's "<s>" would start every prompt with a token the model was never trained on."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise CheckpointError(f"the LLM tokenizer defines no {'BOS' if bos is None else 'EOS'} token")
    for name, tid in (("BOS", bos), ("EOS", eos)):
        if not 0 <= tid < vocab_size:
            raise CheckpointError(f"the LLM tokenizer's {name} id {tid} is outside the model's vocabulary")
    if tokenizer.bos_token != "</s>":
        raise CheckpointError(f"the LLM tokenizer's BOS token is {tokenizer.bos_token!r}, but InstructBLIP-Vicuna "
                              "starts prompts with '</s>' (as the hub checkpoint's tokenizer does)")
    log.debug("LLM tokenizer: BOS %r (id %d), EOS %r (id %d)", tokenizer.bos_token, bos, tokenizer.eos_token, eos)


def _image_spec(src: str, revision: str | None, local_only: bool, vision_config) -> ImageSpec:
    """Frame preprocessing from the model's own processor config (preprocessor_config.json, or
    the image_processor part of processor_config.json), which must agree with the ViT's input
    size; the CLIP constants of method.md when a checkpoint ships no processor config."""
    from transformers.image_processing_base import ImageProcessingMixin

    size = vision_config.image_size
    fallback = ImageSpec((size, size))
    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(src, revision=revision, local_files_only=local_only)
    except (OSError, ValueError) as err:
        log.debug("no image processor config for %s (%s); using %s", src, _first_line(err), fallback)
        return fallback
    raw = config.get("size") or {}
    hw = (raw.get("height", size), raw.get("width", size)) if isinstance(raw, dict) else (int(raw), int(raw))
    spec = ImageSpec((int(hw[0]), int(hw[1])), tuple(config.get("image_mean", fallback.mean)),
                     tuple(config.get("image_std", fallback.std)))
    if spec.size != (size, size):
        raise CheckpointError(f"the processor config of '{src}' resizes frames to {spec.size[0]}x{spec.size[1]}, "
                              f"but its vision encoder takes {size}x{size}")
    return spec


def load_malmm(
    src: str = DEFAULT_MODEL,
    *,
    model_class: type,
    memory_bank_length: int | None = None,
    checkpoint: str | Path | None = None,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    strict_checkpoint: bool = True,
    qformer_dtype: torch.dtype | None = None,
    quantized_cache: str | Path | None = None,
):
    """Build a `model_class` (:class:`models.MALMM`, whose ``from_pretrained`` calls this) from
    InstructBLIP weights. The class comes in as an argument so that this module never imports
    the network's: each side knows only what it needs of the other.

    memory_bank_length: M, the bank capacity; 0 = no memory (each frame on its own). Default:
        the checkpoint's ``config.model.memory_bank_length``, else 20.
    checkpoint: optional MA-LMM ``.pth`` (as the official runner saves it, or a bare state
        dict) whose weights overlay the loaded ones; its config is kept as
        ``model.trained_config`` and its trained frame count sets the temporal positions.
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
    local_only = Path(src).is_dir() or _is_cached(src, revision)  # then never touch the network
    hf, tokenizer, qformer_tokenizer = _load_hf(
        src, revision, local_only, quantization, Path(quantized_cache) if quantized_cache else None, dtype, device
    )
    _check_special_tokens(tokenizer, hf.config.text_config.vocab_size)
    # LAVIS cuts long instructions from the left, keeping their end (init_tokenizer and the
    # LlamaTokenizer in blip2_vicuna_instruct.py are made with truncation_side="left"); the
    # hub's Q-Former tokenizer says "right". Set here, whatever the files say.
    tokenizer.truncation_side = qformer_tokenizer.truncation_side = "left"
    image_spec = _image_spec(src, revision, local_only, hf.config.vision_config)

    qformer = MemoryQFormer(hf.config.qformer_config, num_query_tokens=hf.config.num_query_tokens)
    qformer.to(device=device, dtype=torch.float32)
    qformer.load_state_dict(hf.qformer.state_dict(), strict=True)
    del hf.qformer
    model = model_class(
        vision_model=hf.vision_model,
        query_tokens=hf.query_tokens,
        qformer=qformer,
        language_projection=hf.language_projection,
        language_model=hf.language_model,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        memory_bank_length=DEFAULT_MEMORY_BANK_LENGTH if memory_bank_length is None else memory_bank_length,
        name=src,
        image_spec=image_spec,
    )
    model.quantization = quantization
    if checkpoint is not None:
        _overlay(model, checkpoint, strict_checkpoint, memory_bank_length)
    model.set_qformer_dtype(qformer_dtype or qformer_dtype_for(dtype, device))
    return model


def _overlay(model, checkpoint: str | Path, strict: bool, memory_bank_length: int | None) -> None:
    """An MA-LMM checkpoint's weights over the model, and what its config says of its training:
    the frames (temporal rows) it trained, its M (unless given), its text length (the official
    classification configs: 30)."""
    report = load_overlay(model, checkpoint, strict=strict)
    model.overlay_report = report
    model.trained_frames = report.trained_frames
    if memory_bank_length is None and report.config.memory_bank_length is not None:
        model.memory_bank_length = report.config.memory_bank_length
    model.max_text_tokens = report.config.max_txt_len or model.max_text_tokens
