"""The engine's session (malmm_cli/engine/session.py): a video read once answers as one pass
does, and as the command line does, without decoding a frame or running the ViT again.

The tiny model runs in fp32 here: bf16's three significant digits could let two code paths
that add the same numbers in another order differ in a generated word.
"""

from __future__ import annotations

import json

import pytest
import torch

from malmm_cli.engine import Session, SessionOptions
from malmm_cli.results.records import ErrorResult
from malmm_cli.runs import Lockstep, OneByOne
from tests.cli import SAMPLE, TINY, malmm, records, stable

FAST = dict(frames=8, memory=3)
GEN = dict(beams=1, max_tokens=3)
# (task, options of the job beyond the sampling): what each VideoState method answers
TASKS = [
    ("caption", dict(memory=3, **GEN)),
    ("ask", dict(questions=["what is shown?", "where is it?"], memory=3, **GEN)),
    ("classify", dict(labels="cat,dog,ball,car", memory=3)),
    ("summarize", dict(every=2.0, memory=3, **GEN)),
]


def comparable(record: dict) -> dict:
    """A record as JSON holds it (tuples become lists), without what depends on the run rather
    than the video: its timings and job key."""
    return {k: v for k, v in stable(record).items() if k != "job"}


def answer(video, task: str, options: dict):
    """The VideoState method for `task`, with `options` in its own words."""
    options = dict(options)
    if task == "ask":
        return video.ask(options.pop("questions"), **options)
    if task == "classify":
        return video.classify(**options)
    return getattr(video, task)(**options)


@pytest.fixture(scope="module")
def session(tiny_model):
    return Session.from_model(tiny_model)  # no feature cache: every analyze decodes


@pytest.fixture(scope="module")
def video(session):
    with session.read(SAMPLE, frames=8) as state:
        yield state


@pytest.mark.parametrize("task, options", TASKS, ids=[t for t, _ in TASKS])
def test_a_read_video_answers_as_one_pass_does(session, video, task, options):
    one_pass = session.analyze(str(SAMPLE), session.job(task, frames=8, **options))
    assert comparable(answer(video, task, options).to_record()) == comparable(one_pass.to_record())


def test_answers_decode_nothing_and_run_no_vision_encoder(session, tiny_model, monkeypatch):
    import malmm_cli.engine.analyze as analyze

    encoded = []
    real = tiny_model.encode_frames
    monkeypatch.setattr(tiny_model, "encode_frames", lambda pixels: encoded.append(len(pixels)) or real(pixels))
    with session.read(SAMPLE, frames=8) as state:
        assert sum(encoded) == 8 and state.frames == 8  # the read: each frame through the ViT once

        def no_decoding(*args, **kwargs):
            raise AssertionError("a replay opened the video")

        monkeypatch.setattr(analyze, "stream_frames", no_decoding)
        monkeypatch.setattr(analyze, "probe", no_decoding)
        for task, options in TASKS:
            result = answer(state, task, options)
            assert result.sampling.frames == 8 and result.timings["vision"] == 0.0
    assert sum(encoded) == 8


def test_a_job_sampled_otherwise_is_refused(session, video):
    with pytest.raises(ValueError, match="another read"):
        video.answer(session.job("caption", frames=4, **GEN))


def test_answers_equal_the_command_lines_records(tmp_path, monkeypatch):
    """Session.load as the CLI loads tiny-random (its dtype pinned to fp32 for both, one
    thread), then the CLI's --json records for the same options."""
    monkeypatch.setattr("malmm_cli.engine.loader.default_dtype", lambda device: torch.float32)
    monkeypatch.setenv("MALMM_THREADS", "1")
    session = Session.load("tiny-random", cache=False)
    cli = {"caption": ["caption", SAMPLE, "--beams", 1, "--max-tokens", 3],
           "ask": ["ask", SAMPLE, "what is shown?", "-Q", "where is it?", "--beams", 1, "--max-tokens", 3],
           "classify": ["classify", SAMPLE, "--labels", "cat,dog,ball,car"],
           "summarize": ["summarize", SAMPLE, "--every", 2, "--beams", 1, "--max-tokens", 3]}
    with session.read(SAMPLE, frames=8) as state:
        for task, options in TASKS:
            out = malmm(*cli[task], *TINY, "--frames", 8, "--memory", 3, "--json", "-q", "--no-cache")
            assert out.exit_code == 0, out.stderr
            (expected,) = records(out.stdout)
            assert comparable(answer(state, task, options).to_record()) == comparable(expected), task


def test_run_gives_each_input_once_with_any_runner(session, tmp_path):
    missing = str(tmp_path / "nowhere.mp4")
    job = session.job("caption", **FAST, **GEN)
    alone = comparable(session.analyze(str(SAMPLE), job).to_record())
    for runner in (None, OneByOne(), Lockstep(2)):
        got = dict(session.run([str(SAMPLE), missing], job, runner=runner))
        assert set(got) == {str(SAMPLE), missing}
        assert isinstance(got[missing], ErrorResult) and "does not exist" in got[missing].error
        assert comparable(got[str(SAMPLE)].to_record()) == alone


def test_a_checkpoints_trained_defaults_apply_without_loading_the_model(tiny_model, tiny_dir, tmp_path):
    from tests.official_checkpoint import write_official_checkpoint

    checkpoint = tmp_path / "ckpt.pth"
    write_official_checkpoint(tiny_model, checkpoint, num_frames=6, memory_bank_length=3)
    session = Session(SessionOptions(model=str(tiny_dir), checkpoint=checkpoint))
    job = session.job("caption")
    assert (job.frames, job.memory) == (6, 3) and not session.loaded  # read from the checkpoint's config
    given = session.job("caption", frames=10, memory=5)
    assert (given.frames, given.memory) == (10, 5)  # what the user gives wins
    assert session.job("summarize").frames is None  # summaries keep their rate


def test_labels_too_long_in_the_models_tokens_fail_before_any_input(session, monkeypatch):
    """Issue 18's token bound on labels lives in the session (Session.resolve, check_labels):
    once the model has loaded, a classify job whose label is over 64 of its tokens is a
    UsageError before any video opens. tiny-random spells an unknown word letter by letter."""
    from malmm_cli.engine import session as session_module
    from malmm_cli.engine.jobs import build_job
    from malmm_cli.errors import UsageError

    def no_input(*args, **kwargs):
        raise AssertionError("an input was opened")

    monkeypatch.setattr(session_module, "open_source", no_input)
    long = "z" * 100
    with pytest.raises(UsageError, match="--labels: the label 'zzz.*' is 100 tokens long for this model"):
        session.job("classify", labels=f"cat,{long}", **FAST)
    job = build_job("classify", session.label, labels=f"cat,{long}", **FAST)  # built without the session
    for runner in (None, OneByOne(), Lockstep(2)):
        with pytest.raises(UsageError, match="100 tokens long"):
            next(session.run([str(SAMPLE)], job, runner=runner))
    with pytest.raises(UsageError, match="The data's label set: the label 'zzz.*' is 100 tokens"):
        session.check_labels(["cat", long], "The data's label set")
    assert session.job("classify", labels=f"cat,{'z' * 60}", **FAST).label_set.labels == ("cat", "z" * 60)
