"""`malmm eval` and malmm_cli.evaluate: metrics against hand-computed values, the CLI end to end
on synthetic clips with tiny-random, resuming, broken videos and bad data files."""

from __future__ import annotations

import json
import math

import pytest

from malmm_cli.learn import evaluate as ev
from malmm_cli.learn.dataset import load_dataset
from malmm_cli.learn.eval_command import summary_path
from tests.cli import TINY, malmm, records, run_help_examples

FAST = ["--frames", 4, "-q"]  # 4 frames a clip; tiny-random's results are meaningless, their bookkeeping is not
GEN = ["--beams", 1, "--max-tokens", 2]


# ---- metrics ----------------------------------------------------------------------------------


def rec(target, prediction, rank):
    return {"target": target, "prediction": prediction, "rank": rank}


def test_classify_metrics_by_hand():
    labels = ["a", "b", "c", "d", "e", "f", "g"]
    rs = [rec("a", "a", 1), rec("a", "b", 2), rec("a", "a", 1), rec("b", "c", 6), rec("c", "c", 1)]
    m = ev.classify_metrics(rs, labels)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["top5"] == pytest.approx(4 / 5)  # rank 6 misses top-5
    assert m["per_class"] == {"a": {"n": 3, "accuracy": pytest.approx(2 / 3)}, "b": {"n": 1, "accuracy": 0.0},
                              "c": {"n": 1, "accuracy": 1.0}}
    matrix = m["confusion"]["matrix"]
    assert m["confusion"]["labels"] == labels and len(matrix) == 7 and all(len(row) == 7 for row in matrix)
    assert (matrix[0][0], matrix[0][1], matrix[1][2], matrix[2][2]) == (2, 1, 1, 1)
    assert sum(map(sum, matrix)) == 5


def test_ask_matches_as_the_official_eval():
    assert ev.exact_match(" man ", "man") and not ev.exact_match("Man", "man")  # case counts, as in LAVIS
    assert not ev.exact_match("man walking", "man") and ev.first_word_match("man walking", "man")
    assert not ev.first_word_match("a man", "man")
    marks = [(True, True), (False, True), (False, False), (False, True)]
    m = ev.ask_metrics([{"correct": c, "first_word_correct": f} for c, f in marks])
    assert (m["accuracy"], m["first_word_accuracy"]) == (0.25, 0.75)


def test_bleu4_and_cider_against_hand_computed_values():
    pytest.importorskip("pycocoevalcap")
    # One reference each, words not shared across videos: identical captions give BLEU-4 1 and,
    # each n-gram's idf being log 2 in its own video only, cosine 1 at every n: CIDEr-D = 10.
    same = [{"references": ["A man is cooking."], "prediction": "a man is cooking"},
            {"references": ["the dog runs on grass"], "prediction": "The dog runs on grass!"}]
    for java in (True, False):
        m = ev.caption_scores(same, java=java)
        assert m["bleu4"] == pytest.approx(1.0, abs=1e-6) and m["cider"] == pytest.approx(10.0, abs=1e-6)
        assert m["rouge_l"] == pytest.approx(1.0, abs=1e-6)
    # One extra word: n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty.
    longer = [{"references": ["a man is cooking"], "prediction": "a man is cooking food"}]
    bleu4 = ev.caption_scores(longer, java=False)["bleu4"]
    assert bleu4 == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)


def test_report_counts_errors_apart_and_caption_accuracy_is_none():
    rs = [{"target": "x", "prediction": "x", "rank": 1}, {"input": "v", "index": 1, "error": "broken"}]
    r = ev.report("classify", rs, labels=["x", "y"]).to_record()
    assert (r["n"], r["errors"], r["accuracy"]) == (1, 1, 1.0)
    assert ev.report("caption", []).to_record()["accuracy"] is None


