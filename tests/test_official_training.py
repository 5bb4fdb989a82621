"""Training and evaluating as the official MA-LMM code does (issue 20): each test names the
official behaviour it checks (file and line of boheumd/MA-LMM, the LAVIS fork).

Prompts carried from training to inference, the official frame choice and augmentation, the
global batch with accumulation and the warm-up in official iterations, the official
classification scoring, target normalisation, the best and the last epoch, resuming, ln_vision,
the YouCook2 preset, text truncation and drop_last."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from malmm_cli.engine.augment import (Augment, even_frames, random_augment, random_resized_crop,
                                      segment_frames)
from malmm_cli.engine.tasks import normalize_caption, normalize_question
from malmm_cli.learn.dataset import load_dataset
from malmm_cli.learn.recipe import TRAIN_DEFAULTS, TrainOptions
from malmm_cli.learn.train import TrainEvents, train
from models import MALMM
from models.overlay import TrainedConfig
from tests.cli import TINY, malmm, records
from tests.synthetic import make_dataset

BREAKFAST = "what type of breakfast is shown in the video?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("official"), labels=("cat", "dog"), train_per_label=4,
                        test_per_label=2, n_frames=8)


def _relabel(source: Path, target: Path, names: dict[str, str]) -> Path:
    """The same clips under other label names (paths made absolute, so the file may live anywhere)."""
    rows = source.read_text().splitlines()
    out = [rows[0]]
    for row in rows[1:]:
        video, label = row.rsplit(",", 1)
        out.append(f"{source.parent / video},{names.get(label, label)}")
    target.write_text("\n".join(out) + "\n")
    return target


FAST_TRAIN = [*TINY, "--frames", 3, "--epochs", 1, "--batch-size", 4, "--views", 1, "-q"]


# ---- 1. the prompt a model was trained with is the prompt it is asked afterwards -------------------


def test_train_with_a_label_set_uses_its_prompt_and_its_labels(data, tmp_path):
    """breakfast_cls_datasets.py line 72 (and 104): Breakfast trains and evaluates with "what type
    of breakfast is shown in the video?"; coin_cls_datasets.py line 75 and lvu_cls_datasets.py
    line 78 likewise. `train --label-set` takes that prompt, records it and the set in the
    checkpoint, and refuses a label the set does not have."""
    train_csv = _relabel(data.train, tmp_path / "breakfast.csv", {"cat": "Coffee", "dog": "tea"})
    ckpt = tmp_path / "b.pth"
    out = malmm("train", train_csv, "--task", "classify", "--label-set", "breakfast", "-o", ckpt, *FAST_TRAIN)
    assert out.exit_code == 0, out.output
    info = torch.load(ckpt, weights_only=True)["config"]["malmm"]
    assert (info["prompt"], info["label_set"]) == (BREAKFAST, "breakfast")
    assert info["labels"][:3] == ["cereal", "coffee", "tea"]  # the whole set, as it spells its labels
    out = malmm("train", train_csv, "--task", "classify", "--label-set", "breakfast", "-o", ckpt, *FAST_TRAIN,
                "--epochs", 2, "--resume")
    assert out.exit_code == 0, out.output  # resumed with the options it recorded (the set's prompt among them)
    assert torch.load(ckpt, weights_only=True)["config"]["malmm"]["state"]["epoch"] == 2
    foreign = _relabel(data.train, tmp_path / "foreign.csv", {"cat": "coffee", "dog": "waffle"})
    out = malmm("train", foreign, "--task", "classify", "--label-set", "breakfast", "-o", tmp_path / "x.pth",
                *FAST_TRAIN)
    assert out.exit_code == 2 and "the label 'waffle' is not in the label set breakfast" in out.output
    assert f"{foreign}, line " in out.output and out.output.count("\n") == 1


def test_classify_and_eval_ask_what_the_checkpoint_learnt(data, tmp_path):
    """The checkpoint's prompt and label set are the defaults of classify and eval (before, an
    official checkpoint was asked "what is shown in the video?" by eval, a prompt it never saw);
    an explicit choice that differs is a warning. Every record carries its "prompt"."""
    train_csv = _relabel(data.train, tmp_path / "breakfast.csv", {"cat": "coffee", "dog": "tea"})
    ckpt = tmp_path / "b.pth"
    assert malmm("train", train_csv, "--task", "classify", "--label-set", "breakfast", "-o", ckpt,
                 *FAST_TRAIN).exit_code == 0
    clip = load_dataset(train_csv, "classify")[0].video
    out = malmm("classify", clip, "--checkpoint", ckpt, *TINY, "--json", "-q")
    assert out.exit_code == 0, out.output
    (record,) = records(out.stdout)
    assert (record["prompt"], record["label_set"], len(record["labels"])) == (BREAKFAST, "breakfast", 5)
    out = malmm("classify", clip, "--checkpoint", ckpt, "--labels", "coffee,tea", *TINY, "--json", "-q")
    assert records(out.stdout)[0]["prompt"] == BREAKFAST  # labels of the user's, the prompt it learnt
    out = malmm("classify", clip, "--checkpoint", ckpt, "--task", "coin", *TINY, "--json")
    assert records(out.stdout)[0]["prompt"] == "what is the activity in the video?"
    assert "the checkpoint was trained with the prompt" in out.stderr  # asked otherwise: said so
    test_csv = _relabel(data.test, tmp_path / "btest.csv", {"cat": "coffee", "dog": "tea"})
    out = malmm("eval", test_csv, "--task", "classify", "--checkpoint", ckpt, *TINY, "--json", "-q",
                "-o", tmp_path / "preds.jsonl")
    final = records(out.stdout)[0]
    assert (final["prompt"], final["label_set"], final["labels"]) == (BREAKFAST, "breakfast", 10)
    assert all(r["prompt"] == BREAKFAST for r in records((tmp_path / "preds.jsonl").read_text()))


def test_a_checkpoint_without_a_label_set_needs_labels_before_anything_loads(tiny_model, tmp_path, monkeypatch):
    from malmm_cli.engine import loader
    from tests.official_checkpoint import write_official_checkpoint

    ckpt = tmp_path / "plain.pth"
    write_official_checkpoint(tiny_model, ckpt, num_frames=3, memory_bank_length=2)
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["datasets"] = {"msrvtt_caption": {}}
    torch.save(saved, ckpt)
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = malmm("classify", "anything.mp4", "--checkpoint", ckpt, *TINY)
    assert out.exit_code == 2 and "the checkpoint names no label set" in out.output
    out = malmm("classify", "anything.mp4", *TINY)
    assert out.exit_code == 2 and "Give exactly one of --task" in out.output


@pytest.mark.parametrize("datasets, expected", [
    ({"breakfast_cls": {"num_frames": 100}}, "breakfast"),
    ({"coin_cls": {}}, "coin"),
    ({"lvu_cls": {"task": "genre", "history": 100}}, "lvu_genre"),
    ({"msrvtt_qa": {}}, None),
])
def test_an_official_checkpoints_datasets_name_its_label_set(datasets, expected):
    """Official configs name their dataset builder (cls_breakfast.yaml, cls_coin.yaml, cls_lvu.yaml
    with datasets.lvu_cls.task): that is the label set, with the prompt of its dataset file."""
    from malmm_cli.engine.tasks import official_label_set

    trained = TrainedConfig.from_config({"model": {"num_frames": 100, "memory_bank_length": 20}, "datasets": datasets})
    assert official_label_set(trained) == expected and not trained.concat


# ---- 2. frames and augmentation at train time ------------------------------------------------------


def test_training_frames_are_one_random_frame_per_segment_drawn_again_each_view():
    """msvd_vqa_datasets.py lines 47-56 (the same in the caption, Breakfast and COIN datasets):
    segment_list = linspace(0, frame_length, T + 1, dtype=int); one randint(start, end) in each,
    the start where a segment is empty. Eval: rint(linspace(0, n - 1, T)) (line 94)."""
    n, T = 37, 8
    bounds = np.linspace(0, n, T + 1, dtype=int)
    draws = [segment_frames(np.random.default_rng(s), n, T) for s in range(200)]
    for picked in draws:
        assert len(picked) == T and all(a <= f < b for f, a, b in zip(picked, bounds[:-1], bounds[1:]))
    for k in range(T):  # every frame of every segment is drawn sometimes: uniform, not fixed
        assert {int(d[k]) for d in draws} == set(range(bounds[k], bounds[k + 1]))
    assert np.array_equal(even_frames(n, T), np.rint(np.linspace(0, n - 1, T)).astype(int))
    short = segment_frames(np.random.default_rng(0), 3, 8)  # fewer frames than segments: each kept once
    assert np.array_equal(short, np.unique(short)) and set(short) <= {0, 1, 2}


def _torchvision_crop(rnd, height, width, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, transcribed (torchvision is not installed
    here), drawing from Python's random instead of torch's generator."""
    area = height * width
    for _ in range(10):
        target = area * rnd.uniform(*scale)
        aspect = math.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rnd.randint(0, height - h), rnd.randint(0, width - w), h, w
    return 0, 0, height, width  # (never reached at these sizes)


