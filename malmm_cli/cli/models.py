"""`malmm models list|download|path` and `malmm doctor` (the work: engine/catalog.py and
engine/doctor.py)."""

from __future__ import annotations

import typer

from .options import HelpInWords, ListJsonOpt, ModelNameArg, ModelPathArg, examples


def register(app: typer.Typer, models_app: typer.Typer) -> None:
    models_app.command("list", cls=HelpInWords, epilog=examples("malmm models list", "malmm models list --json"))(
        models_list)
    models_app.command("download", cls=HelpInWords, epilog=examples(
        "malmm models download instructblip-vicuna-7b", "malmm models download tiny-random"))(models_download)
    models_app.command("path", cls=HelpInWords, epilog=examples("malmm models path", "malmm models path tiny-random"))(
        models_path)
    app.command(cls=HelpInWords, epilog=examples("malmm doctor"))(doctor)


def models_list(json_: ListJsonOpt = False):
    """The model presets, and whether each is downloaded."""
    from malmm_cli.engine.catalog import list_models

    raise typer.Exit(list_models(json_))


def models_download(name: ModelNameArg):
    """Download a model into the Hugging Face cache (resumable)."""
    from malmm_cli.engine.catalog import download_model

    raise typer.Exit(download_model(name))


def models_path(name: ModelPathArg = None):
    """Print where a downloaded model lives, or where everything is cached."""
    from malmm_cli.engine.catalog import model_path

    raise typer.Exit(model_path(name))


def doctor():
    """Check the installation and run tiny-random end to end on a generated video."""
    from malmm_cli.engine.doctor import run_doctor

    raise typer.Exit(run_doctor())