def test_caption_cases_gather_the_references_of_a_video(tmp_path):
    data = tmp_path / "cap.csv"
    data.write_text("video,caption\na.mp4,one\nb.mp4,two\na.mp4,three\n")
    cases = ev.cases_for(load_dataset(data, "caption"), "caption")
    assert [(c.index, c.targets) for c in cases] == [(0, ("one", "three")), (1, ("two",))]


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Four 2-second synthetic clips in two classes (tests/synthetic.py), and data files for the
    three tasks over them."""
    from tests.synthetic import make_dataset

    root = tmp_path_factory.mktemp("evaldata")
    data = make_dataset(root, labels=("cat", "dog"), train_per_label=1, test_per_label=2, n_frames=8)
    clips = [row.split(",")[0] for row in data.test.read_text().splitlines()[1:]]
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"video": c, "question": "what is it?", "answer": "cat"}) + "\n" for c in clips))
    cap = root / "cap.csv"
    cap.write_text("video,caption\n" + "".join(f"{c},a coloured screen then noise\n{c},colour\n" for c in clips))
    return data.test, qa, cap


def _summary(out_file):
    return json.loads(summary_path(out_file).read_text())


def test_classify_end_to_end(synth, tmp_path):
    test_csv, _, _ = synth
    out_file = tmp_path / "preds.jsonl"
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "-o", out_file, "--json")
    assert out.exit_code == 0, out.stderr
    (final,) = records(out.stdout)
    rows = records(out_file.read_text())
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and len({r["job"] for r in rows}) == 1
    assert all(r["prediction"] in ("cat", "dog") and r["correct"] == (r["prediction"] == r["target"]) for r in rows)
    assert final["n"] == 4 and final["errors"] == 0 and final["labels"] == 2 and final["frames"] == 4
    assert final["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 4)
    assert final["top5"] == 1.0  # two labels: the target is always in the top five
    assert sum(map(sum, final["confusion"]["matrix"])) == 4
    assert _summary(out_file) == final
    table = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "--labels", "cat,dog,car")
    assert table.exit_code == 0 and "top-1 accuracy" in table.stdout and "per_class" not in table.stdout


def test_ask_and_caption_end_to_end(synth):
    pytest.importorskip("pycocoevalcap")
    _, qa, cap = synth
    out = malmm("eval", qa, "--task", "ask", *TINY, *FAST, *GEN, "--json")
    assert out.exit_code == 0, out.stderr
    (final,) = records(out.stdout)
    assert final["n"] == 4 and 0 <= final["accuracy"] <= final["first_word_accuracy"] <= 1
    out = malmm("eval", cap, "--task", "caption", *TINY, *FAST, *GEN, "--json")
    assert out.exit_code == 0, out.stderr
    (final,) = records(out.stdout)
    assert final["n"] == 4 and final["accuracy"] is None  # four videos, two references each
    assert math.isfinite(final["cider"]) and 0 <= final["bleu4"] <= 1


def test_resume_after_an_interrupt_redoes_nothing(synth, tmp_path, monkeypatch):
    from malmm_cli.engine.session import Session

    test_csv, _, _ = synth
    out_file = tmp_path / "preds.jsonl"
    real = Session.attempt
    videos = [item.video for item in load_dataset(test_csv, "classify")]  # one per case, in case order
    calls, interrupt = [], [True]

    def stop_at_third(self, spec, *args, **kwargs):  # Ctrl-C while the third case runs, in the first run only
        calls.append(videos.index(spec))
        if len(calls) == 3 and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt
        return real(self, spec, *args, **kwargs)

    monkeypatch.setattr(Session, "attempt", stop_at_third)
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "-o", out_file)
    assert out.exit_code == 130 and "interrupted; 2 predictions kept" in out.stderr
    assert not summary_path(out_file).exists()
    before = out_file.read_text()
    calls.clear()
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "-o", out_file, "--resume", "--json")
    assert out.exit_code == 0, out.stderr
    assert calls == [2, 3] and out_file.read_text().startswith(before)
    assert [r["index"] for r in records(out_file.read_text())] == [0, 1, 2, 3]
    assert records(out.stdout)[0]["n"] == 4
    # Other options are other work: nothing is taken for done.
    calls.clear()
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "--memory", 2, "-o", out_file, "--resume")
    assert out.exit_code == 0 and calls == [0, 1, 2, 3]


def test_broken_videos_become_error_records(synth, tmp_path):
    test_csv, _, _ = synth
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 2000)
    data = tmp_path / "val.csv"
    first = load_dataset(test_csv, "classify")[0]
    # A video that exists but cannot be read is its item's error record; a missing one is refused
    # before anything loads, as train refuses it (test_train.py, issue 24 point 10).
    data.write_text(f"video,label\n{first.video},{first.target}\nbroken.mp4,{'cat' if first.target == 'dog' else 'dog'}\n")
    out_file = tmp_path / "preds.jsonl"
    out = malmm("eval", data, "--task", "classify", *TINY, *FAST, "-o", out_file, "--json")
    assert out.exit_code == 1
    rows = records(out_file.read_text())
    assert ["error" in r for r in rows] == [False, True] and rows[1]["input"] == "broken.mp4"
    final = records(out.stdout)[0]
    assert (final["n"], final["errors"]) == (1, 1) and _summary(out_file) == final


def test_python_api_matches_the_cli(synth, tiny_model, tmp_path):
    test_csv, _, _ = synth
    items = load_dataset(test_csv, "classify")
    seen = []
    report = ev.evaluate(tiny_model, items, "classify", frames=4, memory=3, on_record=seen.append)
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "--memory", 3, "-o", tmp_path / "p.jsonl")
    assert out.exit_code == 0, out.stderr
    cli = records((tmp_path / "p.jsonl").read_text())
    assert [r["prediction"] for r in report.records] == [r["prediction"] for r in cli]
    assert seen == report.records and report.n == 4 and report.accuracy == _summary(tmp_path / "p.jsonl")["accuracy"]


@pytest.mark.parametrize("args, words", [
    (["--task", "ask"], "the header has no 'question' column"),
    (["--task", "classify", "--labels", "cat,car"], "the label 'dog' is not in the label set 'custom'"),
    (["--task", "classify", "--label-set", "nope"], "Unknown --label-set 'nope'"),
    (["--task", "classify", "--labels", "a,b", "--label-set", "coin"], "not both"),
    (["--task", "caption", "--labels", "a,b"], "--labels and --label-set are for --task classify"),
    (["--task", "classify", "--resume"], "--resume needs --output"),
])
def test_bad_data_and_options_are_one_sentence(synth, args, words):
    test_csv, _, _ = synth
    out = malmm("eval", test_csv, *args, *TINY, *FAST)
    assert out.exit_code == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_outputs_never_clobber_the_data_or_a_foreign_summary(synth, tmp_path):
    test_csv, _, _ = synth
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "-o", test_csv)
    assert out.exit_code == 2 and "is one of the inputs" in out.stderr
    out_file = tmp_path / "preds.jsonl"
    summary_path(out_file).write_text("my notes\n")
    out = malmm("eval", test_csv, "--task", "classify", *TINY, *FAST, "-o", out_file)
    assert out.exit_code == 2 and "is not an eval summary written by malmm" in out.stderr
    assert summary_path(out_file).read_text() == "my notes\n" and not out_file.exists()


def test_a_summary_edited_since_malmm_wrote_it_is_kept(synth, tmp_path):
    """The summary beside -o was recognised by its keys alone: an edited one was replaced."""
    test_csv, _, _ = synth
    out_file = tmp_path / "preds.jsonl"
    run = ("eval", test_csv, "--task", "classify", *TINY, *FAST, "-o", out_file, "-q")
    assert malmm(*run).exit_code in (0, 1)
    assert malmm(*run, "--overwrite").exit_code in (0, 1)  # its own, untouched: replaced
    edited = {**json.loads(summary_path(out_file).read_text()), "note": "my reading of these numbers"}
    summary_path(out_file).write_text(json.dumps(edited))
    out = malmm(*run, "--overwrite")
    assert out.exit_code == 2 and "is not an eval summary written by malmm" in out.stderr
    assert json.loads(summary_path(out_file).read_text()) == edited


def test_the_help_examples_run_as_printed(synth, tiny_model, tmp_path, monkeypatch):
    """Every example under `malmm eval --help`, in a folder holding the files they name (the
    checkpoint built as the official runner saves one), with MALMM_MODEL=tiny-random."""
    from tests.official_checkpoint import write_official_checkpoint

    test_csv, qa, cap = synth
    for name, source in (("val.csv", test_csv), ("qa.jsonl", qa), ("captions.csv", cap)):
        text = source.read_text()
        (tmp_path / name).write_text(text.replace("clips/", f"{source.parent}/clips/"))
    write_official_checkpoint(tiny_model, tmp_path / "msrvtt_cap.pth", num_frames=4, memory_bank_length=3)
    write_official_checkpoint(tiny_model, tmp_path / "ckpt.pth", num_frames=4, memory_bank_length=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MALMM_MODEL", "tiny-random")
    assert len(run_help_examples(["eval"])) == 4
    assert len(records((tmp_path / "qa-preds.jsonl").read_text())) == 4


def test_questions_on_one_video_run_the_vision_encoder_once(synth, tiny_model, tmp_path, monkeypatch):
    from malmm_cli.learn.dataset import Item
    from malmm_cli.engine.features import FeatureCache

    video = load_dataset(synth[0], "classify")[0].video
    items = [Item(i, video, "cat", q) for i, q in enumerate(["what is it?", "what colour?", "is it moving?"])]
    encoded = []
    real = tiny_model.encode_frames
    monkeypatch.setattr(tiny_model, "encode_frames", lambda pixels: encoded.append(len(pixels)) or real(pixels))
    report = ev.evaluate(tiny_model, items, "ask", frames=4, beams=1, max_tokens=2, cache=FeatureCache(tmp_path))
    assert report.n == 3 and sum(encoded) == 4  # 4 frames through the ViT, for the first question only
