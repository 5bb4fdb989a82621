"""Shared fixtures: a tiny random InstructBLIP checkpoint built once per session, loaded through
the same ``from_pretrained`` path as the real model, and transformers' own model on it."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach the network: the hub is off, caches are private to the session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """MALMM_CACHE_DIR points at a session temp dir, so nothing touches the user's cache."""
    old = os.environ.get("MALMM_CACHE_DIR")
    os.environ["MALMM_CACHE_DIR"] = str(tmp_path_factory.mktemp("malmm-cache"))
    yield
    if old is None:
        os.environ.pop("MALMM_CACHE_DIR", None)
    else:
        os.environ["MALMM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """MALMM in float32 on CPU (M=4 by default; streams override M per test)."""
    from models import MALMM

    torch.manual_seed(0)
    return MALMM.from_pretrained(str(tiny_dir), memory_bank_length=4, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """transformers' InstructBlipForConditionalGeneration on the same weights: the reference."""
    from transformers import InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_processor(tiny_dir):
    from transformers import InstructBlipProcessor

    return InstructBlipProcessor.from_pretrained(str(tiny_dir))


@pytest.fixture
def pixels():
    """Random preprocessed frames [8, 3, 224, 224] (values in the normalised range)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(8, 3, 224, 224, generator=gen)
