"""`malmm serve` (malmm_cli/serve/): the real `openai` client against live servers on 127.0.0.1.

Each server is `python -m malmm_cli serve --model tiny-random --port 0 ...` in a subprocess,
always stopped; answers are compared with `malmm ask` (and the records of the native
endpoints with the commands' --json records) for the same options. MALMM_THREADS=1 on both
sides: the same numbers, added in the same order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import psutil
import pytest

from malmm_cli.serve.access import host_allowed, key_matches, locate
from malmm_cli.serve.protocol import ApiError, parse_chat, parse_native
from tests.cli import SAMPLE, TINY, help_examples, help_text, malmm, records, stable
from tests.media import make_video
from tests.streams import FolderServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-4f9c"
FAST = {"frames": 8, "memory": 3, "beams": 1, "max_tokens": 3}  # options of a quick answer
SLOW = {"frames": 240, "memory": 20}  # on tiny-random: seconds of decoding and Q-Former work (memory merges)


class Served:
    """`malmm serve ARGS` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, *args, env: dict | None = None):
        command = [sys.executable, "-m", "malmm_cli", "serve", *TINY, "--port", "0", "--no-cache", *args]
        environ = {**os.environ, "MALMM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(command, cwd=ROOT, env=environ, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(180) or self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                ready.set()
        ready.set()  # it ended

    def client(self, key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120, **kwargs)

    def health(self) -> dict:
        return json.loads(call(self.url, "/health", method="GET")[2])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@contextmanager
def served(*args, **kwargs):
    server = Served(*args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def call(url: str, path: str, body=None, *, method: str = "POST", headers: dict | None = None,
         raw: bytes | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request (urllib: nothing between the test and the wire)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if data is not None else {}
    sent.update(headers or {})
    request = urllib.request.Request(url + path, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def chat_body(video: str, question: str, **options) -> dict:
    return {"model": "tiny-random", "malmm": options,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                                       {"type": "text", "text": question}]}]}


def messages(video: str, question: str) -> list[dict]:
    return chat_body(video, question)["messages"]


def flags(options: dict) -> list:
    """Options as the command line spells them."""
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)]


def cli_record(task: str, video, *args, **options) -> dict:
    out = malmm(task, video, *args, *TINY, *flags(options), "--json", "-q", "--no-cache")
    assert out.exit_code == 0, out.stderr
    (record,) = records(out.stdout)
    return record


def assert_error(status: int, body: bytes, expected_status: int, code: str | None = None) -> dict:
    """OpenAI's error shape, one sentence, no traceback."""
    assert status == expected_status, body
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    assert isinstance(error["message"], str) and error["message"].endswith((".", ")"))
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("MALMM_THREADS", "1")  # the in-process CLI adds as the server does


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """videos/ (allowed): clip.mp4, long.mp4, a link inside it and a link out of it;
    outside/: secret.mp4."""
    root = tmp_path_factory.mktemp("serve")
    videos, outside = root / "videos", root / "outside"
    videos.mkdir()
    outside.mkdir()
    shutil.copy(SAMPLE, videos / "clip.mp4")
    shutil.copy(SAMPLE, outside / "secret.mp4")
    make_video(videos / "long.mp4", fps=10, n_frames=240, size=(64, 48))
    (videos / "inner-link.mp4").symlink_to(videos / "clip.mp4")
    (videos / "out-link.mp4").symlink_to(outside / "secret.mp4")
    (videos / "out-dir").symlink_to(outside)
    return videos, outside


@pytest.fixture(scope="module")
def server(folders):
    with served("--allow-dir", str(folders[0]), "-q") as running:
        yield running


# ---- answers: the same as `malmm ask` ----------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, FAST], ids=["defaults", "options"])
def test_a_chat_answer_equals_malmm_ask(server, folders, options):
    clip = folders[0] / "clip.mp4"
    reply = server.client().chat.completions.create(
        model="tiny-random", messages=messages(clip.as_uri(), "what is shown?"), extra_body={"malmm": options})
    expected = cli_record("ask", str(clip), "what is shown?", **options)
    assert reply.choices[0].message.content == expected["answers"][0]["answer"]
    assert reply.choices[0].message.role == "assistant" and reply.model == "tiny-random"
    assert stable(reply.model_extra["malmm"]) == stable(expected)  # the whole record, its job key too
    assert reply.usage.completion_tokens >= 1 and reply.usage.total_tokens > reply.usage.prompt_tokens


