"""`malmm serve`: the model behind an OpenAI-compatible HTTP API (malmm_cli/serve/). FastAPI and
uvicorn are the extra `malmm[serve]`, imported only when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from malmm_cli.serve.settings import (API_KEY_ENV, DEFAULT_GRACE_S, DEFAULT_HOST, DEFAULT_KEEP_GB, DEFAULT_MAX_QUEUE,
                                      DEFAULT_PORT, DEFAULT_TIMEOUT_S)

from .options import (CheckpointOpt, Device, DeviceOpt, HelpInWords, ModelOpt, NoCacheOpt, PrecisionOpt, Quant,
                      QuantOpt, QuietOpt, YesOpt, examples)

HostOpt = Annotated[str, typer.Option(
    metavar="ADDRESS", show_default=False,
    help=f"Address to listen on; any but a loopback one (127.0.0.1, ::1, localhost) needs --api-key. "
    f"\\[default: {DEFAULT_HOST}]")]
PortOpt = Annotated[int, typer.Option(metavar="N", show_default=False,
                                      help=f"Port (0: any free one). \\[default: {DEFAULT_PORT}]")]
AllowDirOpt = Annotated[Optional[list[Path]], typer.Option(
    "--allow-dir", metavar="DIR", show_default=False,
    help="A folder whose videos clients may name as file:// URLs (repeatable; links are followed before the "
    "check). \\[default: none: http(s) URLs only]")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(
    metavar="KEY", envvar=API_KEY_ENV, show_envvar=False, show_default=False,
    help=f"Answer only requests with \"Authorization: Bearer KEY\" (better: set ${API_KEY_ENV}, which `ps` "
    "does not show). \\[default: none, on 127.0.0.1 only]")]
MaxQueueOpt = Annotated[int, typer.Option(
    "--max-queue", metavar="N", show_default=False,
    help=f"Requests that may wait behind the one being answered; more get 429 with Retry-After. "
    f"\\[default: {DEFAULT_MAX_QUEUE}]")]
TimeoutOpt = Annotated[float, typer.Option(
    metavar="SECONDS", show_default=False,
    help=f"A request not answered in this time gets 504 (its work stops). \\[default: {DEFAULT_TIMEOUT_S:g}]")]
GraceOpt = Annotated[float, typer.Option(
    metavar="SECONDS", show_default=False,
    help=f"On SIGTERM or Ctrl-C, how long requests in flight may take to finish. \\[default: {DEFAULT_GRACE_S:g}]")]
KeepOpt = Annotated[float, typer.Option(
    metavar="GB", show_default=False,
    help="Keep the videos read, for follow-up questions without decoding or the vision encoder, up to GB "
    f"gigabytes of their features (least recently used dropped first; 0: none). \\[default: {DEFAULT_KEEP_GB:g}]")]


def register(app: typer.Typer) -> None:
    app.command(cls=HelpInWords, epilog=examples(
        "malmm serve --allow-dir ~/videos",
        "malmm serve --model tiny-random --port 8080",
        "malmm serve --host 0.0.0.0 --allow-dir /data/videos     (with $MALMM_API_KEY set)",
    ))(serve)


def serve(
    host: HostOpt = DEFAULT_HOST, port: PortOpt = DEFAULT_PORT, allow_dir: AllowDirOpt = None,
    api_key: ApiKeyOpt = None, max_queue: MaxQueueOpt = DEFAULT_MAX_QUEUE, timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    grace: GraceOpt = DEFAULT_GRACE_S, keep: KeepOpt = DEFAULT_KEEP_GB,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, quant: QuantOpt = Quant.auto,
    device: DeviceOpt = Device.auto, precision: PrecisionOpt = None, no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False, yes: YesOpt = False,
):
    """Answer over HTTP: OpenAI's chat completions (a video_url and a question) and malmm's own
    records (/api/caption, ask, classify, summarize). One model, one request at a time; a video
    read once is kept for the next question."""
    raise typer.Exit(_serve(locals()))


def _serve(values: dict) -> int:
    from malmm_cli.engine.presets import resolve_model
    from malmm_cli.errors import MalmmError
    from malmm_cli.interrupts import sigterm_as_interrupt
    from malmm_cli.messages import error, note, setup_logging
    from malmm_cli.runs.command import CommonOptions, check_environment
    from malmm_cli.serve.settings import settings_from_options

    setup_logging(values["quiet"])
    opts = CommonOptions.from_values(values)
    try:
        settings = settings_from_options(
            host=values["host"], port=values["port"], allow_dirs=values["allow_dir"] or [],
            api_key=values["api_key"], max_queue=values["max_queue"], timeout_s=values["timeout"],
            grace_s=values["grace"], keep_gb=values["keep"], quiet=values["quiet"])
        resolve_model(opts.model)
        check_environment(opts)
        server = _server_module()
        sock = server.bind(settings.host, settings.port)
    except MalmmError as err:
        error(str(err))
        return err.exit_code
    try:
        with sigterm_as_interrupt():
            session = _load(opts)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while loading: nothing was in flight
        sock.close()
        note("stopped before serving")
        return 0
    except MalmmError as err:  # a model not downloaded and not to be fetched unasked, no room for it
        sock.close()
        error(str(err))
        return err.exit_code
    if session is None:
        sock.close()
        return 1
    return server.serve(session, settings, sock)


def _server_module():
    """serve.server, or a UsageError saying how to install what it needs."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        from malmm_cli.errors import UsageError

        raise UsageError("malmm serve needs FastAPI and uvicorn: pip install 'malmm[serve]'.") from None
    from malmm_cli.serve import server

    return server


def _load(opts):
    """The session with its model loaded, or None (said in one sentence)."""
    from malmm_cli.engine.session import Session
    from malmm_cli.runs.command import load_model

    session = Session(opts.session_options())
    return session if load_model(session) else None
