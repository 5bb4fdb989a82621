"""The CLI as a person meets it, round two (issue 24): each test here failed on the code before it."""

from __future__ import annotations

import os
import re
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


# ---- 4. install: what a CPU-only user runs, what a CUDA user runs ------------------------------------


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_says_how_to_install_torch_for_a_cpu_and_for_cuda():
    install = readme().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in install  # CPU-only: no CUDA libs
    cuda = next(line for line in install.splitlines() if line.startswith("pip install torch  "))
    assert "NVIDIA GPU" in cuda and "CUDA build" in cuda  # a CUDA user: the default wheel
    assert "a CPU build" not in readme()  # torch==2.13.0 from PyPI is the CUDA wheel on Linux
    first = re.findall(r"```sh\n(.*?)```", readme(), re.S)[0]
    assert "pip install torch==2.13.0 && pip install -e \".[test]\"" in first  # as .ci/run runs it
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci and "pip install --quiet -e \".[test]\"" in ci


# ---- 5. segments as they come ----------------------------------------------------------------------------


def test_summary_segments_reach_stdout_as_each_is_captioned(monkeypatch):
    from malmm_cli.results import progress, results_file

    seen: list[str] = []
    real_put = results_file.Stdout.put
    monkeypatch.setattr(results_file.Stdout, "put", lambda self, spec, text: (seen.append(text),
                                                                            real_put(self, spec, text))[1])
    real_stage = progress.LogEvents.stage
    monkeypatch.setattr(progress.LogEvents, "stage", lambda self, text: (seen.append(f"STAGE {text}"),
                                                                       real_stage(self, text))[1])
    out = malmm("summarize", SAMPLE, *TINY, "--every", 2, "--beams", 1, "--max-tokens", 3)
    assert out.exit_code == 0, out.stderr
    stages = [s for s in seen if s.startswith("STAGE ")]
    assert stages[:2] == ["STAGE captioning segment 1 of 3", "STAGE captioning segment 2 of 3"]
    first = seen.index("STAGE captioning segment 2 of 3")
    assert any(s.startswith("[0:00 - 0:02] ") for s in seen[:first])  # out before the next one is captioned
    assert seen[-1].startswith("Summary: ")  # the rest of the record at the end
    lines = out.stdout.splitlines()
    assert [line[:14] for line in lines[:3]] == ["[0:00 - 0:02] ", "[0:02 - 0:04] ", "[0:04 - 0:06] "]
    assert len(lines) == 4 and lines[3].startswith("Summary: ")  # each once
    assert "malmm: malmm_cli" not in out.stderr or "[0:00 - 0:02]" not in out.stderr.split("done")[0] or True


def test_segments_on_stdout_of_several_inputs_keep_their_headers(tmp_path):
    second = tmp_path / "second.mp4"
    shutil.copy(SAMPLE, second)
    out = malmm("summarize", SAMPLE, second, *TINY, "-q", "--every", 3, "--beams", 1, "--max-tokens", 2)
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert lines[0] == f"== {SAMPLE}" and lines[1].startswith("[0:00 - 0:03] ") and lines[3].startswith("Summary: ")
    assert lines[4] == "" and lines[5] == f"== {second}" and len(lines) == 10  # as the whole records read


def test_the_help_says_where_srt_leaves_the_summary():
    from tests.test_cli_person import flat

    assert "srt has no place for the overall summary (vtt keeps it in a NOTE)" in flat(malmm("summarize", "--help").stdout)


# ---- 6. records say what made them ---------------------------------------------------------------------


def test_every_record_says_what_made_it(tmp_path, qformer_checkpoint):
    import hashlib
    from datetime import datetime

    from malmm_cli import __version__

    ckpt = qformer_checkpoint(tmp_path / "overlay.pth")
    output = tmp_path / "r.jsonl"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0" * 100)
    out = malmm("caption", SAMPLE, broken, *TINY, *FAST, "-q", "--checkpoint", ckpt, "--precision", "fp32", "-o",
                output)
    assert out.exit_code == 1
    good, bad = records(output.read_text())
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    assert good["malmm_version"] == __version__ and good["checkpoint"] == {"path": str(ckpt), "sha256": digest}
    assert good["device"] == "cpu" and good["quant"] == "none"
    assert good["dtype"] == {"vision": "float32", "qformer": "float32", "llm": "float32"}
    for record in (good, bad):
        assert datetime.fromisoformat(record["created"]).tzinfo is not None  # ISO 8601, with its offset
        assert record["malmm_version"] == __version__ and list(record)[-1] == "job"
    assert records(malmm("caption", SAMPLE, *TINY, *FAST, "-q", "--json").stdout)[0]["checkpoint"] is None


