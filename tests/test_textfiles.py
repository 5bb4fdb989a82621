"""A user's data and label files are read within bounds (issue 18, point 9): regular files only,
bounded lines, rows, labels and label lengths, each one sentence and exit 2, before a model
loads where possible (after it, in the model's own tokens)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from malmm_cli.engine import tasks
from malmm_cli.engine.tasks import custom_label_set
from malmm_cli.errors import UsageError
from malmm_cli.learn import dataset
from malmm_cli.learn.dataset import load_dataset
from malmm_cli.sources import textfiles
from tests.cli import SAMPLE, TINY, malmm


def _finishes(call, timeout=20.0):
    """call() run in a thread; its exception (or None) once it returns. A call that blocks
    (opening a FIFO with no writer) fails the test instead of hanging it."""
    outcome = {}

    def target():
        try:
            call()
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread, outcome


@pytest.mark.parametrize("load", [lambda p: load_dataset(p, "classify"), lambda p: custom_label_set(str(p), None)],
                         ids=["data file", "labels file"])
def test_a_fifo_with_no_writer_is_refused_not_waited_on(tmp_path, load):
    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    thread, outcome = _finishes(lambda: load(fifo))
    if thread.is_alive():  # the old code: blocked in open(); a writer lets it go
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
    assert "error" in outcome, "reading a FIFO with no writer blocked"
    assert isinstance(outcome["error"], UsageError) and "is a pipe (FIFO)" in str(outcome["error"])


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_are_refused_before_a_byte_is_read(device):
    with pytest.raises(UsageError, match=f"The data file {device} is a device"):
        load_dataset(device, "classify")
    with pytest.raises(UsageError, match=f"The labels file {device} is a device"):
        custom_label_set(device, None)


def test_the_cli_refuses_devices_for_every_data_option(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text(f"video,label\n{SAMPLE},a\n{SAMPLE},b\n")
    runs = [["eval", "/dev/zero", "--task", "classify"],
            ["train", "/dev/urandom", "--task", "classify", "-o", tmp_path / "c.pth"],
            ["train", good, "--val", "/dev/zero", "--task", "classify", "-o", tmp_path / "c.pth"],
            ["eval", good, "--task", "classify", "--labels", "/dev/zero"],
            ["classify", SAMPLE, "--labels", "/dev/urandom"]]
    for run in runs:
        out = malmm(*run, *TINY, "-q")
        assert out.exit_code == 2 and "is a device" in out.stderr and "Traceback" not in out.output, run


def test_a_line_longer_than_the_bound_is_one_sentence(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("video,label\na.mp4," + "x" * (textfiles.MAX_LINE_CHARS + 10) + "\n")
    with pytest.raises(UsageError, match=r"d.csv, line 2 is longer than 65,536 characters"):
        load_dataset(data, "classify")
    # multi-byte characters: the bound is in characters, the read in bytes
    data.write_text("video,caption\na.mp4," + "\u00e9" * textfiles.MAX_LINE_CHARS + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="line 2 is longer"):
        load_dataset(data, "caption")
    # no line break at all (a binary file saved as .csv)
    data.write_bytes(b"video,label\n" + b"\x01" * (5 * textfiles.MAX_LINE_CHARS))
    with pytest.raises(UsageError, match="line 2 is longer"):
        load_dataset(data, "classify")


def test_not_utf8_names_its_line(tmp_path):
    data = tmp_path / "d.csv"
    data.write_bytes(b"video,label\na.mp4,cat\nb.mp4,caf\xe9\n")
    with pytest.raises(UsageError, match=r"d.csv, line 3: not UTF-8 text"):
        load_dataset(data, "classify")


def test_label_and_text_lengths_are_bounded_in_characters(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("video,label\na.mp4," + "y" * (textfiles.MAX_LABEL_CHARS + 1) + "\n")
    with pytest.raises(UsageError, match=r"line 2: the label is 201 characters long; the limit is 200"):
        load_dataset(data, "classify")
    data.write_text("video,caption\na.mp4," + "w " * 1000 + "x\n")
    with pytest.raises(UsageError, match=r"line 2: the caption is 2,001 characters long; the limit is 2,000"):
        load_dataset(data, "caption")
    data.write_text("video,caption\na.mp4," + "w" * textfiles.MAX_TEXT_CHARS + "\n")
    assert len(load_dataset(data, "caption")[0].target) == textfiles.MAX_TEXT_CHARS


def test_rows_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_ROWS", 3)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"video": "a.mp4", "label": str(i)}) + "\n" for i in range(4)))
    with pytest.raises(UsageError, match="more than 3 data rows"):
        load_dataset(data, "classify")


def test_deeply_nested_json_is_one_sentence(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"video": "a.mp4", "label": "x"}\n{"video": ' + "[" * 30_000 + "]" * 30_000 + "}\n")
    with pytest.raises(UsageError, match="line 2: the JSON is nested too deeply"):
        load_dataset(data, "classify")
    data.write_text('{"video": "a.mp4", "label": ' + "9" * 5000 + "}\n")  # int() refuses > 4,300 digits
    with pytest.raises(UsageError, match="line 1: not valid JSON"):
        load_dataset(data, "classify")
    out = malmm("eval", data, "--task", "classify", *TINY, "-q")
    assert out.exit_code == 2 and "Traceback" not in out.output


@pytest.mark.parametrize("content, words", [
    ("a\nb\n" + "z" * 100_000 + "\n", "line 3 is longer than 65,536 characters"),
    (json.dumps(["a", "b", "c" * 300]), "is 300 characters long; the limit is 200"),
    (json.dumps(["a", "b"]) + " " * (textfiles.MAX_LABELS * (4 * textfiles.MAX_LABEL_CHARS + 8)), "larger than"),
    ("[" * 50_000, "must hold a JSON list of strings"),
    ("".join(f"label {i}\n" for i in range(textfiles.MAX_LABELS + 1)), "more than 10,000 labels"),
])
def test_labels_files_are_bounded(tmp_path, content, words):
    path = tmp_path / ("labels.json" if content[:1] == "[" else "labels.txt")
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        custom_label_set(str(path), None)
    assert words in str(err.value)


def test_the_data_label_set_and_inline_labels_are_bounded(monkeypatch):
    monkeypatch.setattr(tasks, "MAX_LABELS", 2)
    with pytest.raises(UsageError, match="--labels: 3 labels; the limit is 2"):
        custom_label_set("a,b,c", None)
    from malmm_cli.learn.evaluate import Case, data_label_set

    with pytest.raises(UsageError, match="The data's label set: 3 labels"):
        data_label_set([Case(i, "v.mp4", (t,)) for i, t in enumerate("xyz")])


def test_labels_too_long_in_the_models_tokens_stop_before_any_video(tmp_path):
    """tiny-random's tokenizer spells an unknown word letter by letter: 100 letters are 100
    tokens, within the character bound but over the token bound."""
    long = "z" * 100
    out = malmm("classify", SAMPLE, "--labels", f"cat,{long}", *TINY, "--json", "-q")
    assert out.exit_code == 2 and "is 100 tokens long for this model" in out.stderr and not out.stdout
    data = tmp_path / "d.csv"
    data.write_text(f"video,label\n{SAMPLE},cat\n{SAMPLE},{long}\n")
    for run in (["eval", data, "--task", "classify", "-o", tmp_path / "p.jsonl"],
                ["train", data, "--task", "classify", "-o", tmp_path / "c.pth", "--frames", 2]):
        out = malmm(*run, *TINY, "-q")
        assert out.exit_code == 2 and "The data's label set" in out.stderr and "100 tokens" in out.stderr, run
    assert not (tmp_path / "c.pth").exists() and not (tmp_path / "p.summary.json").exists()
    assert malmm("classify", SAMPLE, "--labels", f"cat,{'z' * 60}", *TINY, "--frames", 2, "-q").exit_code == 0
