"""Caption every video in a folder into a JSON Lines file, resumable, and summarise the results.

    python examples/folder_to_jsonl.py FOLDER [--output results.jsonl] [--model tiny-random]

It runs the CLI (`malmm caption FOLDER -o results.jsonl --resume`): the batch goes on past
broken files (they get an error record), each record is written as soon as its video is
done, and running it again skips what is already in the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--output", default="results.jsonl")
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()

    cmd = [sys.executable, "-m", "malmm_cli", "caption", args.folder, "--model", args.model,
           "-o", args.output, "--resume", "--quiet"]
    code = subprocess.run(cmd).returncode  # 0: all fine, 1: some input failed, 2: usage error
    if code == 2 or not Path(args.output).exists():
        return code
    # An input retried after a failure has an error record and then its result: the last one counts.
    latest = {}
    for line in Path(args.output).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[record["input"]] = record
    for r in latest.values():
        if "error" in r:
            print(f"FAILED  {r['input']}: {r['error']}")
        else:
            print(f"{r['video']['duration']:7.1f}s  {r['sampling']['frames']:4d} frames  {r['input']}: {r['text']}")
    done = sum("error" not in r for r in latest.values())
    print(f"{done} captioned, {len(latest) - done} failed -> {args.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
