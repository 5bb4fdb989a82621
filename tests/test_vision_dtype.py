"""The ViT's dtype on a CPU: bf16 or fp32, whichever the CPU multiplies faster at its shape
(on an Intel Xeon without AMX, fp32 ran ViT-g 1.7x faster than bf16: BENCHMARKS.md 14a)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import malmm_cli.engine.loader as loader
import models.loading as loading
from tests.cli import SAMPLE, TINY, malmm, records


def test_the_faster_dtype_is_one_of_the_two():
    assert loading.faster_cpu_dtype(64, 128, 256, rounds=1) in (torch.bfloat16, torch.float32)


def _config(width: int):
    vision = SimpleNamespace(hidden_size=width, intermediate_size=4 * width, image_size=224, patch_size=14)
    return SimpleNamespace(vision_config=vision)


@pytest.mark.parametrize("device, dtype, width, measured, expected", [
    ("cpu", torch.bfloat16, 1408, torch.float32, torch.float32),   # fp32 measured faster: the ViT goes fp32
    ("cpu", torch.bfloat16, 1408, torch.bfloat16, torch.bfloat16),  # bf16 faster (AMX, Zen 4): unchanged
    ("cpu", torch.float32, 1408, torch.bfloat16, torch.float32),   # an fp32 model is never narrowed
    ("cpu", torch.bfloat16, 32, torch.float32, torch.bfloat16),     # a toy ViT: its timings say nothing
    ("cuda", torch.bfloat16, 1408, torch.float32, torch.bfloat16),  # GPUs keep the model's dtype
])
def test_vision_dtype_follows_the_measurement(monkeypatch, device, dtype, width, measured, expected):
    shapes = []
    monkeypatch.setattr(loader, "_model_config", lambda source: _config(width))
    monkeypatch.setattr(loading, "faster_cpu_dtype", lambda *shape: shapes.append(shape) or measured)
    choice = SimpleNamespace(source="some/model")
    assert loader.vision_dtype_for(choice, torch.device(device), dtype) == expected
    if shapes:  # timed at the ViT's own shape: one frame's 257 tokens through its MLP
        assert shapes == [(257, width, 4 * width)]


def test_an_fp32_vision_encoder_beside_a_bf16_qformer_runs_end_to_end(monkeypatch):
    """What the CLI does where fp32 wins: the ViT in fp32, the rest in the model's bf16."""
    monkeypatch.setattr(loader, "default_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(loader, "vision_dtype_for", lambda choice, device, dtype: torch.float32)
    seen = {}
    real_load = loader.MALMM.from_pretrained

    def spy(*args, **kwargs):
        model = real_load(*args, **kwargs)
        seen["model"] = model
        return model

    monkeypatch.setattr(loader.MALMM, "from_pretrained", spy)
    out = malmm("caption", SAMPLE, *TINY, "--frames", 6, "--no-cache", "--json", "--beams", 1, "--max-tokens", 3)
    assert out.exit_code == 0, out.stderr
    assert "vision encoder in float32" in out.stderr
    model = seen["model"]
    assert model.vision_dtype == torch.float32 and model.qformer_dtype == torch.bfloat16
    assert records(out.stdout)[0]["sampling"]["frames"] == 6
