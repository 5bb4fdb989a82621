"""Streams: the memory state of videos being read, one frame at a time.

A :class:`VideoStream` owns all memory state of one video (the modules hold none), so several
streams can be alive at once and nothing leaks from one video to the next. A
:class:`VideoBatch` reads several videos in lockstep through one batched step per frame.
Both are made by a MALMM (``model.new_stream``, ``model.new_batch``) and keep a reference to
it; this module needs only the model's attributes, not its class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .constants import TEMPORAL_SLOTS
from .errors import ModelError
from .memory_bank import BankStatus
from .qformer import QFormerMemory
from .visual_track import VisualTrack

__all__ = ["VideoStream", "VideoBatch", "ConcatStream", "temporal_slot", "encode_instructions"]


def temporal_slot(t: int, total_frames: int | None, trained_frames: int | None = None) -> int:
    """Which row of the temporal position embedding frame t (0-based) uses.

    A finetuned checkpoint trained rows 0..T_train-1 only (slot t for frame t; later rows stay
    at their zero init). A longer video maps its frames onto the trained rows in order,
    slot = floor(t * T_train / total), when the stream knows its total; when it does not,
    frames past the last trained row share it. Without a checkpoint (zero-shot) the embedding
    is all zeros and the same rule runs over all 120 rows, with no effect.
    """
    slots = min(trained_frames, TEMPORAL_SLOTS) if trained_frames else TEMPORAL_SLOTS
    if total_frames is not None and total_frames > slots:
        return min(t * slots // total_frames, slots - 1)
    return min(t, slots - 1)


def encode_instructions(model, instructions: list[str]):
    """Token ids [B, L], key mask [B, Q+L] (None when nothing is padded) and the Q-Former's
    input embeddings [B, Q+L, H] of the instructions: constant over a video, computed once."""
    qtok = model.qformer_tokenizer(
        instructions, padding="longest", truncation=True, max_length=model.max_text_tokens, return_tensors="pt"
    )
    device = model.device
    input_ids = qtok.input_ids.to(device)  # [B, L]
    B, Q = len(instructions), model.num_query_tokens
    query_mask = torch.ones(B, Q, dtype=torch.bool, device=device)
    key_mask = torch.cat([query_mask, qtok.attention_mask.to(device).bool()], dim=1)  # [B, Q+L]
    query_tokens = model.query_tokens.expand(B, -1, -1).to(model.qformer_dtype)
    embeddings = model.qformer.embed(query_tokens, input_ids)
    return input_ids, (None if bool(key_mask.all()) else key_mask), embeddings  # no padding: no masking work


class VideoStream:
    """The memory state of one video being read; create with :meth:`MALMM.new_stream`.

    With a ``visual_track`` (models/visual_track.py) it records the visual bank into it (an
    empty track), or replays it (a sealed one): then each frame's keys/values and merges come
    from the track, and the features given to :meth:`add_features` only say how many frames
    come (they must be those the track was recorded from).
    """

    def __init__(
        self, model, instructions: list[str], total_frames: int | None, memory_bank_length: int,
        cache_projections: bool, visual_track: VisualTrack | None = None,
    ):
        if visual_track is not None:
            if visual_track.total_frames != total_frames:
                raise ValueError(f"the visual track was recorded for {visual_track.total_frames} frames in all, "
                                 f"not {total_frames}")
            if not visual_track.sealed and visual_track.frames:
                raise ValueError("a visual track is recorded by one stream, from its first frame")
        self.model = model
        self.instructions = instructions
        self.total_frames = total_frames
        self.visual_track = visual_track
        self.input_ids, self.key_mask, self.embeddings = encode_instructions(model, instructions)
        self.state: QFormerMemory = model.qformer.new_memory(memory_bank_length, cache_projections, visual_track)
        self._output: torch.Tensor | None = None

    @property
    def frames_seen(self) -> int:
        return self.state.frames

    @property
    def memory(self) -> BankStatus:
        """Status of the visual bank (the query banks have the same length and history)."""
        return self.state.visual.status()

    @torch.inference_mode()
    def add_frames(self, pixel_values: torch.Tensor) -> None:
        """Feed frames [n, 3, H, W] (preprocessed, in time order); the ViT runs on the whole chunk."""
        self.add_features(self.model.encode_frames(pixel_values))

    @torch.inference_mode()
    def add_features(self, features: torch.Tensor) -> None:
        """Feed vision features [n, P, C] from :meth:`MALMM.encode_frames`, in time order."""
        model = self.model
        features = features.to(model.device, model.qformer_dtype)
        for i in range(features.shape[0]):
            slot = temporal_slot(self.state.frames, self.total_frames, model.trained_frames)
            frame = features[i : i + 1] + model.temporal_embedding.weight[slot]  # [1, P, C]
            hidden = model.qformer.step(self.embeddings, self.key_mask, frame, self.state)
            self._output = hidden[:, : model.num_query_tokens]

    def query_output(self) -> torch.Tensor:
        """[B, 32, H_qformer]: the Q-Former output at the latest frame."""
        if self._output is None:
            raise RuntimeError("the stream has seen no frames yet")
        return self._output

    @torch.inference_mode()
    def visual_tokens(self) -> torch.Tensor:
        """[B, 32, H_llm]: what the LLM sees of the video."""
        return self.model.language_projection(self.query_output())


class VideoBatch:
    """Several videos read in lockstep, one instruction each; create with :meth:`MALMM.new_batch`.

    Each step takes one frame of every video, [B, P, C], and runs one batched Q-Former step:
    the per-step fixed cost (kernel launches, Python, bank bookkeeping) is paid once for all
    B videos, and the GEMMs get B times the rows. Row b (instruction b, video b) has its own
    banks; rows never mix, so each video's output equals reading it alone with
    :meth:`MALMM.new_stream` (up to float rounding). :meth:`MALMM.generate` and
    :meth:`MALMM.score` take a batch like a stream: one answer or score row per video.

    Videos may end at different frame counts: leave a video out of a step (``active``) and
    it has ended. Its output and :attr:`memory` stay as of its last frame, its rows leave
    the banks (later steps stop paying for it), and it cannot take frames again.
    """

    def __init__(self, model, instructions: list[str], total_frames: list[int | None],
                 memory_bank_length: int, cache_projections: bool):
        self.model = model
        self.instructions = instructions
        self.total_frames = total_frames
        self.input_ids, key_mask, embeddings = encode_instructions(model, instructions)
        self.state: QFormerMemory = model.qformer.new_memory(memory_bank_length, cache_projections)
        B = len(instructions)
        # Rows still in the banks: video ids, and their embeddings and key mask.
        self._live = torch.arange(B)
        self._embeddings, self._key_mask = embeddings, key_mask
        self._frames = [0] * B
        self._ended: dict[int, BankStatus] = {}  # video -> its memory status when it ended
        self._output: torch.Tensor | None = None  # [B, Q, H], each row as of its last frame

    @property
    def videos(self) -> int:
        return len(self.instructions)

    @property
    def frames_seen(self) -> tuple[int, ...]:
        """Frames each video has taken."""
        return tuple(self._frames)

    @property
    def memory(self) -> tuple[BankStatus, ...]:
        """Each video's visual bank status (as of its last frame for a video that ended)."""
        row = {int(b): r for r, b in enumerate(self._live)}
        return tuple(self._ended[b] if b in self._ended else self.state.visual.status(row[b])
                     for b in range(self.videos))

    def _going(self, active) -> torch.Tensor:
        """The ``active`` argument as a [B] bool tensor, checked against videos that ended."""
        if active is None:
            going = torch.ones(self.videos, dtype=torch.bool)
        else:
            going = torch.as_tensor(active, dtype=torch.bool).cpu().flatten()
            if going.numel() != self.videos:
                raise ValueError(f"active has {going.numel()} entries for a batch of {self.videos} videos")
        back = [b for b in self._ended if going[b]]
        if back:
            raise ValueError(f"video {back[0]} ended after {self._frames[back[0]]} frames and cannot take more")
        return going

    def _end(self, going: torch.Tensor) -> None:
        """Videos that sit out this step end: record their status, drop their rows."""
        stay = going[self._live]
        if bool(stay.all()):
            return
        for row in (~stay).nonzero().flatten().tolist():
            video = int(self._live[row])
            self._ended[video] = self.state.visual.status(row)
        keep = stay.nonzero().flatten()
        self._live = self._live[keep]
        self._embeddings = self._embeddings[keep.to(self._embeddings.device)]
        if self._key_mask is not None:
            self._key_mask = self._key_mask[keep.to(self._key_mask.device)]
        self.state.keep_rows(keep.to(self.model.device))

    @torch.inference_mode()
    def add_frames(self, pixel_values: torch.Tensor, active=None) -> None:
        """Feed one frame of each video [B, 3, H, W], or n steps [n, B, 3, H, W]; the ViT runs
        on all of them at once (active videos only)."""
        steps = pixel_values if pixel_values.dim() == 5 else pixel_values[None]
        if steps.dim() != 5 or steps.shape[1] != self.videos:
            raise ValueError(f"add_frames takes [{self.videos}, 3, H, W] or [n, {self.videos}, 3, H, W], "
                             f"got {tuple(pixel_values.shape)}")
        going = self._going(active)
        rows = going.nonzero().flatten()
        if not len(rows):  # every video has ended (or ends now): nothing to encode
            self._end(going)
            return
        n = steps.shape[0]
        encoded = self.model.encode_frames(steps[:, rows].flatten(0, 1))  # [n * active, P, C]
        features = encoded.new_zeros(n, self.videos, *encoded.shape[1:])
        features[:, rows.to(features.device)] = encoded.view(n, len(rows), *encoded.shape[1:])
        self.add_features(features, active)

    @torch.inference_mode()
    def add_features(self, features: torch.Tensor, active=None) -> None:
        """Feed one frame of each video [B, P, C], or n steps [n, B, P, C], from
        :meth:`MALMM.encode_frames`. ``active`` ([B] bools): the videos taking these frames;
        the others' rows are ignored, and a video left out has ended (see the class)."""
        model = self.model
        steps = features if features.dim() == 4 else features[None]
        if steps.dim() != 4 or steps.shape[1] != self.videos:
            raise ValueError(f"add_features takes [{self.videos}, P, C] or [n, {self.videos}, P, C], "
                             f"got {tuple(features.shape)}")
        self._end(self._going(active))
        if not len(self._live):  # every video has ended: nothing takes these frames
            return
        steps = steps.to(model.device, model.qformer_dtype)
        live, Q = self._live.tolist(), model.num_query_tokens
        if len(live) < self.videos:
            steps = steps[:, self._live.to(steps.device)]
        pe = model.temporal_embedding.weight
        for i in range(steps.shape[0]):
            t = self.state.frames  # the same for every live video: they all started together
            slots = [temporal_slot(t, self.total_frames[b], model.trained_frames) for b in live]
            frame = steps[i] + pe[slots][:, None]  # [live, P, C]
            hidden = model.qformer.step(self._embeddings, self._key_mask, frame, self.state)
            if self._output is None:
                self._output = hidden.new_zeros(self.videos, Q, hidden.shape[-1])
            self._output[self._live.to(hidden.device)] = hidden[:, :Q]
            for b in live:
                self._frames[b] += 1

    def query_output(self, videos: Sequence[int] | None = None) -> torch.Tensor:
        """[B, 32, H_qformer]: each video's Q-Former output at its latest frame (only `videos`,
        in that order, when given: e.g. those that did not fail)."""
        rows = range(self.videos) if videos is None else list(videos)
        unseen = [b for b in rows if self._frames[b] == 0]
        if unseen:
            raise RuntimeError(f"video {unseen[0]} of the batch has seen no frames yet")
        if videos is None:
            return self._output
        return self._output[torch.as_tensor(rows, dtype=torch.long, device=self._output.device)]

    @torch.inference_mode()
    def visual_tokens(self, videos: Sequence[int] | None = None) -> torch.Tensor:
        """[B, 32, H_llm]: what the LLM sees of each video (of `videos` only, when given)."""
        return self.model.language_projection(self.query_output(videos))


