"""MALMM: InstructBLIP-Vicuna reading a video online, one frame at a time, with MA-LMM's memory.

Per frame t (method.md):
  1. f_t = post_layernorm(ViT(frame_t)) + PE[t]              -- vision, batched over chunks
  2. Q-Former step: queries cross-attend to [visual bank; f_t], each self-attention also
     sees its layer's query bank; then banks append and compress (MBC) down to M entries.
At the end, the 32 query outputs of the last step go through the projection and are
prepended to the prompt for the LLM: 32 visual tokens however long the video.

A :class:`VideoStream` owns all memory state of one video; the modules hold none, so
several streams can be alive at once and nothing leaks from one video to the next. A
:class:`VideoBatch` reads several videos in lockstep through one batched step per frame.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .memory_bank import BankStatus
from .qformer import MemoryQFormer, QFormerMemory

__all__ = ["MALMM", "VideoStream", "VideoBatch", "ImageSpec", "TEMPORAL_SLOTS", "DEFAULT_MODEL"]

DEFAULT_MODEL = "Salesforce/instructblip-vicuna-7b"
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


@contextlib.contextmanager
def _expected_llm_warnings() -> Iterator[None]:
    """Silence notices about intended behaviour that would repeat on every call: bitsandbytes'
    8-bit CPU matmul logs that it casts its inputs to fp16, each time."""
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
            yield
    finally:
        bnb_log.setLevel(level)


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


def _encode_instructions(model: MALMM, instructions: list[str]):
    """Token ids [B, L], key mask [B, Q+L] (None when nothing is padded) and the Q-Former's
    input embeddings [B, Q+L, H] of the instructions: constant over a video, computed once."""
    qtok = model.qformer_tokenizer(
        instructions, padding="longest", truncation=True, max_length=QFORMER_MAX_TEXT, return_tensors="pt"
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
    """The memory state of one video being read; create with :meth:`MALMM.new_stream`."""

    def __init__(
        self, model: MALMM, instructions: list[str], total_frames: int | None, memory_bank_length: int,
        cache_projections: bool,
    ):
        self.model = model
        self.instructions = instructions
        self.total_frames = total_frames
        self.input_ids, self.key_mask, self.embeddings = _encode_instructions(model, instructions)
        self.state: QFormerMemory = model.qformer.new_memory(memory_bank_length, cache_projections)
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

    def __init__(self, model: MALMM, instructions: list[str], total_frames: list[int | None],
                 memory_bank_length: int, cache_projections: bool):
        self.model = model
        self.instructions = instructions
        self.total_frames = total_frames
        self.input_ids, key_mask, embeddings = _encode_instructions(model, instructions)
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


class MALMM(nn.Module):
    """Vision encoder + temporal position + memory Q-Former + projection + LLM.

    Build with :meth:`from_pretrained`. The parameter names are InstructBLIP's
    (``vision_model``, ``query_tokens``, ``qformer``, ``language_projection``,
    ``language_model``) plus MA-LMM's ``temporal_embedding``.
    """

    def __init__(
        self,
        *,
        vision_model: nn.Module,
        query_tokens: nn.Parameter,
        qformer: MemoryQFormer,
        language_projection: nn.Linear,
        language_model: nn.Module,
        tokenizer,
        qformer_tokenizer,
        memory_bank_length: int = 20,
        name: str = "",
        image_spec: ImageSpec | None = None,
    ):
        super().__init__()
        if memory_bank_length < 0:
            raise ValueError(f"memory_bank_length must be >= 0, got {memory_bank_length}")
        self.vision_model = vision_model
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = language_projection
        self.language_model = language_model
        width = vision_model.config.hidden_size
        self.temporal_embedding = nn.Embedding(TEMPORAL_SLOTS, width, device=query_tokens.device)
        nn.init.zeros_(self.temporal_embedding.weight)  # zero-shot: no temporal signal until finetuned
        self.temporal_embedding.to(qformer.embeddings.layernorm.weight.dtype)
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.memory_bank_length = memory_bank_length
        self.num_query_tokens = query_tokens.shape[1]
        self.name = name
        size = vision_model.config.image_size
        self.image_spec = image_spec or ImageSpec((size, size))
        self.quantization: str | None = None  # as loaded: None, "8bit" or "4bit"
        self.overlay_report = None  # models.overlay.OverlayReport of an overlaid MA-LMM checkpoint
        self.trained_frames: int | None = None  # T_train of that checkpoint: temporal rows it trained
        self.eval()

    @property
    def trained_config(self):
        """What an overlaid checkpoint's config says of its training (TrainedConfig), or None."""
        return self.overlay_report.config if self.overlay_report is not None else None

    @classmethod
    def from_pretrained(cls, src: str = DEFAULT_MODEL, **kwargs) -> MALMM:
        """Load InstructBLIP weights (hub id or local dir) plus an optional MA-LMM overlay.

        See :func:`models.loading.load_malmm` for the arguments.
        """
        from .loading import load_malmm

        return load_malmm(src, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def set_qformer_dtype(self, dtype: torch.dtype) -> None:
        """Run the Q-Former, query tokens, projection and temporal embedding in `dtype`."""
        for module in (self.qformer, self.language_projection, self.temporal_embedding):
            module.to(dtype)
        self.query_tokens.data = self.query_tokens.data.to(dtype)

    @property
    def qformer_dtype(self) -> torch.dtype:
        return self.qformer.embeddings.layernorm.weight.dtype

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    # ---- vision -----------------------------------------------------------------------

    @torch.inference_mode()
    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, P, C]: ViT + post-LayerNorm (InstructBLIP's ln_vision), batched."""
        pixel_values = pixel_values.to(self.device, self.vision_dtype)
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    # ---- streams ----------------------------------------------------------------------

    def new_stream(
        self,
        instructions: str | Sequence[str],
        *,
        total_frames: int | None = None,
        memory_bank_length: int | None = None,
        cache_projections: bool = True,
    ) -> VideoStream:
        """Start reading a video. One row per instruction; all rows see the same frames.

        ``memory_bank_length`` overrides the model's M for this stream. ``total_frames``, when
        known, spreads videos longer than 120 frames over the temporal position slots (see
        :func:`temporal_slot`). ``cache_projections=False`` re-projects the banks at every frame
        (the straightforward path; same results, slower). Several videos at once: :meth:`new_batch`.
        """
        if isinstance(instructions, str):
            instructions = [instructions]
        instructions = list(instructions)
        if not instructions:
            raise ValueError("new_stream needs at least one instruction")
        M = self.memory_bank_length if memory_bank_length is None else memory_bank_length
        if M < 0:
            raise ValueError(f"memory_bank_length must be >= 0, got {M}")
        with torch.inference_mode():
            return VideoStream(self, instructions, total_frames, M, cache_projections)

    def new_batch(
        self,
        instructions: Sequence[str],
        *,
        total_frames: int | Sequence[int | None] | None = None,
        memory_bank_length: int | None = None,
        cache_projections: bool = True,
    ) -> VideoBatch:
        """Start reading B videos in lockstep: instruction b goes with video b (see :class:`VideoBatch`).

        ``total_frames``: one count for all videos or one per video (None where unknown).
        """
        instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        if not instructions:
            raise ValueError("new_batch needs at least one instruction (one per video)")
        totals = list(total_frames) if isinstance(total_frames, Sequence) else [total_frames] * len(instructions)
        if len(totals) != len(instructions):
            raise ValueError(f"{len(totals)} total_frames for {len(instructions)} videos")
        M = self.memory_bank_length if memory_bank_length is None else memory_bank_length
        if M < 0:
            raise ValueError(f"memory_bank_length must be >= 0, got {M}")
        with torch.inference_mode():
            return VideoBatch(self, instructions, totals, M, cache_projections)

    # ---- language model -----------------------------------------------------------------

    def _prefix(self, stream: VideoStream | VideoBatch, prompts: Sequence[str] | None):
        """LLM input for each row: [pad ... pad][32 visual tokens][BOS prompt], left-padded.

        Padding goes in front of the visual tokens, so every row's real tokens are contiguous;
        with rotary positions the results equal those of each row alone.
        """
        prompts = list(stream.instructions if prompts is None else prompts)
        visual = stream.visual_tokens()  # [B or 1, Q, D]
        if visual.shape[0] == 1 and len(prompts) > 1:
            visual = visual.expand(len(prompts), -1, -1)
        if visual.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for a stream of {visual.shape[0]} instructions")
        embed = self.language_model.get_input_embeddings()
        # BOS is added here rather than by the tokenizer's own settings, which vary between
        # checkpoints; its id was checked at load time (InstructBLIP-Vicuna: "</s>", id 2).
        bos = self.tokenizer.bos_token_id
        ids = [[bos] + x for x in self.tokenizer(prompts, add_special_tokens=False).input_ids]
        Q = visual.shape[1]
        S = Q + max(len(x) for x in ids)
        pad_id = self.pad_token_id
        rows, masks = [], []
        for b, row_ids in enumerate(ids):
            n_pad = S - Q - len(row_ids)
            tokens = torch.tensor([pad_id] * n_pad + row_ids, device=self.device)
            emb = embed(tokens)  # [n_pad + len, D]
            rows.append(torch.cat([emb[:n_pad], visual[b].to(emb.dtype), emb[n_pad:]], dim=0))
            masks.append(torch.tensor([0] * n_pad + [1] * (S - n_pad), device=self.device))
        return torch.stack(rows), torch.stack(masks)

    @torch.inference_mode()
    def generate(
        self,
        stream: VideoStream | VideoBatch,
        prompts: Sequence[str] | None = None,
        *,
        max_new_tokens: int = 30,
        num_beams: int = 5,
        min_new_tokens: int = 1,
        repetition_penalty: float = 1.5,
        length_penalty: float = 1.0,
        **generate_kwargs,
    ) -> list[str]:
        """Answer each prompt about the stream's video. Defaults follow LAVIS's generate.

        ``prompts`` defaults to the stream's instructions (the paper uses the same text for the
        Q-Former instruction and the LLM prompt).
        """
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        inputs_embeds, attention_mask = self._prefix(stream, prompts)
        # The penalty covers generated tokens only, as in LAVIS (which passes embeddings, not
        # ids). It is passed as an explicit processor because transformers 5 offsets it by each
        # row's left padding, which exempts a padded row's first generated tokens.
        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
        with _expected_llm_warnings():
            out = self.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                logits_processor=processors,
                repetition_penalty=None,
                length_penalty=length_penalty,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.pad_token_id,
                bos_token_id=self.tokenizer.bos_token_id,
                **generate_kwargs,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.inference_mode()
    def score(
        self, stream: VideoStream | VideoBatch, prompts: Sequence[str] | None, candidates: Sequence[str], *,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Log-likelihood of each candidate answer after each prompt: [B, len(candidates)].

        log p(candidate tokens, then EOS | visual tokens, prompt), summed over tokens: the
        probability that the model answers exactly this candidate. The prompt prefix runs
        once; candidates are scored in batches against a copy of its key/value cache.
        """
        if not candidates:
            raise ValueError("score needs at least one candidate")
        inputs_embeds, attention_mask = self._prefix(stream, prompts)
        with _expected_llm_warnings():
            return self._score(inputs_embeds, attention_mask, candidates, batch_size)

    def _fp32_log_probs(self, hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Log-probabilities from the LLM's last hidden states with the output layer in fp32: the
        scores of different labels are compared with each other, and a bf16 logit carries only
        about 3 significant digits."""
        weight, bias = head
        return torch.nn.functional.linear(hidden.float(), weight, bias).log_softmax(-1)

    def _score(self, inputs_embeds, attention_mask, candidates: Sequence[str], batch_size: int) -> torch.Tensor:
        B = inputs_embeds.shape[0]
        lm_head = self.language_model.get_output_embeddings()
        head = (lm_head.weight.float(), None if lm_head.bias is None else lm_head.bias.float())
        decoder = self.language_model.get_decoder()
        prefix = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True)
        first_logp = self._fp32_log_probs(prefix.last_hidden_state[:, -1], head)  # [B, V]
        eos = self.tokenizer.eos_token_id
        cand_ids = [ids + [eos] for ids in self.tokenizer(list(candidates), add_special_tokens=False).input_ids]
        scores = torch.empty(B, len(candidates))
        per_chunk = max(1, batch_size // B)
        for start in range(0, len(cand_ids), per_chunk):
            chunk = cand_ids[start : start + per_chunk]
            scores[:, start : start + len(chunk)] = self._score_chunk(
                decoder, head, prefix.past_key_values, attention_mask, first_logp, chunk
            )
        return scores

    def _score_chunk(self, decoder, head, prefix_cache, prefix_mask, first_logp, chunk: list[list[int]]) -> torch.Tensor:
        B, c = prefix_mask.shape[0], len(chunk)
        L = max(len(ids) for ids in chunk)
        tokens = torch.zeros(c, L, dtype=torch.long, device=self.device)
        valid = torch.zeros(c, L, dtype=torch.bool, device=self.device)
        for i, ids in enumerate(chunk):
            tokens[i, : len(ids)] = torch.tensor(ids, device=self.device)
            valid[i, : len(ids)] = True
        total = first_logp[:, tokens[:, 0]]  # [B, c]: the first token comes from the prefix
        if L > 1:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(c)  # rows: b0c0 .. b0c(c-1), b1c0, ...
            rows_tokens = tokens.repeat(B, 1)  # [B*c, L]
            mask = torch.cat([prefix_mask.repeat_interleave(c, dim=0), valid.repeat(B, 1).long()], dim=1)
            out = decoder(input_ids=rows_tokens[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache)
            logp = self._fp32_log_probs(out.last_hidden_state, head)  # [B*c, L-1, V]
            picked = logp.gather(-1, rows_tokens[:, 1:, None]).squeeze(-1)  # [B*c, L-1]
            picked = picked.masked_fill(~valid[:, 1:].repeat(B, 1), 0.0)
            total = total + picked.sum(-1).view(B, c)
        return total.cpu()
