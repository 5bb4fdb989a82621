"""The memory-augmented Q-Former of MA-LMM.

Parameter names are those of transformers' ``InstructBlipQFormerModel``, so the ``qformer.*``
weights of an InstructBLIP checkpoint load with ``strict=True``. What differs is the forward:
it runs one video frame at a time and reads two kinds of long-term memory, passed in
explicitly as a :class:`QFormerMemory` (the modules themselves hold no state):

- one **visual bank** shared by every cross-attention layer: the 32 queries attend to all
  frames in the bank plus the current one, [(len(bank) + 1) * P, C_vision] tokens;
- one **query bank per layer**: that layer's self-attention keys/values come from the
  layer's inputs at earlier frames (stored in the bank) plus the current input, with the
  text padding mask repeated once per entry. Queries come from the current input only.

Order per frame (method.md): append the current entry to a bank -> attend over the whole
bank -> compress it back to M entries (MBC). Banks are compressed at the end of the step:
nothing reads them in between (each query bank is read only by its own layer), and all
twelve query banks then compress together as one grouped bank.

With ``cache_projections`` a bank also keeps the key/value projections of what it stores,
merged with the same MBC decisions (exact: projections are affine), so each frame projects
only its own tokens instead of re-projecting the whole bank in every layer.

The visual bank is the same for every instruction: a :class:`VisualTrack` records it (each
frame's keys/values and merges) and a later pass over the same video replays it, running
only the instruction's part of each step (visual_track.py).

One step can carry several videos in lockstep (a batch): the frame is then [B, P, C], one
frame of each video, and row b of the instructions, of the visual bank and of the query
banks belongs to video b. Rows never mix, so each video's result equals running it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import InstructBlipQFormerConfig
from transformers.activations import ACT2FN

from .memory_bank import MemoryBank
from .visual_track import VisualTrack

__all__ = ["MemoryQFormer", "QFormerMemory"]


@dataclass
class QFormerMemory:
    """All memory state of one video stream (or one lockstep batch of videos) inside the Q-Former.

    ``query`` holds every layer's query bank as one grouped bank (group i = layer i): they
    have the same shape and history, so they are compressed together, once per frame.
    ``track``: the visual bank's record, being written (an unsealed track) or replayed (a
    sealed one: then ``visual`` holds no features).
    """

    visual: MemoryBank
    query: MemoryBank
    cache_projections: bool = True
    track: VisualTrack | None = None

    @property
    def replaying(self) -> bool:
        return self.track is not None and self.track.sealed

    @property
    def frames(self) -> int:
        """Frames seen so far (every frame is pushed to the visual bank, whatever M)."""
        return self.visual.frames_seen

    @classmethod
    def empty(cls, capacity: int, num_layers: int, num_heads: int, cache_projections: bool = True,
              cross_layers: Sequence[int] = (), track: VisualTrack | None = None) -> QFormerMemory:
        # Cached keys/values are stored head-major, ready for attention: the visual bank keeps
        # those of every cross-attention layer (one buffer), each query bank its layer's.
        if not cache_projections:
            if track is not None:
                raise ValueError("a visual track records cached keys/values: it needs cache_projections")
            return cls(MemoryBank(capacity), MemoryBank(capacity, groups=num_layers), False)
        if track is not None and track.capacity != capacity:
            raise ValueError(f"the visual track was recorded with M={track.capacity}, not {capacity}")
        replay = track is not None and track.sealed
        visual = MemoryBank(capacity, num_heads, extra_names=_cross_names(cross_layers), keep_features=not replay)
        query = MemoryBank(capacity, num_heads, groups=num_layers, extra_names=("k", "v"))
        return cls(visual, query, True, track)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows: the videos of a lockstep batch that go on."""
        self.visual.keep_rows(rows)
        self.query.keep_rows(rows)


