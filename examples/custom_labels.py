"""Classify videos against your own labels, with probabilities, from a labels file.

    python examples/custom_labels.py VIDEO... [--labels examples/kitchen_labels.txt] [--model tiny-random]

Every label is scored by the model's likelihood of giving it as the answer; the
probabilities sum to 1 over the whole label set. Same as:
    malmm classify VIDEO --labels examples/kitchen_labels.txt --top-k 3 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("videos", nargs="+")
    parser.add_argument("--labels", default=str(HERE / "kitchen_labels.txt"))
    parser.add_argument("--prompt", default="what is the person doing?")
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()

    cmd = [sys.executable, "-m", "malmm_cli", "classify", *args.videos, "--labels", args.labels,
           "--prompt", args.prompt, "--top-k", "3", "--model", args.model, "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if "error" in record:
            print(f"{record['input']}: {record['error']}")
            continue
        best = ", ".join(f"{x['label']} {x['score']:.0%}" for x in record["labels"])
        print(f"{record['input']}: {best}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