def test_a_streamed_answer_equals_malmm_ask_and_streams_as_openai_does(server, folders):
    clip = folders[0] / "clip.mp4"
    stream = server.client().chat.completions.create(
        model="tiny-random", messages=messages(clip.as_uri(), "where is it?"), stream=True,
        stream_options={"include_usage": True}, extra_body={"malmm": FAST})
    chunks = list(stream)
    expected = cli_record("ask", str(clip), "where is it?", **FAST)["answers"][0]["answer"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1  # include_usage: the last chunk
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    status, headers, body = call(server.url, "/v1/chat/completions",  # on the wire: SSE, ending with [DONE]
                                 {**chat_body(clip.as_uri(), "where is it?", **FAST), "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_the_last_user_text_is_the_question_and_the_last_video_is_the_video(server, folders):
    clip = folders[0] / "clip.mp4"
    conversation = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip.as_uri()}},
                                                 {"type": "text", "text": "what is shown?"}]},
                    {"role": "assistant", "content": "something"},
                    {"role": "user", "content": "where is it?"}]
    reply = server.client().chat.completions.create(model="tiny-random", messages=conversation,
                                                    extra_body={"malmm": FAST})
    expected = cli_record("ask", str(clip), "where is it?", **FAST)
    assert reply.choices[0].message.content == expected["answers"][0]["answer"]


NATIVE = [
    ("caption", {}, dict(FAST)),
    ("ask", {"question": ["what is shown?", "where is it?"]}, dict(FAST)),
    ("classify", {"labels": ["cat", "dog", "ball", "car"], "top_k": 2}, {"frames": 8, "memory": 3}),
    ("summarize", {"every": 2.0}, dict(FAST)),
]


@pytest.mark.parametrize("task, own, options", NATIVE, ids=[t for t, _, _ in NATIVE])
def test_the_native_endpoints_give_the_commands_records(server, folders, task, own, options):
    clip = str(folders[0] / "clip.mp4")
    status, _, body = call(server.url, f"/api/{task}", {"input": clip, **own, **options})
    assert status == 200, body
    args = {"caption": [], "ask": ["what is shown?", "-Q", "where is it?"],
            "classify": ["--labels", "cat,dog,ball,car", "--top-k", 2], "summarize": ["--every", 2]}[task]
    assert stable(json.loads(body)) == stable(cli_record(task, clip, *args, **options))


def test_a_follow_up_neither_decodes_nor_runs_the_vit_and_concurrent_requests_share_one_read(server, folders,
                                                                                             tmp_path):
    video = folders[0] / "fresh.mp4"  # a video this server has not read
    make_video(video, fps=10, n_frames=40, size=(64, 48))
    before = server.health()["reads"]
    questions = ["what is shown?", "where is it?", "who is there?", "what colour is it?"]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda q: call(server.url, "/api/ask", {"input": str(video), "question": q, **FAST}),
                             questions))
    got = [json.loads(body) for status, _, body in outs if status == 200]
    assert len(got) == 4 and server.health()["reads"] == before + 1  # one read for the four
    assert sorted(r["timings"]["vision"] > 0 for r in got) == [False, False, False, True]  # who read paid for it
    status, _, body = call(server.url, "/api/ask", {"input": str(video), "question": "and now?", **FAST})
    assert status == 200 and json.loads(body)["timings"]["vision"] == 0.0
    assert server.health()["reads"] == before + 1


def test_a_video_from_a_url_goes_through_the_downloader(server, folders):
    with FolderServer(folders[0]) as www:
        url = f"{www.base}/clip.mp4"
        reply = server.client().chat.completions.create(model="tiny-random", messages=messages(url, "what is shown?"),
                                                        extra_body={"malmm": FAST})
        expected = cli_record("ask", str(folders[0] / "clip.mp4"), "what is shown?", **FAST)
        assert reply.choices[0].message.content == expected["answers"][0]["answer"]
        assert reply.model_extra["malmm"]["input"] == url


# ---- models, errors --------------------------------------------------------------------------------

