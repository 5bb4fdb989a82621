"""MA-LMM checkpoints as the official runner saves them, overlaid on InstructBLIP weights.

The official code (a LAVIS fork) saves ``{"model", "optimizer", "config", "scaler", "epoch"}``
where ``model`` is the state dict minus frozen *parameters*. Buffers stay in it, so beside the
trained weights (``Qformer.*``, ``query_tokens``, ``llm_proj.*``, ``ln_vision.*``,
``image_pe.weight``, and ``visual_encoder.*`` when the ViT was trained) it holds:

- ``Qformer.bert.embeddings.position_ids``: ``arange`` of the text positions; dropped;
- ``llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq`` for every LLaMA layer: checked
  against the loaded LLM's own rotary frequencies (another LLM or RoPE base would not fit).

``config["model"]`` says how the model was trained: ``num_frames`` (T_train, the frames per
video, hence the rows of ``image_pe`` that were ever trained), ``memory_bank_length`` (M) and
``max_num_frames``. Every other key must map to a parameter of the model (method.md's key
mapping); unknown keys are refused in strict mode and reported otherwise.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "TrainedConfig", "LavisCheckpoint", "OverlayReport", "read_lavis_checkpoint", "lavis_to_hf_key",
    "convert_lavis_state_dict", "apply_overlay", "load_overlay", "trained_frames", "hf_to_lavis_key",
]

log = logging.getLogger("malmm")

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
_INV_FREQ = re.compile(r"^llm_model\.model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$")
_POSITION_IDS = "Qformer.bert.embeddings.position_ids"
_TOP_LEVEL = {"model", "optimizer", "config", "scaler", "epoch"}


@dataclass(frozen=True)
class TrainedConfig:
    """What a checkpoint's config says about its training (None: not stated).

    From ``config["model"]``: the frames, M and text length it was trained with. From what the
    run trained on: the instruction and label set (``config["malmm"]`` in malmm's checkpoints;
    ``config["datasets"]`` in the official ones, e.g. ``breakfast_cls`` or ``lvu_cls`` with
    its ``task``), and whether it is the paper's no-memory baseline (official: M = 0, i.e.
    ``use_memory_bank=False``, every frame's query tokens concatenated for the LLM)."""

    num_frames: int | None = None
    memory_bank_length: int | None = None
    max_num_frames: int | None = None
    max_txt_len: int | None = None  # Q-Former text and LLM prompt tokens kept (LAVIS max_txt_len)
    prompt: str | None = None  # the instruction it was trained with
    label_set: str | None = None  # malmm's name of a built-in label set (breakfast, coin, lvu_genre, ...)
    labels: tuple[str, ...] | None = None  # the labels it was trained on (malmm's checkpoints)
    datasets: tuple[str, ...] = ()  # official: the dataset builders of its run (breakfast_cls, lvu_cls, ...)
    dataset_task: str | None = None  # official lvu_cls: its task (genre, director, ...)
    concat: bool = False  # the no-memory baseline: all frames' query tokens go to the LLM

    @classmethod
    def from_config(cls, config: Any) -> TrainedConfig:
        model = config.get("model") if isinstance(config, dict) else None
        if not isinstance(model, dict):
            return cls()

        def count(key: str) -> int | None:
            value = model.get(key)
            return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None

        ours = config.get("malmm") if isinstance(config.get("malmm"), dict) else None
        datasets = config.get("datasets") if isinstance(config.get("datasets"), dict) else {}
        task = next((d.get("task") for d in datasets.values() if isinstance(d, dict) and
                     isinstance(d.get("task"), str)), None)
        memory = count("memory_bank_length")
        if ours is not None:
            concat = ours.get("concat") is True
            labels = ours.get("labels")
            labels = tuple(labels) if isinstance(labels, list) and all(isinstance(x, str) for x in labels) else None
            text = {k: ours.get(k) if isinstance(ours.get(k), str) else None for k in ("prompt", "label_set")}
        else:  # the official code: no memory bank means every frame's tokens to the LLM
            concat, labels, text = memory == 0, None, {"prompt": None, "label_set": None}
        return cls(count("num_frames"), memory, count("max_num_frames"), count("max_txt_len") or None,
                   text["prompt"], text["label_set"], labels, tuple(k for k in datasets if isinstance(k, str)),
                   task, concat)


@dataclass
class LavisCheckpoint:
    path: Path
    state: dict[str, torch.Tensor]
    config: TrainedConfig = field(default_factory=TrainedConfig)
    epoch: int | None = None


