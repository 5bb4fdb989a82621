"""uvicorn on a socket bound before the model loads, stopped gracefully.

The socket is bound first, so that a port in use, or a host that is not this machine's, is
one sentence at once rather than after a minute of loading; it listens only once the model
has loaded, so until then a client is refused rather than left waiting. SIGTERM and Ctrl-C
stop accepting, give the requests in flight up to the grace period to finish, and end with
exit 0; a second signal ends at once. (uvicorn would raise the signal again after its
graceful shutdown, so that the process dies of it: a service manager would take that for a
failure.)
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import threading

import uvicorn

from malmm_cli.errors import UsageError
from malmm_cli.messages import note

from .app import create_app
from .settings import ServeSettings
from .worker import Engine

STOP_WAIT_S = 5.0  # after the grace period: how long the model's thread may take to reach its next event


class _Server(uvicorn.Server):
    """uvicorn's server, with signals that end it gracefully and are not raised again, and a
    line on stderr once it listens (not before: a client reading it may connect at once)."""

    def __init__(self, config: uvicorn.Config, ready_line: str):
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            note(self.ready_line)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: any free one), not yet listening."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {host} is not an address or name this machine can listen on.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        reason = (err.strerror or type(err).__name__).lower()
        raise UsageError(f"Cannot listen on {host} port {port} ({reason}); choose another --port or --host.") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(session, settings: ServeSettings, sock: socket.socket) -> int:
    """Answer on `sock` with `session`'s model (loaded) until a signal; returns the exit code."""
    engine = Engine(session, settings)
    config = uvicorn.Config(create_app(engine, settings), log_config=None, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=math.ceil(settings.grace_s))
    url = url_of(sock)
    server = _Server(config, f"serving {session.label} at {url}/v1 (OpenAI's API) and {url}/api (malmm's records); "
                     "Ctrl-C stops")
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(STOP_WAIT_S)
        sock.close()
    note("stopped")
    return 0