def test_models_lists_the_one_model(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny-random"]
    assert client.models.retrieve("tiny-random").owned_by == "malmm"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"


def test_each_error_is_one_sentence_in_openais_shape(server, folders):
    clip, secret = (folders[0] / "clip.mp4").as_uri(), (folders[1] / "secret.mp4").as_uri()
    url = server.url
    cases = [  # (status, code, request)
        (400, "invalid_json", dict(raw=b"{not json")),
        (400, "invalid_content_type", dict(raw=b"{}", headers={"Content-Type": "text/plain"})),
        (400, "missing_video", dict(body={"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}]})),
        (400, "missing_question", dict(body=chat_body(clip, " "))),
        (400, "invalid_value", dict(body=chat_body(clip, "q", fps=-1))),
        (400, "unknown_field", dict(body=chat_body(clip, "q", framez=8))),
        (400, "unsupported_content", dict(body={"model": "tiny-random", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": clip}}, {"type": "text", "text": "q"}]}]})),
        (400, "invalid_video", dict(body=chat_body((folders[0] / "nothing.mp4").as_uri(), "q"))),
        (403, "path_not_allowed", dict(body=chat_body(secret, "q"))),
        (404, "model_not_found", dict(body={**chat_body(clip, "q"), "model": "gpt-4o"})),
        (413, "request_too_large", dict(body={**chat_body(clip, "q"), "padding": "x" * (1 << 20)})),
    ]
    for status, code, request in cases:
        got = call(url, "/v1/chat/completions", **request)
        error = assert_error(got[0], got[2], status, code)
        if code == "invalid_value":
            assert error["message"].startswith("fps must be"), error  # as this API names it, not --fps
    assert_error(*call(url, "/v1/nothing", method="GET")[::2], 404)
    assert_error(*call(url, "/api/translate", {"input": "x"})[::2], 404)
    assert_error(*call(url, "/v1/models", {}, method="POST")[::2], 405)
    with pytest.raises(openai.BadRequestError) as err:  # and as the openai client sees them
        server.client().chat.completions.create(model="tiny-random", messages=messages(clip, "q"),
                                                extra_body={"malmm": {"beams": 99}})
    assert err.value.status_code == 400 and "beams must be from 1 to 16" in err.value.message
    with pytest.raises(openai.NotFoundError):  # a stream that cannot start fails before it does
        server.client().chat.completions.create(model="gpt-4o", messages=messages(clip, "q"), stream=True)


def test_local_files_only_from_under_allow_dir_after_resolving_links(server, folders):
    videos, outside = folders
    ask = lambda path: call(server.url, "/api/ask", {"input": path, "question": "q", **FAST})  # noqa: E731
    assert ask(str(videos / "inner-link.mp4"))[0] == 200  # a link that stays inside
    for path in (videos / "out-link.mp4", videos / "out-dir" / "secret.mp4", outside / "secret.mp4",
                 f"{videos}/../outside/secret.mp4", outside / "missing.mp4"):
        status, _, body = ask(str(path))
        error = assert_error(status, body, 403, "path_not_allowed")
        assert error["message"] == f"{path} is outside the folders this server may read (--allow-dir)."  # as given
    assert "does not exist" in assert_error(*ask(str(videos / "missing.mp4"))[::2], 400)["message"]
    assert_error(*ask("clip.mp4")[::2], 400, "invalid_video_url")  # relative: whose folder?


def test_no_local_file_without_allow_dir_and_paths_are_checked_before_they_are_used(folders):
    videos, outside = folders
    with pytest.raises(ApiError) as err:
        locate((videos / "clip.mp4").as_uri(), ())
    assert err.value.status == 403
    assert locate((videos / "inner-link.mp4").as_uri(), (videos,)).spec == str(videos / "clip.mp4")
    assert locate("file://localhost" + str(videos / "clip.mp4"), (videos,)).input == str(videos / "clip.mp4")
    for bad in ("ftp://host/x.mp4", "data:video/mp4;base64,AAAA", "file://otherhost/x.mp4", "http:///x.mp4"):
        with pytest.raises(ApiError) as err:
            locate(bad, (videos,))
        assert err.value.status == 400, bad


# ---- the chat request read as documented ---------------------------------------------------------

def test_what_a_chat_request_asks():
    body = {"model": "m", "max_tokens": 7, "temperature": 0.2,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///a.mp4"}},
                                                      {"type": "text", "text": "first?"}]},
                         {"role": "user", "content": [{"type": "video_url", "video_url": "file:///b.mp4"},
                                                      {"type": "text", "text": "second"},
                                                      {"type": "text", "text": "part?"}]}],
            "malmm": {"frames": 4, "start": "0:02"}}
    chat = parse_chat(body, "m")
    assert chat.work.video == "file:///b.mp4" and chat.work.options["questions"] == ["second\npart?"]
    assert chat.work.options["max_tokens"] == 7 and chat.work.options["start"] == 2.0  # OpenAI's max_tokens
    assert parse_chat({**body, "malmm": {"max_tokens": 3}}, "m").work.options["max_tokens"] == 3  # malmm's first
    texts = {"model": "m", "messages": [{"role": "user", "content": "file:///a.mp4 what is cooking?"},
                                        {"role": "assistant", "content": "soup"},
                                        {"role": "user", "content": "and in https://x.org/b.mp4, who is there?"}]}
    chat = parse_chat(texts, "m")  # a client that sends only text (llm) writes the URL into it
    assert chat.work.video == "https://x.org/b.mp4" and chat.work.options["questions"] == ["and in , who is there?"]
    texts["messages"][2]["content"] = "who is there?"
    assert parse_chat(texts, "m").work.video == "file:///a.mp4"  # the last video of the conversation
    labels = parse_native("classify", {"input": "/v.mp4", "labels": "a,b"}, "m").options["labels"]
    assert labels == ["a", "b"]  # a list: never taken for a file name


def test_labels_given_as_a_list_are_never_read_as_a_file(tmp_path, monkeypatch):
    from malmm_cli.engine.tasks import custom_label_set

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x,y").write_text("secret\nlines\n")
    assert custom_label_set(["x", "y"], None).labels == ("x", "y")
    assert custom_label_set("x,y", None).labels == ("secret", "lines")  # the command line's file, as before


# ---- who may ask -----------------------------------------------------------------------------------

def test_the_key_is_compared_in_constant_time_and_hosts_must_be_this_machine(monkeypatch):
    import hmac

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert key_matches(f"Bearer {KEY}", KEY) and not key_matches("Bearer nope", KEY) and not key_matches(None, KEY)
    assert not key_matches(KEY, KEY)  # a bare key is no Bearer token
    assert len(seen) == 4
    assert all(host_allowed(h) for h in ("127.0.0.1:8000", "localhost", "[::1]:80", "127.1.2.3"))
    assert not any(host_allowed(h) for h in ("evil.example:8000", "", None, "0.0.0.0:8000", "10.0.0.1"))


def test_the_help_page_speaks_words():
    text = help_text(["serve"])
    for jargon in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list["):
        assert jargon not in text
    assert help_examples(text) and "[default: 127.0.0.1]" in " ".join(text.split())


def test_a_host_other_than_loopback_needs_a_key_and_bad_options_are_refused(tmp_path):
    out = malmm("serve", "--host", "0.0.0.0", *TINY)
    assert out.exit_code == 2 and "--api-key" in out.stderr and "Traceback" not in out.stderr
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use: said before any model loads
        out = malmm("serve", "--port", taken.getsockname()[1], *TINY)
    assert out.exit_code == 2 and "Cannot listen on 127.0.0.1 port" in out.stderr, out.stderr
    for args, needle in ((["--allow-dir", str(tmp_path / "none")], "--allow-dir"), (["--port", "70000"], "--port"),
                         (["--max-queue", "-1"], "--max-queue"), (["--timeout", "0"], "--timeout")):
        out = malmm("serve", *args, *TINY)
        assert out.exit_code == 2 and needle in out.stderr, (args, out.stderr)


@pytest.fixture(scope="module")
def keyed(folders):
    """A server with a key and room for one request waiting."""
    with served("--allow-dir", str(folders[0]), "--max-queue", "1", "-q", env={"MALMM_API_KEY": KEY}) as running:
        yield running


def test_auth(keyed, folders):
    clip = (folders[0] / "clip.mp4").as_uri()
    with pytest.raises(openai.AuthenticationError) as err:
        keyed.client("wrong").chat.completions.create(model="tiny-random", messages=messages(clip, "q"))
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert_error(*call(keyed.url, "/v1/models", method="GET")[::2], 401)  # no key at all
    assert [m.id for m in keyed.client(KEY).models.list()] == ["tiny-random"]
    assert keyed.client(KEY).chat.completions.create(model="tiny-random", messages=messages(clip, "q"),
                                                     extra_body={"malmm": FAST}).choices[0].message.content
    assert call(keyed.url, "/health", method="GET")[0] == 200  # names no file: open


def test_a_full_queue_is_429_with_retry_after(keyed, folders):
    long = str(folders[0] / "long.mp4")
    slow = lambda q: call(keyed.url, "/api/ask", {"input": long, "question": q, **SLOW},  # noqa: E731
                          headers={"Authorization": f"Bearer {KEY}"})
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(slow, "first?")
        wait_for(lambda: keyed.health()["busy"])
        second = pool.submit(slow, "second?")
        wait_for(lambda: keyed.health()["queued"] == 1)
        with pytest.raises(openai.RateLimitError) as err:
            keyed.client(KEY).chat.completions.create(model="tiny-random", messages=messages(Path(long).as_uri(), "q"))
        assert int(err.value.response.headers["retry-after"]) >= 1 and err.value.body["code"] == "rate_limit_exceeded"
        assert first.result()[0] == 200 and second.result()[0] == 200  # those admitted are answered


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_load_50_requests_from_8_threads_each_answered_or_429(keyed, folders):
    videos = folders[0]
    client = keyed.client(KEY)
    questions = [f"question {i}?" for i in range(5)]
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model="tiny-random", messages=messages((videos / "clip.mp4").as_uri(), q), extra_body={"malmm": FAST})
    expected = {q: ask(q).choices[0].message.content for q in questions}  # one at a time: the reference
    process = psutil.Process(keyed.proc.pid)
    rss = [process.memory_info().rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss.append(process.memory_info().rss)
            time.sleep(0.05)

    def one(i: int):
        try:
            return "ok", ask(questions[i % 5]).choices[0].message.content == expected[questions[i % 5]]
        except openai.RateLimitError as err:
            return "429", int(err.response.headers["retry-after"]) >= 1

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(50)))
    finally:
        done.set()
        sampler.join()
    assert len(outcomes) == 50 and all(good for _, good in outcomes)  # none lost; each right, or told to retry
    assert {kind for kind, _ in outcomes} <= {"ok", "429"} and ("ok", True) in outcomes
    assert max(rss) - rss[0] < 300 * 2**20, (rss[0], max(rss))  # bounded: requests are not kept
    assert keyed.health()["queued"] == 0


# ---- stopping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_during_a_request_lets_it_finish_and_exits_0(folders, signum):
    long = str(folders[0] / "long.mp4")
    with served("--allow-dir", str(folders[0]), "-q") as server:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, server.url, "/api/ask", {"input": long, "question": "q", **SLOW})
            wait_for(lambda: server.health()["busy"])
            server.proc.send_signal(signum)
            wait_for(lambda: refused(server.url), timeout=10)  # it stops accepting at once
            status, _, body = pending.result()
        assert status == 200 and json.loads(body)["answers"][0]["answer"]
        assert server.proc.wait(60) == 0
        assert "malmm: stopped" in "".join(server.lines)


def refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


# ---- in this process: the engine's queue, and failures a live server cannot be made to show ------------

@contextmanager
def live_app(session, folder: Path, **settings):
    """create_app on uvicorn in a thread, on a free port of 127.0.0.1."""
    import uvicorn

    from malmm_cli.serve.app import create_app
    from malmm_cli.serve.server import bind, url_of
    from malmm_cli.serve.settings import ServeSettings
    from malmm_cli.serve.worker import Engine

    engine = Engine(session, ServeSettings(allow_dirs=(folder.resolve(),), quiet=True, **settings))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, engine.settings), log_config=None, lifespan="off",
                                           log_level="critical"))
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30)
    try:
        yield url_of(sock), engine
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop(5)