def test_one_random_resized_crop_and_flip_per_clip_as_blip2_video_train():
    """blip_processors.py lines 255-268: RandomResizedCropVideo(224, scale=(0.5, 1.0), ratio
    (3/4, 4/3), bicubic), once per clip (C, T, H, W), then RandomHorizontalFlipVideo (p = 0.5).
    The boxes have torchvision's distribution (its rejection of boxes that do not fit included)."""
    import random

    rng, rnd = np.random.default_rng(1), random.Random(1)
    H, W, n = 120, 160, 4000
    flips, ours, theirs = 0, [], []
    for _ in range(n):
        aug = random_augment(rng, H, W)
        assert 0 <= aug.top and aug.top + aug.height <= H and 0 <= aug.left and aug.left + aug.width <= W
        assert 3 / 4 - 0.03 <= aug.width / aug.height <= 4 / 3 + 0.03
        ours.append((aug.height * aug.width / (H * W), aug.width / aug.height, (aug.top + aug.height / 2) / H))
        top, left, h, w = _torchvision_crop(rnd, H, W)
        theirs.append((h * w / (H * W), w / h, (top + h / 2) / H))
        flips += aug.flip
    ours, theirs = np.array(ours), np.array(theirs)
    assert ours[:, 0].min() >= 0.49 and ours[:, 0].max() <= 1.0
    for k in range(3):  # area fraction, aspect ratio, vertical centre: the same distribution
        assert ours[:, k].mean() == pytest.approx(theirs[:, k].mean(), abs=0.01)
        assert np.percentile(ours[:, k], [10, 50, 90]) == pytest.approx(np.percentile(theirs[:, k], [10, 50, 90]),
                                                                         abs=0.02)
    assert flips / n == pytest.approx(0.5, abs=0.03)
    assert random_resized_crop(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)  # fallback: centred, ratio 4/3
    frames = np.arange(2 * 6 * 8 * 3, dtype=np.uint8).reshape(2, 6, 8, 3)
    box = Augment((6, 8), 1, 2, 4, 5, True)
    assert np.array_equal(box.apply(frames), frames[:, 1:5, 2:7][:, :, ::-1])  # the same box on every frame


