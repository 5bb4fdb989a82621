"""The HTTP face: FastAPI routes over the engine's thread (worker.py), and a guard in front.

    GET  /v1/models, /v1/models/{id}   the one model this server runs
    POST /v1/chat/completions          OpenAI's chat completions (an ask), streamed or whole
    POST /api/caption|ask|classify|summarize   the command's --json record
    GET  /health                       queue, kept videos, reads (no key needed: it names no file)

Every failure reaches the client as one sentence in OpenAI's error shape; a traceback goes to
the server's log only. The guard refuses, before any route runs: a wrong key (401), a body
over MAX_BODY_BYTES (413), and without a key a Host header that is not this machine's or a
POST body that is not JSON (access.py says why).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from malmm_cli.engine.jobs import build_job, check_options
from malmm_cli.engine.tasks import with_trained_defaults
from malmm_cli.errors import InputError, MalmmError, UsageError
from malmm_cli.messages import log, note
from malmm_cli.results.jobkey import job_key
from malmm_cli.results.records import to_json
from malmm_cli.sources.inputs import VideoSource, open_source

from .access import Located, host_allowed, key_matches, locate
from .protocol import CHAT_OPTIONS, TASKS, ApiError, Reply, Work, model_card, parse_chat, parse_json, parse_native, usage_sentence
from .settings import MAX_BODY_BYTES, ServeSettings
from .worker import Abandoned, Engine, Ticket, VideoId

POLL_S = 0.5  # how often a waiting request looks whether its client is still there
OPEN_PATHS = ("/health",)  # answered without the key
DRAIN_BYTES = 16 * 2**20  # a refused body is read and dropped up to this much, then the connection closes


class Json(JSONResponse):
    """JSON as records are written (results/records.py to_json: a file name's undecodable
    bytes escaped, not a failure to encode)."""

    def render(self, content) -> bytes:
        return to_json(content).encode("utf-8")


def error_response(err: ApiError) -> Json:
    return Json(err.body(), status_code=err.status, headers=err.headers)


def api_error(err: BaseException) -> ApiError:
    """Any failure as the ApiError a client is answered with: one sentence, never a traceback."""
    from models import ModelError

    if isinstance(err, ApiError):
        return err
    if isinstance(err, UsageError):
        return ApiError(400, usage_sentence(err), code="invalid_value")
    if isinstance(err, (MalmmError, ModelError)):
        return ApiError(400, str(err), code="invalid_video")
    if isinstance(err, Abandoned):
        return ApiError(504, "No answer within this server's time limit for a request.")
    log.error("a request failed: %s: %s", type(err).__name__, err, exc_info=err)
    return ApiError(500, f"The server failed to answer (an unexpected {type(err).__name__}); its log says more.")


class Guard:
    """Plain ASGI middleware: refusals before any route, the body's size, and one log line per
    request (unless quiet)."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            await _drain(receive)
            await error_response(refusal)(scope, receive, sending)
        else:
            await self.app(scope, _limited(receive), sending)
        if not self.settings.quiet:
            client = (scope.get("client") or ("?",))[0]
            note(f"{client} {scope['method']} {scope['path']} {status[0]} {time.perf_counter() - started:.2f} s")

    def refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.settings.api_key
        if key is None and not host_allowed(headers.get("host")):
            return ApiError(400, "This server answers only requests addressed to this machine (Host: 127.0.0.1 "
                            "or localhost).", code="invalid_host")
        if key is not None and scope["path"] not in OPEN_PATHS and not key_matches(headers.get("authorization"), key):
            return ApiError(401, "Incorrect API key provided: send it as \"Authorization: Bearer KEY\".")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(400, "Send the request body as JSON, with \"Content-Type: application/json\".",
                                code="invalid_content_type")
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                return _too_large()
        return None


def _too_large() -> ApiError:
    return ApiError(413, f"The request body is over {MAX_BODY_BYTES // 2**20} MiB; a request names its video "
                    "(a path or URL), it does not carry it.")


async def _drain(receive) -> None:
    """Read and drop a refused request's body, up to DRAIN_BYTES: a client still sending it when
    the answer comes and the connection closes would see a broken pipe, not the answer."""
    seen = 0
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return


def _limited(receive):
    """`receive` that stops a body growing past MAX_BODY_BYTES (a chunked body has no length)."""
    seen = [0]

    async def limited():
        message = await receive()
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > MAX_BODY_BYTES:
                raise _too_large()
        return message

    return limited


class Opener:
    """Videos opened for requests: a local file checked, a URL downloaded (sources/download.py,
    in a thread), once for all the requests that name it at the same time."""

    def __init__(self):
        self._pending: dict[str, asyncio.Future] = {}

    async def open(self, located: Located) -> tuple[VideoSource, VideoId]:
        task = self._pending.get(located.spec)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(_open, located.spec))
            task.add_done_callback(_retrieved)  # every request for it may have left before it ends
            self._pending[located.spec] = task
            task.add_done_callback(lambda _: self._pending.pop(located.spec, None))
        try:
            source, video = await asyncio.shield(task)
        except MalmmError as err:  # its sentence names the video as this client did, not its real path
            raise ApiError(400, str(err).replace(located.spec, located.input), code="invalid_video") from None
        return replace(source, input=located.input), video


