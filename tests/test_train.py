"""Training: the differentiable forward against the inference path, what gets gradients, the
official checkpoint layout, Ctrl-C, the CLI's refusals, and the memory ablation in miniature
(a clip's label is shown only in its first frames: with memory near 1, without it chance)."""

from __future__ import annotations

import json

import decord
import numpy as np
import pytest
import torch

from malmm_cli.learn.dataset import load_dataset
from malmm_cli.learn.train import Interrupted, TrainEvents, TrainOptions, learning_rate, train
from models import MALMM
from models.overlay import hf_to_lavis_key, lavis_to_hf_key, read_lavis_checkpoint
from models.training import (answer_loss, candidate_log_likelihoods, freeze_for_training, official_config,
                             query_output, save_checkpoint, trained_parameters, visual_tokens)
from tests.cli import TINY, malmm, run_help_examples
from tests.official_checkpoint import lavis_name, write_official_checkpoint
from tests.synthetic import make_dataset

INSTRUCTIONS = ["what does the video describe?", "who wins?"]  # different lengths: the second is padded


def _features(clips: int, frames: int, seed: int) -> torch.Tensor:
    """[clips, frames, 257, 32] drifting features, different for every clip."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(clips, frames, 257, 32, generator=gen).cumsum(dim=1)


@pytest.fixture(scope="module")
def model(tiny_dir):
    """A float32 tiny model with a non-zero temporal embedding, as after finetuning."""
    m = MALMM.from_pretrained(str(tiny_dir), memory_bank_length=4, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        m.temporal_embedding.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return m


# ---- the forward is the inference path's ----------------------------------------------------


@pytest.mark.parametrize("M, frames", [(0, 3), (2, 6), (6, 4)], ids=["no-memory", "compressing", "M>=frames"])
def test_training_forward_equals_the_inference_path(model, M, frames):
    feats = _features(2, frames, seed=M + frames)  # a different clip per instruction
    with torch.no_grad():
        ours = query_output(model, feats, INSTRUCTIONS, M)
    for b, instruction in enumerate(INSTRUCTIONS):
        stream = model.new_stream([instruction], memory_bank_length=M)
        stream.add_features(feats[b])
        torch.testing.assert_close(ours[b : b + 1], stream.query_output(), rtol=1e-4, atol=1e-5)


def test_answer_likelihood_is_what_score_measures(model):
    feats = _features(2, 4, seed=5)
    prompts, candidates = ["what is shown in the video?", "Question: who wins Short answer:"], ["cat", "a dog", "x"]
    with torch.no_grad():
        ours = candidate_log_likelihoods(model, visual_tokens(model, feats, prompts, 3), prompts, candidates)
    for b, prompt in enumerate(prompts):
        stream = model.new_stream([prompt], memory_bank_length=3)
        stream.add_features(feats[b])
        torch.testing.assert_close(ours[b], model.score(stream, [prompt], candidates)[0], rtol=1e-4, atol=1e-4)


def test_gradients_reach_what_ma_lmm_trains_and_nothing_else(tiny_dir):
    m = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    trained = dict(freeze_for_training(m))
    frames = 5
    loss = answer_loss(m, visual_tokens(m, _features(2, frames, seed=1), INSTRUCTIONS, 2), INSTRUCTIONS, ["cat", "dog"])
    loss.backward()
    for name, param in m.named_parameters():
        if name in trained:
            assert param.grad is not None and param.requires_grad, name
        else:
            assert param.grad is None and not param.requires_grad, name
    groups = {n.split(".")[0] for n, p in trained.items() if p.grad.abs().sum() > 0}
    assert groups == {"qformer", "query_tokens", "language_projection", "temporal_embedding"}
    # As in the official code the banks hold detached entries: only the last frame's row learns.
    rows = m.temporal_embedding.weight.grad.abs().sum(dim=1)
    assert rows[frames - 1] > 0 and rows[: frames - 1].sum() == 0 and rows[frames:].sum() == 0


# ---- checkpoints -----------------------------------------------------------------------------


def test_lavis_keys_are_the_inverse_of_the_reader(model):
    for name, _ in trained_parameters(model):
        key = hf_to_lavis_key(name)
        assert key == lavis_name(name) and lavis_to_hf_key(key) == name
    assert hf_to_lavis_key("vision_model.encoder.layers.0.mlp.fc1.weight") is None


def test_checkpoint_is_the_official_layout_and_loads_back(model, tiny_dir, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pth", model, config=official_config(model, num_frames=7, memory_bank_length=3),
                           optimizer=torch.optim.AdamW([p for _, p in trained_parameters(model)]), epoch=2)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "optimizer", "config", "scaler", "epoch"} and saved["epoch"] == 2
    official = tmp_path / "official.pth"
    write_official_checkpoint(model, official, num_frames=7, memory_bank_length=3)
    expected = {k for k in torch.load(official, weights_only=True)["model"] if not k.startswith("ln_vision.")}
    assert set(saved["model"]) == expected  # ln_vision: part of the frozen vision side here
    assert read_lavis_checkpoint(path).config.num_frames == 7
    loaded = MALMM.from_pretrained(str(tiny_dir), checkpoint=path, dtype=torch.float32, device="cpu")
    assert loaded.memory_bank_length == 3 and loaded.trained_frames == 7
    theirs = dict(loaded.named_parameters())
    for name, param in trained_parameters(model):
        torch.testing.assert_close(theirs[name], param.detach(), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*partial"))  # written through a temporary file, renamed


def test_learning_rate_follows_lavis_warmup_then_cosine():
    lr = dict(lr=1e-4, epochs=4, warmup_steps=10, min_lr=0.0)
    assert learning_rate(0, 0, **lr) == pytest.approx(1e-8)
    assert learning_rate(0, 5, **lr) == pytest.approx(1e-8 + (1e-4 - 1e-8) / 2)
    assert learning_rate(0, 50, **lr) == 1e-4
    assert learning_rate(2, 0, **lr) == pytest.approx(0.5e-4)  # cos(pi/2): halfway
    assert learning_rate(3, 0, **lr) < learning_rate(2, 0, **lr)


# ---- the memory ablation, through the CLI ------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"), labels=("cat", "dog"), train_per_label=4,
                        test_per_label=3)


def test_the_pattern_is_bit_identical_in_every_clip(data):
    """What makes chance the ceiling without memory: the last frames are the same pixels."""
    rows = load_dataset(data.test, "classify")
    cat = next(r.video for r in rows if r.target == "cat")
    dog = next(r.video for r in rows if r.target == "dog")
    first, last = (np.stack([decord.VideoReader(v)[i].asnumpy() for v in (cat, dog)]) for i in (0, -1))
    assert np.array_equal(last[0], last[1]) and not np.array_equal(first[0], first[1])


def _train_and_eval(data, tmp_path, memory: int) -> dict:
    ckpt = tmp_path / f"memory{memory}.pth"
    out = malmm("train", data.train, "--task", "classify", "-o", ckpt, *TINY, "--frames", 3, "--memory", memory,
                "--epochs", 4, "--lr", 3e-3, "--batch-size", 4, "--seed", 1, "-q")
    assert out.exit_code == 0, out.output
    config = torch.load(ckpt, weights_only=True)["config"]
    assert (config["model"]["num_frames"], config["model"]["memory_bank_length"]) == (3, memory)
    result = malmm("eval", data.test, "--task", "classify", "--checkpoint", ckpt, *TINY, "--json", "-q")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_memory_ablation_with_memory_it_learns_without_it_chance(data, tmp_path):
    with_memory = _train_and_eval(data, tmp_path, memory=3)
    assert (with_memory["frames"], with_memory["memory"]) == (3, 3)  # the checkpoint's own settings
    assert with_memory["accuracy"] >= 0.8
    without = _train_and_eval(data, tmp_path, memory=0)
    assert without["memory"] == 0
    # The same last frame for every clip: one answer for all, right for one class of two.
    assert without["accuracy"] == 0.5


# ---- interruption and refusals -----------------------------------------------------------------


class _StopAt(TrainEvents):
    def __init__(self, step: int):
        self.at = step

    def step(self, done, loss, lr):
        if done == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_the_progress_so_far(data, tiny_dir, tmp_path):
    m = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    items = load_dataset(data.train, "classify")
    before = m.query_tokens.detach().clone()
    with pytest.raises(Interrupted) as stop:
        train(m, items, TrainOptions(task="classify", epochs=3, batch_size=2, frames=3, memory=3), tmp_path / "c.pth",
              events=_StopAt(2))
    assert stop.value.saved and stop.value.where == "epoch 1/3, batch 2"
    saved = torch.load(tmp_path / "c.pth", weights_only=True)
    assert saved["config"]["malmm"]["interrupted_at"] == {"epoch": 1, "batch": 2}
    assert not torch.equal(saved["model"]["query_tokens"], before)  # two steps of training are in it


def test_train_refuses_before_loading_anything(data, tmp_path):
    existing = tmp_path / "taken.pth"
    existing.write_bytes(b"keep me")
    cases = [
        (["-o", existing], "exists and is not a checkpoint that malmm wrote"),
        (["-o", data.train, "--overwrite"], "is one of this run's inputs"),
        (["-o", tmp_path / "new.pth", "--memory", -1], "--memory must be from 0"),
        (["-o", tmp_path / "missing" / "c.pth"], "does not exist"),
    ]
    for extra, message in cases:
        out = malmm("train", data.train, "--task", "classify", *TINY, *extra)
        assert out.exit_code == 2 and message in out.output, out.output
        assert out.output.count("\n") == 1  # one sentence
    assert existing.read_bytes() == b"keep me"
    bad = tmp_path / "bad.csv"
    bad.write_text("video,answer\nclip.mp4,yes\n")
    out = malmm("train", bad, "--task", "classify", "-o", tmp_path / "c.pth", *TINY)
    assert out.exit_code == 2 and "no 'label' column" in out.output


TRAIN_FAST = ["--task", "classify", *TINY, "--frames", 2, "--epochs", 1, "--batch-size", 4, "-q"]


def test_train_replaces_only_a_checkpoint_it_wrote_and_never_what_is_not_a_file(data, tmp_path):
    """`--overwrite` used to replace anything: a user's notes, a video, a FIFO, /dev/null (as root)."""
    import os
    import stat

    notes, video, fifo = tmp_path / "notes.txt", tmp_path / "clip.mp4", tmp_path / "pipe"
    notes.write_text("my notes\n")
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 a video")
    os.mkfifo(fifo)
    for target, message in ((notes, "is not a checkpoint that malmm wrote"),
                            (video, "is not a checkpoint that malmm wrote"),
                            (fifo, "is not a regular file")):
        out = malmm("train", data.train, *TRAIN_FAST, "-o", target, "--overwrite")
        assert out.exit_code == 2 and message in out.output and "--overwrite" not in out.output, out.output
    assert notes.read_text() == "my notes\n" and video.read_bytes().endswith(b"a video")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # A device is refused before anything is written (not tried with --overwrite: as root, the old
    # code replaced /dev/null itself with a regular file).
    out = malmm("train", data.train, *TRAIN_FAST, "-o", "/dev/null")
    assert out.exit_code == 2 and "is not a regular file" in out.output
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    # Its own checkpoint, untouched since: replaced with --overwrite only; once edited, never.
    ckpt = tmp_path / "c.pth"
    assert malmm("train", data.train, *TRAIN_FAST, "-o", ckpt).exit_code == 0
    out = malmm("train", data.train, *TRAIN_FAST, "-o", ckpt)
    assert out.exit_code == 2 and "pass --overwrite to replace it" in out.output
    assert malmm("train", data.train, *TRAIN_FAST, "-o", ckpt, "--overwrite").exit_code == 0
    with open(ckpt, "ab") as f:
        f.write(b"changed")
    out = malmm("train", data.train, *TRAIN_FAST, "-o", ckpt, "--overwrite")
    assert out.exit_code == 2 and "(or it was changed since)" in out.output
    assert ckpt.read_bytes().endswith(b"changed")
    empty = tmp_path / "empty.pth"  # an empty file holds nothing: simply used
    empty.touch()
    assert malmm("train", data.train, *TRAIN_FAST, "-o", empty).exit_code == 0 and empty.stat().st_size > 0


