"""The runnable examples keep working (tiny-random, bundled sample video)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "malmm_cli" / "data" / "sample.mp4"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_python_api_example():
    out = run("examples/python_api.py")
    assert out.returncode == 0, out.stderr
    assert "visual tokens for the LLM: (2, 32, 64)" in out.stdout
    assert out.stdout.count("Short answer:") == 2 and "log-likelihood of each candidate answer" in out.stdout


def test_folder_to_jsonl_example(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "one.mp4")
    (folder / "broken.mp4").write_bytes(b"\x00" * 1000)
    output = tmp_path / "results.jsonl"
    out = run("examples/folder_to_jsonl.py", str(folder), "--output", str(output))
    assert out.returncode == 1  # one input failed
    assert "1 captioned, 1 failed" in out.stdout
    again = run("examples/folder_to_jsonl.py", str(folder), "--output", str(output))
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sum("error" not in r for r in rows) == 1 and again.returncode == 1  # resumed: no duplicate success
    assert "1 captioned, 1 failed" in again.stdout  # the retried input counts once, not once per record


def test_custom_labels_example():
    out = run("examples/custom_labels.py", str(SAMPLE))
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"{SAMPLE}: ") and line.count("%") == 3


def test_many_videos_example(tmp_path):
    from tests.media import make_video

    short = tmp_path / "short.mp4"
    make_video(short, fps=10, n_frames=20)  # 2 s: 4 frames at 2 fps, against the sample's 12
    out = run("examples/many_videos.py", str(SAMPLE), str(short))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{SAMPLE}: 12 frames, memory 10/10 slots, 2 compressions"
    assert lines[1] == f"{short}: 4 frames, memory 4/10 slots, 0 compressions"  # it sat out the last 8 steps
    assert len(lines) == 4 and lines[2].startswith(f"{SAMPLE}: ") and lines[3].startswith(f"{short}: ")


def test_read_once_example():
    out = run("examples/read_once.py")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("read 20 frames of 6.0 s once: ")
    answers = [line for line in lines if line.startswith("A: ")]
    assert len(answers) == 3 and all("(vision 0.00 s" in line for line in answers)  # no ViT after the read
    assert any(line.startswith("caption: ") for line in lines) and any(line.startswith("[0-2 s] ") for line in lines)
