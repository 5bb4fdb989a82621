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


# ---- quoting: the csv module's rules, strictly (issue 18, point 7) ---------------------------------


def test_a_line_break_in_a_quoted_caption_becomes_a_space_not_nothing(tmp_path):
    data = write(tmp_path / "cap.csv", 'video,caption\na.mp4,"a man\nwalks"\nb.mp4,"two\r\nlines,  and ""quotes"""\n')
    items = load_dataset(data, "caption")
    assert [i.target for i in items] == ["a man walks", 'two lines,  and "quotes"']


def test_line_breaks_in_questions_and_answers_become_spaces_and_line_numbers_stay_right(tmp_path):
    data = write(tmp_path / "qa.csv", 'video,question,answer\na.mp4,"what is\n\n  shown?",dog\nb.mp4,why,\n')
    with pytest.raises(UsageError, match=r"qa.csv, line 5: the 'answer' field is empty"):
        load_dataset(data, "ask")
    data.write_text('video,question,answer\na.mp4,"what is\n\n  shown?","a\n  dog"\n')
    (item,) = load_dataset(data, "ask")
    assert (item.question, item.target) == ("what is shown?", "a dog")


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    """U+2028 and a lone \\r are legal inside a JSON string (json.dumps writes them raw with
    ensure_ascii=False); they must not cut the line."""
    rows = [{"video": "a.mp4", "caption": "one\u2028two"}, {"video": "b.mp4", "caption": "three\rfour\x85five"}]
    data = write(tmp_path / "cap.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [i.target for i in load_dataset(data, "caption")] == ["one two", "three four five"]


@pytest.mark.parametrize("text, words", [
    # closed on the last row: the label would swallow three rows ("dog\nc.mp4,cat\n...")
    ('video,label\na.mp4,cat\nb.mp4,"dog\nc.mp4,cat\nd.mp4,dog\ne.mp4,cat"\n', "lines 3-6: the 'label' field spans several lines"),
    # never closed: the rest of the file would be one field
    ('video,label\na.mp4,cat\nb.mp4,"dog\nc.mp4,cat\nd.mp4,dog\ne.mp4,cat\n', "line 3: a quote opened on this row is never closed"),
    ('video,caption\na.mp4,"a dog\nb.mp4,a cat\n', "line 2: a quote opened on this row is never closed"),
    # text after a closing quote
    ('video,label\na.mp4,cat\nb.mp4,"dog" x\n', "line 3: not valid CSV"),
    ('video,label\n"a.mp4\nb.mp4",cat\n', "lines 2-3: the 'video' field spans several lines"),
])
def test_an_unbalanced_quote_is_an_error_naming_its_line(tmp_path, text, words):
    data = write(tmp_path / "d.csv", text)
    task = "caption" if "caption" in text else "classify"
    with pytest.raises(UsageError) as err:
        load_dataset(data, task)
    assert words in str(err.value) and str(data) in str(err.value)


def test_eval_and_train_refuse_the_swallowing_quote_before_the_model_loads(tmp_path):
    from tests.cli import TINY, malmm

    data = write(tmp_path / "d.csv", 'video,label\na.mp4,cat\nb.mp4,"dog\nc.mp4,cat\nd.mp4,dog\ne.mp4,cat"\n')
    for command in (["eval", data, "--task", "classify"], ["train", data, "--task", "classify", "-o", tmp_path / "c.pth"]):
        out = malmm(*command, *TINY, "-q")
        assert out.exit_code == 2 and "lines 3-6" in out.stderr and "Traceback" not in out.output
        assert not (tmp_path / "c.pth").exists()