def test_a_second_training_to_the_same_output_is_refused_at_once(data, tmp_path, monkeypatch):
    """Two trainings with one -o both said "saved", and one checkpoint was lost."""
    from malmm_cli.learn import train_command as train_cli

    ckpt = tmp_path / "c.pth"
    seen = []
    real_run = train_cli._run

    def run_while_another_starts(o, *prepared):
        if not seen:  # the first training, while it holds the output: a second one starts
            seen.append("started")
            seen[0] = malmm("train", data.train, *TRAIN_FAST, "-o", ckpt, "--overwrite").output
        return real_run(o, *prepared)

    monkeypatch.setattr(train_cli, "_run", run_while_another_starts)
    out = malmm("train", data.train, *TRAIN_FAST, "-o", ckpt)
    assert out.exit_code == 0, out.output
    (second,) = seen
    assert second.count("\n") == 1 and "is being written by another malmm process" in second
    monkeypatch.setattr(train_cli, "_run", real_run)
    assert malmm("train", data.train, *TRAIN_FAST, "-o", ckpt, "--overwrite").exit_code == 0  # released


def test_a_missing_video_is_a_mistake_in_the_data_for_train_and_eval_alike(data, tmp_path, monkeypatch):
    """Issue 24, point 10: one policy for a missing video. Train refused it before loading; eval
    loaded the model and wrote an error record. Both now refuse it before anything loads, naming
    the file and line, and the video as the data file writes it."""
    from malmm_cli.engine import loader

    rows = data.train.read_text().splitlines()
    broken = data.train.parent / "broken.csv"  # beside the clips: the paths are relative to it
    broken.write_text("\n".join(rows[:2] + ["nowhere.mp4,cat"]) + "\n")
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    for command in (["train", broken, "-o", tmp_path / "c.pth"], ["eval", broken, "-o", tmp_path / "p.jsonl"]):
        out = malmm(*command, "--task", "classify", *TINY)
        assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
        assert f"{broken}, line 3: the video nowhere.mp4 does not exist" in out.output
    assert not list(tmp_path.iterdir())



