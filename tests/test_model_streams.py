"""Streams: chunking, isolation, the cached fast path, temporal positions, generate and score."""

from __future__ import annotations

import pytest
import torch

from models import MALMM
from models.malmm import TEMPORAL_SLOTS, temporal_slot

INSTRUCTIONS = ["what does the video describe?", "who wins?"]


def test_one_frame_at_a_time_equals_chunks(tiny_model, pixels):
    a = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=3)
    for t in range(8):
        a.add_frames(pixels[t : t + 1])
    b = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=3)
    b.add_frames(pixels[:5])
    b.add_frames(pixels[5:])
    torch.testing.assert_close(a.query_output(), b.query_output(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.visual_tokens(), b.visual_tokens(), rtol=1e-5, atol=1e-5)
    assert a.memory == b.memory
    assert a.frames_seen == b.frames_seen == 8


def test_streams_are_isolated_when_interleaved(tiny_model, pixels):
    other = torch.flip(pixels, dims=[0]) * 0.5
    x = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=2)
    y = tiny_model.new_stream(["who wins?"], memory_bank_length=3)
    for t in range(6):  # interleaved
        x.add_frames(pixels[t : t + 1])
        y.add_frames(other[t : t + 1])
    x_alone = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=2)
    x_alone.add_frames(pixels[:6])
    y_alone = tiny_model.new_stream(["who wins?"], memory_bank_length=3)
    y_alone.add_frames(other[:6])
    torch.testing.assert_close(x.query_output(), x_alone.query_output(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.query_output(), y_alone.query_output(), rtol=1e-5, atol=1e-5)
    assert y.memory.length == 3 and x.memory.length == 2


def test_nothing_leaks_into_the_next_video(tiny_model, pixels):
    first = tiny_model.new_stream(INSTRUCTIONS)
    first.add_frames(pixels[:1])
    reference = first.query_output().clone()
    busy = tiny_model.new_stream(INSTRUCTIONS)
    busy.add_frames(pixels[1:])
    again = tiny_model.new_stream(INSTRUCTIONS)
    again.add_frames(pixels[:1])
    torch.testing.assert_close(again.query_output(), reference)
    assert not any(isinstance(v, torch.Tensor) for v in vars(tiny_model.qformer).values())


def test_cached_projections_equal_the_straightforward_path(tiny_model):
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(20, 257, 32, generator=gen).cumsum(dim=0)  # slowly drifting frames
    fast = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=5, cache_projections=True)
    slow = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=5, cache_projections=False)
    for t in range(20):
        fast.add_features(feats[t : t + 1])
        slow.add_features(feats[t : t + 1])
        torch.testing.assert_close(fast.query_output(), slow.query_output(), rtol=1e-4, atol=1e-4)
    assert fast.memory.compressions == slow.memory.compressions == 15


def test_memory_status_reports_the_bank(tiny_model, pixels):
    stream = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=3)
    assert stream.memory.length == 0 and stream.frames_seen == 0
    stream.add_frames(pixels[:7])
    status = stream.memory
    assert (status.capacity, status.length, status.frames_seen, status.compressions) == (3, 3, 7, 4)
    assert sum(status.slot_frames) == pytest.approx(7)
    assert status.slot_spans[0][0] == 0 and status.slot_spans[-1][1] == 6


def test_temporal_slot_mapping():
    assert [temporal_slot(t, None) for t in (0, 1, 119, 120, 5000)] == [0, 1, 119, 119, 119]
    assert [temporal_slot(t, 100) for t in (0, 99)] == [0, 99]  # up to 120 frames: slot t
    slots = [temporal_slot(t, 600) for t in range(600)]  # longer: proportional, in order
    assert slots[0] == 0 and slots[-1] == TEMPORAL_SLOTS - 1
    assert all(b - a in (0, 1) for a, b in zip(slots, slots[1:]))
    assert all(slots.count(s) == 5 for s in range(TEMPORAL_SLOTS))  # 600 frames: 5 per slot