def test_views_bound_the_vision_encoder_and_are_cached_apart(data, tiny_dir, tmp_path, monkeypatch):
    """The official data draws anew every epoch (the ViT on every frame of every epoch); here
    --views K draws are made once: the ViT runs K x T times per clip whatever the epochs, and a
    second run takes them all from the feature cache, apart from the plain (eval) features."""
    from malmm_cli.engine.features import FeatureCache

    encoded = []
    real = MALMM.encode_frames
    monkeypatch.setattr(MALMM, "encode_frames", lambda self, px, **kw: encoded.append(len(px)) or real(self, px, **kw))
    items = load_dataset(data.train, "classify")
    cache = FeatureCache(tmp_path / "features")
    opts = TrainOptions(task="classify", epochs=3, frames=3, memory=3, batch_size=4, views=2)
    model = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    train(model, items, opts, tmp_path / "a.pth", cache=cache, model_id="tiny")
    assert sum(encoded) == len(items) * 2 * 3  # 2 views x 3 frames per clip, for 3 epochs
    encoded.clear()
    train(MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu"), items, opts,
          tmp_path / "b.pth", cache=cache, model_id="tiny")
    assert encoded == []  # the same seed: the same views, from the cache
    plain = replace(opts, augment=False)
    train(MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu"), items, plain,
          tmp_path / "c.pth", cache=cache, model_id="tiny")
    assert sum(encoded) == len(items) * 3  # --no-augment: the eval sampling, cached apart from the views


# ---- 3. the effective batch --------------------------------------------------------------------------


def test_the_default_batches_are_the_run_scripts_global_batches():
    """run_scripts/*/train.sh: torchrun --nproc_per_node=4; batch_size_train 16 (classify), 32
    (train_qa.sh), 16 with accum_grad_iters 2 (train_cap.sh): 64, 128 and 128 clips a step."""
    assert {t: (d.batch_size, d.accum, d.iteration) for t, d in TRAIN_DEFAULTS.items()} == {
        "classify": (64, 1, 64), "ask": (128, 1, 128), "caption": (128, 2, 64)}
    resolved = TrainOptions(task="caption").resolved()
    assert (resolved.batch_size, resolved.accum, resolved.lr, resolved.epochs) == (128, 2, 1e-5, 10)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.qformer.config.attention_probs_dropout_prob = 0.0
    return model


def test_accumulated_micro_batches_make_the_step_one_batch_makes(data, tiny_dir, tmp_path, monkeypatch):
    """base_task.py lines 224-241: each micro-batch's loss / accum_grad_iters, gradients summed,
    one optimizer step every accum_grad_iters iterations: with equal token counts, the step of a
    whole batch (at one learning rate: LAVIS sets it per iteration, and the step takes the last)."""
    import malmm_cli.learn.train as train_module

    monkeypatch.setattr(train_module, "learning_rate", lambda *a, **k: 3e-3)
    items = load_dataset(data.train, "classify")
    weights = []
    for accum in (1, 2, 4):
        model = _no_dropout(MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu"))
        opts = TrainOptions(task="classify", epochs=1, frames=3, memory=3, batch_size=8, accum=accum, augment=False,
                            lr=3e-3)
        train(model, items, opts, tmp_path / f"a{accum}.pth")
        weights.append(model.query_tokens.detach().clone())
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[2], weights[0], rtol=1e-5, atol=1e-6)


