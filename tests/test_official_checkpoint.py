"""MA-LMM checkpoints exactly as the official runner saves them: buffers, optimizer, config."""

from __future__ import annotations

import pytest
import torch

from models import MALMM, CheckpointError
from models.malmm import temporal_slot
from tests.official_checkpoint import rotary_inv_freq, write_official_checkpoint

T_TRAIN, M_TRAIN = 4, 3


def _load(tiny_dir, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return MALMM.from_pretrained(str(tiny_dir), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def base(tiny_dir):
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def official(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "checkpoint_best.pth"
    values = write_official_checkpoint(base, path, num_frames=T_TRAIN, memory_bank_length=M_TRAIN)
    return path, values


def test_the_fixture_has_the_official_layout(official, base):
    path, _ = official
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model", "optimizer", "config", "scaler", "epoch"}
    keys = set(obj["model"])
    layers = base.language_model.config.num_hidden_layers
    assert {f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(layers)} <= keys
    assert "Qformer.bert.embeddings.position_ids" in keys and "image_pe.weight" in keys
    assert not any(k.startswith(("visual_encoder.", "llm_model.model.embed", "Qformer.cls")) for k in keys)
    assert obj["optimizer"]["state"] and obj["config"]["model"]["num_frames"] == T_TRAIN


def test_an_official_checkpoint_loads_strictly_and_sets_every_trained_tensor(tiny_dir, official, base):
    path, values = official
    model = _load(tiny_dir, checkpoint=path)
    params = dict(model.named_parameters())
    for name, value in values.items():
        torch.testing.assert_close(params[name], value.reshape(params[name].shape), rtol=0, atol=0)
    untouched = {n for n, p in base.named_parameters() if n not in values}
    assert all(torch.equal(params[n], dict(base.named_parameters())[n]) for n in untouched)
    report = model.overlay_report
    assert report.unexpected == [] and report.not_in_checkpoint == []
    assert report.buffers_checked == base.language_model.config.num_hidden_layers
    assert sorted(report.loaded) == sorted(values)


def test_the_checkpoint_config_sets_memory_and_trained_frames(tiny_dir, official):
    path, _ = official
    model = _load(tiny_dir, checkpoint=path)
    assert model.memory_bank_length == M_TRAIN and model.trained_frames == T_TRAIN
    assert model.trained_config.num_frames == T_TRAIN and model.trained_config.max_num_frames == 120
    explicit = _load(tiny_dir, checkpoint=path, memory_bank_length=7)
    assert explicit.memory_bank_length == 7 and explicit.trained_frames == T_TRAIN
    assert _load(tiny_dir).memory_bank_length == 20 and _load(tiny_dir).trained_frames is None


def test_rotary_frequencies_of_another_llm_are_refused(tiny_dir, base, tmp_path):
    path = tmp_path / "other_llm.pth"
    write_official_checkpoint(base, path, num_frames=T_TRAIN, memory_bank_length=M_TRAIN,
                              inv_freq=rotary_inv_freq(base) * 0.5)  # another RoPE base
    with pytest.raises(CheckpointError, match="rotary"):
        _load(tiny_dir, checkpoint=path)
    report = _load(tiny_dir, checkpoint=path, strict_checkpoint=False).overlay_report
    assert report.buffers_checked == 0 and any("rotary" in u for u in report.unexpected)


def test_rotary_frequencies_saved_in_fp16_are_accepted(tiny_dir, base, tmp_path):
    path = tmp_path / "fp16_buffers.pth"
    write_official_checkpoint(base, path, num_frames=T_TRAIN, memory_bank_length=M_TRAIN,
                              inv_freq=rotary_inv_freq(base).half())
    assert _load(tiny_dir, checkpoint=path).overlay_report.buffers_checked == 2


@pytest.mark.parametrize("extra", [
    {"llm_model.lm_head.weight": torch.zeros(3, 3)},  # a frozen LLM weight has no business here
    {"llm_model.model.layers.9.self_attn.rotary_emb.inv_freq": torch.ones(8)},  # more layers than the LLM
    {"Qformer.cls.predictions.bias": torch.zeros(4)},
])
def test_unknown_keys_are_still_refused(tiny_dir, base, tmp_path, extra):
    path = tmp_path / "extra.pth"
    write_official_checkpoint(base, path, num_frames=T_TRAIN, memory_bank_length=M_TRAIN, extra_keys=extra)
    with pytest.raises(CheckpointError, match="do not fit"):
        _load(tiny_dir, checkpoint=path)


def test_a_bare_state_dict_infers_trained_frames_from_the_temporal_rows(tiny_dir, official, tmp_path):
    path, _ = official
    state = torch.load(path, weights_only=True)["model"]
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    model = _load(tiny_dir, checkpoint=bare)
    assert model.trained_frames == T_TRAIN and model.memory_bank_length == 20  # no config: the default M


# ---- temporal positions past the trained range ----------------------------------------------


def test_frames_past_the_trained_range_map_onto_trained_rows():
    assert [temporal_slot(t, 10, 4) for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # floor(t*4/10)
    assert [temporal_slot(t, None, 4) for t in range(7)] == [0, 1, 2, 3, 3, 3, 3]  # total unknown: clamp
    assert [temporal_slot(t, 4, 4) for t in range(4)] == [0, 1, 2, 3]  # within the range: slot t
    assert [temporal_slot(t, 3, 4) for t in range(3)] == [0, 1, 2]
    # zero-shot (no trained range): all 120 rows, as before
    assert temporal_slot(130, None) == 119 and temporal_slot(130, 240) == 65


def test_a_finetuned_stream_uses_only_trained_rows(tiny_dir, official):
    """With M=0 each frame stands alone, so frame t's output shows which row it got: frame 9 of
    a 10-frame stream (T_train=4) equals a one-frame stream whose features carry PE[3]-PE[0]."""
    path, _ = official
    model = _load(tiny_dir, checkpoint=path, memory_bank_length=0)
    pe = model.temporal_embedding.weight.detach()
    assert pe[:T_TRAIN].abs().sum(1).gt(0).all() and pe[T_TRAIN:].abs().sum() == 0
    feats = torch.randn(10, 257, 32, generator=torch.Generator().manual_seed(5))
    for total, frame, row in [(10, 9, 3), (10, 4, 1), (None, 9, 3), (4, 2, 2)]:
        stream = model.new_stream(["what does the video describe?"], total_frames=total)
        stream.add_features(feats[: frame + 1])
        fresh = model.new_stream(["what does the video describe?"])
        fresh.add_features(feats[frame : frame + 1] + (pe[row] - pe[0]))
        torch.testing.assert_close(stream.query_output(), fresh.query_output(), rtol=1e-5, atol=1e-5)