# ---- a full disk, names the system refuses (issue 18, point 10) -----------------------------------


def test_a_full_temporary_folder_is_one_sentence(data, tmp_path, monkeypatch):
    import errno

    from malmm_cli.engine.features import FrameStore

    def full(self, features):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FrameStore, "append", full)
    out = malmm("train", data.train, "--task", "classify", "-o", tmp_path / "c.pth", *TINY, "--frames", 2,
                "--no-cache", "-q")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "do not fit in the temporary folder" in out.stderr and "no space left on" in out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "c.pth").exists()


def test_a_real_full_tmpfs_as_the_temporary_folder(data, tmp_path, monkeypatch):
    """The same on a real 8 KiB tmpfs (needs root to mount; skipped elsewhere)."""
    import shutil
    import subprocess
    import tempfile

    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(mount))
        out = malmm("train", data.train, "--task", "classify", "-o", tmp_path / "c.pth", *TINY, "--frames", 3,
                    "--no-cache", "-q")
        assert out.exit_code == 1 and f"temporary folder {mount}" in out.stderr and "Traceback" not in out.output
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one(data, tmp_path, monkeypatch):
    import malmm_cli.learn.train as train_module

    saves = []

    def save(path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # torch's own words for a short write on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48960 vs 48848")
        return save_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    ckpt = tmp_path / "c.pth"
    out = malmm("train", data.train, "--task", "classify", "-o", ckpt, *TINY, "--frames", 2, "--epochs", 3, "-q")
    assert out.exit_code == 1 and "Traceback" not in out.output and out.stderr.count("\n") == 1
    assert f"The checkpoint could not be written to {ckpt}" in out.stderr and "the previous one is kept" in out.stderr
    assert torch.load(ckpt, weights_only=True)["config"]["malmm"]["epochs_done"] == 1


def test_names_over_255_bytes_are_one_sentence(data, tmp_path):
    long = "x" * 300
    rows = data.train.read_text().splitlines()
    long_video = data.train.parent / "long_video.csv"
    long_video.write_text("\n".join(rows[:2] + [f"{long}.mp4,cat"]) + "\n")
    runs = [
        (["train", data.train, "-o", tmp_path / f"{long}.pth"], "may be at most 255 bytes"),
        (["train", data.train, "-o", tmp_path / "c.pth", "--checkpoint", tmp_path / f"{long}.pth"], "255 bytes"),
        (["train", data.train, "-o", tmp_path / "c.pth", "--val", tmp_path / f"{long}.csv"], "cannot be read"),
        (["train", long_video, "-o", tmp_path / "c.pth"], f"{long}.mp4 cannot be used"),
        (["eval", data.train, "-o", tmp_path / f"{long}.jsonl"], "255 bytes"),
    ]
    for run, words in runs:
        out = malmm(*run, "--task", "classify", *TINY, "-q")
        assert out.exit_code == 2 and words in out.stderr and "Traceback" not in out.output, (run, out.output)
    assert not list(tmp_path.glob("*.pth"))
    clip = load_dataset(data.train, "classify")[0].video
    out = malmm("caption", clip, "-o", tmp_path / f"{long}.jsonl", *TINY, "-q")  # the batch commands' -o too
    assert out.exit_code == 2 and "255 bytes" in out.stderr and "Traceback" not in out.output


# ---- the help page ------------------------------------------------------------------------------


def test_the_help_examples_run_as_printed(tmp_path, monkeypatch):
    """Every example under `malmm train --help`, in a folder holding the files they name
    (train.csv, val.csv, qa.jsonl over synthetic clips), with MALMM_MODEL=tiny-random."""

    # One-second clips of 4 frames: the examples' frame counts take all of them, so their cost on
    # tiny-random is the epochs', and the 5 they ask for run in a few seconds.
    made = make_dataset(tmp_path, labels=("cat", "dog"), train_per_label=1, test_per_label=1, n_frames=4)
    made.test.rename(tmp_path / "val.csv")
    clips = [row.split(",")[0] for row in made.train.read_text().splitlines()[1:]]
    (tmp_path / "qa.jsonl").write_text("".join(
        json.dumps({"video": clip, "question": "what colour comes first?", "answer": colour}) + "\n"
        for clip, colour in zip(clips, ("red", "green"))))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MALMM_MODEL", "tiny-random")
    assert len(run_help_examples(["train"])) == 4
    written = {p.name: torch.load(p, weights_only=True)["config"] for p in tmp_path.glob("*.pth")}
    assert sorted(written) == ["ckpt.pth", "ckpt2.last.pth", "ckpt2.pth", "qa.pth"]
    assert written["ckpt.pth"]["malmm"]["state"]["epoch"] == 6  # resumed after 5 epochs, to 6
    qa = written["qa.pth"]["model"]
    assert (qa["num_frames"], qa["memory_bank_length"]) == (4, 10)  # --frames 20 of 4-frame clips: all 4


def test_training_under_bf16_autocast_keeps_float32_weights_and_learns(data, tiny_dir, tmp_path, monkeypatch):
    """On a GPU, training runs under bf16 autocast (train._autocast). No GPU here: the same
    loop under CPU bf16 autocast shows that the mixed-precision path runs, learns, and leaves
    the trained weights and the AdamW state in float32."""
    import malmm_cli.learn.train as train_module
    import malmm_cli.learn.validate as validate_module

    calls = []

    def cpu_autocast(model):
        calls.append(model.device.type)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(train_module, "autocast", cpu_autocast)
    monkeypatch.setattr(validate_module, "autocast", cpu_autocast)
    m = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    report = train(m, load_dataset(data.train, "classify"),
                   TrainOptions(task="classify", epochs=3, frames=4, memory=4, lr=3e-3, batch_size=4),
                   tmp_path / "amp.pth")
    assert calls, "the training loop ran under the autocast context"
    losses = [e.train_loss for e in report.epochs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert {p.dtype for n, p in m.named_parameters() if n.startswith("qformer.")} == {torch.float32}
    saved = torch.load(tmp_path / "amp.pth", map_location="cpu", weights_only=True)
    assert {t.dtype for t in saved["model"].values() if t.is_floating_point()} == {torch.float32}
    state = saved["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