class _Lrs(TrainEvents):
    def __init__(self):
        self.lrs = []

    def step(self, done, loss, lr):
        self.lrs.append(lr)


def test_the_warm_up_counts_official_iterations_and_the_last_batch_is_dropped(data, tiny_dir, tmp_path):
    """optims.py LinearWarmupCosineLRScheduler.step and base_task.py line 222: the learning rate
    is set every iteration (one batch of 16 on each of 4 GPUs: 64 clips for classify) from
    warmup_lr to init_lr over warmup_steps iterations. runner_base.py line 552: the training
    loader drops its last incomplete batch. 8 clips in batches of 3: 2 steps an epoch."""
    items = load_dataset(data.train, "classify")
    events = _Lrs()
    # A warm-up of 6 / 64 iterations (6 clips): steps start after 0 and 3 clips.
    opts = TrainOptions(task="classify", epochs=1, frames=3, memory=3, batch_size=3, augment=False, lr=1e-3,
                        warmup_steps=6 / 64)
    report = train(MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu"), items, opts,
                   tmp_path / "w.pth", events=events)
    assert report.steps == 2 and len(items) == 8  # 8 // 3: the last 2 clips dropped
    assert events.lrs == pytest.approx([1e-8, 1e-8 + (1e-3 - 1e-8) * 0.5])


# ---- 4. the official classification scoring -----------------------------------------------------------


def test_generate_scoring_is_the_official_classification_eval(data, tmp_path, monkeypatch):
    """classification.py lines 61-77: model.generate(5 beams, max_len 20 (LVU 5), min_len 1,
    num_captions 5) with blip2_vicuna_instruct's repetition_penalty 1.5 and length_penalty 1;
    lines 130-135: top-1 when beam 0 is the label exactly, top-5 when any of the 5 is."""
    seen = []

    def fake_generate(self, stream, prompts=None, **kw):
        seen.append(kw)
        return ["a dog", "dog", "cat", "car", "ball"] * len(prompts)  # beam 0 is never exactly a label

    monkeypatch.setattr(MALMM, "generate", fake_generate)
    out = malmm("eval", data.test, "--task", "classify", "--scoring", "generate", *TINY, "--frames", 3, "--json",
                "-q", "-o", tmp_path / "p.jsonl")
    assert out.exit_code == 0, out.output
    assert seen and all(kw["num_beams"] == 5 and kw["num_return_sequences"] == 5 and kw["max_new_tokens"] == 20
                        and kw["min_new_tokens"] == 1 and kw["repetition_penalty"] == 1.5
                        and kw["length_penalty"] == 1.0 for kw in seen)
    rows = records((tmp_path / "p.jsonl").read_text())
    assert all(r["prediction"] == "a dog" and not r["correct"] and r["beams"][0] == "a dog" for r in rows)
    assert {r["target"]: r["rank"] for r in rows} == {"dog": 2, "cat": 3}
    final = records(out.stdout)[0]
    assert (final["scoring"], final["accuracy"], final["top5"]) == ("generate", 0.0, 1.0)
    assert final["confusion"]["columns"][-1] == "(not a label)"
    seen.clear()
    lvu = _relabel(data.test, tmp_path / "lvu.csv", {"cat": "comedy", "dog": "action"})
    assert malmm("eval", lvu, "--task", "classify", "--label-set", "lvu_genre", "--scoring", "generate", *TINY,
                 "--frames", 3, "-q").exit_code == 0
    assert {kw["max_new_tokens"] for kw in seen} == {5}  # cls_lvu.yaml: max_len 5


# ---- 5. caption metrics as the official eval computes them -----------------------------------------------


CAPTIONS = [{"references": ["A man (in a hat) is cooking eggs.", "someone's frying an egg"],
             "prediction": "a man is cooking an egg"},
            {"references": ["The dog doesn't stop running!", "a dog runs on the grass"],
             "prediction": "a dog is running on grass"}]