class ConcatStream:
    """The paper's no-memory baseline; create with ``MALMM.new_stream(..., concat=True)``.

    The official code with ``use_memory_bank=False`` (``blip2_vicuna_instruct.py`` lines
    211-252) runs the Q-Former on every frame on its own: the instruction and the 32 query
    tokens, cross-attention to that frame's features only, no bank and no temporal position
    (``image_pe`` is not added on that path). The LLM then sees all T x 32 outputs, in frame
    order: ``visual_tokens()`` is [B, T * 32, H_llm]. Memory and LLM context grow with T,
    which is what MA-LMM's bank avoids (60 frames made 1,920 LLM tokens in the paper).
    """

    def __init__(self, model, instructions: list[str]):
        self.model = model
        self.instructions = instructions
        self.total_frames = None
        self.input_ids, self.key_mask, self.embeddings = encode_instructions(model, instructions)
        self._outputs: list[torch.Tensor] = []  # per chunk: [B, n * 32, H], frame-major
        self._frames = 0
        # The LLM context must hold every frame's tokens and the prompt (a few dozen tokens).
        self.max_frames = max(1, (model.language_model.config.max_position_embeddings - 64) // model.num_query_tokens)

    @property
    def frames_seen(self) -> int:
        return self._frames

    @property
    def memory(self) -> BankStatus:
        """No bank: capacity 0; every frame reaches the LLM (one slot per frame, none merged)."""
        return BankStatus(0, 0, self._frames, 0, (), ())

    @torch.inference_mode()
    def add_frames(self, pixel_values: torch.Tensor) -> None:
        self.add_features(self.model.encode_frames(pixel_values))

    @torch.inference_mode()
    def add_features(self, features: torch.Tensor) -> None:
        """Feed vision features [n, P, C], in time order: n frames through the Q-Former at once,
        each frame a batch row with the instructions and nothing else."""
        model = self.model
        n, B, Q = features.shape[0], self.embeddings.shape[0], model.num_query_tokens
        if self._frames + n > self.max_frames:
            raise ModelError(f"Without memory (--concat) every frame puts {Q} tokens before the LLM, and this "
                             f"LLM takes {model.language_model.config.max_position_embeddings} tokens: at most "
                             f"{self.max_frames} frames; sample fewer (--frames).")
        frames = features.to(model.device, model.qformer_dtype).repeat_interleave(B, dim=0)  # [n * B, P, C]
        mask = None if self.key_mask is None else self.key_mask.repeat(n, 1)
        hidden = model.qformer.step(self.embeddings.repeat(n, 1, 1), mask, frames, model.qformer.new_memory(0))
        out = hidden[:, :Q].reshape(n, B, Q, -1).transpose(0, 1).reshape(B, n * Q, -1)  # frame-major per row
        self._outputs.append(out)
        self._frames += n

    def query_output(self) -> torch.Tensor:
        """[B, T * 32, H_qformer]: every frame's Q-Former output, in frame order."""
        if not self._outputs:
            raise RuntimeError("the stream has seen no frames yet")
        if len(self._outputs) > 1:
            self._outputs = [torch.cat(self._outputs, dim=1)]
        return self._outputs[0]

    @torch.inference_mode()
    def visual_tokens(self) -> torch.Tensor:
        """[B, T * 32, H_llm]: what the LLM sees of the video."""
        return self.model.language_projection(self.query_output())
