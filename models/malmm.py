"""MALMM: InstructBLIP-Vicuna reading a video online, one frame at a time, with MA-LMM's memory.

Per frame t (method.md):
  1. f_t = post_layernorm(ViT(frame_t)) + PE[t]              -- vision, batched over chunks
  2. Q-Former step: queries cross-attend to [visual bank; f_t], each self-attention also
     sees its layer's query bank; then banks append and compress (MBC) down to M entries.
At the end, the 32 query outputs of the last step go through the projection and are
prepended to the prompt for the LLM: 32 visual tokens however long the video.

The memory state lives in streams (models/streams.py), never in the modules.
:meth:`MALMM.from_pretrained` builds one from Hugging Face weights through models/loading.py,
which builds whatever class it is given, so the two modules do not import each other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .constants import CLIP_MEAN, CLIP_STD, DEFAULT_MODEL, QFORMER_MAX_TEXT, TEMPORAL_SLOTS, ImageSpec
from .loading import load_malmm
from .qformer import MemoryQFormer
from .quantize import expected_llm_warnings
from .streams import ConcatStream, VideoBatch, VideoStream, temporal_slot
from .visual_track import VisualTrack

# Re-exported: the constants and stream classes have always been importable from here.
__all__ = ["MALMM", "VideoStream", "VideoBatch", "ConcatStream", "ImageSpec", "TEMPORAL_SLOTS", "DEFAULT_MODEL", "CLIP_MEAN",
           "CLIP_STD", "QFORMER_MAX_TEXT", "temporal_slot"]


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
        # Instruction tokens kept (from the left) for the Q-Former, and for the LLM prompt in
        # training: LAVIS max_txt_len, 128 by default, what a checkpoint's config says otherwise.
        self.max_text_tokens = QFORMER_MAX_TEXT
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
        return load_malmm(src, model_class=cls, **kwargs)

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
    def encode_frames(self, pixel_values: torch.Tensor, *, pre_norm: bool = False) -> torch.Tensor:
        """[n, 3, H, W] -> [n, P, C]: ViT + post-LayerNorm (InstructBLIP's ln_vision), batched.
        ``pre_norm=True`` stops before that LayerNorm (what training with a trainable ln_vision
        caches: :func:`models.training.apply_ln_vision` then applies it)."""
        pixel_values = pixel_values.to(self.device, self.vision_dtype)
        if not pre_norm:
            return self.vision_model(pixel_values=pixel_values).last_hidden_state
        vision = self.vision_model
        return vision.encoder(inputs_embeds=vision.embeddings(pixel_values)).last_hidden_state

    # ---- streams ----------------------------------------------------------------------

    def new_stream(
        self,
        instructions: str | Sequence[str],
        *,
        total_frames: int | None = None,
        memory_bank_length: int | None = None,
        cache_projections: bool = True,
        concat: bool = False,
        visual_track: VisualTrack | None = None,
    ) -> VideoStream | ConcatStream:
        """Start reading a video. One row per instruction; all rows see the same frames.

        ``memory_bank_length`` overrides the model's M for this stream. ``total_frames``, when
        known, spreads videos longer than 120 frames over the temporal position slots (see
        :func:`temporal_slot`). ``cache_projections=False`` re-projects the banks at every frame
        (the straightforward path; same results, slower). ``visual_track``: an empty
        :class:`VisualTrack` (M and total_frames as here) records the visual bank; a sealed
        one, recorded from the same video by this model, is replayed instead of computed
        (same results, the instruction's work only). Several videos at once: :meth:`new_batch`.
        ``concat=True``: the paper's no-memory baseline instead (:class:`ConcatStream`: every
        frame's 32 query tokens go to the LLM; no bank, so neither M nor a track is used).
        """
        if isinstance(instructions, str):
            instructions = [instructions]
        instructions = list(instructions)
        if not instructions:
            raise ValueError("new_stream needs at least one instruction")
        if concat:
            with torch.inference_mode():
                return ConcatStream(self, instructions)
        M = self.memory_bank_length if memory_bank_length is None else memory_bank_length
        if M < 0:
            raise ValueError(f"memory_bank_length must be >= 0, got {M}")
        with torch.inference_mode():
            return VideoStream(self, instructions, total_frames, M, cache_projections, visual_track)

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
        with expected_llm_warnings():
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
        with expected_llm_warnings():
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
        # The key/value cache comes back under the name the decoder takes it by: `cache` in
        # transformers 5.2x (where `past_key_values` is deprecated, with a warning per call),
        # `past_key_values` before. Passing it back under the same name is right for both.
        cache_name = "cache" if "cache" in prefix else "past_key_values"
        first_logp = self._fp32_log_probs(prefix.last_hidden_state[:, -1], head)  # [B, V]
        eos = self.tokenizer.eos_token_id
        cand_ids = [ids + [eos] for ids in self.tokenizer(list(candidates), add_special_tokens=False).input_ids]
        scores = torch.empty(B, len(candidates))
        per_chunk = max(1, batch_size // B)
        for start in range(0, len(cand_ids), per_chunk):
            chunk = cand_ids[start : start + per_chunk]
            scores[:, start : start + len(chunk)] = self._score_chunk(
                decoder, head, (cache_name, prefix[cache_name]), attention_mask, first_logp, chunk
            )
        return scores

    def _score_chunk(self, decoder, head, prefix_cache: tuple[str, object], prefix_mask, first_logp,
                     chunk: list[list[int]]) -> torch.Tensor:
        """`prefix_cache`: (the decoder's name for its key/value cache, the prefix's cache)."""
        B, c = prefix_mask.shape[0], len(chunk)
        L = max(len(ids) for ids in chunk)
        tokens = torch.zeros(c, L, dtype=torch.long, device=self.device)
        valid = torch.zeros(c, L, dtype=torch.bool, device=self.device)
        for i, ids in enumerate(chunk):
            tokens[i, : len(ids)] = torch.tensor(ids, device=self.device)
            valid[i, : len(ids)] = True
        total = first_logp[:, tokens[:, 0]]  # [B, c]: the first token comes from the prefix
        if L > 1:
            cache_name, cache = prefix_cache[0], copy.deepcopy(prefix_cache[1])
            cache.batch_repeat_interleave(c)  # rows: b0c0 .. b0c(c-1), b1c0, ...
            rows_tokens = tokens.repeat(B, 1)  # [B*c, L]
            mask = torch.cat([prefix_mask.repeat_interleave(c, dim=0), valid.repeat(B, 1).long()], dim=1)
            out = decoder(input_ids=rows_tokens[:, :-1], attention_mask=mask[:, :-1], **{cache_name: cache})
            logp = self._fp32_log_probs(out.last_hidden_state, head)  # [B*c, L-1, V]
            picked = logp.gather(-1, rows_tokens[:, 1:, None]).squeeze(-1)  # [B*c, L-1]
            picked = picked.masked_fill(~valid[:, 1:].repeat(B, 1), 0.0)
            total = total + picked.sum(-1).view(B, c)
        return total.cpu()
