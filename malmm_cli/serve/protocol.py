"""Request bodies -> work for the engine, and records -> OpenAI's response shapes.

Chat completions: MA-LMM answers one question about one video at a time, so of a
conversation it reads two things: the question is the text of the last user message, and the
video is the last `video_url` part of the user messages, or the last file:// or http(s) URL
written in their text (a client that sends the whole history each turn sends the video once,
in the first). System and assistant messages are not read. Per-request options go in an extra "malmm" object with the command line's names
(`fps`, `frames`, `start`, `end`, `memory`, `beams`, `max_tokens`); OpenAI's own `max_tokens`
or `max_completion_tokens` count where "malmm" gives none. Decoding is beam search, as in the
paper, so sampling settings (temperature, top_p, seed) change nothing and are ignored.

The native endpoints (/api/caption, /api/ask, /api/classify, /api/summarize) take the
command's options by their names (`--max-tokens` is "max_tokens", `--top-k` "top_k") and the
video as "input", and answer with the command's --json record.

Pure functions of their arguments: no model, no server (tests call them directly).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from malmm_cli.errors import UsageError
from malmm_cli.times import parse_time

# Defaults of an error's type by status, as OpenAI's API names them.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "requests", 500: "server_error", 503: "server_error", 504: "server_error"}
ERROR_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit_exceeded",
               500: "internal_error", 503: "shutting_down", 504: "timeout"}


class ApiError(Exception):
    """What a client is answered when a request fails: a status and one sentence, sent in
    OpenAI's shape {"error": {"message", "type", "code", "param"}}."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code or ERROR_CODES.get(status, "error")
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


@dataclass(frozen=True)
class Work:
    """One request for the engine: `task` on the video `video` (as the client named it), with
    build_job's options (sampling, memory, decoding, and the task's own)."""

    task: str
    video: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Chat:
    """A chat completion request: its work (an ask), and how to answer."""

    work: Work
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def check_model(body: dict, model_id: str, *, required: bool) -> None:
    """The request's "model" is this server's (404 otherwise, as OpenAI's API answers)."""
    model = body.get("model")
    if model is None and not required:
        return
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Say which model to use: \"model\" is required (see GET /v1/models).", param="model",
                       code="missing_model")
    if model != model_id:
        raise ApiError(404, f"The model {model!r} does not exist here; this server runs {model_id!r}.",
                       param="model", code="model_not_found")


# ---- options, as the command line names them --------------------------------------------------

def _number(name: str, value: Any, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind}, not {json.dumps(value)[:40]}.", param=name,
                       code="invalid_value")
    return value


def _time(name: str, value: Any) -> float:
    """Seconds, or "MM:SS" / "HH:MM:SS" as on the command line."""
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError as err:
            raise ApiError(400, f"{name}: {err}", param=name, code="invalid_value") from None
    return float(_number(name, value))


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string.", param=name, code="invalid_value")
    return value


def _texts(name: str, value: Any) -> list[str]:
    """A string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{name} must be a string or a list of strings.", param=name, code="invalid_value")
    return value


# name -> how to read it, as build_job's keyword
_READERS = {
    "fps": lambda v: float(_number("fps", v)),
    "frames": lambda v: _number("frames", v, integer=True),
    "start": lambda v: _time("start", v),
    "end": lambda v: _time("end", v),
    "memory": lambda v: _number("memory", v, integer=True),
    "beams": lambda v: _number("beams", v, integer=True),
    "max_tokens": lambda v: _number("max_tokens", v, integer=True),
    "prompt": lambda v: _text("prompt", v),
    "top_k": lambda v: _number("top_k", v, integer=True),
    "every": lambda v: _time("every", v),
    "scenes": lambda v: _flag("scenes", v),
}
SAMPLING = ("fps", "frames", "start", "end")
CHAT_OPTIONS = (*SAMPLING, "memory", "beams", "max_tokens")
GENERATION = ("beams", "max_tokens")
# Each native endpoint's fields beside "input" and "model": the command's options by name.
NATIVE_FIELDS = {
    "caption": (*SAMPLING, "memory", *GENERATION, "prompt"),
    "ask": ("question", *SAMPLING, "memory", *GENERATION),
    "classify": ("task", "labels", "top_k", "prompt", *SAMPLING, "memory"),
    "summarize": ("every", "scenes", "prompt", *SAMPLING, "memory", *GENERATION),
}
TASKS = tuple(NATIVE_FIELDS)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false.", param=name, code="invalid_value")
    return value


def _unknown(where: str, given: dict, known: tuple[str, ...]) -> None:
    extra = [k for k in given if k not in known]
    if extra:
        raise ApiError(400, f"{where} has no field {extra[0]!r}; it takes {', '.join(known)}.", param=extra[0],
                       code="unknown_field")


def _options(given: dict, names: tuple[str, ...]) -> dict:
    """build_job's keywords from the fields present (null counts as absent)."""
    out = {}
    for name in names:
        if given.get(name) is not None:
            out[name] = _READERS[name](given[name])
    return out