@pytest.fixture(scope="module")
def pe_model(tiny_dir):
    model = MALMM.from_pretrained(str(tiny_dir), memory_bank_length=0, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model.temporal_embedding.weight.copy_(torch.randn(TEMPORAL_SLOTS, 32, generator=torch.Generator().manual_seed(3)))
    return model


@pytest.mark.parametrize("total, frame, slot", [(None, 5, 5), (None, 130, 119), (240, 130, 65), (240, 239, 119)])
def test_streams_add_the_temporal_embedding_of_the_right_slot(pe_model, total, frame, slot):
    """With M=0 each frame stands alone: frame `frame` of a stream must equal frame 0 of a
    fresh stream whose features carry PE[slot] - PE[0] (so that PE[0] + that = PE[slot])."""
    gen = torch.Generator().manual_seed(frame)
    feats = torch.randn(frame + 1, 257, 32, generator=gen)
    stream = pe_model.new_stream(["what does the video describe?"], total_frames=total)
    stream.add_features(feats)
    pe = pe_model.temporal_embedding.weight
    shifted = feats[frame : frame + 1] + (pe[slot] - pe[0]).detach()
    fresh = pe_model.new_stream(["what does the video describe?"], total_frames=total)
    fresh.add_features(shifted)
    torch.testing.assert_close(stream.query_output(), fresh.query_output(), rtol=1e-5, atol=1e-5)


def _full_loglik(model, stream, prompt, row, candidate):
    """log p(candidate + EOS) from one plain forward pass over the whole sequence, no cache."""
    tok = model.tokenizer
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    cand_ids = tok(candidate, add_special_tokens=False).input_ids + [tok.eos_token_id]
    embed = model.language_model.get_input_embeddings()
    with torch.no_grad():
        visual = stream.visual_tokens()[row]
        seq = torch.cat([visual, embed(torch.tensor(prompt_ids + cand_ids))])[None]
        logp = model.language_model(inputs_embeds=seq).logits[0].float().log_softmax(-1)
    start = visual.shape[0] + len(prompt_ids)
    return sum(float(logp[start - 1 + i, cid]) for i, cid in enumerate(cand_ids))


def test_score_is_the_log_likelihood_of_each_candidate(tiny_model, pixels):
    stream = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=3)
    stream.add_frames(pixels[:4])
    candidates = ["comedy", "romantic comedy with a twist", "a", "scrambled egg", "thriller"]
    scores = tiny_model.score(stream, None, candidates, batch_size=4)  # 2 candidates per chunk
    assert scores.shape == (2, len(candidates))
    for row, prompt in enumerate(INSTRUCTIONS):
        for c, cand in enumerate(candidates):
            assert float(scores[row, c]) == pytest.approx(_full_loglik(tiny_model, stream, prompt, row, cand), abs=1e-3)
    assert (scores < 0).all()


def test_score_with_one_stream_row_and_several_prompts(tiny_model, pixels):
    stream = tiny_model.new_stream(["what is the genre of the movie?"])
    stream.add_frames(pixels[:2])
    prompts = ["what is the genre of the movie?", "what is the scene of the movie?"]
    scores = tiny_model.score(stream, prompts, ["comedy", "office"])
    assert scores.shape == (2, 2)
    assert float(scores[1, 1]) == pytest.approx(_full_loglik(tiny_model, stream, prompts[1], 0, "office"), abs=1e-3)


def test_generate_and_score_need_frames_and_sane_arguments(tiny_model, pixels):
    stream = tiny_model.new_stream("what does the video describe?")
    with pytest.raises(RuntimeError, match="no frames"):
        tiny_model.generate(stream)
    stream.add_frames(pixels[:1])
    with pytest.raises(ValueError, match="at least one candidate"):
        tiny_model.score(stream, None, [])
    two_rows = tiny_model.new_stream(INSTRUCTIONS)
    two_rows.add_frames(pixels[:1])
    with pytest.raises(ValueError, match="3 prompts for a stream of 2"):
        tiny_model.generate(two_rows, ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one instruction"):
        tiny_model.new_stream([])
    with pytest.raises(ValueError, match="memory_bank_length"):
        tiny_model.new_stream("x", memory_bank_length=-1)
    texts = tiny_model.generate(stream, max_new_tokens=5, num_beams=2)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_a_bf16_qformer_stays_close_to_fp32_over_a_stream(tiny_dir):
    """The default for bf16 models: same weights, outputs within bf16 tolerance of fp32."""
    fp32 = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    bf16 = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, qformer_dtype=torch.bfloat16, device="cpu")
    feats = torch.randn(30, 257, 32, generator=torch.Generator().manual_seed(2)).cumsum(dim=0) / 5
    streams = [m.new_stream(INSTRUCTIONS, memory_bank_length=4) for m in (fp32, bf16)]
    for t in range(30):
        for stream in streams:
            stream.add_features(feats[t : t + 1])
        a, b = (s.query_output().float() for s in streams)
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999, f"frame {t}"
    assert streams[1].query_output().dtype == torch.bfloat16
