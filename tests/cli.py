"""What the command-line tests share: the sample clip, the tiny model, running the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from malmm_cli.cli.app import app

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


# Fields of a record that belong to the run, not to the video and the options: two runs of the
# same work differ in them. Tests that compare records compare `stable(record)`.
VOLATILE = ("timings", "created")


def stable(record: dict) -> dict:
    """`record` without its VOLATILE fields, as JSON holds it (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in record.items() if k not in VOLATILE}))


def help_text(command: list[str]) -> str:
    out = malmm(*command, "--help")
    assert out.exit_code == 0
    return out.stdout


def help_examples(text: str) -> list[str]:
    """The lines under "Examples:" in a help page (each example on a line of its own)."""
    lines = [line.strip(" │") for line in text.splitlines()]
    start = lines.index("Examples:")
    return [line for line in lines[start + 1:] if line.startswith("malmm ")]


def run_help_examples(command: list[str]) -> list[str]:
    """Run every example of `malmm COMMAND --help` as printed (quietly), each must succeed;
    returns the examples. The caller provides the folder and files they name."""
    import shlex

    examples = help_examples(help_text(command))
    for example in examples:
        out = malmm(*shlex.split(example)[1:], "-q")
        assert out.exit_code == 0, (example, out.output)
    return examples
