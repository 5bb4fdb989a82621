"""The CLI as a person meets it, round two (issue 24): each test here failed on the code before it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.cli import SAMPLE, TINY, malmm, records

FAST = ["--frames", 4, "--beams", 1, "--max-tokens", 3]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: what is checked must be checked before."""
    from malmm_cli.engine import loader

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_model", refuse)


# ---- 1. a format that contradicts the file name ----------------------------------------------------


@pytest.mark.parametrize("args, named, writes", [
    (["-o", "x.srt", "--format", "vtt"], "SubRip (srt)", "WebVTT (vtt)"),
    (["-o", "x.vtt", "--format", "txt"], "WebVTT (vtt)", "text"),
    (["-o", "x.srt", "--json"], "SubRip (srt)", "JSON"),
    (["-o", "x.jsonl", "--format", "md"], "JSON", "Markdown"),
])
def test_a_format_that_contradicts_the_file_name_is_refused(tmp_path, no_model_load, args, named, writes):
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    out = malmm("summarize", SAMPLE, *TINY, *args)
    assert out.exit_code == 2, out.output
    assert f"names a {named} file, but" in out.stderr and f"writes {writes}" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing created


def test_a_format_that_matches_the_file_name_is_taken(tmp_path):
    out = malmm("summarize", SAMPLE, *TINY, *FAST, "-q", "--every", 3, "-o", tmp_path / "x.vtt", "--format", "vtt")
    assert out.exit_code == 0, out.output
    assert (tmp_path / "x.vtt").read_text().startswith("WEBVTT")


# ---- 2. inputs checked before the model loads ---------------------------------------------------------


def test_a_missing_input_is_a_usage_error_before_the_model_loads(tmp_path, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    out = malmm("caption", "videos/", *TINY)
    assert out.exit_code == 2 and out.stderr == "malmm: error: videos/ does not exist.\n"
    shutil.copy(SAMPLE, tmp_path / "real.mp4")
    out = malmm("caption", "real.mp4", "movie.mp4", *TINY, "-o", "r.jsonl")
    assert out.exit_code == 2 and "movie.mp4 does not exist" in out.stderr and not (tmp_path / "r.jsonl").exists()
    (tmp_path / "empty").mkdir()
    out = malmm("caption", "empty/", *TINY)
    assert out.exit_code == 1 and "The folder empty/ contains no video files." in out.stderr


# ---- 3. no deprecated transformers path: -q is quiet ---------------------------------------------------


def test_scoring_raises_no_warning(tiny_model, pixels):
    """transformers 5.2x deprecates `past_key_values` with a FutureWarning on every call."""
    stream = tiny_model.new_stream(["what is it?"], total_frames=2)
    stream.add_frames(pixels[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = tiny_model.score(stream, None, ["a cat", "a dog on a mat", "x"])
        texts = tiny_model.generate(stream, max_new_tokens=3, num_beams=2)
    assert scores.shape == (1, 3) and torch.isfinite(scores).all() and len(texts) == 1


def test_classify_quiet_prints_nothing_on_stderr():
    """In a process of its own: pytest would catch the warnings of an in-process run."""
    out = cli_process("classify", SAMPLE, *TINY, "-q", "--frames", 4, "--labels", "cat,dog,bird")
    assert out.returncode == 0 and out.stderr == "" and len(out.stdout.splitlines()) == 3


def cli_process(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m malmm_cli ARGS` in a process of its own (this tree first on the path)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "malmm_cli", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=300, **kwargs)
