"""`summarize --format html`: the summary's memory timeline and per-segment labels (engine), the
page as written (self-contained, escaped, its downloads and thumbnails), the folder index, and
the page in a real browser: the system Chromium driven by Playwright.

The browser tests skip, saying why, where Playwright or Chromium is missing; CI installs both
and sets MALMM_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from malmm_cli.results.html import report_entry
from malmm_cli.results.records import (LabelScore, MemoryMeta, Result, SamplingMeta, Segmentation, SegmentText,
                                       SlotSpan, VideoMeta)
from malmm_cli.results.writers import WRITERS
from tests.cli import SAMPLE, TINY, malmm, records, stable
from tests.media import decode_indices, make_video
from tests.streams import FolderServer

XSS_NAME = "<img src=x onerror=alert(1)>.mp4"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
SUMMARY_ARGS = ["--fps", 2, "--every", 1, "--memory", 4, "--labels", "cat,dog,car,kitchen"]


def _data(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    assert head.endswith(";base64"), head
    return base64.b64decode(payload)


def _links(page: str) -> dict[str, str]:
    """download name -> data: URI of each download link of a report."""
    return {html.unescape(name): uri for name, uri in re.findall(r'<a download="([^"]+)" href="(data:[^"]+)"', page)}


# ---- the engine: what the memory held, and labels per segment --------------------------------


@pytest.fixture(scope="module")
def session():
    from malmm_cli.engine import Session

    return Session.load("tiny-random", device="cpu", cache=False)


def test_memory_timeline_is_the_banks_own_history(session):
    """Fed frame by frame, a stream compresses at exactly the frames the record names, and its
    slots at the end cover, by MBC's definition (each position's counts, oldest first, tile the
    frames seen), the spans the record gives."""
    from malmm_cli.sources.video import plan_sampling, probe

    M, fps = 5, 4
    with session.read(SAMPLE, task="summarize", fps=fps) as video:
        record = stable(video.summarize(every=2, memory=M).to_record())
    times = plan_sampling(probe(SAMPLE), fps=fps).timestamps
    feats = session.features(SAMPLE, task="summarize", fps=fps)
    n = feats.shape[0]
    stream = session.model.new_stream(["what does the video describe?"], total_frames=n, memory_bank_length=M)
    compressed_at = []
    for t in range(n):
        before = stream.memory.compressions
        stream.add_features(feats[t : t + 1])
        compressed_at += [round(float(times[t]), 3)] * (stream.memory.compressions - before)
    counts = stream.state.visual.counts[0]  # [slots, positions], oldest slot first
    ends = counts.cumsum(dim=0)  # per position: exclusive end frame of each slot
    starts = ends - counts
    bounds = [float(t) for t in times] + [6.0]
    expected = [{"start": round(bounds[int(a.min())], 3), "end": round(bounds[int(b.max())], 3),
                 "frames": round(float(c.float().mean()), 3)} for a, b, c in zip(starts, ends, counts)]
    memory = record["memory"]
    assert memory["compressions_at"] == compressed_at and len(compressed_at) == n - M
    assert memory["slots"] == expected and len(expected) == M
    assert sum(s["frames"] for s in memory["slots"]) == pytest.approx(n, abs=1e-2)
    assert memory["slots"][0]["start"] == 0.0 and memory["slots"][-1]["end"] == record["sampling"]["end"]


def test_without_memory_nothing_is_held(session):
    with session.read(SAMPLE, task="summarize", fps=2) as video:
        memory = stable(video.summarize(every=3, memory=0).to_record())["memory"]
    assert memory == {"length": 0, "compressions": 0, "slots": [], "compressions_at": []}


def test_segment_labels_are_classify_on_the_segment_and_leave_captions_alone(session):
    """Each segment's labels are what classify gives on that segment's range (same frames,
    memory and labels), and asking for them changes no caption."""
    labels = ["cat", "dog", "car", "kitchen"]
    with session.read(SAMPLE, task="summarize", fps=4) as video:
        plain = video.summarize(every=2, memory=5)
        labelled = video.summarize(every=2, memory=5, labels=labels)
    assert [s.text for s in labelled.segments] == [s.text for s in plain.segments]
    assert labelled.label_set == "custom" and plain.label_set is None
    for seg in labelled.segments:
        job = session.job("classify", labels=",".join(labels), fps=4, start=seg.start, end=seg.end, memory=5, top_k=3)
        alone = session.analyze(SAMPLE, job)
        assert [s.label for s in seg.labels] == [s.label for s in alone.labels] and len(seg.labels) == 3
        assert [s.score for s in seg.labels] == pytest.approx([s.score for s in alone.labels], abs=1e-5)


def test_summarize_takes_one_label_set():
    out = malmm("summarize", SAMPLE, *TINY, "-q", "--task", "coin", "--labels", "a,b")
    assert out.exit_code == 2 and "at most one of --task" in out.stderr
    out = malmm("summarize", SAMPLE, *TINY, "-q", "--labels", "just-one")
    assert out.exit_code == 2 and "at least two different labels" in out.stderr


# ---- the page as written ------------------------------------------------------------------------


def _result(video: Path, *, texts=("one", "two", "three"), summary="all of it", every=2.0, labels=None) -> Result:
    n = len(texts)
    segments = tuple(SegmentText(every * i, every * (i + 1), t, labels) for i, t in enumerate(texts))
    slots = (SlotSpan(0.0, every * n / 2, 3.0), SlotSpan(every, every * n, 2.0))
    return Result(input=str(video), task="summarize", model="tiny-random", video=VideoMeta(every * n, 10.0, 160, 120),
                  sampling=SamplingMeta(1.0, 5, 0.0, every * n), timings={}, segments=segments, summary=summary,
                  memory=MemoryMeta(2, 3, slots, (2.0, 3.0, 4.0)), segmentation=Segmentation(every, False),
                  label_set="custom" if labels else None)


def _write(result: Result, folder: Path, name: str = "report.html") -> Path:
    buf = io.StringIO()
    WRITERS["html"].placed(folder).write(result, buf)
    (folder / name).write_text(buf.getvalue(), encoding="utf-8")
    return folder / name


HOSTILE = ["<script>alert(2)</script>", '"><img src=x onerror=alert(3)>', "Tom & Jerry's <b>bold</b> move"]


def test_the_page_escapes_every_text_and_loads_nothing_from_outside(tmp_path):
    video = tmp_path / XSS_NAME
    shutil.copy(SAMPLE, video)
    result = _result(video, texts=HOSTILE, summary="</script><script>alert(5)</script>",
                     labels=(LabelScore("<b onmouseover=alert(4)>x</b>", 0.9), LabelScore("y", 0.1)))
    page = _write(result, tmp_path).read_text()
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert "default-src &#39;none&#39;" in csp and "img-src data:" in csp and "unsafe-inline" not in csp
    for raw in ("<script>alert", "<img src=x", "<b onmouseover", "<b>bold"):
        assert raw not in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page and "Tom &amp; Jerry&#39;s" in page
    sources = re.findall(r'\s(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") or "://" not in s for s in sources)
    assert '<video id="player" controls preload="metadata" src="%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.mp4">' in page
    assert len(re.findall(r"<script\b", page)) == 2  # the data block and the page's own script
    entry = report_entry(page)
    assert entry["summary"] == result.summary and entry["title"] == XSS_NAME and entry["chapters"] == 3


def test_a_name_that_is_not_utf8_is_shown_and_linked_byte_for_byte(tmp_path):
    name = os.fsdecode(b"clip-\xff.mp4")  # one undecodable byte: a lone surrogate in Python
    video = tmp_path / name
    shutil.copy(SAMPLE, video)
    page = _write(_result(video), tmp_path).read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert 'src="clip-%FF.mp4"' in page and "<h1>clip-\\xff.mp4</h1>" in page
    assert report_entry(page)["input"] == str(video)  # the data block keeps the real name


def test_the_header_names_the_checkpoint_and_when_the_record_was_made(tmp_path):
    from malmm_cli.results.records import MadeBy

    made = MadeBy(checkpoint={"path": "runs/<ck>.pth", "sha256": "0123456789abcdef"}, device="cpu",
                  dtype={"vision": "float32", "qformer": "float32", "llm": "float32"}, quant="none",
                  created="2026-01-02T03:04:05+00:00")
    page = _write(replace(_result(SAMPLE), made_by=made), tmp_path).read_text()
    assert "<dt>Checkpoint</dt><dd>runs/&lt;ck&gt;.pth 0123456789abcdef</dd>" in page
    assert "2026-01-02 03:04" in page
    assert "<dt>Checkpoint</dt>" not in _write(_result(SAMPLE), tmp_path, "plain.html").read_text()


def test_downloads_are_the_writers_own_output(tmp_path):
    result = _result(SAMPLE, texts=("a --> b", "c\nd", "e & <f>"))
    links = _links(_write(result, tmp_path).read_text())
    assert sorted(links) == ["sample.json", "sample.srt", "sample.vtt"]
    for fmt in ("srt", "vtt", "json"):
        buf = io.StringIO()
        WRITERS[fmt].write(result, buf)
        assert _data(links[f"sample.{fmt}"]).decode("utf-8") == buf.getvalue()
    assert json.loads(_data(links["sample.json"]))["segments"][2]["text"] == "e & <f>"


def test_thumbnails_are_the_frame_in_the_middle_of_each_chapter(tmp_path):
    """A video whose frames spell their own index: each chapter's picture is the frame on
    screen at its middle, a JPEG at most 320 px wide."""
    from PIL import Image

    video = tmp_path / "index.mp4"
    make_video(video, fps=10, n_frames=60, size=(640, 96))
    page = _write(_result(video, texts=("a", "b", "c"), every=2.0), tmp_path).read_text()
    pictures = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)"', page)
    assert len(pictures) == 3
    frames = []
    for uri in pictures:
        image = Image.open(io.BytesIO(_data(uri)))
        assert image.format == "JPEG" and image.size == (320, 48)
        frames.append(np.asarray(image.convert("RGB")))
    assert decode_indices(np.stack(frames)).tolist() == [10, 30, 50]  # 1 s, 3 s, 5 s at 10 fps


def test_the_memory_is_drawn_where_it_was(tmp_path):
    """Each slot a bar over its span, compressions as marks at their times (neighbours closer
    than a pixel or so merge into one run), chapter cuts, an m:ss axis, and the legend's numbers."""
    from malmm_cli.results.chart import LEFT, RIGHT, memory_chart
    from malmm_cli.results.writers import short_clock

    result = _result(SAMPLE, texts=("a", "b", "c"), every=20.0)  # 60 s; slots 0-30 s and 20-60 s
    chart = memory_chart(result, short_clock)

    def at(t):
        return LEFT + t / 60 * (RIGHT - LEFT)

    assert [(float(b["x"][:-1]), float(b["w"][:-1])) for b in chart["bars"]] == [
        (pytest.approx(at(0), abs=0.01), pytest.approx(at(30) - at(0), abs=0.01)),
        (pytest.approx(at(20), abs=0.01), pytest.approx(at(60) - at(20), abs=0.01))]
    centres = [float(m["x"][:-1]) + float(m["w"][:-1]) / 2 for m in chart["marks"]]
    assert centres == [pytest.approx(at(t), abs=0.01) for t in (2, 3, 4)]
    # A compression at every frame of 10 fps from 6 s on: one run, not 540 marks.
    dense = replace(result, memory=replace(result.memory, compressions_at=tuple(6 + i / 10 for i in range(540))))
    (run,) = memory_chart(dense, short_clock)["marks"]
    assert float(run["x"][:-1]) < at(6) < at(59.9) < float(run["x"][:-1]) + float(run["w"][:-1])
    assert [float(x[:-1]) for x in chart["cuts"]] == [pytest.approx(at(20), abs=0.01), pytest.approx(at(40), abs=0.01)]
    assert [t["label"] for t in chart["ticks"]] == ["0:00", "0:10", "0:20", "0:30", "0:40", "0:50", "1:00"]
    assert "the 2 memory slots" in chart["legend"] and "the 3 compressions" in chart["legend"]
    assert "filled at 0:02" in chart["legend"] and "2.5 frames a slot" in chart["legend"]