def test_with_java_the_scores_are_cocoevalcaps_own():
    """captioning.py lines 127-142: COCOEvalCap tokenizes with the Java PTBTokenizer, then
    Bleu(4), Meteor, Rouge and Cider. The same calls here give the same numbers."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from malmm_cli.learn.caption_metrics import caption_scores, java_available

    if not java_available():
        pytest.skip("no Java runtime here")
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in r["references"]] for i, r in enumerate(CAPTIONS)})
    res = PTBTokenizer().tokenize({i: [{"caption": r["prediction"]}] for i, r in enumerate(CAPTIONS)})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {"bleu4": bleu[3], "bleu1": bleu[0], "meteor": Meteor().compute_score(gts, res)[0],
                "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}
    ours = caption_scores(CAPTIONS)
    assert ours["tokenizer"] == "ptb" and "notes" not in ours
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert "-lrb-" in gts[0][0]  # the Java tokenizer's brackets stay in what is scored


def test_the_python_tokenizer_is_the_java_one_on_captions():
    """pycocoevalcap's PTBTokenizer (-lowerCase) keeps -lrb- and -rrb-: its punctuation list has
    them in capitals. The Python tokenizer gives its output, token for token, on these."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from malmm_cli.learn.caption_metrics import caption_tokens, java_available

    if not java_available():
        pytest.skip("no Java runtime here")
    sentences = ["A man's dog doesn't \"run\" (fast), see...", "A well-known 3.5 km run.",
                 "the cat's toys: a ball & a mouse -- fun!", "he said 'hello' to me", "it costs $5.00 or 5% more",
                 "U.S. troops can't go", "they're 10:30 ready, aren't they?", "The dog [x] {y} runs; fast!",
                 "a woman is slicing (cutting) an onion.", "Two men are playing basketball"]
    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    assert [caption_tokens(s) for s in sentences] == [java[i][0] for i in range(len(sentences))]


def test_without_java_the_record_says_approximate_and_leaves_meteor_out(data, tmp_path, monkeypatch):
    pytest.importorskip("pycocoevalcap")
    rows = data.test.read_text().splitlines()[1:]
    caps = tmp_path / "caps.csv"
    caps.write_text("video,caption\n" + "".join(f"{data.test.parent / r.split(',')[0]},A man (in a hat) cooks.\n"
                                                  for r in rows[:2]))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `java` to be found
    out = malmm("eval", caps, "--task", "caption", *TINY, "--frames", 3, "--beams", 1, "--max-tokens", 3, "--json",
                "-q")
    assert out.exit_code == 0, out.output
    final = records(out.stdout)[0]
    assert final["tokenizer"] == "approximate" and final["meteor"] is None and "METEOR needs Java" in final["notes"][0]
    assert final["cider"] is not None and final["rouge_l"] is not None and final["bleu4"] is not None
    text = malmm("eval", caps, "--task", "caption", *TINY, "--frames", 3, "--beams", 1, "--max-tokens", 3, "-q")
    assert "note: METEOR needs Java" in text.stdout and "approximate (no Java)" in text.stdout


# ---- 6. targets normalised as LAVIS does ---------------------------------------------------------------


def test_targets_go_through_pre_caption_and_pre_question():
    """blip_processors.py lines 51-70 (pre_caption: lowercase, .!"()*#:;~ to a space, runs of
    whitespace to one, stripped, 50 words) and 90-103 (pre_question: those characters removed);
    msrvtt_caption_datasets.py line 65, msvd_vqa_datasets.py line 70 apply them to the targets."""
    from malmm_cli.learn.clips import train_target

    assert normalize_caption("A man (Bob) is cooking!!  Eggs;\tnow.") == "a man bob is cooking eggs now"
    assert normalize_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert train_target("caption", "A DOG: runs.") == "a dog runs"
    assert train_target("ask", "Yes.") == normalize_question("Yes.") == "yes"
    assert train_target("classify", "Fried Egg") == "Fried Egg"  # labels as the data gives them


# ---- 7. the best epoch, the last one, resuming --------------------------------------------------------