@dataclass
class OverlayReport:
    """What an overlay changed: every key is accounted for."""

    path: str
    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # no counterpart, or a shape that does not fit
    not_in_checkpoint: list[str] = field(default_factory=list)  # MA-LMM-trained groups left as loaded
    buffers_checked: int = 0  # rotary inv_freq buffers that matched the LLM's own
    config: TrainedConfig = field(default_factory=TrainedConfig)
    trained_frames: int | None = None  # T_train: rows of the temporal embedding that were trained

    def summary(self) -> str:
        text = f"{len(self.loaded)} tensors loaded from {self.path}"
        if self.trained_frames is not None:
            text += f" (trained on {self.trained_frames} frames"
            text += f", M={self.config.memory_bank_length})" if self.config.memory_bank_length is not None else ")"
        if self.not_in_checkpoint:
            text += f"; not in the checkpoint (kept): {', '.join(self.not_in_checkpoint)}"
        if self.unexpected:
            text += f"; unexpected: {', '.join(self.unexpected[:5])}" + (" ..." if len(self.unexpected) > 5 else "")
        return text


def read_lavis_checkpoint(path: str | Path) -> LavisCheckpoint:
    """An official ``.pth`` (or a bare state dict), read with weights_only: never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 4 ...": a plain pickle, refused or read below either way
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for non-checkpoint files; all mean the same here
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({_refusal(err)})") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, config, epoch = obj["model"], obj.get("config"), obj.get("epoch")
        extra = set(obj) - _TOP_LEVEL
        if extra:
            log.debug("checkpoint %s: ignoring top-level entries %s", path, sorted(extra))
    else:
        state, config, epoch = obj, None, None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' holds no state dict (expected a dict of tensors under 'model')")
    return LavisCheckpoint(path, state, TrainedConfig.from_config(config), epoch if isinstance(epoch, int) else None)


def read_trained_config(path: str | Path) -> TrainedConfig:
    """What a checkpoint's config says of its training, without reading its weights: the file
    is memory-mapped (weights_only, as always) and only its config is looked at. A checkpoint
    that cannot be read so is read whole, with read_lavis_checkpoint's checks and errors."""
    try:
        with warnings.catch_warnings():  # as in read_lavis_checkpoint
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old-format file cannot be mapped: the full read says what is wrong
        return read_lavis_checkpoint(path).config
    config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else None
    return TrainedConfig.from_config(config)


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _refusal(err: Exception) -> str:
    """Why torch.load refused the file, in a few words. Never torch's own advice, which is to
    load it again with weights_only=False (or to allow-list its classes): for a file from
    elsewhere that means running whatever code its pickle names, the one thing not to do."""
    text = str(err).strip()
    if "weights only load failed" in text.lower():
        name = _GLOBAL.search(text)
        held = f"a Python object ({name.group(1)})" if name else "Python objects"
        return f"it holds {held} beyond tensors and plain data, which malmm never unpickles"
    first = text.splitlines()[0] if text else type(err).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", first)[:200]


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


@dataclass
class _Converted:
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    inv_freq: dict[int, torch.Tensor] = field(default_factory=dict)  # LLaMA layer -> rotary inv_freq


