"""MA-LMM's long-term memory bank and its compression (MBC).

A bank holds ``features`` [B, T, N, C] (T time slots, N tokens per slot) and ``counts``
[B, T, N]: how many original frames each slot stands for at each token position. When a
bank holds more than its capacity M, MBC merges, independently at every position i, the
temporally adjacent pair (j, j+1) with the highest cosine similarity into their
count-weighted mean. Counts always sum to the number of frames seen, per position.

:func:`compress` is that definition as a pure function. :class:`MemoryBank` is the state a
video stream keeps, and produces exactly the same sequence of banks, faster:

- Buffers are allocated once with M+1 slots, so memory never grows with the video.
- Attention does not care about slot order, only MBC does. So entries stay in the physical
  slot they were written to; a small per-position index (``order``) records temporal order.
  A merge writes one slot and frees its partner, where the next frame goes. Per frame this
  moves three slots of data instead of rewriting the whole bank (the features plus every
  cached key/value tensor: hundreds of MB at ViT-g size).
- Adjacent-pair similarities are cached; a merge changes only the two pairs around it.
- Key/value projections are affine, so the projection of a count-weighted mean is the
  count-weighted mean of the projections: cached projections (``extras``) are merged with
  the features' decisions and stay exact. A frame's tokens are projected once, on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["merge_plan", "merge", "merge_counts", "compress", "MemoryBank", "BankStatus"]


# ---- MBC as a pure function (the definition) ------------------------------------------------


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
    tail = [1] * (x.dim() - 3)
    slot = torch.arange(T - 1, device=x.device).view(1, T - 1, 1)  # [1, T-1, 1]
    j = plan.unsqueeze(1)  # [B, 1, N]
    src = slot + (slot > j).long()  # source slot of every output slot: s up to j*, s + 1 after
    shifted = x.gather(1, src.view(B, T - 1, N, *tail).expand(B, T - 1, N, *x.shape[3:]))
    jj = j.view(B, 1, N, *tail).expand(B, 1, N, *x.shape[3:])
    k_a = counts.gather(1, j).to(x.dtype).view(B, 1, N, *tail)
    k_b = counts.gather(1, j + 1).to(x.dtype).view(B, 1, N, *tail)
    merged = (k_a * x.gather(1, jj) + k_b * x.gather(1, jj + 1)) / (k_a + k_b)  # [B, 1, N, *D]
    return torch.where((slot == j).view(B, T - 1, N, *tail), merged, shifted)


def merge_counts(counts: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """Counts after merging plan's pairs: [B, T, N] -> [B, T-1, N]."""
    B, T, N = counts.shape
    slot = torch.arange(T - 1, device=counts.device).view(1, T - 1, 1)
    j = plan.unsqueeze(1)
    shifted = counts.gather(1, slot.expand(B, T - 1, N) + (slot > j).long())
    return torch.where(slot == j, counts.gather(1, j) + counts.gather(1, j + 1), shifted)


