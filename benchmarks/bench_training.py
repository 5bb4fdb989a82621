"""Training as the official code trains, on the synthetic memory task (tests/synthetic.py): the
memory ablation with the official no-memory baseline, epoch time with and without augmented
views, and --label-score sum against mean (BENCHMARKS.md, section 21).

    python benchmarks/bench_training.py ablation     # M = 6, M = 2, M = 0 and --concat
    python benchmarks/bench_training.py views        # epoch time: --no-augment, --views 1, 4
    python benchmarks/bench_training.py frames       # epoch time: --frames 3, 6, 12
    python benchmarks/bench_training.py label-score  # sum against mean, by epochs trained

Each runs the CLI in this process on tiny-random, in a fresh MALMM_CACHE_DIR, and prints a
table (and JSON lines to --json FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

from common import ROOT, machine  # noqa: F401 - ROOT puts the repository on sys.path

ABLATION = ["--model", "tiny-random", "--frames", "6", "--epochs", "6", "--lr", "3e-3", "--batch-size", "8"]
# Labels of different token lengths for tiny-random (unknown words are spelt letter by letter).
LONG_LABELS = {"cat": "cat", "dog": "a dog", "car": "a car on the road", "ball": "ball"}


def _cli(*args) -> tuple[int, str, str]:
    from tests.cli import malmm

    out = malmm(*[str(a) for a in args])
    return out.exit_code, out.stdout, out.stderr


def _data(root: Path, labels=None):
    from tests.synthetic import make_dataset

    made = make_dataset(root, labels=("cat", "dog", "car", "ball"), train_per_label=8, test_per_label=5, n_frames=12)
    if labels:
        for path in (made.train, made.test):
            rows = path.read_text().splitlines()
            path.write_text("\n".join([rows[0]] + [f"{r.rsplit(',', 1)[0]},{labels[r.rsplit(',', 1)[1]]}"
                                                   for r in rows[1:]]) + "\n")
    return made


def _eval(made, ckpt: Path, *extra) -> dict:
    code, out, err = _cli("eval", made.test, "--task", "classify", "--model", "tiny-random", "--checkpoint", ckpt,
                          "--json", "-q", *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _epoch_seconds(stderr: str) -> list[float]:
    return [float(s) for s in re.findall(r"· ([\d.]+) s$", stderr, flags=re.M)]


def ablation(root: Path) -> list[dict]:
    made = _data(root)
    rows = []
    for name, memory in (("M = 6", ["--memory", "6"]), ("M = 2", ["--memory", "2"]), ("M = 0", ["--memory", "0"]),
                         ("official baseline (--concat)", ["--concat"])):
        ckpt = root / f"{name.split()[0]}{len(rows)}.pth"
        t0 = time.perf_counter()
        code, _, err = _cli("train", made.train, "--task", "classify", "--val", made.test, *ABLATION, *memory,
                            "-o", ckpt)
        assert code == 0, err
        final = _eval(made, ckpt)
        vals = re.findall(r"val accuracy ([\d.]+)%", err)
        rows.append({"memory": name, "accuracy": final["accuracy"], "n": final["n"], "val_by_epoch": vals,
                     "epoch_s": _epoch_seconds(err), "total_s": round(time.perf_counter() - t0, 1),
                     "llm_tokens": 6 * 32 if "concat" in name else 32})
    return rows


def views(root: Path) -> list[dict]:
    made = _data(root)
    rows = []
    for name, extra in (("--no-augment", ["--no-augment"]), ("--views 1", ["--views", "1"]),
                        ("--views 4 (default)", []), ("--views 8", ["--views", "8"])):
        os.environ["MALMM_CACHE_DIR"] = tempfile.mkdtemp(dir=root)  # the first run of each computes its views
        ckpt = root / f"views{len(rows)}.pth"
        t0 = time.perf_counter()
        code, _, err = _cli("train", made.train, "--task", "classify", *ABLATION, "--memory", "6", *extra, "-o", ckpt)
        total = time.perf_counter() - t0
        assert code == 0, err
        epochs = _epoch_seconds(err)
        t0 = time.perf_counter()
        code, _, err = _cli("train", made.train, "--task", "classify", *ABLATION, "--memory", "6", *extra, "-o", ckpt,
                            "--overwrite")
        again = time.perf_counter() - t0
        rows.append({"run": name, "first_run_s": round(total, 1), "epoch_s": epochs, "cached_run_s": round(again, 1),
                     "accuracy": _eval(made, ckpt)["accuracy"]})
    return rows


def frames(root: Path) -> list[dict]:
    """Epoch time against --frames (12-frame clips, so 12 is every frame), features cached."""
    made = _data(root)
    rows = []
    for count in (3, 6, 12):
        ckpt = root / f"frames{count}.pth"
        args = ["train", made.train, "--task", "classify", "--model", "tiny-random", "--frames", str(count),
                "--epochs", "3", "--lr", "3e-3", "--batch-size", "8", "--memory", "6", "--no-augment", "-o", ckpt]
        code, _, err = _cli(*args)  # the first run fills the feature cache
        assert code == 0, err
        code, _, err = _cli(*args, "--overwrite")
        assert code == 0, err
        epochs = _epoch_seconds(err)
        rows.append({"frames": count, "epoch_s": epochs, "median_epoch_s": sorted(epochs)[len(epochs) // 2]})
    return rows


def label_score(root: Path) -> list[dict]:
    made = _data(root, LONG_LABELS)
    rows = []
    for epochs in (1, 2, 3, 6):
        ckpt = root / f"ls{epochs}.pth"
        code, _, err = _cli("train", made.train, "--task", "classify", *ABLATION[:-6], "--epochs", epochs, "--lr",
                            "3e-3", "--batch-size", "8", "--memory", "6", "-o", ckpt)
        assert code == 0, err
        row = {"epochs": epochs}
        for how in ("sum", "mean"):
            final = _eval(made, ckpt, "--label-score", how)
            row[how] = final["accuracy"]
            row[f"{how}_per_class"] = {k: v["accuracy"] for k, v in final["per_class"].items()}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("ablation", "views", "frames", "label-score"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MALMM_CACHE_DIR"] = str(Path(tmp) / "cache")
        rows = {"ablation": ablation, "views": views, "frames": frames, "label-score": label_score}[args.what](
            Path(tmp))
    print(f"# {args.what} on {machine()}, {time.strftime('%Y-%m-%d')}")
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
