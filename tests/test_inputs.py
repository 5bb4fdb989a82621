"""malmm_cli.sources.inputs: expanding folders, globs and @lists; local sources; yt-dlp downloads with a cache."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pytest

from malmm_cli.sources import download as dl
from malmm_cli.sources import inputs
from malmm_cli.errors import DownloadError, InputError, UsageError
from malmm_cli.sources.inputs import VideoSource, cache_root, download_limits, expand_inputs, is_url, open_source
from tests import media

FAST = {"socket_timeout": 3, "retries": 0, "fragment_retries": 0, "extractor_retries": 0}


def assert_sentence(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.endswith("."), msg
    for needle in needles:
        assert needle in msg, msg


# ----------------------------------------------------------------------------- expansion


def test_is_url():
    assert is_url("http://example.com/a.mp4") and is_url("HTTPS://example.com/watch?v=1")
    for spec in ("ftp://example.com/a.mp4", "file:///tmp/a.mp4", "http://", "clip.mp4", "C:\\v\\a.mp4"):
        assert not is_url(spec), spec


@pytest.fixture
def tree(tmp_path):
    """A folder of videos and non-videos, nested, with names that sort differently by case."""
    root = tmp_path / "videos"
    files = ["b.mp4", "a.MKV", "notes.txt", "sub/c.webm", "sub/deeper/d.mov", "sub/thumb.jpg",
             ".hidden/e.mp4", "._a.mp4", "z_empty_dir/.keep"]
    for name in files:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


def test_folder_expands_recursively_in_stable_order(tree):
    got = expand_inputs([str(tree)])
    rel = [Path(p).relative_to(tree).as_posix() for p in got]
    assert rel == ["a.MKV", "b.mp4", "sub/c.webm", "sub/deeper/d.mov"]  # no txt/jpg, no hidden
    assert expand_inputs([str(tree)]) == got


def test_folder_without_videos_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(InputError) as e:
        expand_inputs([str(tmp_path / "docs")])
    assert_sentence(e.value, str(tmp_path / "docs"), "no video files")


def test_globs(tree):
    got = expand_inputs([str(tree / "*.mp4"), str(tree / "**" / "*.webm")])
    assert got == [str(tree / "b.mp4"), str(tree / "sub" / "c.webm")]
    assert expand_inputs([str(tree / "sub" / "*")]) == [str(tree / "sub" / "c.webm"), str(tree / "sub" / "deeper" / "d.mov")]
    with pytest.raises(InputError) as e:
        expand_inputs([str(tree / "*.avi")])
    assert_sentence(e.value, "matches no files")
    with pytest.raises(InputError) as e:
        expand_inputs([str(tree / "*.txt")])
    assert_sentence(e.value, "matches no video files")


def test_missing_paths_are_one_usage_error_naming_each_as_written(tree, monkeypatch):
    """Before any model loads: a typo costs nothing (issue 24)."""
    monkeypatch.chdir(tree.parent)
    with pytest.raises(UsageError) as e:
        expand_inputs(["nope/", "videos/b.mp4"])
    assert str(e.value) == "nope/ does not exist."  # as typed, the slash too
    lst = tree.parent / "todo.txt"
    lst.write_text("videos/b.mp4\n# a comment\ngone.mp4\n")
    with pytest.raises(UsageError) as e:
        expand_inputs(["a.mp4", f"@{lst.name}"])
    assert str(e.value) == "2 inputs do not exist: a.mp4, gone.mp4 (todo.txt, line 3)."


def test_files_and_urls_pass_through(tree):
    url = "https://example.com/v?id=1"
    assert expand_inputs([url, str(tree / "b.mp4"), url]) == [url, str(tree / "b.mp4")]
    with pytest.raises(InputError) as e:
        expand_inputs(["ftp://example.com/a.mp4"])
    assert_sentence(e.value, "ftp://example.com/a.mp4", "unsupported scheme 'ftp'", "http and https")
    with pytest.raises(InputError):
        expand_inputs(["   "])


def test_list_file(tree, tmp_path):
    lst = tree / "batch.txt"
    lst.write_text(
        "# my batch\n\nb.mp4\n   \n  sub  \nhttps://example.com/v.mp4\n# sub/c.webm twice, deduplicated\nsub/c.webm\n"
    )
    got = expand_inputs([f"@{lst}"])
    assert got == [str(tree / "b.mp4"), str(tree / "sub" / "c.webm"), str(tree / "sub" / "deeper" / "d.mov"),
                   "https://example.com/v.mp4"]
    nested = tmp_path / "outer.txt"
    nested.write_text(f"@{lst}\n{tree / 'a.MKV'}\n")
    assert expand_inputs([f"@{nested}"]) == got + [str(tree / "a.MKV")]


def test_bad_list_files(tmp_path):
    with pytest.raises(InputError) as e:
        expand_inputs([f"@{tmp_path / 'nope.txt'}"])
    assert_sentence(e.value, "nope.txt", "cannot be read", "no such file")
    loop = tmp_path / "loop.txt"
    loop.write_text(f"@{loop}\n")
    with pytest.raises(InputError) as e:
        expand_inputs([f"@{loop}"])
    assert_sentence(e.value, "includes itself")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError) as e:
        expand_inputs([f"@{binary}"])
    assert_sentence(e.value, "not UTF-8")


# ----------------------------------------------------------------------------- local sources


def test_open_local_source(tree):
    src = open_source(str(tree / "b.mp4"))
    assert src == VideoSource(input=str(tree / "b.mp4"), path=tree / "b.mp4", url=None)
    for spec, needle in [(str(tree / "missing.mp4"), "does not exist"), (str(tree / "sub"), "is a folder"),
                         ("ftp://host/x.mp4", "unsupported scheme")]:
        with pytest.raises(InputError) as e:
            open_source(spec)
        assert_sentence(e.value, spec, needle)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MALMM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("MALMM_CACHE_DIR")
    from platformdirs import user_cache_dir

    assert cache_root() == Path(user_cache_dir("malmm"))


# ----------------------------------------------------------------------------- downloads


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, counts requests; /broken.mp4 breaks off mid-download, /trickle.mp4 sends a
    byte every 0.2 s, /redirect?to=URL&code=N redirects, and `types` overrides content types."""

    requests: list[str]
    types: dict[str, str]
    stopping: threading.Event

    def log_message(self, *args):  # keep pytest output clean
        pass

    def guess_type(self, path):
        return self.types.get(Path(path).name) or super().guess_type(path)

    def do_GET(self):
        self.requests.append(self.path)
        url = urlparse(self.path)
        if url.path == "/redirect":
            query = parse_qs(url.query)
            self.send_response(int(query.get("code", ["302"])[0]))
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path == "/trickle.mp4":
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                while not self.stopping.is_set():
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client went away
                pass
            return
        if self.path.startswith("/broken.mp4"):
            data = (Path(self.directory) / "clip.mp4").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the server goes away mid-file
            self.close_connection = True
            return
        super().do_GET()

    def do_HEAD(self):
        self.requests.append("HEAD " + self.path)
        super().do_HEAD()


