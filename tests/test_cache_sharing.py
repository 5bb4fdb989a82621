"""The feature cache across `malmm train` and `malmm eval --checkpoint`: a checkpoint that holds
no vision weights (ours) shares the ViT features of the model it was trained from; one that
overlays vision weights (an official one's ln_vision) gets features of its own.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from malmm_cli.engine.loader import model_id, overlays_vision
from models import MALMM
from tests.cli import TINY, malmm
from tests.official_checkpoint import write_official_checkpoint
from tests.synthetic import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sharing"), labels=("cat", "dog"), train_per_label=1,
                        test_per_label=0, n_frames=8)


def _id(tiny_dir, checkpoint=None) -> str:
    model = MALMM.from_pretrained(str(tiny_dir), checkpoint=checkpoint, dtype=torch.float32, device="cpu")
    return model_id(SimpleNamespace(source="tiny-random"), SimpleNamespace(checkpoint=checkpoint), model)


def test_only_a_checkpoint_with_vision_weights_changes_the_feature_key(tiny_model, tiny_dir, data, tmp_path):
    ours = tmp_path / "ours.pth"
    out = malmm("train", data.train, "--task", "classify", "-o", ours, *TINY, "--frames", 3, "--memory", 2,
                "--epochs", 1, "-q")
    assert out.exit_code == 0, out.output
    official = tmp_path / "official.pth"
    write_official_checkpoint(tiny_model, official, num_frames=3, memory_bank_length=2)  # with ln_vision
    base = _id(tiny_dir)
    assert _id(tiny_dir, ours) == base
    assert _id(tiny_dir, official) != base
    loaded = MALMM.from_pretrained(str(tiny_dir), checkpoint=official, dtype=torch.float32, device="cpu")
    assert overlays_vision(loaded) and "vision_model.post_layernorm.weight" in loaded.overlay_report.loaded


def test_eval_with_a_trained_checkpoint_reuses_the_features_train_cached(tiny_model, tmp_path, monkeypatch):
    data = make_dataset(tmp_path, labels=("cat", "dog"), train_per_label=1, test_per_label=0, n_frames=8, seed=5)
    frames_encoded = []
    real = MALMM.encode_frames
    monkeypatch.setattr(MALMM, "encode_frames", lambda self, pixels: frames_encoded.append(len(pixels))
                        or real(self, pixels))
    ckpt = tmp_path / "ckpt.pth"
    out = malmm("train", data.train, "--task", "classify", "-o", ckpt, *TINY, "--frames", 3, "--memory", 2,
                "--epochs", 1, "--no-augment", "-q")  # the eval sampling (augmented views are cached apart)
    assert out.exit_code == 0, out.output
    assert sum(frames_encoded) == 6  # two new clips, three frames each, into the cache
    frames_encoded.clear()
    out = malmm("eval", data.train, "--task", "classify", "--checkpoint", ckpt, *TINY, "-q")
    assert out.exit_code == 0, out.output
    assert frames_encoded == []  # the checkpoint's 3 frames, from the cache train filled
    official = tmp_path / "official.pth"
    write_official_checkpoint(tiny_model, official, num_frames=3, memory_bank_length=2)
    out = malmm("eval", data.train, "--task", "classify", "--checkpoint", official, *TINY, "-q")
    assert out.exit_code == 0, out.output
    assert sum(frames_encoded) == 6  # its ln_vision makes other features: computed, not taken from the cache