def test_with_val_o_holds_the_best_epoch_and_last_pth_the_last(data, tmp_path, monkeypatch):
    """runner_base.py lines 400-409: after every epoch the validation metric (agg_metrics); a
    strictly higher one saves checkpoint_best.pth; the latest is saved every epoch (line 385)."""
    import malmm_cli.learn.train as train_module
    from malmm_cli.learn.validate import Validation

    scores = iter([0.5, 0.9, 0.7])
    monkeypatch.setattr(train_module, "validate", lambda *a, **k: Validation(1.0, next(scores), "accuracy"))
    ckpt = tmp_path / "c.pth"
    out = malmm("train", data.train, "--task", "classify", "--val", data.test, "-o", ckpt, *TINY, "--frames", 3,
                "--epochs", 3, "--batch-size", 4, "--views", 1)
    assert out.exit_code == 0, out.output
    best, last = (torch.load(p, weights_only=True)["config"]["malmm"] for p in (ckpt, tmp_path / "c.last.pth"))
    assert (best["epochs_done"], last["epochs_done"]) == (2, 3) and last["state"]["best_epoch"] == 2
    log = [json.loads(line) for line in (tmp_path / "c.metrics.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["val_accuracy"], e["best"]) for e in log] == [(1, 0.5, True), (2, 0.9, True), (3, 0.7, False)]
    assert "the best epoch, 2 of 3" in out.stderr


def test_resume_continues_the_run_exactly(data, tmp_path):
    """runner_base.py _load_checkpoint (lines 629-653): the weights, the optimizer and the epoch
    from the checkpoint. A run of 1 epoch resumed to 3 ends where 3 epochs in one go end: the
    batches, views and dropout of an epoch come from the seed and the epoch alone."""
    common = ("train", data.train, "--task", "classify", *TINY, "--frames", 3, "--batch-size", 4, "--views", 2,
              "--lr", 3e-3, "-q")
    straight, resumed = tmp_path / "straight.pth", tmp_path / "resumed.pth"
    assert malmm(*common, "--epochs", 3, "-o", straight).exit_code == 0
    assert malmm(*common, "--epochs", 1, "-o", resumed).exit_code == 0
    out = malmm(*common, "--epochs", 3, "-o", resumed, "--resume")
    assert out.exit_code == 0, out.output
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6)
    assert b["config"]["malmm"]["state"]["steps"] == a["config"]["malmm"]["state"]["steps"] == 6
    out = malmm(*common, "--epochs", 3, "-o", resumed, "--resume", "--lr", 1e-4)
    assert out.exit_code == 2 and "--lr 0.0001 differs from the run being resumed" in out.output
    out = malmm(*common, "--epochs", 3, "-o", resumed, "--resume")
    assert out.exit_code == 2 and "is complete (3 epochs)" in out.output


class _StopAfter(TrainEvents):
    def __init__(self, steps):
        self.left = steps

    def step(self, done, loss, lr):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


def test_ctrl_c_in_the_middle_of_an_epoch_resumes_at_that_step(data, tiny_dir, tmp_path):
    from malmm_cli.learn.checkpoints import read_resume
    from malmm_cli.learn.train import Interrupted

    items = load_dataset(data.train, "classify")
    opts = TrainOptions(task="classify", epochs=2, frames=3, memory=3, batch_size=2, augment=False)
    with pytest.raises(Interrupted):
        train(MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu"), items, opts,
              tmp_path / "c.pth", events=_StopAfter(5))  # epoch 2 (4 steps each), after its first step
    source, info, state = read_resume(tmp_path / "c.pth")
    assert (state.epoch, state.step, state.steps) == (1, 1, 5) and info["interrupted_at"] == {"epoch": 2, "batch": 1}
    saved = torch.load(source, weights_only=True)
    model = MALMM.from_pretrained(str(tiny_dir), checkpoint=source, dtype=torch.float32, device="cpu")
    report = train(model, items, TrainOptions(**info["options"]), tmp_path / "c.pth",
                   resume={"state": state, "optimizer": saved["optimizer"]})
    assert report.steps == 8 and len(report.epochs) == 1  # the 3 steps left of epoch 2


def test_the_saved_line_counts_in_words(data, tmp_path):
    """Issue 24, point 10: "1 epoch", not "1 epochs"."""
    out = malmm("train", data.train, "--task", "classify", *TINY, "--frames", 2, "--epochs", 1, "--batch-size", 4,
                "--no-augment", "-o", tmp_path / "c.pth")
    assert out.exit_code == 0, out.output
    assert "(1 epoch, 2 steps; frames 2, memory" in out.stderr


def test_a_step_counter_with_time_left_inside_each_epoch(data, tiny_dir, tmp_path):
    """Issue 24, point 8: in a log (not a terminal), a line with the step, the loss and the time
    left inside each epoch, besides the line per epoch."""
    import io

    from rich.console import Console

    from malmm_cli.learn.train_view import TrainView

    buffer = io.StringIO()
    view = TrainView(Console(file=buffer, force_terminal=False, width=200), log_every=0.0)
    opts = TrainOptions(task="classify", epochs=1, frames=3, memory=3, batch_size=2, augment=False)
    train(MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu"),
          load_dataset(data.train, "classify"), opts, tmp_path / "c.pth", events=view)
    lines = buffer.getvalue().splitlines()
    steps = [line for line in lines if ": step " in line]
    assert [line.split("step ")[1].split(" ")[0] for line in steps] == ["1/4", "2/4", "3/4"]
    assert all(line.endswith(" left") and " · loss " in line for line in steps)
    assert lines[-1].startswith("malmm: epoch 1/1: loss ")


# ---- 9. smaller points ------------------------------------------------------------------------------


def test_ln_vision_trains_behind_an_option_on_features_cached_before_it(data, tiny_dir, tmp_path, monkeypatch):
    """blip2_vicuna_instruct.py line 172 (ln_vision(visual_encoder(frame))) with freeze_vit
    freezing the ViT's blocks only: ln_vision is trained and saved as ln_vision.*."""
    calls = []
    real = MALMM.encode_frames
    monkeypatch.setattr(MALMM, "encode_frames",
                        lambda self, px, **kw: calls.append(kw.get("pre_norm", False)) or real(self, px, **kw))
    ckpt = tmp_path / "ln.pth"
    out = malmm("train", data.train, "--task", "classify", "--train-ln-vision", "-o", ckpt, *TINY, "--frames", 3,
                "--epochs", 2, "--batch-size", 4, "--views", 1, "--lr", 1e-2, "-q")
    assert out.exit_code == 0, out.output
    assert calls and all(calls)  # every frame encoded before ln_vision
    state = torch.load(ckpt, weights_only=True)["model"]
    base = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    assert not torch.equal(state["ln_vision.weight"], base.vision_model.post_layernorm.weight.detach())
    plain = tmp_path / "plain.pth"
    assert malmm("train", data.train, "--task", "classify", "-o", plain, *FAST_TRAIN).exit_code == 0
    assert "ln_vision.weight" not in torch.load(plain, weights_only=True)["model"]


def test_the_youcook2_preset_and_min_tokens(data, tmp_path, monkeypatch):
    """run_scripts/youcook2/train.sh: init_lr 1e-4; cap_youcook2.yaml: max_len 30, min_len 2."""
    rows = data.test.read_text().splitlines()[1:]
    caps = tmp_path / "caps.csv"
    caps.write_text("video,caption\n" + "".join(f"{data.test.parent / r.split(',')[0]},a red thing.\n" for r in rows))
    ckpt = tmp_path / "yc.pth"
    assert malmm("train", caps, "--task", "caption", "--preset", "youcook2", "-o", ckpt, *FAST_TRAIN).exit_code == 0
    assert torch.load(ckpt, weights_only=True)["config"]["run"]["init_lr"] == 1e-4
    seen = []
    real = MALMM.generate
    monkeypatch.setattr(MALMM, "generate", lambda self, s, p=None, **kw: seen.append(kw) or real(self, s, p, **kw))
    out = malmm("eval", caps, "--task", "caption", "--preset", "youcook2", *TINY, "--frames", 3, "--beams", 1, "-q")
    assert out.exit_code == 0, out.output
    assert {(kw["max_new_tokens"], kw["min_new_tokens"]) for kw in seen} == {(30, 2)}
    seen.clear()
    out = malmm("caption", rows[0].split(",")[0] if False else data.test.parent / rows[0].split(",")[0], *TINY,
                "--frames", 3, "--beams", 1, "--max-tokens", 4, "--min-tokens", 3, "--json", "-q")
    assert records(out.stdout)[0]["generation"]["min_new_tokens"] == 3 and seen[0]["min_new_tokens"] == 3


def test_instructions_are_cut_from_the_left_at_the_official_lengths(tiny_dir, tmp_path):
    """blip2_vicuna_instruct.py lines 50 and 76: both tokenizers truncate from the left, at
    max_txt_len (128; cls_*.yaml: 30); line 255-263: the LLM prompt of the training forward too.
    The hub's Q-Former tokenizer says truncation_side "right": set at load, whatever it says."""
    import shutil

    from models.training import tokenize_instructions

    copy = tmp_path / "hub-like"
    shutil.copytree(tiny_dir, copy)
    config = copy / "qformer_tokenizer" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "truncation_side": "right"}))
    model = MALMM.from_pretrained(str(copy), dtype=torch.float32, device="cpu")
    assert model.qformer_tokenizer.truncation_side == model.tokenizer.truncation_side == "left"
    long = " ".join(["cat"] * 200) + " what is shown in the video?"
    ids = tokenize_instructions(model, [long]).input_ids[0]
    end = model.qformer_tokenizer("what is shown in the video?", add_special_tokens=False).input_ids
    assert len(ids) == 128 and ids[-1 - len(end) : -1].tolist() == end  # the end kept, [SEP] last
    model.max_text_tokens = 30
    assert tokenize_instructions(model, [long]).input_ids.shape[1] == 30


