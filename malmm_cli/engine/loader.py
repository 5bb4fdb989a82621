"""Loading the model for a command: device, precision (--quant auto), overlay, and the identity
of its vision path for the feature cache."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch

from models import MALMM, ModelNotAvailableError
from models.loading import default_dtype, resolve_device

from malmm_cli.errors import UsageError


def _model_config(source: str):
    """The InstructBLIP config of a source, if it is available locally (None otherwise)."""
    from transformers import AutoConfig

    if source == "tiny-random":
        from models.tiny import ensure_tiny_checkpoint

        source = str(ensure_tiny_checkpoint())
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):  # not downloaded, or not a model: loading says which, in one sentence
        return None


def _other_bytes(config, vision_dtype: torch.dtype) -> int:
    """ViT (in its dtype) + Q-Former and projection (float32 at load): what sits beside the LLM."""
    v, q = config.vision_config, config.qformer_config
    vit = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    qformer = q.num_hidden_layers * (6 * q.hidden_size**2 + 4 * q.hidden_size * q.intermediate_size)
    return int(vit * torch.finfo(vision_dtype).bits / 8 + qformer * 4)


LARGE_VIT_WIDTH = 1024  # ViT-g: 1408; tiny-random: 32 (its timings say nothing)


def vision_dtype_for(choice, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The ViT's dtype: the model's, except on a CPU where fp32 GEMMs at the ViT's shape run
    faster than the bf16 ones (measured: models.loading.faster_cpu_dtype). Only the ViT
    changes; the LLM, which would not fit in fp32, and the Q-Former keep theirs."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return dtype
    config = _model_config(choice.source)
    if config is None or config.vision_config.hidden_size < LARGE_VIT_WIDTH:
        return dtype
    from models.loading import faster_cpu_dtype

    v = config.vision_config
    return faster_cpu_dtype((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size, v.intermediate_size)


def resolve_quantization(quant: str, choice, device: torch.device, dtype: torch.dtype, quiet: bool,
                         vision_dtype: torch.dtype | None = None) -> str | None:
    """--quant: none / 8bit / 4bit as given; auto = the fastest precision that fits, measured on
    this device for the paper's 5-beam decoding and remembered in the cache (models/quantize.py)."""
    if quant == "none":
        return None
    if quant in ("8bit", "4bit"):
        return quant
    from models.quantize import choose_precision

    from malmm_cli.sources.inputs import cache_root

    if choice.source == "tiny-random":  # a toy: timings at its size say nothing, quantizing it nothing
        return None
    config = _model_config(choice.source)
    if config is None:  # not downloaded yet: loading will say so
        return None
    picked = choose_precision(config.text_config, device, dtype, _other_bytes(config, vision_dtype or dtype),
                              cache_root() / "precision.json")
    if not quiet:
        sys.stderr.write(f"malmm: --quant auto: {picked.mode or str(dtype).replace('torch.', '')}, "
                         f"{picked.reason()}\n")
    return picked.mode


def _device(value: str) -> torch.device:
    try:
        return resolve_device(value)
    except ModelNotAvailableError as err:  # a usage error here: the user named the device
        raise UsageError("--device cuda was given but PyTorch sees no CUDA GPU (use --device cpu or auto).") from err


def _quiet_libraries() -> None:
    """transformers and huggingface_hub configure their loggers on import, so set them here:
    their retry notices and tips are noise next to our one-sentence errors."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _announce_download(choice, quiet: bool) -> None:
    from huggingface_hub import constants

    from .fetch import needs_download

    if quiet or not needs_download(choice):
        return
    size = f" ({choice.preset.download})" if choice.preset else ""
    sys.stderr.write(f"malmm: {choice.source} is not downloaded yet; fetching it{size} into "
                     f"{constants.HF_HUB_CACHE} (Ctrl-C stops; `malmm models download {choice.label}` resumes) ...\n")


def model_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype of the model for --precision (presets.PRECISIONS) on `device`."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("--precision bf16: this GPU does not compute in bf16; use --precision auto or fp32.")
        return torch.bfloat16
    return default_dtype(device)


def load_model(choice, opts) -> MALMM:
    """The model `choice` (presets.ModelChoice) names, as `opts` (session.SessionOptions: device,
    quant, precision, checkpoint, quiet) asks, saying what it does on stderr unless quiet."""
    from malmm_cli.sources.inputs import cache_root

    from .fetch import check_download, needs_download
    from .presets import resolve_precision

    _quiet_libraries()
    if needs_download(choice):  # before anything is measured or fetched
        check_download(choice, confirm=getattr(opts, "confirm_download", False))
    device = _device(str(getattr(opts.device, "value", opts.device)))
    precision = resolve_precision(getattr(opts, "precision", None))
    dtype = model_dtype(device, precision)
    # Only auto lets timing choose the vision encoder's precision: a pinned one pins every part.
    vision_dtype = vision_dtype_for(choice, device, dtype) if precision == "auto" else dtype
    quant = resolve_quantization(str(getattr(opts.quant, "value", opts.quant)), choice, device, dtype, opts.quiet,
                                 vision_dtype)
    if opts.checkpoint is not None and not Path(opts.checkpoint).is_file():
        raise UsageError(f"--checkpoint '{opts.checkpoint}' does not exist.")
    _announce_download(choice, opts.quiet)
    t0 = time.perf_counter()
    if not opts.quiet:
        sys.stderr.write(f"malmm: loading {choice.label} on {device.type} in "
                         f"{str(dtype).replace('torch.', '')}" + (f" ({quant})" if quant else "") + " ...\n")
        sys.stderr.flush()
    model = MALMM.from_pretrained(
        choice.source, checkpoint=opts.checkpoint, quantization=quant,
        dtype=dtype, device=device, quantized_cache=cache_root() / "quantized",
    )
    if vision_dtype != model.vision_dtype:
        model.vision_model.to(vision_dtype)
        if not opts.quiet:
            sys.stderr.write(f"malmm: vision encoder in {str(vision_dtype).replace('torch.', '')}: its matrix "
                             "products ran faster so on this CPU (measured)\n")
    if not opts.quiet:
        extra = f"; {model.overlay_report.summary()}" if model.overlay_report else ""
        sys.stderr.write(f"malmm: model ready in {time.perf_counter() - t0:.1f} s{extra}\n")
    return model


def _file_id(path: Path) -> str:
    """The checkpoint's identity (as --resume's job key sees it), short."""
    from malmm_cli.results.jobkey import file_identity

    ident = file_identity(path)
    return hashlib.sha256(f"{ident['path']}|{ident['size']}|{ident['mtime_ns']}".encode()).hexdigest()[:16]


def overlays_vision(model: MALMM) -> bool:
    """Whether the model's overlaid checkpoint replaced weights of its vision path (an
    official one's ln_vision, i.e. vision_model.post_layernorm). `malmm train` writes none
    there (the ViT and its LayerNorm stay frozen), so its checkpoints share the features of
    the model they were trained from."""
    report = model.overlay_report
    return report is not None and any(name.startswith("vision_model.") for name in report.loaded)


def model_id(choice, opts, model: MALMM) -> str:
    """What determines the vision features: weights (the source, and the checkpoint only if it
    overlaid vision weights), dtype, preprocessing."""
    ckpt = _file_id(Path(opts.checkpoint)) if opts.checkpoint and overlays_vision(model) else "-"
    spec = model.image_spec
    return f"v1|{choice.source}|{ckpt}|{model.vision_dtype}|antialias|{spec.size}|{spec.mean}|{spec.std}"
