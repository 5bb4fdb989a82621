"""The paper's no-memory baseline (issue 20, point 8): every frame through the Q-Former on its
own and all T x 32 query tokens to the LLM, checked frame by frame against the official
definition (transformers' InstructBLIP Q-Former per frame is exactly LAVIS's Qformer.bert on
that path), in inference and in training."""

from __future__ import annotations

import pytest
import torch

from models import MALMM, ModelError
from models.training import (candidate_log_likelihoods, freeze_for_training, query_output, trained_parameters,
                             visual_tokens)

INSTRUCTIONS = ["what does the video describe?", "Question: who wins? Short answer:"]


@pytest.fixture(scope="module")
def trained_like(tiny_dir):
    """A float32 tiny model whose temporal embedding is not zero (as after finetuning), so
    that adding it anywhere would show."""
    m = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        m.temporal_embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return m


def _official_frames(hf_model, hf_processor, features: torch.Tensor, instructions) -> torch.Tensor:
    """The official no-memory path, blip2_vicuna_instruct.py lines 211-235 and 250-252:
    text_input repeated per frame, Qformer.bert(text ids, query+text mask, query tokens,
    encoder_hidden_states = that frame's ln_vision features, no image_pe), then the outputs
    of the T frames reshaped to [B, T * 32, C] in frame order. Reference: [B, T * 32, H]."""
    q = hf_processor.qformer_tokenizer(instructions, padding="longest", return_tensors="pt")
    B, T = len(instructions), features.shape[0]
    mask = torch.cat([torch.ones(B, 32, dtype=q.attention_mask.dtype), q.attention_mask], dim=1)
    out = []
    with torch.no_grad():
        for t in range(T):  # frame by frame, as the official loop over B * T rows computes each
            frame = features[t : t + 1].expand(B, -1, -1)
            hidden = hf_model.qformer(input_ids=q.input_ids, attention_mask=mask,
                                      query_embeds=hf_model.query_tokens.expand(B, -1, -1),
                                      encoder_hidden_states=frame).last_hidden_state
            out.append(hidden[:, :32])
    return torch.stack(out, dim=1).reshape(B, T * 32, -1)


