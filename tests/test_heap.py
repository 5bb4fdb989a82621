"""Freed memory goes back to the system between chunks of a video (issue 18)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from malmm_cli.engine import analyze
from malmm_cli.engine.analyze import Analyzer
from malmm_cli.engine.features import FeatureCache
from malmm_cli.engine.presets import TASK_DEFAULTS
from malmm_cli.engine.tasks import Job
from malmm_cli.sources.inputs import VideoSource
from models import MALMM
from tests.cli import SAMPLE

REPO = Path(__file__).resolve().parents[1]

# 50 MB in 64 KiB blocks (below glibc's mmap threshold, so they come from the heap), then every
# other block freed: 25 MB of holes that glibc keeps resident, none of them at the heap's top.
HOLES_SCRIPT = """
import ctypes, re
from malmm_cli.engine.heap import release_free_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def anon_mb():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
blocks = [libc.malloc(64 << 10) for _ in range(800)]
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
for b in blocks[::2]:
    libc.free(b)
before = anon_mb()
released = release_free_memory()
print(released, before - anon_mb())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_free_pages_inside_the_heap_go_back_to_the_system():
    proc = subprocess.run([sys.executable, "-c", HOLES_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    released, dropped_mb = proc.stdout.split()
    if released != "True":
        pytest.skip("this C library has no malloc_trim (not glibc)")
    assert float(dropped_mb) > 15, f"only {dropped_mb} MB of 25 MB of free holes went back"


def caption(model, cache: FeatureCache | None) -> None:
    defaults = TASK_DEFAULTS["caption"]
    job = Job(task="caption", model_label="tiny", memory=4, frames=12, prompts=(defaults.prompt,),
              generation=dataclasses.replace(defaults.generation, num_beams=1, max_new_tokens=4))
    Analyzer(model, "test|tiny|float32", cache=cache, chunk_size=5).run(VideoSource(str(SAMPLE), SAMPLE, None), job)


def test_memory_is_released_after_every_chunk_decoded(tiny_model, tmp_path, monkeypatch):
    """Once per chunk decoded from the video, after the model has taken it; not when the
    features come back from the cache (nothing is decoded then)."""
    events: list[str] = []
    encode = MALMM.encode_frames

    def encoding(self, pixels, *args, **kwargs):
        events.append("chunk")
        return encode(self, pixels, *args, **kwargs)

    monkeypatch.setattr(MALMM, "encode_frames", encoding)
    monkeypatch.setattr(analyze, "release_free_memory", lambda: events.append("release"))
    cache = FeatureCache(tmp_path / "features", limit_gb=1)
    caption(tiny_model, cache)
    chunks = events.count("chunk")
    assert chunks >= 3 and events == ["chunk", "release"] * chunks, events
    events.clear()
    caption(tiny_model, cache)  # a cache hit: no frame decoded
    assert events == []