def test_a_page_whose_video_is_gone_says_so(tmp_path):
    page = _write(_result(tmp_path / "gone.mp4"), tmp_path).read_text()
    assert "<video" not in page and "could not be found" in page and "data:image/jpeg" not in page
    assert len(re.findall(r"data-start=", page)) == 3


# ---- a real run: one page, and a folder with its index -----------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """summarize on the sample clip under a hostile name: its JSON record and its page."""
    root = tmp_path_factory.mktemp("report")
    video = root / "videos" / XSS_NAME
    video.parent.mkdir()
    shutil.copy(SAMPLE, video)
    out = malmm("summarize", video, *TINY, "-q", *SUMMARY_ARGS, "--format", "json")
    assert out.exit_code == 0, out.stderr
    (record,) = records(out.stdout)
    page = root / "pages" / "report.html"
    page.parent.mkdir()
    out = malmm("summarize", video, *TINY, "-q", *SUMMARY_ARGS, "-o", page)
    assert out.exit_code == 0, out.stderr
    return record, page


def test_a_run_writes_one_page_with_a_chapter_per_segment(report):
    record, page = report
    text = page.read_text()
    starts = [float(x) for x in re.findall(r'data-start="([^"]+)"', text)]
    assert starts == [s["start"] for s in record["segments"]] and len(starts) == 6
    assert text.count('<meter min="0" max="1"') == 3 * len(starts)
    assert 'src="../videos/%3Cimg' in text  # the video, relative to the page
    assert json.loads(_data(_links(text)["<img src=x onerror=alert(1)>.json"]))["segments"] == record["segments"]


