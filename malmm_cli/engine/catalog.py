"""The model presets on this machine: which exist, which are downloaded and where, and
downloading them (`malmm models list|download|path`)."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

from rich.console import Console
from rich.text import Text

from .presets import PRESETS, resolve_model

log = logging.getLogger("malmm")

TINY = "tiny-random"


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a cached hub model, or None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def local_path(source: str) -> Path | None:
    if source == TINY:
        from models.tiny import TINY_VERSION, tiny_random_dir

        path = tiny_random_dir()
        marker = path / "malmm_tiny.json"
        ok = marker.exists() and json.loads(marker.read_text()).get("version") == TINY_VERSION
        return path if ok else None
    if Path(source).is_dir():
        return Path(source)
    return _hub_snapshot(source)


def _size(path: Path) -> int:
    # Hub snapshots are symlinks into blobs/: count what they point to.
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models(as_json: bool) -> int:
    rows = []
    for preset in PRESETS.values():
        path = local_path(preset.source)
        built = preset.source == TINY  # made on this machine, never fetched
        rows.append({
            "name": preset.name, "source": preset.source, "description": preset.description,
            "available": path is not None, "downloaded": path is not None and not built,
            "path": str(path) if path else None,
            "size_bytes": _size(path) if path else None, "download": preset.download, "hardware": preset.hardware,
        })
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    _print_models(rows, Console())
    return 0


def _print_models(rows: list[dict], console: Console) -> None:
    """One block per model: its name and whether it is here, then what it is, where it comes
    from and what it runs on, indented. Lines break at spaces only, so a name or hub id is never
    cut, as a table's narrow columns cut them at 80 columns."""
    indent = " " * 4
    for i, row in enumerate(rows):
        if i:
            console.print()
        built = row["source"] == TINY
        if row["available"]:
            status = f"{'built here' if built else 'downloaded'}, {_human(row['size_bytes'])}"
        else:
            status = f"not built yet ({row['download']}, on first use)" if built else \
                f"not downloaded ({row['download']})"
        console.print(Text.assemble((row["name"], "bold"), "  ", (status, "green" if row["available"] else "yellow")))
        details = [row["description"]]
        if row["source"] != row["name"]:  # tiny-random is built here, not fetched from anywhere
            details.append(f"hub: {row['source']}")
        details.append(f"runs on: {row['hardware']}")
        for detail in details:
            # textwrap rather than Rich: Rich would pad an indented block with trailing spaces,
            # and fold a word longer than the line where textwrap lets it run on.
            for line in textwrap.wrap(detail, max(20, console.width), initial_indent=indent, subsequent_indent=indent,
                                      break_long_words=False, break_on_hyphens=False):
                console.print(Text(line), soft_wrap=True)


def _human(n: int) -> str:
    from malmm_cli.sources.space import human_bytes

    return human_bytes(n)


def _resolve(name: str):
    """The ModelChoice for a name, or the exit code after reporting why there is none."""
    from malmm_cli.errors import MalmmError

    try:
        return resolve_model(name)
    except MalmmError as err:
        print(f"malmm: error: {err}", file=sys.stderr)
        return err.exit_code


def download_model(name: str) -> int:
    choice = _resolve(name)
    if isinstance(choice, int):
        return choice
    if choice.source == TINY:
        from models.tiny import ensure_tiny_checkpoint

        print(ensure_tiny_checkpoint())
        return 0
    if Path(choice.source).is_dir():
        print(f"malmm: '{choice.source}' is a local directory; nothing to download.", file=sys.stderr)
        return 0
    from .fetch import DownloadRefused, check_download, needs_download

    try:
        if needs_download(choice):
            check_download(choice, confirm=False)  # room for it; asking for it is saying yes
    except DownloadRefused as err:
        print(f"malmm: error: {err}", file=sys.stderr)
        return 1
    return _download_hub(choice.source)


def _download_hub(repo_id: str) -> int:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry notices would bury the one sentence below
    print(f"malmm: downloading {repo_id} into the Hugging Face cache (resumable) ...", file=sys.stderr)
    try:
        files = HfApi().list_repo_files(repo_id)
        # One copy of the weights: safetensors when the repo has them.
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.model", "*.txt", *weights])
    except OfflineModeIsEnabled:
        print(f"malmm: error: could not download '{repo_id}': HF_HUB_OFFLINE is set.", file=sys.stderr)
        return 1
    except (httpx.TransportError, ConnectionError) as err:  # before OSError: ConnectionError is one
        log.debug("download of %s failed: %r", repo_id, err)
        print(f"malmm: error: could not download '{repo_id}': the Hugging Face hub could not be reached "
              "(no network connection?); the download can be resumed later with the same command.", file=sys.stderr)
        return 1
    except (HfHubHTTPError, httpx.HTTPError, OSError) as err:
        print(f"malmm: error: could not download '{repo_id}': {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(path)
    return 0


def model_path(name: str | None) -> int:
    if name is None:
        return _cache_locations()
    choice = _resolve(name)
    if isinstance(choice, int):
        return choice
    path = local_path(choice.source)
    if path is None:
        print(f"malmm: error: '{choice.label}' is not downloaded; run: malmm models download {choice.label}",
              file=sys.stderr)
        return 1
    print(path)
    return 0


def _cache_locations() -> int:
    from huggingface_hub import constants

    from malmm_cli.sources.inputs import cache_root

    root = cache_root()
    for label, path in (("malmm cache", root), ("vision features", root / "features"),
                        ("downloaded videos", root / "downloads"), ("quantized models", root / "quantized"),
                        ("Hugging Face models", Path(constants.HF_HUB_CACHE))):
        print(f"{label + ':':21s}{path}")
    return 0
