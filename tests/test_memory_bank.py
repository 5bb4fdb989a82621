"""MBC (memory bank compression) against its definition in method.md."""

from __future__ import annotations

import pytest
import torch

from models.memory_bank import MemoryBank, compress, merge, merge_plan


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", range(5))
def test_merged_pair_is_the_most_similar_one_at_each_position(seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, N, C = 2, 6, 5, 8
    x = torch.randn(B, T, N, C, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 4, (B, T, N), generator=gen)
    plan = merge_plan(x)
    out, out_counts = compress(x, counts)
    assert out.shape == (B, T - 1, N, C) and out_counts.shape == (B, T - 1, N)
    for b in range(B):
        for i in range(N):
            sims = [_cos(x[b, j, i], x[b, j + 1, i]) for j in range(T - 1)]
            j = max(range(T - 1), key=lambda s: sims[s])
            assert plan[b, i] == j
            ka, kb = counts[b, j, i], counts[b, j + 1, i]
            expected = (ka * x[b, j, i] + kb * x[b, j + 1, i]) / (ka + kb)
            torch.testing.assert_close(out[b, j, i], expected)
            assert out_counts[b, j, i] == ka + kb
            # Other slots keep their order and values; the one after the merge is gone.
            kept = [s for s in range(T) if s not in (j, j + 1)]
            new_slots = [s for s in range(T - 1) if s != j]
            for old, new in zip(kept, new_slots):
                torch.testing.assert_close(out[b, new, i], x[b, old, i])
                assert out_counts[b, new, i] == counts[b, old, i]


def test_different_positions_can_merge_different_time_steps():
    # Position 0: slots 0 and 1 identical; position 1: slots 2 and 3 identical.
    x = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    x[0, 1, 0] = x[0, 0, 0]
    x[0, 3, 1] = x[0, 2, 1]
    assert merge_plan(x).tolist() == [[0, 2]]


@pytest.mark.parametrize("capacity", [1, 2, 5])
def test_bank_invariants_over_a_long_stream(capacity):
    gen = torch.Generator().manual_seed(capacity)
    bank = MemoryBank(capacity)
    B, N, C = 2, 7, 6
    total = torch.zeros(B, N, C, dtype=torch.float64)
    W, bias = torch.randn(C, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    for t in range(1, 31):
        f = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
        total += f
        bank.append(f, proj=f @ W + bias)
        assert len(bank) == min(t, capacity)  # never over capacity
        assert (bank.counts.sum(dim=1) == t).all()  # counts sum to frames seen, per position
        # Merging by count-weighted means keeps the count-weighted sum: it is the sum of all frames.
        torch.testing.assert_close((bank.counts[..., None] * bank.features).sum(dim=1), total)
        # A cached affine projection merged with the same decisions equals the projection of the merged bank.
        torch.testing.assert_close(bank.extra("proj"), bank.features @ W + bias)
    status = bank.status()
    assert status.length == capacity and status.frames_seen == 30
    assert status.compressions == 30 - capacity
    assert sum(status.slot_frames) == pytest.approx(30)


def test_status_spans_cover_the_stream_in_order():
    bank = MemoryBank(3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        bank.append(torch.randn(1, 4, 5, generator=gen))
    spans = bank.status().slot_spans
    assert len(spans) == 3
    assert spans[0][0] == 0 and spans[-1][1] == 9  # first slot starts at frame 0, last ends at frame 9
    for (first, last), (next_first, next_last) in zip(spans, spans[1:]):
        assert first <= last and first <= next_first and last <= next_last
    # Every position's slots tile frames 0..9 exactly (contiguous, no gaps, no overlaps).
    ends = bank.counts.cumsum(dim=1)
    assert (ends[:, -1] == 10).all()


def test_fresh_slots_are_single_frames_before_any_compression():
    bank = MemoryBank(4)
    for _ in range(3):
        bank.append(torch.randn(1, 2, 3))
    status = bank.status()
    assert status.compressions == 0
    assert status.slot_frames == (1.0, 1.0, 1.0)
    assert status.slot_spans == ((0, 0), (1, 1), (2, 2))


def test_capacity_zero_keeps_nothing():
    bank = MemoryBank(0)
    bank.append(torch.randn(1, 2, 3))
    bank.append(torch.randn(1, 2, 3))
    assert len(bank) == 0 and bank.frames_seen == 2 and bank.status().length == 0


def test_compress_needs_two_slots_and_rejects_negative_capacity():
    with pytest.raises(ValueError):
        compress(torch.randn(1, 1, 2, 3), torch.ones(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        MemoryBank(-1)


def test_bf16_bank_picks_pairs_in_float32():
    x = torch.randn(1, 5, 6, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(merge_plan(x.bfloat16()), merge_plan(x.bfloat16().float()))


@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("capacity", [1, 2, 3, 7])
def test_the_bank_evolves_exactly_like_repeated_pure_compress(capacity, heads):
    """The in-place bank (physical slots, cached similarities, head-major extras) against the definition."""
    gen = torch.Generator().manual_seed(100 + capacity)
    bank = MemoryBank(capacity, extra_heads=heads)
    B, N, C = 2, 9, 5
    ref_x = ref_k = ref_p = None
    W = torch.randn(C, 6, generator=gen, dtype=torch.float64)
    for t in range(25):
        # A drifting stream, with exact repeats now and then (ties resolve to the earliest pair).
        f = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
        if t % 6 == 5:
            f = ref_x[:, -1].clone()
        bank.push(f, proj=f @ W)
        # Between push and settle, slots() holds every entry (physical order): per position,
        # the same set as the temporal view.
        phys = bank.slots()
        assert phys.shape[1] == len(bank)
        torch.testing.assert_close(phys.sort(dim=1).values, bank.features.sort(dim=1).values)
        if heads:  # head-major extras: [B, heads, N * L, d] position-major; head h = columns h*d:(h+1)*d
            proj = bank.slots("proj")
            assert proj.shape == (B, heads, N * len(bank), 6 // heads)
            entries = phys @ W  # [B, L, N, 6] in the same physical order
            torch.testing.assert_close(proj[:, 1], entries[..., 2:4].transpose(1, 2).flatten(1, 2))
            if len(bank) == capacity + 1:  # a full bank: each head's keys are one contiguous block
                assert proj[1, 2].is_contiguous() and proj.data_ptr() == bank._extras.data_ptr()  # a view: no copy
        bank.settle()
        x1, k1, p1 = f[:, None], torch.ones(B, 1, N, dtype=torch.long), (f @ W)[:, None]
        ref_x = x1 if ref_x is None else torch.cat([ref_x, x1], 1)
        ref_k = k1 if ref_k is None else torch.cat([ref_k, k1], 1)
        ref_p = p1 if ref_p is None else torch.cat([ref_p, p1], 1)
        while ref_x.shape[1] > capacity:
            plan = merge_plan(ref_x)
            ref_p = merge(ref_p, ref_k, plan)
            ref_x, ref_k = compress(ref_x, ref_k)
        torch.testing.assert_close(bank.features, ref_x)
        assert torch.equal(bank.counts, ref_k)
        torch.testing.assert_close(bank.extra("proj"), ref_p)


def test_push_attend_settle_sees_the_current_entry_then_drops_to_capacity():
    bank = MemoryBank(2)
    for _ in range(3):
        bank.push(torch.randn(1, 4, 3))
        assert len(bank) == bank.slots().shape[1] <= 3
        bank.settle()
        assert len(bank) <= 2
    with pytest.raises(RuntimeError, match="between push"):
        bank.slots()  # after settle the bank has a free slot: nothing to attend over
    with pytest.raises(RuntimeError, match="push before settle"):
        bank.push(torch.randn(1, 4, 3))
        bank.push(torch.randn(1, 4, 3))


def test_keep_rows_leaves_the_other_rows_as_if_alone():
    """A grouped bank with extras drops a batch row mid-stream (a video of a lockstep batch
    ended); the rows left go on exactly like banks that only ever held them."""
    gen = torch.Generator().manual_seed(9)
    B, N, C, groups = 3, 5, 8, 2
    together = MemoryBank(3, extra_heads=2, groups=groups, extra_names=("k", "v"))
    alone = {b: MemoryBank(3, extra_heads=2, groups=groups, extra_names=("k", "v")) for b in (0, 2)}
    for t in range(9):
        x = torch.randn(groups, B, N, C, generator=gen, dtype=torch.float64)
        kv = torch.randn(groups, 2, B, N, 4, generator=gen, dtype=torch.float64)
        if t == 4:
            together.keep_rows(torch.tensor([0, 2]))
        rows = [0, 1, 2] if t < 4 else [0, 2]
        for g in range(groups):
            together.stage(x[g, rows], g, kv[g][:, rows])
            for b, bank in alone.items():
                bank.stage(x[g, b : b + 1], g, kv[g][:, b : b + 1])
        for bank in (together, *alone.values()):
            bank.commit()
            bank.settle()
    assert together.features.shape[0] == groups * 2
    for i, (b, bank) in enumerate(alone.items()):
        for g in range(groups):
            torch.testing.assert_close(together.features[g * 2 + i], bank.features[g])
            torch.testing.assert_close(together.extra("v")[g * 2 + i], bank.extra("v")[g])
        assert together.status(i) == bank.status(0)