@pytest.fixture(scope="module")
def folder_report(tmp_path_factory):
    """Two videos into -o DIR: one page each and index.html (a video named index.mp4 does not
    take the index's name)."""
    root = tmp_path_factory.mktemp("folder")
    videos = root / "videos"
    videos.mkdir()
    shutil.copy(SAMPLE, videos / "index.mp4")
    make_video(videos / "stripes.mp4", fps=10, n_frames=40, size=(64, 48))
    out = malmm("summarize", videos, *TINY, "-q", "--fps", 2, "--every", 2, "--format", "html", "-o", root / "out")
    assert out.exit_code == 0, out.stderr
    return root


def test_a_folder_gets_an_index_of_its_pages(folder_report, tmp_path):
    out = folder_report / "out"
    pages = sorted(p.name for p in out.glob("*.html"))
    assert len(pages) == 3 and "index.html" in pages and "index.mp4" not in pages
    index = (out / "index.html").read_text()
    listed = re.findall(r'<h2><a href="([^"]+)">([^<]+)</a></h2>', index)
    assert sorted(href for href, _ in listed) == sorted(p for p in pages if p != "index.html")
    assert sorted(title for _, title in listed) == ["index.mp4", "stripes.mp4"]
    assert index.count("data:image/jpeg;base64,") == 2
    # A third video later, with --resume: the index lists the pages written before too.
    shutil.copy(SAMPLE, folder_report / "videos" / "third.mp4")
    again = malmm("summarize", folder_report / "videos", *TINY, "-q", "--fps", 2, "--every", 2, "--format", "html",
                  "-o", out, "--resume")
    assert again.exit_code == 0, again.stderr
    assert len(re.findall(r"<h2><a href=", (out / "index.html").read_text())) == 3


