"""What the command-line tests share: the sample clip, the tiny model, running the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from malmm_cli.app import app

SAMPLE = Path(__file__).resolve().parents[1] / "malmm_cli" / "data" / "sample.mp4"  # 6 s, 10 fps (60 frames), 160x120
TINY = ["--model", "tiny-random"]


def malmm(*args):
    """Run `malmm ARGS...` in this process; exceptions other than exits propagate to the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def records(text: str) -> list[dict]:
    """The JSON records in a command's output (one per non-blank line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
