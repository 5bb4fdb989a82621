"""Numbers and defaults the rest of models/ shares: one small module that imports nothing of
ours, so that the network, loading and the tiny checkpoint can all use it without a circle."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "Salesforce/instructblip-vicuna-7b"
DEFAULT_MEMORY_BANK_LENGTH = 20  # M when neither the caller nor the checkpoint's config says
TEMPORAL_SLOTS = 120  # MA-LMM's learned temporal position embedding: nn.Embedding(120, 1408)
QFORMER_MAX_TEXT = 128  # instruction tokens kept for the Q-Former (LAVIS max_txt_len), from the left
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """How frames must be prepared for this model's ViT (from its processor config)."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
