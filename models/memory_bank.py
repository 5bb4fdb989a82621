"""MA-LMM's long-term memory bank and its compression (MBC), as pure tensor code.

A bank holds ``features`` of shape [B, T, N, C] (T time slots, N tokens per slot) and
``counts`` [B, T, N]: how many original frames each slot stands for at each token position.
When a bank holds more than its capacity M, MBC merges, independently at every position i,
the temporally adjacent pair (j, j+1) with the highest cosine similarity into their
count-weighted mean. Counts always sum to the number of frames seen, per position.

Key/value projections are affine, so the projection of a count-weighted mean is the
count-weighted mean of the projections. A bank can therefore carry cached projections
(``extras``) that are merged with the same decisions and stay exact: a frame's tokens are
projected once, when they arrive, instead of re-projecting the whole bank at every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["merge_plan", "merge", "compress", "MemoryBank", "BankStatus"]


def merge_plan(features: torch.Tensor) -> torch.Tensor:
    """The slot j* to merge with j*+1 at every position: [B, T, N, C] -> [B, N] (long).

    Similarity is computed in float32 so that bf16 banks pick the same pair as fp32 ones
    would, except for near-ties. Ties go to the earliest pair (torch.argmax's rule).
    """
    x = features.float()
    sim = F.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1)  # [B, T-1, N]
    return sim.argmax(dim=1)


def merge(x: torch.Tensor, counts: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Merge slot plan[b, i] with the next one at every (b, i), weighted by counts.

    x: [B, T, N, *D] (features or a cached projection), counts: [B, T, N], plan: [B, N].
    Returns [B, T-1, N, *D]: slots before j* unchanged, the merged pair at j*, later slots shifted.
    """
    B, T, N = counts.shape
    extra_dims = x.dim() - 3
    slot = torch.arange(T - 1, device=x.device).view(1, T - 1, 1)  # [1, T-1, 1]
    j = plan.unsqueeze(1)  # [B, 1, N]
    # Source slot for every output slot: s for s <= j*, s + 1 after it.
    src = slot + (slot > j).long()  # [B, T-1, N]
    idx = src.view(B, T - 1, N, *([1] * extra_dims)).expand(B, T - 1, N, *x.shape[3:])
    shifted = x.gather(1, idx)

    jj = j.view(B, 1, N, *([1] * extra_dims)).expand(B, 1, N, *x.shape[3:])
    k_a = counts.gather(1, j).to(x.dtype)  # [B, 1, N]
    k_b = counts.gather(1, j + 1).to(x.dtype)
    k_a = k_a.view(B, 1, N, *([1] * extra_dims))
    k_b = k_b.view(B, 1, N, *([1] * extra_dims))
    merged = (k_a * x.gather(1, jj) + k_b * x.gather(1, jj + 1)) / (k_a + k_b)  # [B, 1, N, *D]

    at_j = (slot == j).view(B, T - 1, N, *([1] * extra_dims))
    return torch.where(at_j, merged, shifted)


def merge_counts(counts: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Counts after merging plan's pairs: [B, T, N] -> [B, T-1, N]."""
    B, T, N = counts.shape
    slot = torch.arange(T - 1, device=counts.device).view(1, T - 1, 1)
    j = plan.unsqueeze(1)
    shifted = counts.gather(1, slot.expand(B, T - 1, N) + (slot > j).long())
    summed = counts.gather(1, j) + counts.gather(1, j + 1)
    return torch.where(slot == j, summed, shifted)


def compress(features: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MBC step: [B, T, N, C], [B, T, N] -> [B, T-1, N, C], [B, T-1, N]. Needs T >= 2."""
    if features.shape[1] < 2:
        raise ValueError("compress needs a bank of at least two slots")
    plan = merge_plan(features)
    return merge(features, counts, plan), merge_counts(counts, plan)


@dataclass(frozen=True)
class BankStatus:
    """What a bank holds, for progress displays and result records.

    ``slot_frames[s]`` is the mean number of frames slot s stands for (over positions);
    ``slot_spans[s]`` is the (first, last) frame index, counted from the stream's first
    frame, that any position of slot s covers.
    """

    capacity: int
    length: int
    frames_seen: int
    compressions: int
    slot_frames: tuple[float, ...]
    slot_spans: tuple[tuple[int, int], ...]


class MemoryBank:
    """A capacity-bounded bank: append one time step, compress while over capacity.

    ``extras`` are tensors aligned with the features slot by slot (e.g. cached key/value
    projections, [B, T, N, D]); they are appended together and merged with the
    features' decisions. Capacity 0 means no memory: nothing is ever stored.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.features: torch.Tensor | None = None  # [B, T, N, C]
        self.counts: torch.Tensor | None = None  # [B, T, N]
        self.extras: dict[str, torch.Tensor] = {}
        self.frames_seen = 0
        self.compressions = 0

    def __len__(self) -> int:
        return 0 if self.features is None else self.features.shape[1]

    def append(self, features: torch.Tensor, **extras: torch.Tensor) -> None:
        """Add one time step: features [B, N, C], each extra [B, N, *D]; then enforce capacity."""
        self.frames_seen += 1
        if self.capacity == 0:
            return
        fresh = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        if self.features is None:
            self.extras = {k: v.unsqueeze(1) for k, v in extras.items()}
            self.features = features.unsqueeze(1)
            self.counts = fresh.unsqueeze(1)
        else:
            if extras.keys() != self.extras.keys():
                raise ValueError(f"extras {sorted(extras)} do not match the bank's {sorted(self.extras)}")
            self.features = torch.cat([self.features, features.unsqueeze(1)], dim=1)
            self.counts = torch.cat([self.counts, fresh.unsqueeze(1)], dim=1)
            self.extras = {k: torch.cat([v, extras[k].unsqueeze(1)], dim=1) for k, v in self.extras.items()}
        while len(self) > self.capacity:
            self._compress()

    def _compress(self) -> None:
        plan = merge_plan(self.features)
        self.features = merge(self.features, self.counts, plan)
        self.extras = {k: merge(v, self.counts, plan) for k, v in self.extras.items()}
        self.counts = merge_counts(self.counts, plan)
        self.compressions += 1

    def status(self) -> BankStatus:
        if self.counts is None:
            return BankStatus(self.capacity, 0, self.frames_seen, self.compressions, (), ())
        counts = self.counts
        end = counts.cumsum(dim=1)  # exclusive end frame of each slot, per position
        start = end - counts
        first = start.amin(dim=(0, 2)).tolist()
        last = (end.amax(dim=(0, 2)) - 1).tolist()
        per_slot = counts.float().mean(dim=(0, 2)).tolist()
        return BankStatus(
            capacity=self.capacity,
            length=len(self),
            frames_seen=self.frames_seen,
            compressions=self.compressions,
            slot_frames=tuple(per_slot),
            slot_spans=tuple(zip((int(f) for f in first), (int(x) for x in last))),
        )