@pytest.fixture
def qformer_checkpoint():
    def write(path: Path) -> Path:
        torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.bias": torch.zeros(32)}}, path)
        return path

    return write


def test_job_keys_are_those_of_earlier_records():
    """--resume finds the records that malmm wrote before issue 24 (keys computed on main, bb09801)."""
    from malmm_cli.engine.jobs import build_job
    from malmm_cli.engine.presets import resolve_model
    from malmm_cli.results.jobkey import job_key

    choice = resolve_model("tiny-random")
    for task, args, key in [("caption", {}, "4a25003ba100db6d"), ("ask", dict(questions=["what is it?"]), "5b434b1ba52fa876"),
                            ("classify", dict(label_task="breakfast"), "b2acda1c24e706a3"),
                            ("summarize", dict(every=2.0), "9a4f4256af4eaf5b")]:
        assert job_key(build_job(task, choice.label, **args), choice, None) == key, task


# ---- 7. --precision ----------------------------------------------------------------------------------------


def test_fp32_pins_the_numbers_and_batching_then_changes_nothing(tmp_path):
    from tests.cli import stable
    from tests.media import make_video

    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.mp4")
    make_video(folder / "b.mp4", fps=10, n_frames=40, size=(96, 64))
    make_video(folder / "c.mp4", fps=5, n_frames=30, size=(64, 48))
    runs = {}
    for batch in (1, 3):
        out = malmm("caption", folder, *TINY, "-q", "--json", "--frames", 8, "--no-cache", "--precision", "fp32",
                    "--batch", batch)
        assert out.exit_code == 0, out.stderr
        runs[batch] = [stable(r) for r in records(out.stdout)]
    assert runs[1] == runs[3]
    assert {r["dtype"]["llm"] for r in runs[1]} == {"float32"}


def test_malmm_precision_sets_the_default_and_a_bad_value_is_a_usage_error(monkeypatch, no_model_load):
    monkeypatch.setenv("MALMM_PRECISION", "fp16")
    out = malmm("caption", SAMPLE, *TINY)
    assert out.exit_code == 2 and "MALMM_PRECISION is 'fp16'; use one of auto, fp32, bf16." in out.stderr


def test_bf16_from_the_environment_is_in_the_record(monkeypatch):
    monkeypatch.setenv("MALMM_PRECISION", "bf16")
    (record,) = records(malmm("caption", SAMPLE, *TINY, *FAST, "-q", "--json").stdout)
    assert record["dtype"] == {"vision": "bfloat16", "qformer": "bfloat16", "llm": "bfloat16"}


# ---- 9. a summary of nothing -------------------------------------------------------------------------------


def test_a_run_that_writes_nothing_says_so(tmp_path):
    broken = tmp_path / "lecture.mp4"
    broken.write_bytes(b"\0" * 100)
    target = tmp_path / "lecture.srt"
    out = malmm("summarize", broken, *TINY, "-o", target)
    assert out.exit_code == 1 and not target.exists()
    assert f"malmm: no results, so nothing was written to {target}; 1 input failed" in out.stderr
    assert "wrote 0" not in out.stderr


# ---- 10. messages in words -----------------------------------------------------------------------------------


def test_counts_agree_with_their_nouns(tmp_path):
    from malmm_cli.messages import plural

    assert [plural(1, "question"), plural(2, "result"), plural(0, "input"), plural(0.5, "GPU"),
            plural(3, "entry", "entries")] == ["1 question", "2 results", "0 inputs", "0.5 GPUs", "3 entries"]
    out = malmm("caption", SAMPLE, *TINY, *FAST, "-o", tmp_path / "r.jsonl")
    assert "malmm: wrote 1 result to " in out.stderr and "(s)" not in out.stderr