def _open(spec: str) -> tuple[VideoSource, VideoId]:
    source = open_source(spec)
    try:
        return source, VideoId.of(source)
    except OSError as err:  # gone or replaced since open_source looked
        raise InputError(f"{spec} cannot be read ({(err.strerror or type(err).__name__).lower()}).") from None


async def _until(deadline: float, request: Request, awaitable):
    """What `awaitable` gives, unless the deadline passes (504) or the client leaves first."""
    future = asyncio.ensure_future(awaitable)
    future.add_done_callback(_retrieved)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError(504, "No answer within this server's time limit for a request.")
        done, _ = await asyncio.wait({future}, timeout=min(remaining, POLL_S))
        if done:
            return future.result()
        if await request.is_disconnected():
            raise ApiError(499, "The client closed the connection.", code="client_closed_request")


def sampling_of(job, session) -> tuple:
    """(fps, frames, start, end): how `job` reads its video once a checkpoint's trained frame
    count applies (engine.tasks.with_trained_defaults; its config is read, nothing is run)."""
    job = with_trained_defaults(job, session.trained_config())
    return (job.fps if job.frames is None else None, job.frames, job.start, job.end)


def _retrieved(future: asyncio.Future) -> None:
    """Take a future's exception, so that one nobody waits for any more (the request timed out or
    left) is not reported as "never retrieved"; a request still waiting gets it from result()."""
    if not future.cancelled():
        future.exception()


class Requests:
    """A parsed request's way to its Answer: checked, admitted, its video opened, queued, awaited."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        self.session = engine.session
        self.opener = Opener()

    def job(self, work: Work):
        """As Session.job builds it, but for its last step (resolve: the model's tokenizer), which
        runs on the model's thread."""
        try:
            check_options(**{k: work.options.get(k) for k in CHAT_OPTIONS})  # its arguments, exactly
            return build_job(work.task, self.session.label, **work.options)
        except UsageError as err:
            raise api_error(err) from None

    async def answer(self, request: Request, work: Work, count_tokens: bool = False):
        deadline = time.monotonic() + self.settings.timeout_s
        job = self.job(work)
        located = locate(work.video, self.settings.allow_dirs)
        with self.engine.admit():
            source, video = await _until(deadline, request, self.opener.open(located))
            key = job_key(job, self.session.choice, self.session.options.checkpoint)
            ticket = Ticket(work, job, key, source, video, sampling_of(job, self.session), deadline, count_tokens)
            self.engine.submit(ticket)
            try:
                return await _until(deadline, request, asyncio.wrap_future(ticket.future))
            except asyncio.CancelledError:  # the server's grace period ran out
                ticket.cancel()
                raise
            except Exception as err:
                ticket.cancel()  # the engine skips it, or stops it at its next event
                raise api_error(err) from None


def add_error_handlers(app: FastAPI) -> None:
    """Every failure in OpenAI's shape: ours, Starlette's (no route, wrong method), and bugs."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, err: HTTPException):
        if err.status_code == 405:
            return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}."))
        return error_response(ApiError(err.status_code, f"There is no {request.url.path} here; see /v1/models, "
                                       "/v1/chat/completions and /api/{caption,ask,classify,summarize}."))

    @app.exception_handler(Exception)
    async def on_failure(request: Request, err: Exception):
        return error_response(api_error(err))


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    model_id, created = engine.session.label, int(time.time())
    requests = Requests(engine, settings)
    app = FastAPI(title="malmm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, settings=settings)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return Json({"status": "ok", "model": model_id, **engine.status()})

    @app.get("/v1/models")
    async def models():
        return Json({"object": "list", "data": [model_card(model_id, created)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise ApiError(404, f"The model {name!r} does not exist here; this server runs {model_id!r}.",
                           code="model_not_found")
        return Json(model_card(model_id, created))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        chat = parse_chat(parse_json(await request.body()), model_id)
        done = await requests.answer(request, chat.work, count_tokens=True)
        reply = Reply(model_id, done.result.answers[0].answer, done.usage, done.result.to_record())
        if chat.stream:
            return StreamingResponse(reply.events(chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return Json(reply.completion())

    @app.post("/api/{task}")
    async def native(task: str, request: Request):
        if task not in TASKS:
            raise ApiError(404, f"There is no /api/{task}; the tasks are {', '.join(TASKS)}.")
        work = parse_native(task, parse_json(await request.body()), model_id)
        done = await requests.answer(request, work)
        return Json(done.result.to_record())

    return app