def usage_sentence(err: UsageError) -> str:
    """A UsageError's sentence with the command line's flags as this API names them
    ("--max-tokens must be ..." -> "max_tokens must be ...")."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), str(err))


# ---- native requests ------------------------------------------------------------------------------

def parse_native(task: str, body: dict, model_id: str) -> Work:
    """POST /api/TASK: the command's options by name, the video as "input"."""
    check_model(body, model_id, required=False)
    fields = NATIVE_FIELDS[task]
    _unknown(f"/api/{task}", body, ("input", "model", *fields))
    if not isinstance(body.get("input"), str) or not body["input"].strip():
        raise ApiError(400, "Say which video: \"input\" is a file:// URL, an absolute path or an http(s) URL.",
                       param="input", code="missing_video")
    options = _options(body, tuple(f for f in fields if f in _READERS))
    if task == "ask":
        if body.get("question") is None:
            raise ApiError(400, "Say what to ask: \"question\" is a string or a list of strings.",
                           param="question", code="missing_question")
        options["questions"] = _texts("question", body["question"])
    if task == "classify":
        if body.get("task") is not None:
            options["label_task"] = _text("task", body["task"])
        if body.get("labels") is not None:
            labels = body["labels"]
            # A list stays a list: a string naming a file would make the server read that file.
            options["labels"] = labels.split(",") if isinstance(labels, str) else _texts("labels", labels)
    return Work(task, body["input"].strip(), options)


# ---- chat completions ---------------------------------------------------------------------------

def parse_chat(body: dict, model_id: str) -> Chat:
    check_model(body, model_id, required=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "\"messages\" must be a non-empty list of messages.", param="messages",
                       code="invalid_messages")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "This model gives one answer per request (n must be 1).", param="n", code="invalid_value")
    if body.get("tools"):
        raise ApiError(400, "This model cannot call tools.", param="tools", code="unsupported_parameter")
    extra = body.get("malmm") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "\"malmm\" must be an object of options (fps, frames, ...).", param="malmm",
                       code="invalid_value")
    _unknown("\"malmm\"", extra, CHAT_OPTIONS)
    options = _options(extra, CHAT_OPTIONS)
    if "max_tokens" not in options:
        for name in ("max_completion_tokens", "max_tokens"):
            if body.get(name) is not None:
                options["max_tokens"] = _number(name, body[name], integer=True)
                break
    video, question = _video_and_question([m for m in messages if m.get("role") == "user"])
    stream = _flag("stream", body["stream"]) if body.get("stream") is not None else False
    stream_options = body.get("stream_options") or {}
    usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    return Chat(Work("ask", video, {**options, "questions": [question]}), stream, usage)


# A word of a message's text that is a file:// or http(s) URL names a video too: clients that
# send only text (llm's OpenAI models, a shell script) write it into the question, as ollama's
# users write image paths into theirs. Punctuation that ends a sentence is not part of it.
_URL_WORD = re.compile(r"(?<!\S)(?:file|https?)://\S*[^\s.,;:!?)\]}>\"']", re.IGNORECASE)


def _video_and_question(users: list[dict]) -> tuple[str, str]:
    """The last video of the user messages (a video_url part, or a URL in their text), and the
    last user message's text without the URLs in it."""
    video = None
    texts: list[str] = []
    for message in users:
        texts = []
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, "A message's content must be a string or a list of parts.", param="messages",
                           code="invalid_messages")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                urls = _URL_WORD.findall(part["text"])
                video = urls[-1] if urls else video
                texts.append(_URL_WORD.sub("", part["text"]).strip())
            elif kind == "video_url":
                video = _url_of(part.get("video_url"))
            elif kind in ("image_url", "input_image", "input_audio", "file"):
                raise ApiError(400, f"This model watches videos: send a video_url part, not {kind}.",
                               param="messages", code="unsupported_content")
            else:
                raise ApiError(400, f"Unknown content part {json.dumps(kind)[:40]}; use text and video_url.",
                               param="messages", code="unsupported_content")
    if video is None:
        raise ApiError(400, "No video: add a video_url part ({\"type\": \"video_url\", \"video_url\": "
                       "{\"url\": \"file:///...\"}}) to a user message, or its URL to the text.", param="messages",
                       code="missing_video")
    question = "\n".join(t for t in texts if t.strip()).strip()
    if not question:
        raise ApiError(400, "No question: the last user message has no text.", param="messages",
                       code="missing_question")
    return video, question


def _url_of(value: Any) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, "A video_url part needs a \"url\".", param="messages", code="invalid_video_url")
    return url


# ---- answers --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    truncated: bool  # the answer stopped at max_tokens

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Reply:
    """One chat completion's answer, in the shapes OpenAI's API sends: a whole completion, or
    server-sent-event chunks. The answer is generated whole (beam search), so it streams as
    one content chunk."""

    def __init__(self, model_id: str, answer: str, usage: Usage, record: dict):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id = model_id
        self.answer = answer
        self.usage = usage
        self.record = record  # the `malmm ask --json` record, for clients that want more

    @property
    def finish_reason(self) -> str:
        return "length" if self.usage.truncated else "stop"

    def completion(self) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer, "refusal": None},
                             "logprobs": None, "finish_reason": self.finish_reason}],
                "usage": self.usage.to_json(), "malmm": self.record}

    def _chunk(self, delta: dict, finish: str | None, usage: bool) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage:
            chunk["usage"] = None
        return chunk

    def events(self, include_usage: bool) -> Iterator[str]:
        """The stream: the role, the answer, the finish reason, [the usage,] then [DONE]."""
        chunks = [self._chunk({"role": "assistant", "content": ""}, None, include_usage),
                  self._chunk({"content": self.answer}, None, include_usage),
                  self._chunk({}, self.finish_reason, include_usage)]
        if include_usage:
            chunks.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model_id, "choices": [], "usage": self.usage.to_json()})
        for chunk in chunks:
            yield sse(chunk)
        yield "data: [DONE]\n\n"


def sse(data: dict) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "malmm"}
