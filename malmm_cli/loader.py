"""Loading the model for a command: device, precision (--quant auto), overlay, and the identity
of its vision path for the feature cache."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch

from models import MALMM
from models.loading import default_dtype

from .errors import UsageError


def resolve_quantization(quant: str, device: torch.device) -> str | None:
    """--quant auto: on a CPU, unquantized bf16/fp32 (bitsandbytes' CPU kernels dequantize on
    every matmul, which BENCHMARKS.md measured slower than bf16 here); on a GPU, the most
    precise mode whose LLM weights fit in free memory with room for activations."""
    if quant == "none":
        return None
    if quant in ("8bit", "4bit"):
        return quant
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    gib = free / 2**30
    # Vicuna-7B weights: ~13.5 GiB bf16, ~7 GiB 8-bit, ~4 GiB 4-bit, plus ~2.5 GiB for the ViT,
    # Q-Former, memory banks and generation.
    if gib >= 17:
        return None
    return "8bit" if gib >= 10 else "4bit"


def _device(value: str) -> torch.device:
    if value == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but PyTorch sees no CUDA GPU (use --device cpu or auto).")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def _quiet_libraries() -> None:
    """transformers and huggingface_hub configure their loggers on import, so set them here:
    their retry notices and tips are noise next to our one-sentence errors."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _announce_download(choice, quiet: bool) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    if quiet or constants.HF_HUB_OFFLINE or Path(choice.source).is_dir() or choice.source == "tiny-random":
        return
    if not isinstance(try_to_load_from_cache(choice.source, "config.json"), str):
        size = f" ({choice.preset.download})" if choice.preset else ""
        sys.stderr.write(f"malmm: {choice.source} is not downloaded yet; fetching it{size} into the Hugging Face "
                         f"cache (or run: malmm models download {choice.label}) ...\n")


def load_model(choice, opts) -> MALMM:
    _quiet_libraries()
    device = _device(str(getattr(opts.device, "value", opts.device)))
    quant = resolve_quantization(str(getattr(opts.quant, "value", opts.quant)), device)
    if quant is not None and device.type == "cpu" and choice.source != "tiny-random":
        sys.stderr.write(f"malmm: note: {quant} on a CPU is slower than bf16 here; see BENCHMARKS.md\n")
    if opts.checkpoint is not None and not Path(opts.checkpoint).is_file():
        raise UsageError(f"--checkpoint '{opts.checkpoint}' does not exist.")
    _announce_download(choice, opts.quiet)
    t0 = time.perf_counter()
    if not opts.quiet:
        sys.stderr.write(f"malmm: loading {choice.label} on {device.type}"
                         + (f" ({quant})" if quant else "") + " ...\n")
        sys.stderr.flush()
    model = MALMM.from_pretrained(
        choice.source, memory_bank_length=20, checkpoint=opts.checkpoint, quantization=quant,
        dtype=default_dtype(device), device=device,
    )
    if not opts.quiet:
        extra = f"; {model.overlay_report.summary()}" if model.overlay_report else ""
        sys.stderr.write(f"malmm: model ready in {time.perf_counter() - t0:.1f} s{extra}\n")
    return model


def _file_id(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def model_id(choice, opts, model: MALMM) -> str:
    """What determines the vision features: weights (source + overlay), dtype, preprocessing."""
    ckpt = _file_id(Path(opts.checkpoint)) if opts.checkpoint else "-"
    return f"v1|{choice.source}|{ckpt}|{model.vision_dtype}|antialias"
