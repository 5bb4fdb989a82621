"""Lockstep batches: B videos through one batched Q-Former step equal each video read alone."""

from __future__ import annotations

import pytest
import torch

from models import MALMM
from models.malmm import TEMPORAL_SLOTS

# Different lengths, so the batch pads the shorter instructions and masks them.
INSTRUCTIONS = ["what does the video describe?", "who wins?", "what is the man cooking in this video?"]


@pytest.fixture(scope="module")
def model(tiny_dir):
    """The tiny model with a non-zero temporal embedding, so per-video frame positions matter."""
    model = MALMM.from_pretrained(str(tiny_dir), memory_bank_length=3, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model.temporal_embedding.weight.copy_(
            0.3 * torch.randn(TEMPORAL_SLOTS, 32, generator=torch.Generator().manual_seed(5)))
    return model


def _videos(lengths, seed=0):
    """One drifting feature sequence [n, 257, 32] per video, each different."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 257, 32, generator=gen).mul(2.0).cumsum(dim=0) for n in lengths]


def _alone(model, instruction, feats, **kwargs):
    stream = model.new_stream([instruction], **kwargs)
    stream.add_features(feats)
    return stream


def test_a_batch_equals_each_video_alone_frame_by_frame(model):
    videos = _videos([7, 7, 7])
    batch = model.new_batch(INSTRUCTIONS)
    alone = [model.new_stream([text]) for text in INSTRUCTIONS]
    for t in range(7):
        batch.add_features(torch.stack([v[t] for v in videos]))  # one frame of each video
        for stream, v in zip(alone, videos):
            stream.add_features(v[t : t + 1])
        expected = torch.cat([s.query_output() for s in alone])
        torch.testing.assert_close(batch.query_output(), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"frame {t}: {m}")
    assert batch.frames_seen == (7, 7, 7)
    assert batch.memory == tuple(s.memory for s in alone)
    torch.testing.assert_close(batch.visual_tokens(), torch.cat([s.visual_tokens() for s in alone]))


def test_videos_that_end_early_keep_their_last_output(model):
    lengths = [6, 2, 4]
    videos = _videos(lengths, seed=1)
    totals = [60, None, 200]  # per-video temporal spreading
    batch = model.new_batch(INSTRUCTIONS, total_frames=totals)
    steps = torch.zeros(max(lengths), len(lengths), 257, 32)
    for b, v in enumerate(videos):
        steps[: len(v), b] = v
    for t in range(max(lengths)):
        batch.add_features(steps[t], active=[t < n for n in lengths])
    assert batch.frames_seen == tuple(lengths)
    for b, (text, v, total) in enumerate(zip(INSTRUCTIONS, videos, totals)):
        alone = _alone(model, text, v, total_frames=total)
        torch.testing.assert_close(batch.query_output()[b : b + 1], alone.query_output(), rtol=1e-5, atol=1e-5)
        assert batch.memory[b] == alone.memory
    # The ended rows left the banks: only the longest video is still in them.
    assert batch.state.visual.features.shape[0] == 1
    with pytest.raises(ValueError, match="video 1 ended after 2 frames"):
        batch.add_features(steps[0], active=[True, True, False])


def test_several_steps_at_once_and_frames_through_the_vit(model, pixels):
    batch = model.new_batch(INSTRUCTIONS[:2])
    frames = torch.stack([pixels[:4], pixels[4:]], dim=1)  # [4 steps, 2 videos, 3, H, W]
    batch.add_frames(frames[:1])
    batch.add_frames(frames[1:])
    for b in range(2):
        alone = model.new_stream([INSTRUCTIONS[b]])
        alone.add_frames(frames[:, b])
        torch.testing.assert_close(batch.query_output()[b : b + 1], alone.query_output(), rtol=1e-5, atol=1e-5)


def test_generate_and_score_answer_per_video(model):
    videos = _videos([3, 3], seed=2)
    batch = model.new_batch(INSTRUCTIONS[:2])
    batch.add_features(torch.stack(videos, dim=1))
    alone = [_alone(model, text, v) for text, v in zip(INSTRUCTIONS[:2], videos)]
    texts = model.generate(batch, max_new_tokens=6, num_beams=2)
    assert texts == [model.generate(s, max_new_tokens=6, num_beams=2)[0] for s in alone]
    candidates = ["comedy", "scrambled egg"]
    scores = model.score(batch, None, candidates)
    expected = torch.cat([model.score(s, None, candidates) for s in alone])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_batch_mistakes_are_one_sentence(model):
    batch = model.new_batch(INSTRUCTIONS[:2])
    with pytest.raises(ValueError, match=r"takes \[2, P, C\]"):
        batch.add_features(torch.zeros(3, 257, 32))
    with pytest.raises(ValueError, match="active has 3 entries"):
        batch.add_features(torch.zeros(2, 257, 32), active=[True, True, True])
    with pytest.raises(RuntimeError, match="no frames"):
        batch.query_output()
    with pytest.raises(ValueError, match="3 total_frames for 2 videos"):
        model.new_batch(INSTRUCTIONS[:2], total_frames=[1, 2, 3])
    with pytest.raises(ValueError, match="at least one instruction"):
        model.new_batch([])
    batch.add_features(torch.zeros(2, 257, 32), active=torch.tensor([False, False]))  # both end unseen
    with pytest.raises(ValueError, match="video 0 ended after 0 frames"):
        batch.add_features(torch.zeros(2, 257, 32))