def test_concat_stream_equals_the_official_definition_frame_by_frame(trained_like, hf_model, hf_processor, pixels):
    """blip2_vicuna_instruct.py lines 211-252 (use_memory_bank=False): the T frames' 32 query
    outputs, concatenated in frame order, are what the LLM reads (_official_frames)."""
    features = trained_like.encode_frames(pixels[:5])
    stream = trained_like.new_stream(INSTRUCTIONS, concat=True)
    stream.add_features(features[:2])  # chunks of any size: the same tokens
    stream.add_features(features[2:])
    reference = _official_frames(hf_model, hf_processor, features, INSTRUCTIONS)
    assert stream.query_output().shape == (2, 5 * 32, 32)
    torch.testing.assert_close(stream.query_output(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.visual_tokens(), hf_model.language_projection(reference), rtol=1e-5, atol=1e-5)
    assert stream.memory.capacity == 0 and stream.memory.frames_seen == 5


def test_the_memory_path_is_untouched_by_it(trained_like, pixels):
    """Zero memory keeps only the last frame's 32 tokens, as before; the baseline all of them."""
    features = trained_like.encode_frames(pixels[:3])
    last = trained_like.new_stream(INSTRUCTIONS[:1], memory_bank_length=0)
    last.add_features(features)
    concat = trained_like.new_stream(INSTRUCTIONS[:1], concat=True)
    concat.add_features(features)
    assert last.visual_tokens().shape[1] == 32 and concat.visual_tokens().shape[1] == 96
    # Without memory, the last frame seen alone gives the concat's last 32 tokens, apart from the
    # temporal position the memory path adds (the official baseline adds none).
    with torch.no_grad():
        saved = trained_like.temporal_embedding.weight.clone()
        trained_like.temporal_embedding.weight.zero_()
        try:
            alone = trained_like.new_stream(INSTRUCTIONS[:1], memory_bank_length=0)
            alone.add_features(features)
        finally:
            trained_like.temporal_embedding.weight.copy_(saved)
    torch.testing.assert_close(alone.query_output(), concat.query_output()[:, -32:], rtol=1e-5, atol=1e-5)


def test_training_forward_equals_the_concat_stream_and_trains_every_frame(tiny_dir, trained_like, pixels):
    """blip2_vicuna_instruct.py lines 211-252 in forward(): the training path is the same
    concatenation, and with no bank to detach every frame's pass gets a gradient."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 257, 32, generator=gen)
    with torch.no_grad():
        ours = query_output(trained_like, feats, INSTRUCTIONS, 0, concat=True)
    for b, instruction in enumerate(INSTRUCTIONS):
        stream = trained_like.new_stream([instruction], concat=True)
        stream.add_features(feats[b])
        torch.testing.assert_close(ours[b : b + 1], stream.query_output(), rtol=1e-4, atol=1e-5)
    m = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    freeze_for_training(m)
    first = torch.randn(2, 4, 257, 32, generator=gen, requires_grad=True)
    visual_tokens(m, first, INSTRUCTIONS, 0, concat=True).sum().backward()
    # No bank to detach: every frame gets a gradient; no temporal position on this path.
    assert all(first.grad[:, t].abs().sum() > 0 for t in range(4))
    assert m.temporal_embedding.weight.grad is None or m.temporal_embedding.weight.grad.abs().sum() == 0
    assert {n for n, p in trained_parameters(m) if p.grad is not None} >= {"query_tokens"}


def test_the_llm_reads_all_frames_tokens(trained_like, pixels):
    features = trained_like.encode_frames(pixels[:3])
    stream = trained_like.new_stream(["what is shown in the video?"], concat=True)
    stream.add_features(features)
    candidates = ["cat", "a dog"]
    with torch.no_grad():
        ours = candidate_log_likelihoods(trained_like, stream.visual_tokens(), ["what is shown in the video?"],
                                         candidates)
    torch.testing.assert_close(trained_like.score(stream, None, candidates), ours, rtol=1e-4, atol=1e-4)
    assert len(trained_like.generate(stream, max_new_tokens=3, num_beams=2)) == 1


def test_more_frames_than_the_llm_context_holds_is_one_sentence(trained_like, pixels):
    stream = trained_like.new_stream(["x"], concat=True)
    limit = stream.max_frames  # tiny-random: a 512-token LLM
    assert limit == (512 - 64) // 32
    features = trained_like.encode_frames(pixels[:1]).expand(limit + 1, -1, -1)
    with pytest.raises(ModelError, match=f"at most {limit} frames"):
        stream.add_features(features)


# ---- the baseline through the commands -------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("concat"), labels=("cat", "dog"), train_per_label=4,
                        test_per_label=3)


def test_the_commands_take_concat_and_say_so_in_the_record(data):
    from malmm_cli.learn.dataset import load_dataset
    from tests.cli import SAMPLE, TINY, malmm, records

    clip = load_dataset(data.test, "classify")[0].video
    out = malmm("caption", clip, "--concat", *TINY, "--frames", 3, "--beams", 1, "--max-tokens", 2, "--json", "-q")
    assert out.exit_code == 0, out.output
    assert records(out.stdout)[0]["memory"] == {"length": 0, "compressions": 0, "concat": True}
    out = malmm("classify", clip, clip, "--concat", "--labels", "cat,dog", *TINY, "--frames", 3, "--batch", 2,
                "--json", "-q")
    assert out.exit_code == 0 and all(r["memory"]["concat"] for r in records(out.stdout))  # --batch: one at a time
    out = malmm("caption", clip, "--concat", "--memory", 2, *TINY)
    assert out.exit_code == 2 and "--concat has no memory bank" in out.output
    out = malmm("caption", SAMPLE, "--concat", *TINY, "--frames", 20, "-q")  # 20 x 32 tokens > tiny's 512
    assert out.exit_code == 1 and "at most 14 frames" in out.output and "Traceback" not in out.output


def test_official_memory_ablation_baseline_beside_memory_and_none(data, tmp_path):
    """The paper's ablation (MA-LMM Table 6): the no-memory baseline sends every frame's tokens to
    the LLM, so on this task (the answer is in the first frames) it learns, as the memory bank
    does; M = 0 (the last frame only) stays at chance. A trained baseline checkpoint says so in
    its config (memory_bank_length 0, as the official one), and eval runs it that way."""
    import json

    from tests.cli import TINY, malmm

    def run(*mode):
        ckpt = tmp_path / f"{'-'.join(map(str, mode))}.pth"
        out = malmm("train", data.train, "--task", "classify", "-o", ckpt, *TINY, "--frames", 3, *mode,
                    "--epochs", 4, "--lr", 3e-3, "--batch-size", 4, "--seed", 1, "--views", 1, "-q")
        assert out.exit_code == 0, out.output
        result = malmm("eval", data.test, "--task", "classify", "--checkpoint", ckpt, *TINY, "--json", "-q")
        assert result.exit_code == 0, result.output
        return torch.load(ckpt, weights_only=True)["config"], json.loads(result.stdout.strip().splitlines()[-1])

    config, concat = run("--concat")
    assert config["model"]["memory_bank_length"] == 0 and config["malmm"]["concat"] is True
    assert concat["concat"] is True and concat["accuracy"] >= 0.8
    _, none = run("--memory", 0)
    assert "concat" not in none and none["accuracy"] == 0.5  # one answer for every clip


def test_an_official_checkpoint_without_a_memory_bank_is_read_as_the_baseline(tiny_model, tiny_dir, tmp_path):
    """blip2_vicuna_instruct.py line 110: use_memory_bank = memory_bank_length > 0; a checkpoint
    trained with memory_bank_length 0 (from_config's default, line 802) is the baseline."""
    from malmm_cli.engine.session import Session, SessionOptions
    from tests.official_checkpoint import write_official_checkpoint

    ckpt = tmp_path / "baseline.pth"
    write_official_checkpoint(tiny_model, ckpt, num_frames=4, memory_bank_length=0)
    session = Session(SessionOptions(model=str(tiny_dir), checkpoint=ckpt))
    job = session.job("caption")
    assert (job.concat, job.memory, job.frames) == (True, 0, 4) and not session.loaded
    assert session.job("caption", memory=3).concat is False  # an explicit --memory wins


def test_watch_refuses_the_baseline_in_one_sentence():
    """A checkpoint trained with --concat makes its jobs concat by default; watch keeps its
    memory constant, which the baseline cannot (frames x 32 LLM tokens), so it says so before
    reading anything, instead of running with M = 0."""
    from malmm_cli.engine.live import LiveWatch
    from malmm_cli.engine.tasks import Job
    from malmm_cli.errors import UsageError

    with pytest.raises(UsageError, match="give --memory M"):
        LiveWatch(None, None, Job(task="caption", model_label="tiny-random", memory=0, fps=1.0, concat=True), every=10)


def test_a_video_read_once_answers_again_with_the_baseline(tiny_model, tiny_dir, tmp_path):
    """chat and serve keep what a read saw; the baseline has no visual bank to keep, so its
    follow-ups go the plain way and answer as a fresh read does."""
    from malmm_cli.engine.session import Session, SessionOptions
    from tests.cli import SAMPLE
    from tests.official_checkpoint import write_official_checkpoint

    ckpt = tmp_path / "baseline.pth"
    write_official_checkpoint(tiny_model, ckpt, num_frames=4, memory_bank_length=0)
    session = Session(SessionOptions(model=str(tiny_dir), checkpoint=ckpt, cache=False))
    with session.read(SAMPLE, frames=4) as video:
        first = video.ask("what is shown?", max_tokens=3, beams=1)
        again = video.ask("what is shown?", max_tokens=3, beams=1)
    fresh = session.analyze(SAMPLE, session.job("ask", questions=["what is shown?"], frames=4, max_tokens=3, beams=1))
    assert first.memory.concat and again.answers == first.answers == fresh.answers
