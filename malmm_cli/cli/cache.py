"""`malmm cache`: what the malmm cache folder holds (size per kind), `clear`, `prune --older-than`
(the work: engine/cache_dir.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .options import GroupInWords, HelpInWords, examples

KIND_NAMES = "features, downloads, quantized, models, precision, outputs"

KindsArg = Annotated[Optional[list[str]], typer.Argument(
    metavar="KIND", show_default=False,
    help=f"What to remove: {KIND_NAMES}. \\[default: all but outputs, the records of what malmm wrote]")]
CacheJsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per kind (one per line).")]


def _age(text: str) -> float:
    from malmm_cli.engine.cache_dir import parse_age

    try:
        return parse_age(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


OlderThanOpt = Annotated[float, typer.Option(
    "--older-than", metavar="AGE", parser=_age, show_default=False,
    help="Remove what has not been used (features) or written (the rest) for AGE: 30d, 12h, 2w, 90m.")]


def register(app: typer.Typer) -> None:
    cache_app = typer.Typer(cls=GroupInWords, help="The malmm cache folder: its size per kind; clear; prune.",
                            invoke_without_command=True)
    app.add_typer(cache_app, name="cache")
    cache_app.callback(invoke_without_command=True)(cache)
    cache_app.command("clear", cls=HelpInWords, epilog=examples(
        "malmm cache clear", "malmm cache clear features downloads"))(clear)
    cache_app.command("prune", cls=HelpInWords, epilog=examples(
        "malmm cache prune --older-than 30d", "malmm cache prune --older-than 2w features"))(prune)


def cache(ctx: typer.Context, json_: CacheJsonOpt = False):
    """The malmm cache folder: what each kind takes (vision features, downloaded videos,
    quantized weights, ...); `clear` and `prune` remove them."""
    if ctx.invoked_subcommand is not None:
        return
    from malmm_cli.engine.cache_dir import show_usage

    raise typer.Exit(show_usage(json_))


def clear(kinds: KindsArg = None):
    """Remove everything of the kinds named (all but outputs without names); all of it can be made again."""
    from malmm_cli.engine.cache_dir import remove_kinds

    raise typer.Exit(remove_kinds(kinds or [], None))


def prune(older_than: OlderThanOpt, kinds: KindsArg = None):
    """Remove what has not been used for a while, of the kinds named (all but outputs without names)."""
    from malmm_cli.engine.cache_dir import remove_kinds

    raise typer.Exit(remove_kinds(kinds or [], older_than))