def _cross_names(cross_layers: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{kind}{i}" for i in cross_layers for kind in "kv")


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _project(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """x [B, S, K] through each linear layer -> [len(layers), B, S, H], stacked.

    Under inference each projection writes straight into its slice of the stacked result
    (addmm with out=, the kernel F.linear runs too), so stacking them copies nothing.
    """
    flat = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled():
        out = torch.stack([_linear(flat, layer) for layer in layers])
    else:
        out = flat.new_empty(len(layers), flat.shape[0], layers[0].out_features)
        for i, layer in enumerate(layers):
            torch.addmm(layer.bias, flat, layer.weight.t(), out=out[i])
    return out.view(len(layers), *x.shape[:-1], -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, bias: torch.Tensor | None):
    """Multi-head attention over head-major keys/values, fused.

    q [B, L, H]; k, v [B or 1, heads, S, H/heads], each head's keys contiguous (as the banks
    store them); bias [B, 1, 1, S] additive (0 or -inf, q's dtype) or None. The fused kernel
    (scaled_dot_product_attention) never materializes the [heads, L, S] scores: with 32
    queries against 5,397 keys it ran 1.1-1.4x faster than matmul, softmax, matmul.
    """
    B, L, H = q.shape
    if k.shape[0] != B:  # one video's visual bank read by several instructions
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
    q = q.view(B, L, num_heads, H // num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, L, d]
    return out.transpose(1, 2).reshape(B, L, H)


def _mask_bias(key_mask: torch.Tensor, entries: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] bool (False at padding) -> [B, 1, 1, N * entries] additive mask for
    position-major bank keys (all entries of token 0, then of token 1, ...)."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(~key_mask, float("-inf"))
    return bias.repeat_interleave(entries, dim=1)[:, None, None, :]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H] -> [B, heads, S, H/heads], contiguous per head."""
    B, S, H = x.shape
    return x.view(B, S, num_heads, H // num_heads).transpose(1, 2).contiguous()


def _entries_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Projected bank entries [B, T, N, H] -> [B, heads, N * T, H/heads], position-major like
    the banks' cached keys (so one mask layout serves both paths)."""
    return _heads(x.transpose(1, 2).flatten(1, 2), num_heads)


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        kv_size = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_size, config.hidden_size)
        self.value = nn.Linear(kv_size, config.hidden_size)


class QFormerSelfOutput(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # Functional calls: the per-frame step is small enough that module-call overhead shows.
        hidden = _linear(hidden, self.dense)
        if self.training:
            hidden = self.dropout(hidden)
        ln = self.LayerNorm
        return F.layer_norm(hidden + residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class QFormerAttention(nn.Module):
    """Attention + output projection, residual and LayerNorm (BERT post-norm)."""

    def __init__(self, config: InstructBlipQFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerSelfOutput(config)


class QFormerIntermediate(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(_linear(hidden, self.dense))


class QFormerOutput(QFormerSelfOutput):
    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class QFormerLayer(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        # Text tokens and query tokens have separate feed-forward weights (InstructBLIP).
        self.intermediate = QFormerIntermediate(config)
        self.output = QFormerOutput(config)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config)

    def self_attention(self, hidden: torch.Tensor, bias: torch.Tensor | None, bank: MemoryBank, layer: int,
                       cache: bool):
        """hidden [B, N, H] joins this layer's query bank (group `layer`) and attends over all of it.

        bias: [B, 1, 1, N * entries] from :func:`_mask_bias` (instruction padding), or None.
        """
        attn = self.attention.attention
        if cache:
            bank.stage(hidden, layer, _project(hidden, (attn.key, attn.value)))
            keys, values = bank.slots("k", layer), bank.slots("v", layer)  # [B, heads, (T+1) * N, d]
        else:
            bank.stage(hidden, layer)
            entries = bank.slots(group=layer)
            keys = _entries_to_heads(_linear(entries, attn.key), attn.num_heads)
            values = _entries_to_heads(_linear(entries, attn.value), attn.num_heads)
        out = _attend(_linear(hidden, attn.query), keys, values, attn.num_heads, bias)
        return self.attention.output(out, hidden)

    def cross_attention(self, queries: torch.Tensor, frame_kv: tuple[torch.Tensor, torch.Tensor]):
        """queries [B, Q, H] attend over visual keys/values [B or 1, heads, S, d]; all tokens valid."""
        attn = self.crossattention.attention
        out = _attend(_linear(queries, attn.query), frame_kv[0], frame_kv[1], attn.num_heads, None)
        return self.crossattention.output(out, queries)

    def feed_forward(self, hidden: torch.Tensor, query_length: int) -> torch.Tensor:
        queries = hidden[:, :query_length]
        out = self.output_query(self.intermediate_query(queries), queries)
        if hidden.shape[1] > query_length:
            text = hidden[:, query_length:]
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class QFormerEncoder(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])


class QFormerEmbeddings(nn.Module):
    """Query tokens followed by the instruction's word + position embeddings, then LayerNorm."""

    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, query_embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        text = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :L])
        embeddings = torch.cat([query_embeds.to(text.dtype), text], dim=1)
        return self.dropout(self.layernorm(embeddings.to(self.layernorm.weight.dtype)))


class MemoryQFormer(nn.Module):
    """Q-Former that processes a video frame by frame with MA-LMM's memory banks."""

    def __init__(self, config: InstructBlipQFormerConfig, num_query_tokens: int = 32):
        super().__init__()
        self.config = config
        self.num_query_tokens = num_query_tokens
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)
        self.cross_layers = [i for i, layer in enumerate(self.encoder.layer) if layer.has_cross_attention]

    def embed(self, query_tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, Q, H] query tokens + [B, L] instruction ids -> [B, Q + L, H]; constant per stream."""
        return self.embeddings(query_tokens, input_ids)

    def new_memory(self, capacity: int, cache_projections: bool = True,
                   track: VisualTrack | None = None) -> QFormerMemory:
        return QFormerMemory.empty(capacity, len(self.encoder.layer), self.config.num_attention_heads,
                                   cache_projections, self.cross_layers, track)

    def _cross_projections(self) -> list[nn.Linear]:
        """Key and value projections of every cross-attention layer, in the visual bank's order."""
        out = []
        for i in self.cross_layers:
            attn = self.encoder.layer[i].crossattention.attention
            out += [attn.key, attn.value]
        return out

    def _push_frame(self, frame: torch.Tensor, memory: QFormerMemory) -> dict[int, tuple]:
        """Add the frame to the visual bank; per cross-attention layer, keys/values over the
        whole bank, current frame included, each [V, heads, S, d]. Replaying a track, the
        frame's keys/values come from it (and `frame` is not read)."""
        bank, out = memory.visual, {}
        if memory.cache_projections:
            if memory.replaying:
                bank.push(None, memory.track.frame(bank.frames_seen)[0])
            else:
                keys_values = _project(frame, self._cross_projections())  # [2 * layers, V, P, H]
                bank.push(frame, keys_values)
                if memory.track is not None:
                    memory.track.record(keys_values)  # its merges at the end of the step
            for i in self.cross_layers:
                out[i] = (bank.slots(f"k{i}"), bank.slots(f"v{i}"))
        else:
            bank.push(frame)
            entries = bank.slots()
            for i in self.cross_layers:
                attn = self.encoder.layer[i].crossattention.attention
                out[i] = (_entries_to_heads(_linear(entries, attn.key), attn.num_heads),
                          _entries_to_heads(_linear(entries, attn.value), attn.num_heads))
        return out

    def step(
        self, embeddings: torch.Tensor, key_mask: torch.Tensor | None, frame: torch.Tensor, memory: QFormerMemory
    ) -> torch.Tensor:
        """Run the Q-Former for one frame and update ``memory`` in place (inference: no dropout).

        embeddings: [B, N, H] from :meth:`embed` (query tokens + instruction), constant per stream.
        key_mask: [B, N] bool, False at instruction padding; None when nothing is padded.
        frame: [1, P, C_vision] this frame's vision features (temporal position already added),
        read by all B rows; or [B, P, C_vision], one frame per row (a lockstep batch of videos).
        Returns the last hidden states [B, N, H]; the first ``num_query_tokens`` are the output.
        """
        B = embeddings.shape[0]
        if frame.dim() != 3 or frame.shape[0] not in (1, B):
            raise ValueError(f"step takes one frame's features [1, P, C] or one per row [{B}, P, C], "
                             f"got {tuple(frame.shape)}")
        query_length = self.num_query_tokens
        frame_kv = self._push_frame(frame, memory)
        # Every query bank holds the same number of entries, each with the same padding.
        entries = memory.query.length + 1
        bias = None if key_mask is None else _mask_bias(key_mask, entries, embeddings.dtype)
        hidden = embeddings
        for i, layer in enumerate(self.encoder.layer):
            hidden = layer.self_attention(hidden, bias, memory.query, i, memory.cache_projections)
            if layer.has_cross_attention:
                queries = layer.cross_attention(hidden[:, :query_length], frame_kv[i])
                hidden = torch.cat([queries, hidden[:, query_length:]], dim=1)
            hidden = layer.feed_forward(hidden, query_length)
        # Both kinds of bank compress back to M only now: nothing reads them until the next frame.
        memory.query.commit()
        memory.query.settle()
        self._settle_visual(memory)
        return hidden

    @staticmethod
    def _settle_visual(memory: QFormerMemory) -> None:
        """Compress the visual bank: as recorded when replaying a track, and recorded when writing one."""
        bank, track = memory.visual, memory.track
        if track is None:
            bank.settle()
        elif track.sealed:
            bank.settle(track.frame(bank.frames_seen - 1)[1])
        else:
            track.record_merges(bank.settle())
