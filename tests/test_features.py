"""The feature cache is an optimisation, never a risk: damaged entries are rebuilt, a full or
read-only disk only turns it off, crashed writers leave nothing behind for long, concurrent
writers of one entry all succeed, and bad settings are one sentence."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from malmm_cli.engine.analyze import Analyzer
from malmm_cli.errors import UsageError
from malmm_cli.engine.features import CACHE_LIMIT_ENV, FeatureCache, FrameStore
from malmm_cli.sources.inputs import VideoSource
from malmm_cli.engine.presets import TASK_DEFAULTS
from malmm_cli.engine.tasks import Job
from models import MALMM
from tests.cli import SAMPLE, TINY, malmm, records
from tests.media import make_video

FRAMES = 12
F32 = "torch.float32"


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def read_all(cache: FeatureCache, key: str, count: int, shape: tuple[int, ...], dtype: str = F32) -> torch.Tensor | None:
    hit = cache.get(key, count, shape, dtype)
    return None if hit is None else torch.cat([chunk for _, chunk in hit.chunks(5)])


def write_entry(root: Path, key: str, feats: torch.Tensor) -> None:
    writer = FeatureCache(root, limit_gb=1).writer(key, feats.shape[0], tuple(feats.shape[1:]), str(feats.dtype))
    for a in range(0, feats.shape[0], 5):
        writer.append(feats[a : a + 5])
    writer.commit()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    """The malmm logger's warnings (the CLI may have pointed it at a closed stream earlier)."""
    logger = logging.getLogger("malmm")
    saved = logger.level, logger.propagate, list(logger.handlers)
    handler = _Warnings()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    yield handler.messages
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


@pytest.fixture
def vit_frames(monkeypatch) -> list[int]:
    """Frames that went through the vision encoder, per call."""
    calls: list[int] = []
    original = MALMM.encode_frames

    def counting(self, pixels):
        calls.append(pixels.shape[0])
        return original(self, pixels)

    monkeypatch.setattr(MALMM, "encode_frames", counting)
    return calls


def caption(model, cache: FeatureCache | None, video: Path = SAMPLE) -> str:
    defaults = TASK_DEFAULTS["caption"]
    job = Job(task="caption", model_label="tiny", memory=4, frames=FRAMES, prompts=(defaults.prompt,),
              generation=dataclasses.replace(defaults.generation, num_beams=1, max_new_tokens=4))
    analyzer = Analyzer(model, "test|tiny|float32", cache=cache, chunk_size=5)
    return analyzer.run(VideoSource(str(video), video, None), job).text


@pytest.fixture(scope="module")
def baseline(tiny_model, tmp_path_factory):
    """A pristine entry of SAMPLE and the caption computed from the video."""
    root = tmp_path_factory.mktemp("pristine") / "features"
    text = caption(tiny_model, FeatureCache(root, limit_gb=1))
    (key,) = visible(root)
    shape = tuple(tiny_model.encode_frames(torch.zeros(1, 3, 224, 224)).shape[1:])
    return dict(root=root, key=key, text=text, shape=shape,
                features=torch.from_numpy(np.load(root / key / "features.npy")))


# ---- 1. entries are verified before use ------------------------------------------------------------