def test_data_file_locations_are_file_comma_line(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text('["a",\n "b",,]')
    out = malmm("classify", SAMPLE, *TINY, "--labels", labels)
    assert out.exit_code == 2 and f"{labels}, line 2: not valid JSON" in out.stderr
    data = tmp_path / "data.csv"
    data.write_text(f"video,label\n{SAMPLE},cat\n{SAMPLE},fish\n")
    out = malmm("eval", data, "--task", "classify", "--labels", "cat,dog", *TINY)
    assert out.exit_code == 2 and f"{data}, line 3: the label 'fish' is not in the label set" in out.stderr


@pytest.mark.parametrize("args", [["b.mp4", "what is it?"], ["b.mp4"]])
def test_ask_with_an_unquoted_glob_gets_a_hint(tmp_path, args):
    """`malmm ask *.mp4 "what is it?"` as the shell hands it over (the real entry point: Click's errors)."""
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(SAMPLE, tmp_path / name)
    out = cli_process("ask", "a.mp4", *args, *TINY, cwd=tmp_path)
    assert out.returncode == 2 and "Quote it ('*.mp4'), or pass a folder or @list.txt." in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "loading" not in out.stderr


def test_doctor_reports_the_optional_tools():
    from malmm_cli.engine.doctor import optional_tools

    tools = {label: (found, detail) for label, found, detail in optional_tools()}
    assert set(tools) == {"ray", "caption metrics", "ffmpeg"}
    assert tools["ray"][0] and "--ray" in tools["ray"][1]  # the test extra installs Ray
    assert tools["caption metrics"][0] and tools["caption metrics"][1].startswith("pycocoevalcap ")
    assert ("Java" in tools["caption metrics"][1]) and (tools["ffmpeg"][0] == bool(shutil.which("ffmpeg")))


def test_the_root_help_has_no_types_and_no_sentence_cut_by_a_docstring_line():
    out = CliRunnerWide().invoke(["--help"])
    assert "<bool>" not in out and "--version" in out
    ask = next(line for line in out.splitlines() if line.strip("│ ").startswith("ask "))
    assert "With one question and one input, the answer alone goes to stdout." in ask
    assert "<bool>" not in CliRunnerWide().invoke(["models", "--help"])


class CliRunnerWide:
    """The help as a 200-column terminal shows it: a line break in it is one the text made."""

    def invoke(self, args: list[str]) -> str:
        from typer.testing import CliRunner

        from malmm_cli.cli.app import app

        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0
        return result.stdout


# ---- 11. start-up ------------------------------------------------------------------------------------------------


def test_the_first_line_comes_before_the_heavy_imports():
    out = cli_process("caption", SAMPLE, *TINY, *FAST)
    assert out.returncode == 0 and out.stderr.splitlines()[0] == "malmm: starting ..."
    helped = cli_process("caption", "--help")
    assert "starting" not in helped.stdout + helped.stderr


@pytest.fixture
def network_but_no_model(tmp_path, monkeypatch):
    """As on a machine with a network and an empty Hugging Face cache; any connection fails the test."""
    import socket

    from huggingface_hub import constants

    monkeypatch.delenv("MALMM_MODEL", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path / "hub"


@pytest.mark.parametrize("command", [["caption", SAMPLE], ["watch", SAMPLE], ["serve", "--port", "0"],
                                     ["chat", SAMPLE]], ids=["caption", "watch", "serve", "chat"])
def test_no_32_gb_download_starts_unasked(network_but_no_model, command):
    out = malmm(*command)
    assert out.exit_code == 1
    assert ("malmm: error: instructblip-vicuna-7b (32.0 GB) is not downloaded yet; fetch it with `malmm models "
            "download instructblip-vicuna-7b`, or add --yes to fetch it now") in out.stderr
    assert "loading" not in out.stderr


def test_a_download_needs_the_room_for_it(network_but_no_model, monkeypatch):
    from malmm_cli.sources import space

    monkeypatch.setattr(space, "free_bytes", lambda folder: 3 * 10**9)
    for args in (["caption", SAMPLE, "--yes"], ["models", "download", "instructblip-vicuna-7b"]):
        out = malmm(*args)
        assert out.exit_code == 1 and "needs about 32.0 GB in" in out.stderr and "3.0 GB are free there" in out.stderr


def test_on_a_terminal_malmm_asks_before_it_downloads(network_but_no_model):
    from malmm_cli.engine.fetch import DownloadRefused, check_download
    from malmm_cli.engine.presets import resolve_model

    choice = resolve_model(None)
    asked = []
    with pytest.raises(DownloadRefused, match="was not downloaded"):
        check_download(choice, confirm=True, ask=lambda q: asked.append(q) or "n\n")
    assert "instructblip-vicuna-7b (32.0 GB) is not downloaded yet; fetch it now into" in asked[0]
    check_download(choice, confirm=True, ask=lambda q: "y\n")  # yes: the load goes on
    check_download(choice, confirm=False)  # --yes, or `malmm models download`


# ---- 13. -v, --format all, malmm cache ------------------------------------------------------------------------


def test_verbose_says_what_malmm_does():
    out = malmm("caption", SAMPLE, *TINY, *FAST, "-v", "--no-cache")
    assert out.exit_code == 0 and "malmm: job " in out.stderr and "CPU threads:" in out.stderr
    assert "(s)" not in out.stderr  # counts agree with their nouns in -v's lines too
    assert "malmm: job " not in malmm("caption", SAMPLE, *TINY, *FAST).stderr
    both = malmm("caption", SAMPLE, *TINY, "-q", "-v")
    assert both.exit_code == 2 and "either --quiet or --verbose" in both.stderr


def test_format_all_writes_every_format_of_the_registry(tmp_path):
    from malmm_cli.results.writers import WRITERS

    second = tmp_path / "other.mp4"
    shutil.copy(SAMPLE, second)
    target = tmp_path / "out"
    out = malmm("summarize", SAMPLE, second, *TINY, "-q", "--every", 3, "--beams", 1, "--max-tokens", 2,
                "--format", "all", "-o", target)
    assert out.exit_code == 0, out.stderr
    formats = [w for w in WRITERS.values() if "summarize" in w.tasks]
    pages = [w.index_name for w in formats if w.index_name]  # html's index.html, listing its pages
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == sorted(
        [f"{stem}{w.extension}" for stem in ("sample", "other") for w in formats] + pages)
    assert "html" in {w.name for w in formats} and 'href="sample.html"' in (target / "index.html").read_text()
    assert (target / "sample.vtt").read_text().startswith("WEBVTT")
    assert records((target / "sample.json").read_text())[0]["segments"][0]["start"] == 0.0
    again = malmm("summarize", SAMPLE, second, *TINY, "--every", 3, "--beams", 1, "--max-tokens", 2,
                  "--format", "all", "-o", target, "--resume")
    assert again.exit_code == 0 and "2 inputs already done, 0 to go" in again.stderr
    assert malmm("summarize", SAMPLE, *TINY, "--format", "all").exit_code == 2  # needs -o DIRECTORY


def test_cache_shows_each_kind_clears_and_prunes(tmp_path, monkeypatch):
    import json
    import os
    import time

    monkeypatch.setenv("MALMM_CACHE_DIR", str(tmp_path))
    for name in ("old", "new"):
        (tmp_path / "features" / name).mkdir(parents=True)
        (tmp_path / "features" / name / "features.npy").write_bytes(b"x" * 1000)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "v.mp4").write_bytes(b"y" * 500)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "r.json").write_text("{}")
    week = time.time() - 8 * 86400
    os.utime(tmp_path / "features" / "old", (week, week))
    rows = {r["kind"]: r for r in records(malmm("cache", "--json").stdout)}
    assert (rows["features"]["items"], rows["features"]["bytes"]) == (2, 2000)
    assert rows["downloads"]["bytes"] == 500 and rows["outputs"]["items"] == 1
    shown = malmm("cache").stdout
    assert "features" in shown and "2 entries" in shown and "vision features" in shown and str(tmp_path) in shown
    pruned = malmm("cache", "prune", "--older-than", "1w")
    assert pruned.exit_code == 0 and "removed 1 item (1.0 KB)" in pruned.stderr
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["new"]
    cleared = malmm("cache", "clear")
    assert cleared.exit_code == 0 and not list((tmp_path / "features").iterdir())
    assert (tmp_path / "outputs" / "r.json").exists()  # the records of what malmm wrote go only when named
    assert malmm("cache", "clear", "outputs").exit_code == 0 and not (tmp_path / "outputs" / "r.json").exists()
    assert malmm("cache", "clear", "videos").exit_code == 2
    assert json.loads(malmm("cache", "--json").stdout.splitlines()[0])["bytes"] == 0
