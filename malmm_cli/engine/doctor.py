"""`malmm doctor`: the installation checked and the engine run end to end here: versions,
device, cache folder, and tiny-random through a session over the bundled sample."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from .catalog import TINY, local_path
from .presets import PRESETS


def sample_video() -> Path:
    """A 6-second 160x120 test pattern shipped with the package."""
    return Path(str(resources.files("malmm_cli").joinpath("data/sample.mp4")))


def _versions() -> dict[str, str]:
    names = ("torch", "transformers", "accelerate", "bitsandbytes", "decord", "av", "yt-dlp", "typer", "rich")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "MISSING"
    return found


def optional_tools() -> list[tuple[str, bool, str]]:
    """(label, present, detail) for what some commands use and the install does not require:
    Ray (--ray), the caption metrics (eval --task caption) and an ffmpeg binary (yt-dlp)."""
    found = []
    ray = _version("ray")
    found.append(("ray", ray is not None, f"{ray} (--ray)" if ray else
                  "not installed (optional, for --ray: pip install 'malmm[ray]')"))
    coco = _version("pycocoevalcap")
    java = shutil.which("java")
    java_note = f"Java at {java}, not needed" if java else "no Java, none needed"
    found.append(("caption metrics", coco is not None,
                  f"pycocoevalcap {coco}: CIDEr, BLEU-4 for eval --task caption ({java_note})" if coco else
                  "pycocoevalcap not installed (optional, for eval --task caption: pip install 'malmm[eval]')"))
    ffmpeg = shutil.which("ffmpeg")
    found.append(("ffmpeg", ffmpeg is not None, f"{ffmpeg} (yt-dlp uses it for streamed URLs)" if ffmpeg else
                  "not found (optional: yt-dlp needs it for some streamed URLs; local files do not)"))
    return found


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_doctor() -> int:
    console = Console(stderr=False, soft_wrap=True)  # one line per check, whatever the width
    ok = True

    def check(label: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok = ok and good
        console.print(f"[{'green' if good else 'red'}]{'ok ' if good else 'BAD'}[/] {label}: {detail}")

    check("python", sys.version_info >= (3, 10), f"{platform.python_version()} on {platform.machine()}")
    for name, version in _versions().items():
        check(name, version != "MISSING", version)
    import torch

    from models.loading import default_dtype

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0)
        check("device", True, f"CUDA: {gpu.name}, {gpu.total_memory / 2**30:.0f} GiB")
    else:
        dtype = default_dtype(torch.device("cpu"))
        check("device", True, f"CPU only, {os.cpu_count()} cores, model dtype {str(dtype).replace('torch.', '')}")
    from malmm_cli.errors import UsageError
    from malmm_cli.sources.inputs import cache_root

    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".doctor"
        probe.write_text("ok")
        probe.unlink()
        check("cache", True, str(root))
    except UsageError as err:  # MALMM_CACHE_DIR names something that cannot be a folder
        check("cache", False, str(err))
    except OSError as err:
        check("cache", False, f"{root} is not writable ({err.strerror})")
    for label, found, detail in optional_tools():
        console.print(f"[{'green' if found else 'yellow'}]{'ok ' if found else ' - '}[/] {label}: {detail}")
    default = PRESETS["instructblip-vicuna-7b"]
    path = local_path(default.source)
    console.print(f"    {default.name}: " + (f"downloaded at {path}" if path else
                  f"not downloaded (malmm models download {default.name})"))
    ok = _doctor_end_to_end(check) and ok
    console.print("[green]all good[/]" if ok else "[red]some checks failed[/]")
    return 0 if ok else 1


def _doctor_end_to_end(check) -> bool:
    """tiny-random over the bundled sample: decode -> vision -> memory -> LLM."""
    from .presets import Generation
    from .session import Session
    from .tasks import Job

    t0 = time.perf_counter()
    try:
        session = Session.load(TINY, device="cpu", cache=False)
        job = Job(task="caption", model_label=TINY, memory=4, generation=Generation(num_beams=1, max_new_tokens=5),
                  frames=12, prompts=("what does the video describe?",))
        result = session.analyze(str(sample_video()), job)
    except Exception as err:  # doctor reports whatever broke, then exits non-zero
        check("end to end", False, f"{type(err).__name__}: {err}")
        return False
    check("end to end", result.sampling.frames == 12,
          f"tiny-random read {result.sampling.frames} frames of {sample_video().name}, memory "
          f"{result.memory.length} slots, {result.memory.compressions} compressions, "
          f"{time.perf_counter() - t0:.1f} s (its text is meaningless by design)")
    return True
