"""Parity with transformers' InstructBlipForConditionalGeneration on the same tiny weights.

With no memory (M=0) or a single frame, MA-LMM is exactly InstructBLIP on that frame.
"""

from __future__ import annotations

import pytest
import torch

INSTRUCTIONS = ["what does the video describe?", "Question: who wins? Short answer:"]


def _hf_qformer(hf_model, hf_processor, pixel_values, instructions):
    """transformers' per-image Q-Former output [B, 32, H] and projected tokens [B, 32, D]."""
    q = hf_processor.qformer_tokenizer(instructions, padding="longest", return_tensors="pt")
    B = len(instructions)
    with torch.no_grad():
        out = hf_model.get_image_features(
            pixel_values.expand(B, -1, -1, -1), qformer_input_ids=q.input_ids,
            qformer_attention_mask=q.attention_mask, return_dict=True,
        )
    return out.qformer_outputs.last_hidden_state[:, :32], out.pooler_output


def _hf_generate(hf_model, hf_processor, pixel_values, prompt, **kwargs):
    tok = hf_processor.tokenizer
    q = hf_processor.qformer_tokenizer([prompt], return_tensors="pt")
    ids = [hf_model.config.image_token_index] * 32 + tok(prompt).input_ids
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model.generate(
            pixel_values=pixel_values, qformer_input_ids=q.input_ids, qformer_attention_mask=q.attention_mask,
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, **kwargs,
        )
    new = out[0, input_ids.shape[1]:] if torch.equal(out[0, : input_ids.shape[1]], input_ids[0]) else out[0]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_vision_features_equal_transformers(tiny_model, hf_model, pixels):
    ours = tiny_model.encode_frames(pixels[:3])
    with torch.no_grad():
        theirs = hf_model.vision_model(pixel_values=pixels[:3]).last_hidden_state
    assert ours.shape == (3, 257, 32)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("memory", [0, 4])
def test_single_frame_equals_instructblip(tiny_model, hf_model, hf_processor, pixels, memory):
    stream = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=memory)
    stream.add_frames(pixels[:1])
    ref_query, ref_tokens = _hf_qformer(hf_model, hf_processor, pixels[:1], INSTRUCTIONS)
    torch.testing.assert_close(stream.query_output(), ref_query, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.visual_tokens(), ref_tokens, rtol=1e-5, atol=1e-5)


def test_no_memory_treats_each_frame_on_its_own(tiny_model, hf_model, hf_processor, pixels):
    stream = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=0)
    for t in range(4):
        stream.add_frames(pixels[t : t + 1])
        ref_query, _ = _hf_qformer(hf_model, hf_processor, pixels[t : t + 1], INSTRUCTIONS)
        torch.testing.assert_close(stream.query_output(), ref_query, rtol=1e-5, atol=1e-5)
    assert stream.memory.length == 0 and stream.frames_seen == 4


def test_memory_changes_the_output_after_the_first_frame(tiny_model, hf_model, hf_processor, pixels):
    """Guards the parity tests against a memory that silently does nothing."""
    stream = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=4)
    stream.add_frames(pixels[:3])
    alone, _ = _hf_qformer(hf_model, hf_processor, pixels[2:3], INSTRUCTIONS)
    assert (stream.query_output() - alone).abs().max() > 1e-3


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prompt", INSTRUCTIONS)
def test_generation_equals_instructblip(tiny_model, hf_model, hf_processor, pixels, prompt, num_beams):
    kwargs = dict(max_new_tokens=12, num_beams=num_beams)
    expected = _hf_generate(hf_model, hf_processor, pixels[:1], prompt, **kwargs)
    stream = tiny_model.new_stream([prompt], memory_bank_length=0)
    stream.add_frames(pixels[:1])
    ours = tiny_model.generate(stream, [prompt], min_new_tokens=0, repetition_penalty=1.0, **kwargs)
    assert expected, "the reference generated nothing; the comparison would be vacuous"
    assert ours == [expected]


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model, pixels):
    """Left padding in front of the visual tokens must not change any row's answer."""
    stream = tiny_model.new_stream(INSTRUCTIONS, memory_bank_length=3)
    stream.add_frames(pixels[:5])
    batched = tiny_model.generate(stream, max_new_tokens=10, num_beams=2)
    for row, prompt in enumerate(INSTRUCTIONS):
        single = tiny_model.new_stream([prompt], memory_bank_length=3)
        single.add_frames(pixels[:5])
        torch.testing.assert_close(single.query_output()[0], stream.query_output()[row], rtol=1e-5, atol=1e-5)
        assert tiny_model.generate(single, max_new_tokens=10, num_beams=2) == [batched[row]]
