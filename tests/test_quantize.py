"""LLM precision: the auto choice (fastest that fits, measured, remembered) and quantized copies."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from models import MALMM
from models import quantize
from models.quantize import choose_precision, llm_weight_bytes

VICUNA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32001)


def test_llm_weight_sizes_at_vicuna_7b():
    gb = {m: llm_weight_bytes(VICUNA_7B, m) / 1e9 for m in ("bf16", "8bit", "4bit")}
    assert gb["bf16"] == pytest.approx(13.5, abs=0.1)  # 6.74 B parameters in bf16
    assert gb["bf16"] > gb["8bit"] > gb["4bit"] > 3.5


@pytest.fixture
def fake_device(monkeypatch):
    """A device with `available` bytes free and made-up timings; counts measurements."""
    state = {"measured": 0, "available": 64 << 30, "seconds": {"bf16": 0.02, "8bit": 0.4, "4bit": 0.1}, "failed": {}}

    def measure(h, f, device, dtype, rows=5, **_):
        state["measured"] += 1
        return dict(state["seconds"]), dict(state["failed"])

    monkeypatch.setattr(quantize, "measure_precisions", measure)
    monkeypatch.setattr(quantize, "available_memory", lambda device: state["available"])
    return state


def test_auto_picks_the_fastest_precision_that_fits(fake_device, tmp_path):
    cpu = torch.device("cpu")
    picked = choose_precision(VICUNA_7B, cpu, torch.bfloat16, other_bytes=3 << 30)
    assert picked.mode is None and "bf16 20.0 ms" in picked.reason()  # bf16 is fastest here and fits
    fake_device["seconds"] = {"bf16": 0.9, "8bit": 0.37, "4bit": 0.19}  # e.g. single-row decoding
    assert choose_precision(VICUNA_7B, cpu, torch.bfloat16, other_bytes=3 << 30).mode == "4bit"
    fake_device["available"] = 10 << 30  # budget 5 GiB: bf16 (13.5 GB) and 8-bit (7.0 GB) do not fit
    fake_device["seconds"] = {"bf16": 0.02, "8bit": 0.05, "4bit": 0.1}
    picked = choose_precision(VICUNA_7B, cpu, torch.bfloat16, other_bytes=3 << 30)
    assert picked.mode == "4bit" and "bf16, 8bit would not fit" in picked.reason()
    fake_device["available"] = 1 << 30  # nothing fits: the smallest is the best chance
    assert choose_precision(VICUNA_7B, cpu, torch.bfloat16, other_bytes=3 << 30).mode == "4bit"


def test_the_measurement_is_remembered_per_device_and_size(fake_device, tmp_path):
    cache = tmp_path / "precision.json"
    cpu = torch.device("cpu")
    for _ in range(3):
        choose_precision(VICUNA_7B, cpu, torch.bfloat16, other_bytes=0, cache_file=cache)
    assert fake_device["measured"] == 1 and len(json.loads(cache.read_text())) == 1
    smaller = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, vocab_size=1000)
    choose_precision(smaller, cpu, torch.bfloat16, other_bytes=0, cache_file=cache)
    assert fake_device["measured"] == 2 and len(json.loads(cache.read_text())) == 2


def test_real_measurement_runs_every_precision_on_this_cpu():
    seconds, failed = quantize.measure_precisions(64, 128, torch.device("cpu"), torch.bfloat16, repeat=1)
    assert set(seconds) == {"bf16", "8bit", "4bit"} and all(s > 0 for s in seconds.values()) and not failed


def test_a_precision_that_cannot_run_at_the_model_size_is_left_out(tmp_path):
    """A hidden size of 32 is below bitsandbytes' 4-bit block of 64: measuring it raised
    "shape '[64, 0]' is invalid" and --quant auto crashed with a traceback."""
    tiny = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=300)
    picked = choose_precision(tiny, torch.device("cpu"), torch.bfloat16, other_bytes=0,
                              cache_file=tmp_path / "precision.json")
    assert "4bit" in picked.failed and picked.mode != "4bit" and "bf16" in picked.seconds
    assert "cannot run at this model's sizes: " in picked.reason()
    again = choose_precision(tiny, torch.device("cpu"), torch.bfloat16, other_bytes=0,
                             cache_file=tmp_path / "precision.json")  # remembered, failures included
    assert again.failed == picked.failed and again.mode == picked.mode


def test_a_failed_mode_is_never_chosen_even_if_it_alone_fits(fake_device):
    fake_device["available"] = 1 << 30  # nothing fits: 4-bit would be the best chance ...
    fake_device["seconds"] = {"bf16": 0.02, "8bit": 0.05}
    fake_device["failed"] = {"4bit": "shape '[64, 0]' is invalid"}  # ... but it cannot run
    assert choose_precision(VICUNA_7B, torch.device("cpu"), torch.bfloat16, other_bytes=0).mode is None


def test_quantized_weights_are_saved_once_then_reloaded(tiny_dir, tmp_path, monkeypatch, pixels):
    saves = []
    original = quantize.save_quantized
    monkeypatch.setattr("models.loading.save_quantized", lambda model, target: (saves.append(target),
                                                                                 original(model, target)))
    loads = [MALMM.from_pretrained(str(tiny_dir), quantization="4bit", dtype=torch.bfloat16, device="cpu",
                                   quantized_cache=tmp_path / "quantized") for _ in range(2)]
    assert len(saves) == 1 and (saves[0] / "config.json").exists()
    assert json.loads((saves[0] / "config.json").read_text())["quantization_config"]["load_in_4bit"] is True
    for model in loads:
        assert type(model.language_model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        assert type(model.qformer.encoder.layer[0].attention.attention.query) is torch.nn.Linear
    # The reloaded copy holds the same quantized weights: same outputs.
    outs = []
    for model in loads:
        stream = model.new_stream("what does the video describe?")
        stream.add_frames(pixels[:2])
        outs.append(model.score(stream, None, ["a dog", "a cat"]))
    torch.testing.assert_close(outs[0], outs[1])