def test_a_classify_checkpoint_records_max_txt_len_30(data, tiny_dir, tmp_path):
    """cls_breakfast.yaml / cls_coin.yaml / cls_lvu.yaml: max_txt_len 30; the caption and QA
    configs keep the default 128. A checkpoint's config sets the length where it is loaded."""
    ckpt = tmp_path / "c.pth"
    assert malmm("train", data.train, "--task", "classify", "-o", ckpt, *FAST_TRAIN).exit_code == 0
    assert torch.load(ckpt, weights_only=True)["config"]["model"]["max_txt_len"] == 30
    loaded = MALMM.from_pretrained(str(tiny_dir), checkpoint=ckpt, dtype=torch.float32, device="cpu")
    assert loaded.max_text_tokens == 30
    assert MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu").max_text_tokens == 128


def test_the_training_prompt_is_cut_from_the_left_in_the_loss(tiny_dir):
    """blip2_vicuna_instruct.py lines 255-263: the LLM prompt of the training forward is cut to
    max_txt_len tokens from the left (BOS kept, the start of the text dropped)."""
    from models.training import llm_token_ids

    model = MALMM.from_pretrained(str(tiny_dir), dtype=torch.float32, device="cpu")
    model.max_text_tokens = 8
    long = " ".join(["dog"] * 40) + " what is shown in the video?"
    (prompt,), (answer,) = llm_token_ids(model, [long], ["cat"])
    ids = model.tokenizer(long, add_special_tokens=False).input_ids
    assert prompt == [model.tokenizer.bos_token_id] + ids[-7:] and len(prompt) == 8
    assert answer[-1] == model.tokenizer.eos_token_id