def compress(features: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MBC step: [B, T, N, C], [B, T, N] -> [B, T-1, N, C], [B, T-1, N]. Needs T >= 2."""
    if features.shape[1] < 2:
        raise ValueError("compress needs a bank of at least two slots")
    plan = merge_plan(features)
    return merge(features, counts, plan), merge_counts(counts, plan)


# ---- the bank a stream keeps ----------------------------------------------------------------


@dataclass(frozen=True)
class BankStatus:
    """What a bank holds, for progress displays and result records.

    ``slot_frames[s]`` is the mean number of frames slot s (oldest first) stands for, over
    positions; ``slot_spans[s]`` is the (first, last) frame index, counted from the stream's
    first frame, that any position of slot s covers.
    """

    capacity: int
    length: int
    frames_seen: int
    compressions: int
    slot_frames: tuple[float, ...]
    slot_spans: tuple[tuple[int, int], ...]


def _take(buf: torch.Tensor, where: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """buf [B, S, N, *D] at physical slot phys[b, i] for every (b, i) -> [B, N, *D].

    ``where`` is (batch index, phys, position index), each [B, N]: advanced indexing copies
    whole rows of D, several times faster than gather/scatter with an expanded index
    (and bf16 scatter is not vectorized at all on CPU).
    """
    return buf[where]


def _put(buf: torch.Tensor, where: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
    """buf[b, phys[b, i], i] = value[b, i] for every (b, i), in place."""
    buf[where] = value.to(buf.dtype)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


class MemoryBank:
    """A capacity-bounded bank with the same semantics as repeated :func:`compress`.

    Per frame: :meth:`push` the new entry (and its cached projections, ``extras``), read
    :meth:`slots` (every entry, current included, in physical order), then :meth:`settle`
    to compress back down to capacity. Capacity 0 means no memory: the bank holds the
    current entry during the step and drops it at :meth:`settle`.

    ``groups`` > 1 makes one bank hold several same-shaped banks stacked on the batch axis
    (the Q-Former's per-layer query banks): each group stages its entry (:meth:`stage`) and
    reads its own :meth:`slots`, then one :meth:`commit` and one :meth:`settle` serve all groups,
    so merging costs one set of tensor ops per frame instead of one per layer.
    """

    def __init__(self, capacity: int, extra_heads: int | None = None, groups: int = 1):
        if capacity < 0:
            raise ValueError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        # Extras (cached keys/values) are stored head-major, [B, heads, N, S, D/heads], when
        # given: attention reads each head's keys of all entries as one contiguous block (the
        # order of keys does not matter to attention), and a merge touches, per position, one
        # short run of slots instead of rows 32 KB apart (DRAM-latency bound).
        self.extra_heads = extra_heads
        self.groups = groups
        self.length = 0  # valid entries (committed)
        self.frames_seen = 0
        self.compressions = 0
        self._staged: set[int] = set()
        self._features: torch.Tensor | None = None  # [B, S, N, C], S = capacity + 1 physical slots
        self._counts: torch.Tensor | None = None  # [B, S, N]
        self._extras: dict[str, torch.Tensor] = {}  # name -> [B, S, N, D] or [B, heads, N, S, D/heads]
        self._order: torch.Tensor | None = None  # [B, S, N]: temporal index t -> physical slot
        self._sims: torch.Tensor | None = None  # [B, S-1, N]: cos(entry t, entry t+1), float32
        self._free: torch.Tensor | None = None  # [B, N]: the physical slot the next entry goes to

    def __len__(self) -> int:
        return self.length

    def _allocate(self, features: torch.Tensor, extras: dict[str, torch.Tensor]) -> None:
        B, N = features.shape[0] * self.groups, features.shape[1]
        S = self.capacity + 1
        dev = features.device
        self._rows = features.shape[0]  # batch rows per group
        self._features = features.new_zeros(B, S, N, *features.shape[2:])
        self._counts = torch.zeros(B, S, N, dtype=torch.long, device=dev)
        h = self.extra_heads
        self._extras = {
            k: v.new_zeros(B, S, N, *v.shape[2:]) if h is None else v.new_zeros(B, h, N, S, v.shape[-1] // h)
            for k, v in extras.items()
        }
        self._order = torch.arange(S, device=dev).view(1, S, 1).repeat(B, 1, N)
        self._sims = torch.zeros(B, max(S - 1, 1), N, dtype=torch.float32, device=dev)
        self._free = torch.zeros(B, N, dtype=torch.long, device=dev)
        self._batch = torch.arange(B, device=dev).view(B, 1).expand(B, N)
        self._position = torch.arange(N, device=dev).view(1, N).expand(B, N)
        self._head_index = (torch.arange(B, device=dev).view(B, 1, 1),
                            torch.arange(h or 1, device=dev).view(1, h or 1, 1),
                            torch.arange(N, device=dev).view(1, 1, N))

    def _at(self, phys: torch.Tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """Index of slot phys[b, i] at every (b, i), for slot-major buffers: rows [B, N, *D]."""
        return (self._batch[rows], phys, self._position[rows])

    def _at_heads(self, phys: torch.Tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """The same for head-major buffers [B, heads, N, S, d]: rows [B, heads, N, d], walked
        head by head and position by position, through memory in order."""
        b, h, n = self._head_index
        return (b[rows], h, n, phys.view(phys.shape[0], 1, -1))

    def _head_major(self, buf: torch.Tensor) -> bool:
        return self.extra_heads is not None and buf.dim() == 5

    def _slot_view(self, buf: torch.Tensor) -> torch.Tensor:
        """buf as [B, S, N, *D] (a view; slow to index for head-major buffers: status/tests only)."""
        return buf.permute(0, 3, 2, 1, 4) if self._head_major(buf) else buf

    def _group_rows(self, group: int) -> slice:
        return slice(group * self._rows, (group + 1) * self._rows)

    # ---- adding an entry -----------------------------------------------------------------

    def stage(self, features: torch.Tensor, group: int = 0, **extras: torch.Tensor) -> None:
        """Write this frame's entry of one group ([B, N, C], extras [B, N, *D]) into its free slot."""
        if self._features is None:
            self._allocate(features, extras)
        elif extras.keys() != self._extras.keys():
            raise ValueError(f"extras {sorted(extras)} do not match the bank's {sorted(self._extras)}")
        if self.length > self.capacity:
            raise RuntimeError("push before settle: the bank is already over capacity")
        if group in self._staged:
            raise RuntimeError(f"group {group} staged twice before commit")
        rows = self._group_rows(group)
        free = self._free[rows]
        _put(self._features, self._at(free, rows), features)
        for name, value in extras.items():
            buf = self._extras[name]
            if self._head_major(buf):  # [B, N, D] -> [B, heads, N, d]
                _put(buf, self._at_heads(free, rows), value.view(*value.shape[:2], buf.shape[1], -1).transpose(1, 2))
            else:
                _put(buf, self._at(free, rows), value)
        self._staged.add(group)

    def commit(self) -> None:
        """Every group has staged its entry: it becomes the newest entry of the bank."""
        if len(self._staged) != self.groups:
            raise RuntimeError(f"commit with {len(self._staged)} of {self.groups} groups staged")
        t, at = self.length, self._at(self._free)
        _put(self._counts, at, torch.ones_like(self._free))
        self._order[:, t] = self._free
        if t > 0:
            previous = _take(self._features, self._at(self._order[:, t - 1]))
            self._sims[:, t - 1] = _cos(previous, _take(self._features, at))
        self.length += 1
        self.frames_seen += 1
        self._staged.clear()
        # Until the first merge entries fill slots 0, 1, 2, ...; after it, the bank is full
        # right after each push, and each merge frees the slot the next push takes.
        if self.length <= self.capacity:
            self._free = torch.full_like(self._free, self.length)

    def push(self, features: torch.Tensor, **extras: torch.Tensor) -> None:
        """Add the current time step: features [B, N, C], each extra [B, N, *D] (one group)."""
        self.stage(features, 0, **extras)
        self.commit()

    def slots(self, name: str | None = None, group: int | None = None) -> torch.Tensor:
        """Every entry, physical order, as a view: features [B, L, N, C]; an extra
        [B, L, N, D], or [B, heads, L * N, D/heads] when stored head-major. With ``group``:
        that group's rows, including its staged (not yet committed) entry.

        Valid between push/stage and settle: then the entries fill slots 0..L-1 (in order
        while the bank fills up; all M+1 slots once it is full). A head-major extra is a
        view once the bank is full, a copy while it fills up.
        """
        L = self.length + (1 if group is not None and group in self._staged else 0)
        if L and L <= self.capacity and self.compressions:
            raise RuntimeError("slots() is read between push() and settle()")
        rows = slice(None) if group is None else self._group_rows(group)
        if name is None:
            return self._features[rows, :L]
        if self.extra_heads is None:
            return self._extras[name][rows, :L]
        return self._extras[name][rows, :, :, :L].flatten(2, 3)  # [B, heads, N * L, d]: key order is free

    # ---- compression ---------------------------------------------------------------------

    def settle(self) -> None:
        """Compress until the bank is within capacity (once per frame at steady state)."""
        if self.capacity == 0:
            self.length, self._free = 0, torch.zeros_like(self._free)
            return
        while self.length > self.capacity:
            self._merge_once()

    def _merge_once(self) -> None:
        L = self.length
        j = self._sims[:, : L - 1].argmax(dim=1)  # [B, N] temporal index of the most similar pair
        order = self._order
        a_phys = order.gather(1, j.unsqueeze(1)).squeeze(1)  # physical slots of the pair
        b_phys = order.gather(1, (j + 1).unsqueeze(1)).squeeze(1)
        a, b = self._at(a_phys), self._at(b_phys)
        k_a, k_b = _take(self._counts, a), _take(self._counts, b)  # [B, N]
        a_heads = b_heads = None
        if self.extra_heads is not None:
            a_heads, b_heads = self._at_heads(a_phys), self._at_heads(b_phys)
        for buf in (self._features, *self._extras.values()):
            if self._head_major(buf):  # rows [B, heads, N, d]; weights broadcast over heads
                ia, ib, wa, wb = a_heads, b_heads, k_a[:, None, :, None], k_b[:, None, :, None]
            else:  # rows [B, N, *D]
                tail = [1] * (buf.dim() - 3)
                ia, ib, wa, wb = a, b, k_a.view(*k_a.shape, *tail), k_b.view(*k_b.shape, *tail)
            # The count-weighted mean in at least float32 (bf16 banks round once, after it).
            acc = torch.promote_types(buf.dtype, torch.float32)
            wa, wb = wa.to(acc), wb.to(acc)
            _put(buf, ia, (wa * _take(buf, ia).to(acc) + wb * _take(buf, ib).to(acc)) / (wa + wb))
        _put(self._counts, a, k_a + k_b)
        # Temporal order loses entry j+1; pairs shift the same way, except the two pairs
        # that now touch the merged entry, which are measured again.
        t = torch.arange(L - 1, device=j.device).view(1, L - 1, 1)
        self._order[:, : L - 1] = order[:, :L].gather(1, t + (t > j.unsqueeze(1)).long())
        if L > 2:
            p = torch.arange(L - 2, device=j.device).view(1, L - 2, 1)
            self._sims[:, : L - 2] = self._sims[:, : L - 1].gather(1, p + (p >= (j + 1).unsqueeze(1)).long())
            merged = _take(self._features, a)
            prev_t, next_t = (j - 1).clamp(min=0), (j + 1).clamp(max=L - 2)
            before = _take(self._features, self._at(self._order.gather(1, prev_t.unsqueeze(1)).squeeze(1)))
            after = _take(self._features, self._at(self._order.gather(1, next_t.unsqueeze(1)).squeeze(1)))
            jj = j.unsqueeze(1)
            pair = prev_t.unsqueeze(1)  # pair (j-1, merged), if j > 0
            self._sims.scatter_(1, pair, torch.where(jj > 0, _cos(before, merged).unsqueeze(1), self._sims.gather(1, pair)))
            pair = j.clamp(max=L - 3).unsqueeze(1)  # pair (merged, j+1), if there is an entry after it
            self._sims.scatter_(1, pair, torch.where(jj < L - 2, _cos(merged, after).unsqueeze(1), self._sims.gather(1, pair)))
        self._free = b_phys  # the next push writes here
        self.length = L - 1
        self.compressions += 1

    # ---- temporal-order views (status, tests) ----------------------------------------

    def _ordered(self, buf: torch.Tensor) -> torch.Tensor:
        L = self.length
        B, _, N = self._order.shape
        idx = self._order[:, :L].view(B, L, N, *([1] * (buf.dim() - 3))).expand(B, L, N, *buf.shape[3:])
        return buf.gather(1, idx)

    @property
    def features(self) -> torch.Tensor | None:
        """[B, T, N, C], oldest entry first."""
        return None if self._features is None or not self.length else self._ordered(self._features)

    @property
    def counts(self) -> torch.Tensor | None:
        """[B, T, N], oldest entry first."""
        return None if self._counts is None or not self.length else self._ordered(self._counts)

    def extra(self, name: str) -> torch.Tensor:
        """A cached projection [B, T, N, D], oldest entry first."""
        ordered = self._ordered(self._slot_view(self._extras[name]))
        return ordered.flatten(3) if self.extra_heads is not None else ordered

    def append(self, features: torch.Tensor, **extras: torch.Tensor) -> None:
        """push + settle: add one time step and compress back to capacity."""
        self.push(features, **extras)
        self.settle()

    def status(self) -> BankStatus:
        counts = self.counts
        if counts is None:
            return BankStatus(self.capacity, 0, self.frames_seen, self.compressions, (), ())
        end = counts.cumsum(dim=1)  # exclusive end frame of each slot, per position
        start = end - counts
        return BankStatus(
            capacity=self.capacity,
            length=self.length,
            frames_seen=self.frames_seen,
            compressions=self.compressions,
            slot_frames=tuple(counts.float().mean(dim=(0, 2)).tolist()),
            slot_spans=tuple(zip((int(f) for f in start.amin(dim=(0, 2)).tolist()),
                                 (int(x) - 1 for x in end.amax(dim=(0, 2)).tolist()))),
        )
