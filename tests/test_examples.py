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