def _rewrite_header(npy: Path, dtype: str, shape: tuple[int, ...]) -> None:
    data = npy.read_bytes()
    with open(npy, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
    npy.write_bytes(head.getvalue() + data[offset:])


def _flip_last_bit(npy: Path) -> None:
    data = bytearray(npy.read_bytes())
    data[-1] ^= 1
    npy.write_bytes(bytes(data))


def _append(npy: Path, data: bytes) -> None:
    with open(npy, "ab") as f:
        f.write(data)


def _random_data(npy: Path) -> None:
    size = npy.stat().st_size
    with open(npy, "r+b") as f:
        f.seek(256)
        f.write(os.urandom(size - 256))


def _older_format(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({k: meta[k] for k in ("count", "shape", "dtype")}))


def _replace(entry: Path, feats: torch.Tensor) -> None:
    """A consistent entry under this key whose features are not what this model computes."""
    shutil.rmtree(entry)
    write_entry(entry.parent, entry.name, feats)


DAMAGE = {
    "truncated": lambda e, f: os.truncate(e / "features.npy", (e / "features.npy").stat().st_size - 1000),
    "trailing bytes": lambda e, f: _append(e / "features.npy", b"\0" * 8),
    "random data": lambda e, f: _random_data(e / "features.npy"),
    "last bit flipped": lambda e, f: _flip_last_bit(e / "features.npy"),
    "header disagrees with meta": lambda e, f: _rewrite_header(e / "features.npy", "<f8", (f.shape[0], f.shape[1], f.shape[2] // 2)),
    "wrong dtype": lambda e, f: _replace(e, f.half()),
    "wrong feature shape": lambda e, f: _replace(e, f[:, :, : f.shape[2] // 2].contiguous()),
    "wrong frame count": lambda e, f: _replace(e, f[:-1].contiguous()),
    "meta not JSON": lambda e, f: (e / "meta.json").write_bytes(b"\x00{garbage"),
    "meta missing": lambda e, f: (e / "meta.json").unlink(),
    "data missing": lambda e, f: (e / "features.npy").unlink(),
    "no checksum (older format)": lambda e, f: _older_format(e),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_discarded_and_rebuilt(damage, baseline, tiny_model, tmp_path, vit_frames, warnings_logged):
    root, key = tmp_path / "features", baseline["key"]
    shutil.copytree(baseline["root"], root)
    DAMAGE[damage](root / key, baseline["features"])

    assert caption(tiny_model, FeatureCache(root, limit_gb=1)) == baseline["text"]  # never the damaged features
    assert sum(vit_frames) == FRAMES  # computed again from the video
    assert len(warnings_logged) == 1 and key in warnings_logged[0]
    rebuilt = read_all(FeatureCache(root, limit_gb=1), key, FRAMES, baseline["shape"])
    assert rebuilt is not None and torch.equal(rebuilt, baseline["features"])
    assert hidden(root) == []


def test_an_entry_is_checked_against_what_the_caller_expects(baseline, tmp_path):
    root, key = tmp_path / "features", baseline["key"]
    shutil.copytree(baseline["root"], root)
    cache = FeatureCache(root, limit_gb=1)
    shape = baseline["shape"]
    assert read_all(cache, key, FRAMES, (shape[0], shape[1] + 1)) is None  # another model's shape
    assert visible(root) == []  # such an entry is discarded, not kept beside the right one
    shutil.rmtree(root)
    shutil.copytree(baseline["root"], root)
    assert read_all(cache, key, FRAMES, shape, "torch.bfloat16") is None and visible(root) == []
    shutil.rmtree(root)
    shutil.copytree(baseline["root"], root)
    assert torch.equal(read_all(cache, key, FRAMES, shape), baseline["features"])


# ---- 2. a full or read-only disk turns the cache off, the analysis goes on --------------------------


@pytest.fixture
def cli_cache(tmp_path, monkeypatch) -> Path:
    """An empty MALMM_CACHE_DIR for the CLI, with the session's tiny model linked in."""
    from models.tiny import ensure_tiny_checkpoint

    models = ensure_tiny_checkpoint().parent  # built in the session's cache dir, once
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("MALMM_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def second_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("second") / "b.mp4"
    make_video(path, fps=10, n_frames=60)
    return path


class _FailingFile:
    """A file whose writes fail with `code` once `budget` bytes have gone through."""

    def __init__(self, real, budget: int, code: int):
        self._real, self._budget, self._code = real, budget, code

    def write(self, data):
        n = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._budget:
            raise OSError(self._code, os.strerror(self._code))
        self._budget -= n
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


def fail_writes(monkeypatch, under: Path, code: int, *, name: str | None = None, budget: int = 0) -> None:
    """Files opened for writing under `under` (named `name`) fail with `code` after `budget` bytes."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            path = Path(os.fspath(file))
            if path.is_relative_to(under) and name in (None, path.name):
                return _FailingFile(f, budget, code)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


def read_only(monkeypatch, request, directory: Path) -> None:
    """Nothing can be created or written under `directory`. chmod does not stop root, so as
    root the calls that create things fail as on a read-only file system instead."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        request.addfinalizer(lambda: directory.chmod(0o700))
        return
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if Path(os.fspath(path)).is_relative_to(directory):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    fail_writes(monkeypatch, directory, errno.EROFS)


def _two_inputs_succeed_with_one_warning(out, what: str) -> None:
    assert out.exit_code == 0, out.stderr
    assert [Path(r["input"]).name for r in records(out.stdout)] == ["sample.mp4", "b.mp4"]
    assert all("text" in r for r in records(out.stdout))
    assert out.stderr.count("feature cache at") == 1 and what in out.stderr
    assert "continuing without it" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("where", ["features dir read-only", "cache dir read-only, no features dir yet"])
def test_a_read_only_cache_warns_once_and_the_batch_succeeds(where, cli_cache, second_video, monkeypatch, request):
    features = cli_cache / "features"
    if where.startswith("features"):
        features.mkdir()
        read_only(monkeypatch, request, features)
    else:
        read_only(monkeypatch, request, cli_cache)
    out = malmm("caption", SAMPLE, second_video, *TINY, "--frames", FRAMES, "--json")
    _two_inputs_succeed_with_one_warning(out, "cannot be written")
    assert visible(features) == [] and hidden(features) == []


@pytest.mark.parametrize("failing, budget", [("features.npy", 600_000), ("meta.json", 0)])
def test_a_full_disk_drops_the_entry_warns_once_and_the_batch_succeeds(failing, budget, cli_cache, second_video,
                                                                      monkeypatch):
    features = cli_cache / "features"
    fail_writes(monkeypatch, features, errno.ENOSPC, name=failing, budget=budget)  # 600 kB: a chunk or two
    out = malmm("caption", SAMPLE, second_video, *TINY, "--frames", 48, "--json")
    _two_inputs_succeed_with_one_warning(out, "is full")
    assert visible(features) == []  # a disk that is full cannot have taken the whole entry
    assert hidden(features) == []  # and the partial, which kept it full, is gone


# ---- 3. work directories of dead writers are removed ----------------------------------------------

_WRITER = """
import os, sys, time, torch
from malmm_cli.engine.features import FeatureCache
writer = FeatureCache(sys.argv[1], limit_gb=1).writer(sys.argv[2], 4, (3, 2), "torch.float32")
writer.append(torch.zeros(2, 3, 2))
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
os._exit(0)  # no abort, no cleanup: as if killed
"""


def test_work_dirs_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    root = tmp_path / "features"
    dead, live, young, old = "a" * 40, "b" * 40, "c" * 40, "d" * 40
    running = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), live, "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert running.stdout.readline().strip() == "ready"
        subprocess.run([sys.executable, "-c", _WRITER, str(root), dead, "0"], check=True, capture_output=True)
        # pid 1 is alive, but that says nothing of a work dir nobody has written to for days
        (root / f".{young}.1.partial").mkdir()
        (root / f".{old}.1.partial").mkdir()
        two_days_ago = time.time() - 2 * 86400
        os.utime(root / f".{old}.1.partial", (two_days_ago, two_days_ago))
        assert len(hidden(root)) == 4

        FeatureCache(root, limit_gb=1).writer("e" * 40, 4, (3, 2), F32).abort()
        owners = {name.split(".")[1] for name in hidden(root)}
        assert owners == {live, young}
    finally:
        running.kill()
        running.wait()


# ---- 4. --no-cache writes nothing under the cache dir -------------------------------------------------


def test_no_cache_writes_nothing_under_the_cache_dir(cli_cache, monkeypatch):
    seen: list[list[str]] = []
    original = MALMM.generate

    def generate(self, *args, **kwargs):  # segments are captioned while the features are kept aside
        seen.append(sorted(set(os.listdir(cli_cache)) - {"models"}))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MALMM, "generate", generate)
    out = malmm("summarize", SAMPLE, "--scenes", "--fps", 2, "--no-cache", *TINY, "--json")
    assert out.exit_code == 0 and len(records(out.stdout)[0]["segments"]) >= 1
    assert len(seen) >= 2 and all(names == [] for names in seen)
    assert sorted(os.listdir(cli_cache)) == ["models"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frame_store_reads_back_what_was_appended(dtype, tmp_path):
    feats = torch.randn(23, 4, 6).to(dtype)
    with FrameStore(tmp_path / "missing") as store:  # an unusable directory falls back to the temp dir
        for a in range(23):
            store.append(feats[a : a + 1])
        assert torch.equal(store.read(0, 23), feats) and torch.equal(store.read(7, 19), feats[7:19])
        assert store.read(5, 5).shape == (0, 4, 6)
        with pytest.raises(IndexError):
            store.read(20, 24)
    assert list(tmp_path.iterdir()) == []


# ---- 5. concurrent writers of one entry ------------------------------------------------------------


def test_two_writers_of_one_entry_both_succeed(tmp_path):
    root, key = tmp_path / "features", "f" * 40
    mine, theirs = torch.randn(10, 3, 4), torch.randn(10, 3, 4)
    for damaged_winner in (False, True):
        shutil.rmtree(root, ignore_errors=True)
        first, second = FeatureCache(root, limit_gb=1), FeatureCache(root, limit_gb=1)
        w1, w2 = first.writer(key, 10, (3, 4), F32), second.writer(key, 10, (3, 4), F32)
        for a in range(0, 10, 4):
            w1.append(theirs[a : a + 4])
            w2.append(mine[a : a + 4])
        assert w1.commit()
        if damaged_winner:
            _flip_last_bit(root / key / "features.npy")
        assert w2.commit()  # lost the race: the winner's entry stands if sound, else ours replaces it
        expected = mine if damaged_winner else theirs
        assert torch.equal(read_all(first, key, 10, (3, 4)), expected)
        assert visible(root) == [key] and hidden(root) == []


_STRESS = """
import logging, sys, threading
import numpy as np, torch
from malmm_cli.engine.features import FeatureCache
logging.basicConfig(level=logging.WARNING)
root, seed = sys.argv[1], int(sys.argv[2])
COUNT, SHAPE = 24, (6, 8)
errors = []

def features(key):
    return torch.from_numpy(np.random.default_rng(int(key[:8], 16)).standard_normal((COUNT, *SHAPE), dtype=np.float32))

def work(thread):
    try:
        rng = np.random.default_rng(seed * 10 + thread)
        cache = FeatureCache(root, limit_gb=2.5 * COUNT * 48 * 4 / 1e9)  # room for two of the four entries
        for _ in range(15):
            key = f"{rng.integers(1, 5):08x}" * 5
            want = features(key)
            hit = cache.get(key, COUNT, SHAPE, "torch.float32")
            if hit is None:
                writer = cache.writer(key, COUNT, SHAPE, "torch.float32")
                for a in range(0, COUNT, 5):
                    writer.append(want[a : a + 5])
                writer.commit()
            else:
                assert torch.equal(torch.cat([c for _, c in hit.chunks(5)]), want), key
        assert cache.writable
    except BaseException as err:
        errors.append(err)
        raise

threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.exit(1 if errors else 0)
"""


def test_concurrent_writers_readers_and_eviction_never_fail(tmp_path):
    """Three processes of two threads each read, write and evict four entries at once."""
    root = tmp_path / "features"
    procs = [subprocess.Popen([sys.executable, "-c", _STRESS, str(root), str(seed)], stderr=subprocess.PIPE,
                              text=True) for seed in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "WARNING" not in err  # no reader ever met half an entry, no writer failed
    assert hidden(root) == []
    cache = FeatureCache(root, limit_gb=1)
    for key in visible(root):
        assert read_all(cache, key, 24, (6, 8)) is not None


def test_eviction_skips_entries_that_vanish(tmp_path, monkeypatch):
    root = tmp_path / "features"
    for i, key in enumerate(["1" * 40, "2" * 40, "3" * 40]):
        write_entry(root, key, torch.randn(10, 25, 40))  # 40 kB each
        os.utime(root / key, (1000.0 + i, 1000.0 + i))
    listed = FeatureCache.entries
    monkeypatch.setattr(FeatureCache, "entries", lambda self: listed(self) + [self.root / ("9" * 40)])
    FeatureCache(root, limit_gb=100e3 / 1e9).evict()  # room for two: the least recently used goes
    assert visible(root) == ["2" * 40, "3" * 40]


# ---- 6. bad settings ---------------------------------------------------------------------------------


def test_a_bad_cache_limit_is_one_sentence_naming_the_variable(monkeypatch, tmp_path):
    for value in ["abc", "-1", "nan", "inf", "-inf", "1e999", "20GB"]:
        monkeypatch.setenv(CACHE_LIMIT_ENV, value)
        with pytest.raises(UsageError) as err:
            FeatureCache(tmp_path)
        message = str(err.value)
        assert CACHE_LIMIT_ENV in message and value in message and message.endswith(".") and "\n" not in message
    for value, limit in [("0", 0), ("2.5", 2.5e9), (" 3 ", 3e9), ("", 20e9)]:
        monkeypatch.setenv(CACHE_LIMIT_ENV, value)
        assert FeatureCache(tmp_path).limit == limit


def test_a_bad_cache_limit_is_a_usage_error_on_the_command_line(cli_cache, monkeypatch):
    monkeypatch.setenv(CACHE_LIMIT_ENV, "abc")
    out = malmm("caption", SAMPLE, *TINY, "--frames", 4)
    assert out.exit_code == 2 and "Traceback" not in out.stderr and "loading" not in out.stderr  # before the model
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"malmm: error: {CACHE_LIMIT_ENV} must be")
