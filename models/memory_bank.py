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
- The merge decisions depend on the features alone. :meth:`MemoryBank.settle` returns the
  ones it made; a bank built with ``keep_features=False`` takes them back instead
  (``settle(plans)``) and holds only the extras: it replays a recorded bank exactly (same
  values in the same physical slots) without its features, similarities or their merges.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    Storage is position-major: per (row, position) the S = M + 1 physical slots of an entry
    are adjacent, so one flat row index, ``(row * N + position) * S + slot``, addresses any
    entry, and every read or write of one slot per position is a single ``index_select`` /
    ``index_copy_`` on a 2-D view (several times faster than advanced indexing, which
    broadcasts three index tensors per call). All extras (cached keys/values) share one
    buffer, so a merge moves all of them with one read and one write.
    """

    def __init__(self, capacity: int, extra_heads: int | None = None, groups: int = 1,
                 extra_names: tuple[str, ...] | None = None, keep_features: bool = True):
        if capacity < 0:
            raise ValueError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        # False: a replay bank, extras only; its merges are the plans given to settle().
        self.keep_features = keep_features
        # Extras are stored head-major, [E, R, heads, N, S, D/heads], when extra_heads is given:
        # attention reads each head's keys of all entries as one contiguous block (the order of
        # keys does not matter to attention). Without heads they are [E, R, 1, N, S, D].
        self.extra_heads = extra_heads
        self.groups = groups
        self._names: tuple[str, ...] | None = tuple(extra_names) if extra_names is not None else None
        self.length = 0  # valid entries (committed)
        self.frames_seen = 0
        self.compressions = 0
        self._staged: set[int] = set()
        self._features: torch.Tensor | None = None  # [R, N, S, C], R = groups * rows
        self._extras: torch.Tensor | None = None  # [E, R, heads, N, S, d]
        self._counts: torch.Tensor | None = None  # [R, N, S]: frames each physical slot stands for
        self._order: torch.Tensor | None = None  # [R, N, S]: temporal index t -> physical slot
        self._sims: torch.Tensor | None = None  # [R, N, S]: cos(entry t, entry t+1); column S-1 is scratch
        self._free: torch.Tensor | None = None  # [R, N]: the physical slot the next entry goes to

    def __len__(self) -> int:
        return self.length

    # ---- storage -------------------------------------------------------------------------

    def _allocate(self, features: torch.Tensor | None, extras: torch.Tensor | None) -> None:
        B, N = features.shape[:2] if features is not None else extras.shape[1:3]
        R, S = B * self.groups, self.capacity + 1
        dev = (features if features is not None else extras).device
        self._features = None if features is None else features.new_zeros(R, N, S, features.shape[-1])
        self._counts = torch.zeros(R, N, S, dtype=torch.long, device=dev)
        self._order = torch.arange(S, device=dev).repeat(R, N, 1)
        self._sims = torch.zeros(R, N, S, dtype=torch.float32, device=dev)
        self._free = torch.zeros(R, N, dtype=torch.long, device=dev)
        self._extras = None
        if extras is not None:
            h, D = self.extra_heads or 1, extras.shape[-1]
            if D % h:
                raise ValueError(f"extras of width {D} do not split into {h} heads")
            self._extras = extras.new_zeros(extras.shape[0], R, h, N, S, D // h)
        self._index(B)

    def _index(self, rows: int) -> None:
        """Flat row numbers of slot 0 for every (row, position), and for the extras every
        (extra, row, head, position): in storage order for merges, and in the order of an
        [E, R, N, D] value (position, then head) for writes."""
        R, N, S = self._order.shape
        dev = self._order.device
        self._rows = rows  # batch rows per group
        self._row_base = torch.arange(R * N, device=dev).view(R, N) * S
        if self._extras is not None:
            E, _, h = self._extras.shape[:3]
            self._extra_base = torch.arange(E * R * h * N, device=dev).view(E, R, h, N) * S
            self._extra_put_base = self._extra_base.transpose(2, 3).contiguous()  # [E, R, N, h]

    def _extra_index(self, name: str) -> int:
        if self._names is None or name not in self._names:
            raise KeyError(f"the bank has no extra {name!r}")
        return self._names.index(name)

    def _stack_extras(self, stacked: torch.Tensor | None, extras: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The extras as one [E, B, N, D] tensor, in the bank's name order."""
        if stacked is not None:
            if extras or self._names is None or stacked.shape[0] != len(self._names):
                raise ValueError("stacked extras need the bank's extra_names and no named extras")
            return stacked
        if not extras:
            if self._names:
                raise ValueError(f"extras {sorted(self._names)} missing")
            self._names = ()
            return None
        if self._names is None:
            self._names = tuple(extras)
        if set(extras) != set(self._names):
            raise ValueError(f"extras {sorted(extras)} do not match the bank's {sorted(self._names)}")
        return torch.stack([extras[name] for name in self._names])

    def _group_rows(self, group: int) -> slice:
        return slice(group * self._rows, (group + 1) * self._rows)

    # ---- adding an entry -----------------------------------------------------------------

    def stage(self, features: torch.Tensor | None, group: int = 0, stacked: torch.Tensor | None = None,
              **extras: torch.Tensor) -> None:
        """Write this frame's entry of one group into its free slot.

        features [B, N, C] (None in a bank without features); extras by name, each [B, N, D],
        or all at once as ``stacked`` [E, B, N, D] in the order of the bank's ``extra_names``
        (no stacking copy).
        """
        values = self._stack_extras(stacked, extras)
        if not self.keep_features:
            if features is not None or values is None:
                raise ValueError("a bank without features takes extras only")
        elif features is None or features.dim() != 3:
            raise ValueError(f"bank entries are [B, N, C], got {None if features is None else tuple(features.shape)}")
        if self._order is None:
            self._allocate(features, values)
        if (values is None) != (self._extras is None):
            raise ValueError("every entry needs the same extras")
        if self.length > self.capacity:
            raise RuntimeError("push before settle: the bank is already over capacity")
        if group in self._staged:
            raise RuntimeError(f"group {group} staged twice before commit")
        rows = self._group_rows(group)
        free = self._free[rows]
        if features is not None:
            C = self._features.shape[-1]
            at = (self._row_base[rows] + free).view(-1)
            self._features.view(-1, C).index_copy_(0, at, features.reshape(-1, C).to(self._features.dtype))
        if values is not None:
            d = self._extras.shape[-1]
            at = (self._extra_put_base[:, rows] + free[None, :, :, None]).view(-1)
            self._extras.view(-1, d).index_copy_(0, at, values.reshape(-1, d).to(self._extras.dtype))
        self._staged.add(group)

    def commit(self) -> None:
        """Every group has staged its entry: it becomes the newest entry of the bank."""
        if len(self._staged) != self.groups:
            raise RuntimeError(f"commit with {len(self._staged)} of {self.groups} groups staged")
        t, free = self.length, self._free
        at = self._row_base + free  # [R, N]
        self._counts.view(-1).index_fill_(0, at.view(-1), 1)
        self._order[:, :, t] = free
        if t > 0 and self._features is not None:
            R, N, _, C = self._features.shape
            pair = torch.stack([self._row_base + self._order[:, :, t - 1], at], dim=2)
            previous, current = self._features.view(-1, C).index_select(0, pair.view(-1)).view(R, N, 2, C).unbind(2)
            self._sims[:, :, t - 1] = _cos(previous, current)
        self.length += 1
        self.frames_seen += 1
        self._staged.clear()
        # Until the first merge entries fill slots 0, 1, 2, ...; after it, the bank is full
        # right after each push, and each merge frees the slot the next push takes.
        if self.length <= self.capacity:
            self._free = torch.full_like(free, self.length)

    def push(self, features: torch.Tensor | None, stacked: torch.Tensor | None = None, **extras: torch.Tensor) -> None:
        """Add the current time step: features [B, N, C], extras as in :meth:`stage` (one group)."""
        self.stage(features, 0, stacked, **extras)
        self.commit()

    def slots(self, name: str | None = None, group: int | None = None) -> torch.Tensor:
        """Every entry, physical order, as a view: features [B, L, N, C]; an extra
        [B, L, N, D], or [B, heads, N * L, D/heads] when stored head-major. With ``group``:
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
            return self._features[rows, :, :L].transpose(1, 2)
        buf = self._extras[self._extra_index(name), rows]  # [B, heads, N, S, d]
        if self.extra_heads is None:
            return buf[:, 0, :, :L].transpose(1, 2)
        return buf[:, :, :, :L].flatten(2, 3)  # [B, heads, N * L, d]: key order is free

    # ---- compression ---------------------------------------------------------------------

    def settle(self, plans: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Compress until the bank is within capacity (once per frame at steady state).

        Returns the merge plans, in order: per merge, the temporal index j [R, N] (long) of
        the pair merged at each position. ``plans``: merge so instead of by similarity (what
        a settle of the recorded bank returned); a bank without features needs them."""
        if self.capacity == 0:
            self.length, self._free = 0, torch.zeros_like(self._free)
            return []
        over = max(0, self.length - self.capacity)
        if plans is None and self._features is None and over:
            raise RuntimeError("a bank without features merges only as told (settle(plans))")
        if plans is not None and len(plans) != over:
            raise ValueError(f"{len(plans)} merge plans for a bank {over} entries over capacity")
        done = []
        while self.length > self.capacity:
            done.append(self._merge_once(None if plans is None else plans[len(done)]))
        return done

    @staticmethod
    def _merge_rows(flat: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Count-weighted mean of the two rows of ``flat`` at each pair [..., 2] -> [..., D], in
        at least float32 (bf16 banks round once, after it); written over the first row."""
        acc = torch.promote_types(flat.dtype, torch.float32)
        x = flat.index_select(0, pairs.reshape(-1)).view(*pairs.shape, flat.shape[-1])
        w = weights.to(acc).unsqueeze(-1)
        wa, wb, xa, xb = w[..., 0, :], w[..., 1, :], x[..., 0, :], x[..., 1, :]
        # (wa * xa + wb * xb) / (wa + wb), with the bank's rows promoted inside each op and
        # in-place steps: bit for bit the same, two passes over the rows fewer.
        merged = (xa * wa).add_(xb * wb).div_(wa + wb).to(flat.dtype)
        flat.index_copy_(0, pairs[..., 0].reshape(-1), merged.view(-1, flat.shape[-1]))
        return merged

    def _merge_once(self, j: torch.Tensor | None) -> torch.Tensor:
        L = self.length
        R, N, S = self._order.shape
        if j is None:
            j = self._sims[:, :, : L - 1].argmax(dim=2)  # [R, N] temporal index of the most similar pair
        phys = self._order.gather(2, torch.stack([j, j + 1], dim=2))  # [R, N, 2] physical slots of the pair
        counts = self._counts.gather(2, phys)
        if self._features is not None:
            C = self._features.shape[-1]
            merged = self._merge_rows(self._features.view(-1, C), self._row_base[..., None] + phys, counts)
        if self._extras is not None:  # weights broadcast over extras and heads
            pairs = self._extra_base[..., None] + phys[None, :, None]  # [E, R, heads, N, 2]
            self._merge_rows(self._extras.view(-1, self._extras.shape[-1]), pairs, counts[None, :, None])
        self._counts.scatter_(2, phys[..., :1], counts.sum(dim=2, keepdim=True))
        # Temporal order loses entry j+1; pairs shift the same way, except the two pairs
        # that now touch the merged entry, which are measured again.
        jj = j.unsqueeze(2)
        t = torch.arange(L - 1, device=j.device)
        self._order[:, :, : L - 1] = self._order[:, :, :L].gather(2, t + (t > jj).long())
        if L > 2 and self._features is not None:
            p = torch.arange(L - 2, device=j.device)
            self._sims[:, :, : L - 2] = self._sims[:, :, : L - 1].gather(2, p + (p > jj).long())
            near = torch.stack([(j - 1).clamp(min=0), (j + 1).clamp(max=L - 2)], dim=2)  # temporal neighbours
            rows = self._row_base[..., None] + self._order.gather(2, near)
            neighbours = self._features.view(-1, C).index_select(0, rows.view(-1)).view(R, N, 2, C)
            sims = _cos(neighbours, merged.unsqueeze(2))  # [R, N, 2]: pair (j-1, j) and pair (j, j+1)
            # A pair that does not exist (j = 0, or the merged entry is the last) writes the scratch column.
            pair = torch.stack([j - 1, j], dim=2)
            exists = torch.stack([j > 0, j < L - 2], dim=2)
            self._sims.scatter_(2, torch.where(exists, pair, S - 1), sims)
        self._free = phys[..., 1]  # the next push writes here
        self.length = L - 1
        self.compressions += 1
        return j

    # ---- rows ----------------------------------------------------------------------------

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (long, the same in every group): videos that ended
        leave a lockstep batch, so later steps stop paying for them."""
        if self._order is None:
            self._rows = len(rows)
            return
        index = (torch.arange(self.groups, device=rows.device)[:, None] * self._rows + rows).view(-1)
        for name in ("_features", "_counts", "_order", "_sims", "_free"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, index))
        if self._extras is not None:
            self._extras = self._extras.index_select(1, index)
        self._index(len(rows))

    # ---- temporal-order views (status, tests) ----------------------------------------

    def _ordered(self, buf: torch.Tensor) -> torch.Tensor:
        """buf [R, N, S, *D] -> [R, L, N, *D], oldest entry first."""
        L = self.length
        R, N = self._order.shape[:2]
        idx = self._order[:, :, :L].view(R, N, L, *([1] * (buf.dim() - 3))).expand(R, N, L, *buf.shape[3:])
        return buf.gather(2, idx).transpose(1, 2)

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
        buf = self._extras[self._extra_index(name)].permute(0, 2, 3, 1, 4)  # [R, N, S, heads, d]
        return self._ordered(buf).flatten(3)

    def append(self, features: torch.Tensor, **extras: torch.Tensor) -> None:
        """push + settle: add one time step and compress back to capacity."""
        self.push(features, **extras)
        self.settle()

    def status(self, row: int | None = None) -> BankStatus:
        """What the bank holds; with ``row``, that batch row's slots only (a lockstep batch's video)."""
        counts = self.counts
        if counts is not None and row is not None:
            counts = counts[row : row + 1]
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