@pytest.fixture
def session(tiny_model):
    from malmm_cli.engine import Session

    return Session.from_model(tiny_model, label="tiny-random")  # no feature cache


def test_an_unexpected_failure_is_500_in_one_sentence(session, folders, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail /secret/path")

    monkeypatch.setattr(session, "read", broken)
    with live_app(session, folders[0]) as (url, _):
        status, _, body = call(url, "/v1/chat/completions", chat_body((folders[0] / "clip.mp4").as_uri(), "q"))
    error = assert_error(status, body, 500, "internal_error")
    assert error["type"] == "server_error" and "secret" not in error["message"]


def test_a_request_past_its_time_is_504_and_its_work_stops(session, folders):
    with live_app(session, folders[0], timeout_s=0.3) as (url, engine):
        status, _, body = call(url, "/api/ask", {"input": str(folders[0] / "long.mp4"), "question": "q", **SLOW})
        assert_error(status, body, 504, "timeout")
        wait_for(lambda: not engine.status()["busy"], timeout=10)  # stopped at its next chunk of frames
        assert engine.status()["answered"] == 0


def test_a_client_that_leaves_stops_its_work(session, folders):
    import socket

    body = json.dumps({"input": str(folders[0] / "long.mp4"), "question": "q", **SLOW}).encode()
    with live_app(session, folders[0]) as (url, engine):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: engine.status()["busy"])
        wait_for(lambda: not engine.status()["busy"], timeout=10)  # well before the answer would come
        assert engine.status()["answered"] == 0


