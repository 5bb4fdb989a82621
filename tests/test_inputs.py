"""malmm_cli.inputs: expanding folders, globs and @lists; local sources; yt-dlp downloads with a cache."""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from malmm_cli import inputs
from malmm_cli.errors import DownloadError, InputError
from malmm_cli.inputs import VideoSource, cache_root, expand_inputs, is_url, open_source
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


def test_files_and_urls_pass_through(tree):
    missing = str(tree / "not-there.mp4")
    url = "https://example.com/v?id=1"
    assert expand_inputs([missing, url, str(tree / "b.mp4"), url]) == [missing, url, str(tree / "b.mp4")]
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
    """Serves a folder, counts requests, and has one URL that breaks off mid-download."""

    requests: list[str]

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
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
        handler = type("H", (_Handler,), {"requests": []})
        self.requests = handler.requests
        self.folder = folder
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
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
    meta = json.loads((cache / "downloads" / f"{inputs.url_key(url)}.json").read_text())
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
    inputs._remove_stale_temps(downloads)
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
