"""LLM precision: bitsandbytes configs (the LLM only), a cache of quantized weights, and a
measurement of which precision generates fastest on the running device.

Measured on this project's 2-core AVX512-BF16 CPU at Vicuna-7B size (BENCHMARKS.md): a
5-beam decoding step takes 0.42 s in 4-bit, 1.48 s in bf16 and 1.49 s in 8-bit (decoding
reads every weight once per step, and bitsandbytes has a fast 4-bit CPU kernel); on a GPU
the ranking differs. Quantizing at load takes minutes at 7B while a saved quantized copy
reloads in about a second. Hence the cache, and hence measuring rather than assuming.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("malmm")

MODES = ("bf16", "8bit", "4bit")  # "bf16" = the model dtype, unquantized
QUANTIZATION_MODES = (None, "8bit", "4bit")
# Without the skip list bitsandbytes would also quantize the ViT, Q-Former and projection.
NOT_QUANTIZED = ["vision_model", "qformer", "language_projection", "query_tokens", "lm_head"]
_BYTES_PER_PARAM = {"bf16": 2.0, "8bit": 1.0, "4bit": 0.5}


@contextlib.contextmanager
def expected_llm_warnings() -> Iterator[None]:
    """Silence notices about intended behaviour that would repeat on every call: bitsandbytes'
    8-bit CPU matmul logs that it casts its inputs to fp16, each time."""
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
            yield
    finally:
        bnb_log.setLevel(level)


def quantization_config(mode: str | None, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}, got {mode!r}")
    if mode is None:
        return None
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=NOT_QUANTIZED)


# ---- quantized copies ---------------------------------------------------------------------


def _versions() -> str:
    import bitsandbytes
    import transformers

    return f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}"


def _source_identity(src: str, revision: str | None) -> str:
    """A local directory by path and modification time; a hub model by id and cached commit."""
    path = Path(src)
    if path.is_dir():
        config = path / "config.json"
        return f"{path.resolve()}@{config.stat().st_mtime_ns if config.exists() else 0}"
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(src, "config.json", revision=revision)
    commit = Path(hit).parent.name if isinstance(hit, str) else (revision or "main")
    return f"{src}@{commit}"


def quantized_copy_dir(cache: Path, src: str, revision: str | None, mode: str, device: torch.device,
                       dtype: torch.dtype) -> Path:
    key = "|".join([_source_identity(src, revision), mode, device.type, str(dtype), _versions()])
    return Path(cache) / hashlib.sha256(key.encode()).hexdigest()[:24]


def save_quantized(model, target: Path) -> None:
    """Save a quantized model atomically (temp dir, then rename); a failure leaves nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- which precision: fits, and fastest ----------------------------------------------------------


def llm_weight_bytes(text_config, mode: str) -> int:
    """LLaMA weights in `mode`: linear layers quantized, embeddings and lm_head in bf16."""
    h, f, L, V = (text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers,
                  text_config.vocab_size)
    linear = L * (4 * h * h + 3 * h * f)
    return int(linear * _BYTES_PER_PARAM[mode] + 2 * V * h * 2)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("cannot read available memory")


def _mlp_block(mode: str, h: int, f: int, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Module]:
    """A LLaMA MLP's three linear layers (gate, up: h->f; down: f->h) in `mode`."""
    import bitsandbytes as bnb

    layers = []
    for n_in, n_out in ((h, f), (h, f), (f, h)):
        weight = (torch.randn(n_out, n_in) * 0.02).to(dtype)
        if mode == "bf16":
            layer = torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype)
            layer.weight.data = weight
        elif mode == "8bit":
            layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            # As transformers builds them: no double quantization.
            layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, quant_type="nf4",
                                      compress_statistics=False)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)
        # eval(): bitsandbytes repacks 4-bit weights for its fast CPU kernel only in inference mode.
        layers.append(layer.to(device).eval())
    return layers


def measure_precisions(h: int, f: int, device: torch.device, dtype: torch.dtype, rows: int = 5,
                       modes=MODES, repeat: int = 3) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds for one LLaMA MLP block on `rows` tokens (one decoding step of a 5-beam search)
    in each precision, on this device: the part of a generation step that quantization changes.

    Returns (seconds per mode, why each failed mode failed): a mode whose kernel cannot run at
    these sizes (bitsandbytes' 4-bit blocks are 64 values; a hidden size of 32 cannot be
    packed) is left out rather than crashing the choice.
    """
    x = torch.randn(rows, h, device=device).to(dtype)
    seconds, failed = {}, {}
    with torch.inference_mode(), expected_llm_warnings():
        for mode in modes:
            try:
                seconds[mode] = _time_block(_mlp_block(mode, h, f, dtype, device), x, repeat)
            except (RuntimeError, ValueError, AssertionError, TypeError) as err:
                failed[mode] = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                log.debug("precision %s cannot run at %dx%d: %s", mode, h, f, failed[mode])
    return seconds, failed


def _time_block(layers: list[torch.nn.Module], x: torch.Tensor, repeat: int) -> float:
    gate, up, down = layers
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda *a: None)
    down(torch.nn.functional.silu(gate(x)) * up(x))  # warm-up (first-call kernel setup)
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        down(torch.nn.functional.silu(gate(x)) * up(x))
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class PrecisionChoice:
    mode: str | None  # None (the model dtype), "8bit" or "4bit": what load_malmm takes
    seconds: dict[str, float] = field(default_factory=dict)
    fits: dict[str, bool] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # modes whose measurement failed, and why

    def reason(self) -> str:
        timed = ", ".join(f"{m} {s * 1000:.1f} ms" for m, s in self.seconds.items())
        left_out = [m for m, ok in self.fits.items() if not ok]
        text = f"fastest per generation step measured on this device ({timed} per MLP block)"
        text += f"; {', '.join(left_out)} would not fit in memory" if left_out else ""
        if self.failed:
            text += f"; left out, as they cannot run at this model's sizes: {', '.join(self.failed)}"
        return text


def choose_precision(text_config, device: torch.device, dtype: torch.dtype, other_bytes: int,
                     cache_file: Path | None = None) -> PrecisionChoice:
    """The fastest LLM precision whose weights fit next to the rest of the model.

    The measurement takes a few seconds and is remembered in `cache_file` per device,
    layer size and library versions. A mode that fails its measurement is never chosen.
    """
    h, f = text_config.hidden_size, text_config.intermediate_size
    budget = available_memory(device) - other_bytes - (2 << 30)  # activations, banks, generation
    fits = {m: llm_weight_bytes(text_config, m) <= budget for m in MODES}
    if not any(fits.values()):
        fits["4bit"] = True  # nothing fits: the smallest is the best chance
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    key = f"{device_name}|{h}x{f}|{dtype}|{_versions()}"
    stored = _read_json(cache_file)
    entry = stored.get(key)
    if not isinstance(entry, dict) or "seconds" not in entry:
        seconds, failed = measure_precisions(h, f, device, dtype)
        entry = {"seconds": seconds, "failed": failed}
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            stored[key] = entry
            cache_file.write_text(json.dumps(stored, indent=1))
    seconds, failed = entry["seconds"], entry.get("failed", {})
    usable = [m for m in MODES if fits[m] and m in seconds]
    if not usable:  # nothing both fits and runs: the unquantized model, which always runs
        usable = ["bf16"]
    best = min(usable, key=lambda m: seconds.get(m, 0.0))
    return PrecisionChoice(None if best == "bf16" else best, seconds, fits, failed)


def _read_json(path: Path | None) -> dict:
    """The remembered measurements; an unreadable file is measured again, not an error."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu x{os.cpu_count()}"