class Server:
    def __init__(self, folder: Path):
        handler = type("H", (_Handler,), {"requests": [], "types": {}, "stopping": threading.Event()})
        self.requests = handler.requests
        self.types = handler.types
        self.stopping = handler.stopping
        self.folder = folder
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.stopping.set()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def site(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    media.make_video(folder / "clip.mp4", fps=25, n_frames=50)
    (folder / "page.html").write_text("<html><body><h1>Holiday</h1><p>No video here.</p></body></html>")
    server = Server(folder)
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_entries(cache: Path) -> list[str]:
    d = cache / "downloads"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_download_is_cached_and_reused_offline(site, tmp_path):
    cache = tmp_path / "cache"
    url = f"{site.base}/clip.mp4"
    src = open_source(url, cache_dir=cache, download_options=FAST)
    assert src.url == url and src.input == url
    assert src.path.parent == cache / "downloads" and src.path.name.startswith(inputs.url_key(url))
    assert src.path.read_bytes() == (site.folder / "clip.mp4").read_bytes()
    meta = json.loads((cache / "downloads" / f"{inputs.url_key(url)}.meta.json").read_text())
    assert meta["url"] == url
    assert not [n for n in cache_entries(cache) if n.startswith(".tmp-")]
    served = len(site.requests)
    site.stop()  # no network from here on
    again = open_source(url, cache_dir=cache, download_options=FAST)
    assert again.path == src.path and len(site.requests) == served


def test_download_uses_malmm_cache_dir(site, tmp_path, monkeypatch):
    monkeypatch.setenv("MALMM_CACHE_DIR", str(tmp_path / "envcache"))
    src = open_source(f"{site.base}/clip.mp4", download_options=FAST)
    assert src.path.parent == tmp_path / "envcache" / "downloads"


def test_broken_download_leaves_nothing_behind(site, tmp_path):
    cache = tmp_path / "cache"
    url = f"{site.base}/broken.mp4"
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        open_source(url, cache_dir=cache, download_options=FAST)
    assert_sentence(e.value, url, "broke off before the download finished")
    assert cache_entries(cache) == []  # no partial video, no temp folder, no metadata
    assert time.monotonic() - start < 10
    assert inputs.cached_download(url, cache / "downloads") is None
    # a later good download into the same cache works
    assert open_source(f"{site.base}/clip.mp4", cache_dir=cache, download_options=FAST).path.exists()


def test_half_written_file_is_never_taken_for_a_video(tmp_path):
    """What a killed run leaves (a temp folder with a .part file) is not a cache hit."""
    downloads = tmp_path / "downloads"
    url = "https://example.com/v.mp4"
    tmp = downloads / f".tmp-{inputs.url_key(url)}-abc"
    tmp.mkdir(parents=True)
    (tmp / "v.mp4.part").write_bytes(b"\0" * 100)
    assert inputs.cached_download(url, downloads) is None
    old = time.time() - 2 * 24 * 3600
    os.utime(tmp, (old, old))
    dl._remove_stale_temps(downloads)
    assert not tmp.exists()


@pytest.mark.parametrize("case, needle", [
    ("page", "no video was found there"),
    ("404", "HTTP 404"),
    ("refused", "connection was refused"),
    ("dns", "could not be resolved"),
])
def test_download_failures_are_one_fast_sentence(site, tmp_path, case, needle):
    url = {
        "page": f"{site.base}/page.html",
        "404": f"{site.base}/missing.mp4",
        "refused": f"http://127.0.0.1:{free_port()}/clip.mp4",
        "dns": "http://no-such-host.invalid/clip.mp4",  # .invalid never resolves (RFC 2606)
    }[case]
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        open_source(url, cache_dir=cache, download_options=FAST)
    assert_sentence(e.value, f"Could not download {url}:", needle)
    assert time.monotonic() - start < 15
    assert [n for n in cache_entries(cache) if not n.startswith(".")] == []


# ----------------------------------------------------------------------------- download safety


@contextlib.contextmanager
def never_connected():
    """A listening socket standing in for a non-http server: a test asserts nothing connected."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        yield server


@pytest.mark.parametrize("code, target", [
    (301, "ftp://127.0.0.1:{port}/clip.mp4"),
    (302, "file:///etc/passwd"),
    (307, "data:video/mp4;base64,AAAAIGZ0eXBpc29t"),
])
def test_redirect_away_from_http_is_refused_before_connecting(site, tmp_path, code, target):
    with never_connected() as ftp:
        target = target.format(port=ftp.getsockname()[1])
        # a first hop within http, then one away from it: every hop is checked, not only the first
        url = f"{site.base}/redirect?to={quote('/redirect?to=' + quote(target, safe='') + f'&code={code}', safe='')}"
        cache = tmp_path / "cache"
        with pytest.raises(DownloadError) as e:
            open_source(url, cache_dir=cache, download_options=FAST)
        assert str(e.value) == f"Could not download {url}: it redirected to {target}, which is not http(s)."
        with pytest.raises(BlockingIOError):
            ftp.accept()
    assert cache_entries(cache) == []
    # a redirect that stays on http(s) is followed as before
    ok = f"{site.base}/redirect?to=%2Fclip.mp4&code={code}"
    assert open_source(ok, cache_dir=cache, download_options=FAST).path.read_bytes() == (site.folder / "clip.mp4").read_bytes()


def test_a_page_whose_video_is_not_on_http_is_refused_before_connecting(site, tmp_path):
    with never_connected() as ftp:
        target = f"ftp://127.0.0.1:{ftp.getsockname()[1]}/clip.mp4"
        (site.folder / "embed.html").write_text(f'<html><body><video src="{target}" controls></video></body></html>')
        url, cache = f"{site.base}/embed.html", tmp_path / "cache"
        with pytest.raises(DownloadError) as e:
            open_source(url, cache_dir=cache, download_options=FAST)
        assert str(e.value) == f"Could not download {url}: it led to {target}, which is not http(s)."
        with pytest.raises(BlockingIOError):
            ftp.accept()
    assert cache_entries(cache) == []


def error_within(seconds: float, fn, *args, **kwargs) -> BaseException:
    """The exception `fn` raises, which must come within `seconds` (it runs in a thread, so a
    download that hangs fails the test instead of hanging it)."""
    outcome: list = []

    def run():
        try:
            fn(*args, **kwargs)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still running after {seconds} s"
    assert outcome[0] is not None, "it did not fail"
    return outcome[0]


@pytest.mark.parametrize("how", ["env", "argument"])
def test_a_stalled_download_is_given_up(site, tmp_path, monkeypatch, how):
    """/trickle.mp4 sends a byte every 0.2 s: never quiet long enough for a socket timeout."""
    url, cache = f"{site.base}/trickle.mp4", tmp_path / "cache"
    limits = {"stall_s": 1.0, "deadline_s": 30.0}
    if how == "env":
        monkeypatch.setenv("MALMM_DOWNLOAD_STALL_S", "1")
        monkeypatch.setenv("MALMM_DOWNLOAD_DEADLINE_S", "30")
        limits = {}
    err = error_within(10, open_source, url, cache_dir=cache, download_options=FAST, **limits)
    assert isinstance(err, DownloadError)
    assert_sentence(err, f"Could not download {url}: no data arrived for 1 s", "MALMM_DOWNLOAD_STALL_S")
    assert cache_entries(cache) == []  # no partial video, no temp folder, no metadata


def test_a_download_past_its_deadline_is_given_up(site, tmp_path, monkeypatch):
    monkeypatch.setenv("MALMM_DOWNLOAD_DEADLINE_S", "2")
    url, cache = f"{site.base}/trickle.mp4", tmp_path / "cache"
    start = time.monotonic()
    err = error_within(10, open_source, url, cache_dir=cache, download_options=FAST)
    assert isinstance(err, DownloadError) and time.monotonic() - start >= 2
    assert_sentence(err, f"Could not download {url}: it did not finish within 2 s", "MALMM_DOWNLOAD_DEADLINE_S")
    assert cache_entries(cache) == []


@pytest.mark.parametrize("var", ["MALMM_DOWNLOAD_STALL_S", "MALMM_DOWNLOAD_DEADLINE_S"])
@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_bad_download_limits_are_a_usage_error(site, tmp_path, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(UsageError) as e:
        download_limits()
    assert_sentence(e.value, var, repr(value), "greater than 0")
    with pytest.raises(UsageError):  # before any request
        open_source(f"{site.base}/clip.mp4", cache_dir=tmp_path / "cache", download_options=FAST)
    assert site.requests == []
    with pytest.raises(UsageError) as e:
        download_limits(stall_s=-1)
    assert_sentence(e.value, "stall_s", "-1")
    assert download_limits(stall_s=5, deadline_s=float("inf")) == inputs.DownloadLimits(5.0, float("inf"))


@pytest.mark.parametrize("name, content, needle", [
    ("fake.mp4", b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>", "an HTML page"),
    ("data.mp4", b'{"error": "quota exceeded"}', "JSON"),
])
def test_a_download_that_is_not_a_video_is_not_cached(site, tmp_path, name, content, needle):
    (site.folder / name).write_bytes(content)  # served as video/mp4, from its name
    url, cache = f"{site.base}/{name}", tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        open_source(url, cache_dir=cache, download_options=FAST)
    assert str(e.value) == f"Could not download {url}: the server sent {needle}, not a video."
    assert cache_entries(cache) == []


@pytest.mark.parametrize("content", [b"<html><body>Sign in</body></html>", b""])
def test_a_non_video_cached_by_an_older_version_is_not_a_hit(site, tmp_path, content):
    url, downloads = f"{site.base}/clip.mp4", tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / f"{inputs.url_key(url)}.mp4").write_bytes(content)
    assert inputs.cached_download(url, downloads) is None
    src = open_source(url, cache_dir=tmp_path / "cache", download_options=FAST)
    assert src.path.read_bytes() == (site.folder / "clip.mp4").read_bytes()


def test_a_url_ending_in_json_does_not_clash_with_the_metadata(site, tmp_path):
    (site.folder / "clip.json").write_bytes((site.folder / "clip.mp4").read_bytes())
    site.types["clip.json"] = "video/mp4"
    url, cache = f"{site.base}/clip.json", tmp_path / "cache"
    key = inputs.url_key(url)
    src = open_source(url, cache_dir=cache, download_options=FAST)
    assert src.path.read_bytes() == (site.folder / "clip.mp4").read_bytes()
    assert src.path.suffix != ".json" and src.path.name.startswith(key)
    assert json.loads((cache / "downloads" / f"{key}.meta.json").read_text())["url"] == url
    assert sorted(cache_entries(cache)) == sorted([src.path.name, f"{key}.meta.json"])
    site.stop()
    assert open_source(url, cache_dir=cache, download_options=FAST).path == src.path


# ----------------------------------------------------------------------------- symlinks, cache dir


def test_symlinked_folders_never_loop_and_each_real_file_comes_once(tmp_path):
    root, outside = tmp_path / "videos", tmp_path / "elsewhere"
    for name in ("a.mp4", "sub/b.mp4", "sub/deeper/c.mkv"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    outside.mkdir()
    (outside / "x.mp4").write_bytes(b"x")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # points to an ancestor
    (root / "sub" / "linked.mp4").symlink_to(outside / "x.mp4")  # a linked video from outside: kept
    a, b, c, x = root / "a.mp4", root / "sub" / "b.mp4", root / "sub" / "deeper" / "c.mkv", outside / "x.mp4"
    cases = [
        ([root / "**" / "*.mp4"], {a, b, x}),
        ([root], {a, b, c, x}),
        ([root / "sub" / "*"], {a, b, c, x}),  # matches the link itself, which is expanded once
        ([root / "**"], {a, b, c, x}),
        ([root, root / "**" / "*.m*", root / "sub" / "loop" / "a.mp4"], {a, b, c, x}),
    ]
    for args, real in cases:
        start = time.monotonic()
        got = expand_inputs([str(arg) for arg in args])
        assert time.monotonic() - start < 5
        resolved = [Path(p).resolve() for p in got]
        assert len(resolved) == len(set(resolved)) and set(resolved) == real, (args, got)
    assert expand_inputs([str(root / "**" / "*.mp4")]) == [str(a), str(b), str(root / "sub" / "linked.mp4")]
    assert expand_inputs([str(root / "sub" / "loop" / "a.mp4"), str(root)])[0] == str(root / "sub" / "loop" / "a.mp4")


def test_cache_dir_that_cannot_be_a_folder_is_one_sentence(site, tmp_path, monkeypatch):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    for value, needle in [(a_file, "is a file, not a folder"),
                          (a_file / "cache", f"cannot be created because {a_file} is a file")]:
        monkeypatch.setenv("MALMM_CACHE_DIR", str(value))
        with pytest.raises(UsageError) as e:
            cache_root()
        assert_sentence(e.value, f"MALMM_CACHE_DIR is {value}", needle)
        with pytest.raises(UsageError):
            open_source(f"{site.base}/clip.mp4", download_options=FAST)
    monkeypatch.setenv("MALMM_CACHE_DIR", str(tmp_path / "new" / "cache"))
    assert cache_root() == tmp_path / "new" / "cache" and not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize("env, value, needle", [
    ("MALMM_CACHE_DIR", "FILE", "MALMM_CACHE_DIR"),
    ("MALMM_DOWNLOAD_STALL_S", "abc", "MALMM_DOWNLOAD_STALL_S must be"),
    ("MALMM_DOWNLOAD_DEADLINE_S", "-5", "MALMM_DOWNLOAD_DEADLINE_S must be"),
])
def test_bad_environment_values_stop_the_cli_before_any_model_loads(tmp_path, monkeypatch, env, value, needle):
    from typer.testing import CliRunner

    from malmm_cli.cli.app import app

    if value == "FILE":
        value = str(tmp_path / "a-file")
        Path(value).write_text("not a folder")
    monkeypatch.setenv(env, value)
    sample = Path(__file__).resolve().parents[1] / "malmm_cli" / "data" / "sample.mp4"
    out = CliRunner().invoke(app, ["caption", str(sample), "--model", "tiny-random"])
    assert out.exit_code == 2 and "loading" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("malmm: error: ") and needle in line