def make_ticket(session, path: Path, question: str, seconds: float = 120.0):
    from malmm_cli.engine.jobs import build_job
    from malmm_cli.serve.app import sampling_of
    from malmm_cli.serve.protocol import Work
    from malmm_cli.serve.worker import Ticket, VideoId
    from malmm_cli.sources.inputs import open_source

    work = Work("ask", str(path), {"questions": [question], **FAST})
    source = open_source(str(path))
    job = build_job("ask", session.label, **work.options)
    return Ticket(work, job, "key", source, VideoId.of(source), sampling_of(job, session), time.monotonic() + seconds)


def test_the_same_work_queued_together_gets_one_answer_and_one_read(session, folders):
    from malmm_cli.serve.settings import ServeSettings
    from malmm_cli.serve.worker import Engine

    engine = Engine(session, ServeSettings())
    clip = folders[0] / "clip.mp4"
    tickets = [make_ticket(session, clip, q) for q in ("what?", "what?", "where?")]
    tickets.append(make_ticket(session, clip, "gone?", seconds=-1))  # past its time before it ran
    for ticket in tickets:
        engine.submit(ticket)
    engine.start()
    try:
        answers = [t.future.result(60).result for t in tickets[:3]]
        with pytest.raises(Exception, match="timed out"):
            tickets[3].future.result(60)
    finally:
        engine.stop(5)
    assert answers[0] == answers[1] and answers[0].answers[0].question == "what?"
    assert answers[2].answers[0].question == "where?"
    assert engine.reads == 1 and engine.answered == 3


def test_kept_videos_stay_within_the_budget_least_recently_used_first(session, folders, tmp_path):
    from malmm_cli.serve.settings import ServeSettings
    from malmm_cli.serve.worker import Engine

    clips = [tmp_path / f"{name}.mp4" for name in "abc"]
    for clip in clips:
        shutil.copy(SAMPLE, clip)
    one = Engine(session, ServeSettings())
    one.start()
    try:
        one.submit(ticket := make_ticket(session, clips[0], "q"))
        ticket.future.result(60)
        size = one.status()["kept_bytes"]  # a video of FAST's sampling
    finally:
        one.stop(5)
    assert size > 0
    engine = Engine(session, ServeSettings(keep_bytes=2 * size))
    engine.start()
    try:
        for clip in (clips[0], clips[1], clips[0], clips[2], clips[0], clips[1]):
            engine.submit(ticket := make_ticket(session, clip, "q"))
            ticket.future.result(60)
            assert engine.status()["kept_bytes"] <= 2 * size
        # a, b, a (kept), c (drops b), a (kept), b (read again, drops c)
        assert engine.reads == 4 and engine.status()["kept_videos"] == 2
    finally:
        engine.stop(5)