# ---- issue 24, point 13: eval as a person reads it; labels scored by their mean ----------------------


def test_eval_text_shows_the_confusion_matrix_and_records_name_videos_as_written(data, tmp_path):
    out_file = tmp_path / "p.jsonl"
    out = malmm("eval", data.test, "--task", "classify", *TINY, "--frames", 3, "-q", "-o", out_file)
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "confusion (rows: true, columns: predicted)" in text and "labels scored by" in text
    matrix = text[text.index("confusion"):].splitlines()
    assert matrix[1].split() == ["cat", "dog"] and [line.split()[0] for line in matrix[2:4]] == ["cat", "dog"]
    counts = [[int(v) for v in line.split()[1:]] for line in matrix[2:4]]
    final = json.loads((tmp_path / "p.summary.json").read_text())
    assert counts == final["confusion"]["matrix"] and sum(map(sum, counts)) == final["n"] == 4
    written = [r.split(",")[0] for r in data.test.read_text().splitlines()[1:]]
    assert [r["input"] for r in records(out_file.read_text())] == written  # "clips/test_cat_0.mp4", not absolute


def test_eval_text_prints_the_confusion_of_the_labels_in_use_only(data, tmp_path):
    """A label set larger than the data's labels (a built-in set on a few items): the printed
    matrix has a row per true label the data has and a column per label true or predicted; the
    summary keeps the whole matrix."""
    out = malmm("eval", data.test, "--task", "classify", *TINY, "--frames", 3, "-q", "-o", tmp_path / "p.jsonl",
                "--labels", "cat,dog,ball,car,tea")
    assert out.exit_code == 0, out.output
    final = json.loads((tmp_path / "p.summary.json").read_text())
    labels, matrix = final["confusion"]["labels"], final["confusion"]["matrix"]
    assert len(labels) == 5 and len(matrix) == 5
    predicted = {labels[j] for row in matrix for j, v in enumerate(row) if v}
    lines = out.stdout[out.stdout.index("confusion"):].splitlines()
    header, body = lines[1].split(), lines[2:]
    assert [line.split()[0] for line in body] == ["cat", "dog"]
    assert header == [x for x in labels if x in {"cat", "dog"} | predicted]
    assert "labels no item has or got left out" in lines[0]  # ball, car, tea have no row
    for line, true in zip(body, ("cat", "dog")):
        assert [int(v) for v in line.split()[1:]] == [matrix[labels.index(true)][labels.index(c)] for c in header]


def test_label_score_mean_divides_each_labels_log_likelihood_by_its_tokens(data, tiny_model):
    """--label-score mean: a label's score is its log-likelihood (EOS included) over its token
    count; sum (the default) is the probability of answering exactly the label."""
    from malmm_cli.engine import Session

    clip = load_dataset(data.test, "classify")[0].video
    labels = ["cat", "a dog on the grass", "ball"]  # 1, 5 and 1 words; unknown ones spelt out
    session = Session.from_model(tiny_model)
    with session.read(clip, frames=3) as video:
        by = {how: {s.label: s.score for s in video.classify(labels=labels, label_score=how).labels}
              for how in ("sum", "mean")}
        stream = tiny_model.new_stream(["what is shown in the video?"], memory_bank_length=20)
        stream.add_features(video.kept.store.read(0, video.frames))
    summed = tiny_model.score(stream, None, labels)[0].double().numpy()
    counts = np.array([len(ids) + 1 for ids in tiny_model.tokenizer(labels, add_special_tokens=False).input_ids])
    assert counts[1] > counts[0]
    for how, scores in (("sum", summed), ("mean", summed / counts)):
        expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        assert [by[how][label] for label in labels] == pytest.approx(expected, abs=1e-5)
