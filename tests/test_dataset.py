"""Data files for eval/train: CSV and JSONL per task, paths relative to the file, one-sentence errors."""

from __future__ import annotations

import json

import pytest

from malmm_cli.learn.dataset import Item, load_dataset
from malmm_cli.errors import UsageError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_classify_resolves_relative_paths_against_the_data_file(tmp_path, monkeypatch):
    data = write(tmp_path / "sets" / "val.csv", "video,label\nclips/a.mp4,cooking\n/abs/b.mp4, dancing \n")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    items = load_dataset("sets/val.csv", "classify")
    assert items == [
        Item(index=0, video=str(tmp_path / "sets" / "clips" / "a.mp4"), target="cooking"),
        Item(index=1, video="/abs/b.mp4", target="dancing"),
    ]
    assert load_dataset(data, "classify") == items


def test_csv_ask_with_quoted_commas_extra_columns_and_any_column_order(tmp_path):
    data = write(
        tmp_path / "qa.csv",
        'answer,Question,video,note\nred,"what colour, mostly?",a.mp4,x\n',
    )
    (item,) = load_dataset(data, "ask")
    assert (item.question, item.target, item.video) == ("what colour, mostly?", "red", str(tmp_path / "a.mp4"))


def test_jsonl_caption_keeps_urls_and_skips_blank_lines(tmp_path):
    rows = [{"video": "https://example.com/v.mp4", "caption": "a man runs"}, {"video": "b.mp4", "caption": "a dog"}]
    data = write(tmp_path / "cap.jsonl", json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    items = load_dataset(data, "caption")
    assert [i.video for i in items] == ["https://example.com/v.mp4", str(tmp_path / "b.mp4")]
    assert [i.index for i in items] == [0, 1] and items[1].question is None


def test_a_missing_video_is_not_an_error_here(tmp_path):
    data = write(tmp_path / "d.csv", "video,label\nnowhere.mp4,x\n")
    assert load_dataset(data, "classify")[0].video == str(tmp_path / "nowhere.mp4")


def test_bom_from_spreadsheets_is_ignored(tmp_path):
    data = tmp_path / "d.csv"
    data.write_bytes("\ufeffvideo,label\na.mp4,x\n".encode("utf-8"))
    assert load_dataset(data, "classify")[0].target == "x"


@pytest.mark.parametrize(
    "name, text, task, words",
    [
        ("none.csv", None, "classify", "does not exist"),
        ("d.csv", "video,caption\na.mp4,hi\n", "classify", "line 1: the header has no 'label' column"),
        ("d.csv", "video,label\na.mp4,\n", "classify", "line 2: the 'label' field is empty"),
        ("d.csv", "video,question,answer\na.mp4,why\n", "ask", "line 2: the 'answer' field is missing"),
        ("d.csv", "video,label\na.mp4,x,y\n", "classify", "line 2: 3 fields but the header has 2"),
        ("d.csv", "video,label\n", "classify", "no data rows"),
        ("d.csv", "", "classify", "no data rows"),
        ("d.jsonl", '{"video": "a.mp4", "label": "x"}\n{"video": "b.mp4",\n', "classify", "line 2: not valid JSON"),
        ("d.jsonl", '["a.mp4", "x"]\n', "classify", "line 1: each line must be a JSON object"),
        ("d.jsonl", '{"video": "a.mp4", "label": 3}\n', "classify", "line 1: the 'label' field must be text"),
        ("d.json", '[{"video": "a.mp4", "label": "x"}]\n', "classify", "holds one JSON list; write one object per line"),
        ("d.jsonl", '{"video": "a.mp4"}\n', "caption", "line 1: the 'caption' field is missing"),
    ],
)
def test_bad_data_files_are_one_sentence_naming_file_and_line(tmp_path, name, text, task, words):
    path = tmp_path / name
    if text is not None:
        write(path, text)
    with pytest.raises(UsageError) as err:
        load_dataset(path, task)
    message = str(err.value)
    assert words in message and str(path) in message
    assert "\n" not in message and message.endswith(".")


def test_unknown_task_and_folder_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="Unknown task 'segment'"):
        load_dataset(write(tmp_path / "d.csv", "video,label\na,b\n"), "segment")
    with pytest.raises(UsageError, match="is a folder"):
        load_dataset(tmp_path, "classify")
