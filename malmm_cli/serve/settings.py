"""What a server is made of, with every default and bound once: `malmm serve`'s options and
their help come from here. Imports neither torch nor fastapi (`malmm serve --help` is instant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from malmm_cli.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 32  # requests waiting behind the one being answered; more get 429
DEFAULT_TIMEOUT_S = 600.0  # a request's whole life (download, queue, answer); the openai client's own default
DEFAULT_GRACE_S = 30.0  # SIGTERM: in-flight requests may finish within this (Kubernetes waits 30 s, then kills)
DEFAULT_KEEP_GB = 4.0  # videos kept: an hour at 1 fps is ~2.6 GB of InstructBLIP features
API_KEY_ENV = "MALMM_API_KEY"

MAX_QUEUE = 100_000
MAX_TIMEOUT_S = 7 * 86_400.0
MAX_GRACE_S = 3_600.0
MAX_KEEP_GB = 1_000_000.0
MAX_BODY_BYTES = 1 * 2**20  # a request is JSON naming a video (a path or URL), never the video itself
MAX_KEPT_VIDEOS = 256  # each kept video holds an open temporary file; the usual limit is 1,024 per process


@dataclass(frozen=True)
class ServeSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow_dirs: tuple[Path, ...] = ()  # folders whose files may be read, resolved (symlinks followed)
    api_key: str | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S
    grace_s: float = DEFAULT_GRACE_S
    keep_bytes: int = int(DEFAULT_KEEP_GB * 1e9)
    quiet: bool = False


def _bounded(name: str, value: float, low: float, high: float, what: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{name} must be {what} from {low:g} to {high:,g}, not {value:g}.")


def settings_from_options(*, host: str, port: int, allow_dirs: list[Path], api_key: str | None, max_queue: int,
                          timeout_s: float, grace_s: float, keep_gb: float, quiet: bool) -> ServeSettings:
    """The command line's values checked (a UsageError naming the option otherwise): any host
    but a loopback one needs an API key, and every --allow-dir is an existing folder."""
    from .access import is_loopback, resolve_allowed_dirs

    _bounded("--port", port, 0, 65_535, "a port number")
    _bounded("--max-queue", max_queue, 0, MAX_QUEUE, "a number of requests")
    _bounded("--timeout", timeout_s, 1, MAX_TIMEOUT_S, "a number of seconds")
    _bounded("--grace", grace_s, 0, MAX_GRACE_S, "a number of seconds")
    _bounded("--keep", keep_gb, 0, MAX_KEEP_GB, "a number of gigabytes")
    if api_key is not None and not api_key.strip():
        raise UsageError(f"--api-key (or ${API_KEY_ENV}) is empty; give a key, or leave it out on 127.0.0.1.")
    if not is_loopback(host) and api_key is None:
        raise UsageError(f"--host {host} lets other machines connect: give --api-key KEY (or set ${API_KEY_ENV}) "
                         "so that only clients with the key are answered.")
    return ServeSettings(host=host, port=port, allow_dirs=resolve_allowed_dirs(allow_dirs), api_key=api_key,
                         max_queue=max_queue, timeout_s=timeout_s, grace_s=grace_s, keep_bytes=int(keep_gb * 1e9),
                         quiet=quiet)