def convert_lavis_state_dict(lavis: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LAVIS keys -> MALMM names. Returns (converted, keys with no counterpart); known buffers
    are set aside (see :func:`load_overlay` for their checks)."""
    out = _convert(lavis)
    return out.params, out.unexpected


def _convert(lavis: dict[str, torch.Tensor]) -> _Converted:
    out, qkv = _Converted(), {}
    for key, value in lavis.items():
        if key == _POSITION_IDS:
            continue
        rotary = _INV_FREQ.match(key)
        if rotary:
            out.inv_freq[int(rotary.group(1))] = value
            continue
        bias = _QKV_BIAS.match(key)
        if bias:
            qkv.setdefault(int(bias.group(1)), {})[bias.group(2)] = value
            continue
        name = lavis_to_hf_key(key)
        if name is None:
            out.unexpected.append(key)
        else:
            out.params[name] = value
    for layer, parts in qkv.items():
        if set(parts) != {"q", "v"}:
            out.unexpected.extend(f"visual_encoder.blocks.{layer}.attn.{p}_bias" for p in parts)
            continue
        # EVA-CLIP has q and v biases but no k bias; HF stores the concatenation.
        q, v = parts["q"], parts["v"]
        out.params[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _llm_inv_freq(model) -> torch.Tensor | None:
    """The loaded LLM's rotary frequencies (one module per model in transformers 5)."""
    for name, buffer in model.language_model.named_buffers():
        if name.endswith("rotary_emb.inv_freq"):
            return buffer
    return None


def _check_rotary(model, inv_freq: dict[int, torch.Tensor]) -> tuple[int, list[str]]:
    """(buffers that match, problems): the checkpoint's LLM must be the one loaded. The saved
    values may be fp16-rounded (Vicuna's own files store them in fp16), hence the tolerance."""
    if not inv_freq:
        return 0, []
    layers = model.language_model.config.num_hidden_layers
    ours = _llm_inv_freq(model)
    problems = [f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq (the LLM has {layers} layers)"
                for i in sorted(inv_freq) if i >= layers]
    matched = 0
    for i, value in sorted(inv_freq.items()):
        if i >= layers:
            continue
        if ours is None or value.shape != ours.shape or not torch.allclose(
                value.float(), ours.detach().float().cpu(), rtol=2e-3, atol=0.0):
            problems.append(f"layer {i}'s rotary inv_freq differs from the loaded LLM's rotary frequencies "
                            "(a checkpoint for another LLM?)")
        else:
            matched += 1
    return matched, problems


def trained_frames(config: TrainedConfig, image_pe: torch.Tensor | None) -> int | None:
    """T_train: the config's num_frames, else the rows of image_pe up to the last non-zero one
    (rows past T_train are never trained and stay at their zero init); None without image_pe."""
    rows = None if image_pe is None else image_pe.shape[0]
    if config.num_frames:
        return min(config.num_frames, rows) if rows else config.num_frames
    if image_pe is None:
        return None
    nonzero = torch.nonzero(image_pe.detach().float().abs().sum(dim=1)).flatten()
    return int(nonzero[-1]) + 1 if len(nonzero) else None


@torch.no_grad()
def apply_overlay(model, converted: dict[str, torch.Tensor], report: OverlayReport) -> OverlayReport:
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


def _misfits(model, converted: dict[str, torch.Tensor]) -> list[str]:
    params = dict(model.named_parameters())
    return [k for k, v in converted.items() if k not in params or tuple(params[k].shape) != tuple(v.shape)]


def load_overlay(model, path: str | Path, *, strict: bool = True) -> OverlayReport:
    """Overlay an MA-LMM checkpoint; keys that do not fit raise (strict) or are reported.

    Strict mode checks everything before changing anything, so a bad file leaves the model as
    it was.
    """
    ckpt = read_lavis_checkpoint(path)
    out = _convert(ckpt.state)
    matched, rotary_problems = _check_rotary(model, out.inv_freq)
    report = OverlayReport(str(path), unexpected=list(out.unexpected), buffers_checked=matched, config=ckpt.config)
    if strict:
        bad = report.unexpected + _misfits(model, out.params) + rotary_problems
        if bad:
            raise CheckpointError(
                f"checkpoint '{path}' has {len(bad)} key(s) that do not fit the model, e.g. {', '.join(bad[:3])}"
            )
    report.unexpected.extend(rotary_problems)
    apply_overlay(model, out.params, report)
    report.trained_frames = trained_frames(ckpt.config, out.params.get("temporal_embedding.weight"))
    log.info("overlay: %s", report.summary())
    if report.unexpected:
        log.warning("overlay %s: %d unexpected key(s): %s", path, len(report.unexpected), ", ".join(report.unexpected[:5]))
    return report


# ---- the other direction: MALMM names -> LAVIS keys (for writing checkpoints) -------------------

_HF_QFORMER_RENAMES = [
    ("qformer.", "Qformer.bert."),
    ("embeddings.layernorm.", "embeddings.LayerNorm."),
    (".crossattention.attention.", ".crossattention.self."),
    (".attention.attention.", ".attention.self."),
]


def hf_to_lavis_key(name: str) -> str | None:
    """The LAVIS MA-LMM key of a MALMM parameter MA-LMM trains (Q-Former, query tokens,
    projection, ``ln_vision``, temporal position embedding), or None for the frozen ViT and LLM.

    The inverse of :func:`lavis_to_hf_key` on those names, so a checkpoint written with these
    keys loads here and in the official code alike.
    """
    if name.startswith("qformer."):
        for old, new in _HF_QFORMER_RENAMES:
            name = name.replace(old, new, 1) if old == "qformer." else name.replace(old, new)
        return name
    if name == "query_tokens":
        return name
    if name == "temporal_embedding.weight":
        return "image_pe.weight"
    for prefix, new in (("language_projection.", "llm_proj."), ("vision_model.post_layernorm.", "ln_vision.")):
        if name.startswith(prefix):
            return new + name[len(prefix) :]
    return None