def test_an_index_html_of_the_users_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("<p>my own page</p>")
    result = malmm("summarize", SAMPLE, *TINY, "-q", "--fps", 1, "--format", "html", "-o", out)
    assert result.exit_code == 2 and "not an index page that malmm wrote" in result.stderr
    assert (out / "index.html").read_text() == "<p>my own page</p>" and not list(out.glob("sample*"))


# ---- in a real browser ------------------------------------------------------------------------


def _chromium() -> str | None:
    candidates = [os.environ.get("MALMM_TEST_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _no_browser(reason: str):
    if os.environ.get("MALMM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MALMM_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _no_browser("Playwright is not installed (pip install -e '.[test]')")
    path = _chromium()
    if path is None:
        _no_browser("no Chromium to drive (apt-get install chromium, or set MALMM_TEST_CHROMIUM)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        except Error as err:
            _no_browser(f"Chromium at {path} does not start: {str(err).splitlines()[0]}")
        yield chromium
        chromium.close()


def _until(page, script: str, seconds: float = 10.0):
    """Wait until `script` (a function of no arguments) is true in the page. Polled from here:
    Playwright's own wait_for_function evaluates a string, which the page's policy forbids."""
    import time

    deadline = time.monotonic() + seconds
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"still false after {seconds} s: {script}"
        page.wait_for_timeout(50)


class Visit:
    """A page opened in its own browser context, with everything it asks for on record: every
    request (those not for a file: or data: URL are refused), dialogs (dismissed), and errors
    (a Content-Security-Policy refusal is one)."""

    def __init__(self, browser, path: Path, *, width: int = 1100, scheme: str = "light"):
        self.context = browser.new_context(viewport={"width": width, "height": 900}, color_scheme=scheme)
        self.requests, self.dialogs, self.errors = [], [], []
        self.context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                           else route.abort())
        self.page = page = self.context.new_page()
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")

    def outside(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(("file:", "data:"))]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.context.close()


def test_the_page_in_a_browser_plays_seeks_and_highlights(browser, report):
    record, page = report
    with Visit(browser, page) as visit:
        p = visit.page
        assert p.title().startswith(XSS_NAME)
        starts = p.eval_on_selector_all("[data-start]", "els => els.map(e => parseFloat(e.dataset.start))")
        assert starts == [s["start"] for s in record["segments"]]
        sizes = p.eval_on_selector_all(".chapter img", "els => els.map(e => [e.complete, e.naturalWidth])")
        assert len(sizes) == len(starts) and all(done and 0 < width <= 320 for done, width in sizes)
        p.locator(".chapter").nth(2).click()
        assert p.evaluate("document.getElementById('player').currentTime") == pytest.approx(starts[2], abs=0.15)
        assert p.locator(".chapter").nth(2).get_attribute("aria-current") == "true"
        # It plays (Chromium decodes this H.264 clip): time moves on, and the highlight follows it.
        _until(p, f"() => document.getElementById('player').currentTime > {starts[3] + 0.05}")
        assert p.evaluate("document.getElementById('player').error") is None
        _until(p, "() => document.querySelectorAll('.chapter.current').length === 1 && "
                  "document.querySelector('.chapter.current').id !== 'chapter-3'")
        assert visit.outside() == [] and visit.dialogs == [] and visit.errors == []
        assert any(url.endswith(".mp4") for url in visit.requests)  # the player read the video beside it


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_page_fits_a_phone(browser, report, scheme):
    _, page = report
    with Visit(browser, page, width=390, scheme=scheme) as visit:
        p = visit.page
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        wide = p.evaluate("""() => Array.from(document.querySelectorAll('body *'))
            .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > innerWidth + 0.5)
            .map(e => e.tagName + '.' + e.className)""")
        assert wide == []
        background = p.evaluate("getComputedStyle(document.body).backgroundColor")
        dark = sum(int(x) for x in re.findall(r"\d+", background)[:3]) < 3 * 128
        assert dark == (scheme == "dark")
        assert visit.outside() == [] and visit.errors == []


def test_model_text_never_runs_in_the_browser(browser, tmp_path):
    video = tmp_path / XSS_NAME
    shutil.copy(SAMPLE, video)
    label = "<b onmouseover=alert(4)>x</b>"
    result = _result(video, texts=HOSTILE, summary="</script><script>alert(5)</script>",
                     labels=(LabelScore(label, 0.9), LabelScore("y", 0.1)))
    with Visit(browser, _write(result, tmp_path)) as visit:
        p = visit.page
        p.locator(".label").first.hover()
        texts = p.eval_on_selector_all(".chapter .text", "els => els.map(e => e.textContent)")
        assert texts == HOSTILE
        assert p.text_content("#summary") == result.summary and p.text_content(".label") == label
        assert p.evaluate("document.querySelectorAll('.chapter img, .chapter b, script:not([type])').length") == 4
        assert visit.dialogs == [] and visit.outside() == [] and visit.errors == []


def test_the_index_page_in_a_browser(browser, folder_report):
    with Visit(browser, folder_report / "out" / "index.html", width=390) as visit:
        p = visit.page
        hrefs = p.eval_on_selector_all("h2 a", "els => els.map(e => e.href)")
        assert len(hrefs) >= 2 and all(Path(h.removeprefix("file://")).is_file() for h in hrefs)
        sizes = p.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(sizes) == len(hrefs) and all(w > 0 for w in sizes)
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        p.locator("h2 a").first.click()
        p.wait_for_selector("#player")
        assert visit.outside() == [] and visit.errors == [] and visit.dialogs == []


def test_a_url_input_plays_its_downloaded_copy(browser, tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(SAMPLE, served / "clip.mp4")
    with FolderServer(served) as www:
        url = f"{www.base}/clip.mp4"
        page = tmp_path / "url.html"
        out = malmm("summarize", url, *TINY, "-q", "--fps", 1, "--every", 2, "-o", page)
        assert out.exit_code == 0, out.stderr
    text = page.read_text()
    assert f'<a href="{url}" rel="noopener noreferrer">' in text
    source = re.search(r'<video id="player" controls preload="metadata" src="([^"]+)">', text).group(1)
    assert "downloads/" in source and not source.startswith(("http", "/"))
    assert (tmp_path / source).resolve().is_file()
    with Visit(browser, page) as visit:
        p = visit.page
        p.locator(".chapter").nth(1).click()
        _until(p, "() => document.getElementById('player').currentTime > 2.05")
        assert visit.outside() == [] and visit.errors == []
