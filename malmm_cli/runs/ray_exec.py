"""Work items on a Ray cluster: a pool of actors, each holding one model, fed by the driver.

The shape (issue 13): Ray Core actors, each loading the model once in its constructor, and
the driver's own `ray.wait` loop handing one item to each ready actor, so no item waits
behind a long one. Results come back to the driver, which stays the only writer of the
output. Ray Data's `map_batches` was tried and rejected: an input that killed its worker
every time made it restart the actor (reloading the model) without end, and two tasks in
flight per actor let a short video wait behind a long one.

Faults: actors restart without limit (`max_restarts=-1`) but their calls are never retried
by Ray (its retries did not cover a lost node); when a worker dies, the driver puts its item
back in the queue, at most MAX_ATTEMPTS times in all, and takes the restarted actor back
after a ready probe. A worker that cannot start (model missing) stops the run with one
sentence.

`ray` is imported only here and only when asked for (it adds ~0.6 s to start-up).
`run_items` is generic: any picklable factory whose product maps an item to an outcome
(runs/runners.py's OnRay, for the batch commands and `malmm eval` alike).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from malmm_cli.errors import MalmmError, UsageError
from malmm_cli.messages import plural

log = logging.getLogger("malmm")

RAY_ENV = "MALMM_RAY"
MAX_ATTEMPTS = 3  # runs of one item that may end with its worker dead
CONNECT_TIMEOUT_S = 5.0  # TCP check of HOST:PORT: a bare ray.init on a dead address hung 820 s
POLL_S = 0.5  # ray.wait timeout: between waits, Ctrl-C and SIGTERM handlers run
NOT_READY_LIMIT_S = 900.0  # no worker able to run anything for this long: the cluster cannot host one
# Settings that reach the workers: the driver's environment does not (except on a local
# Ray, whose processes are its children). Paths among them must mean the same on every node.
FORWARDED_ENV = re.compile(r"^(MALMM_(?!RAY$).*|HF_HUB_OFFLINE|TRANSFORMERS_OFFLINE)$")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class WorkerStartError(MalmmError):
    """No worker could start (model missing, malmm not installed on a node): the run stops."""


@dataclass(frozen=True)
class Failure:
    """The outcome of an item that no worker could finish: the sentence for its error record."""

    message: str


@dataclass(frozen=True)
class PoolSpec:
    """How many actors and what each reserves; None = chosen from the cluster (plan_pool)."""

    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    use_gpus: bool = True  # False for --device cpu: a GPU reserved by default would sit idle


# ---- the address ---------------------------------------------------------------------------


def check_address(value: str) -> str:
    """`local`, `auto` or `HOST:PORT` (a UsageError otherwise), trimmed."""
    text = value.strip()
    if text in ("local", "auto"):
        return text
    match = _HOST_PORT.match(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise UsageError(f"--ray must be local, auto or HOST:PORT (the head node's address, as `ray start --head` "
                         f"prints it), not {value!r}.")
    return text


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A plain TCP connect to HOST:PORT, so a wrong or dead address is one sentence in seconds."""
    match = _HOST_PORT.match(address)
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__).lower()
        raise UsageError(f"No Ray cluster answers at {address} ({why}); start one with `ray start --head` "
                         "there, or check the address and the firewall.") from None


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's settings that the workers need (FORWARDED_ENV), for the actors' runtime_env."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if FORWARDED_ENV.match(k)}


# ---- the session -----------------------------------------------------------------------------


def _import_ray(local: bool):
    """Import ray; for a local Ray, first make it use the loopback address only.

    A new local Ray takes the machine's outward address as its node address and its servers
    listen on every interface. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read when ray is
    imported) the node address is 127.0.0.1 and every server binds to it alone. A token of
    this process's own enables Ray's token auth without writing ~/.ray/auth_token."""
    if local and "ray" not in sys.modules:  # both settings are read when ray is imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "RAY_AUTH_MODE" not in os.environ and not os.environ.get("RAY_AUTH_TOKEN"):
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'malmm[ray]' (the same version on every node).") from None
    return ray


class _MainThreadStdout:
    """sys.stdout while Ray is connected: Ray's driver prints its raylet notices (a worker
    died, ...) to stdout from a thread of its own, where they would land among the results
    (`--json` without -o). Writes from any thread but the main one go to stderr instead."""

    def __init__(self, stdout, stderr):
        self._stdout, self._stderr = stdout, stderr

    def _target(self):
        return self._stdout if threading.current_thread() is threading.main_thread() else self._stderr

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stdout, name)


def connect(address: str) -> tuple[Any, bool]:
    """(the ray module, whether this call started the connection). `local` starts a private
    Ray on 127.0.0.1 (refusing to go on if it is not there); `auto` joins the cluster that
    `ray start` runs on this machine; HOST:PORT, the head node there. A process already
    connected (a Python user who called ray.init) keeps its connection."""
    if address not in ("local", "auto"):
        check_reachable(address)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"], False
    ray = _import_ray(address == "local")
    _init(ray, address)
    if address == "local":
        try:
            _check_loopback(ray)
        except UsageError:
            ray.shutdown()
            raise
    return ray, True


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[Any]:
    """connect(address) for the length of a run, disconnecting (and stopping a local Ray)
    at the end if it connected; yields the ray module."""
    ray, started = connect(address)
    stdout = sys.stdout
    sys.stdout = _MainThreadStdout(stdout, sys.stderr)
    try:
        yield ray
    finally:
        sys.stdout = stdout
        if started:
            ray.shutdown()


def _init(ray, address: str) -> None:
    """ray.init, keeping this process's SIGINT and SIGTERM handlers (ray.init replaces the
    SIGTERM one with a plain exit, which would skip the run's clean-up and exit code)."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise UsageError(f"Cannot connect to Ray at {address}: {_last_line(err)}") from None
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"Ray could not start or connect ({address}): {_last_line(err)}") from None
    finally:
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)


def _check_loopback(ray) -> None:
    """A local Ray must live on 127.0.0.1 only; if ray was imported before _import_ray set it
    up, it does not, and the run stops rather than serve the network."""
    address = ray.util.get_node_ip_address()
    if address != "127.0.0.1":
        raise UsageError(f"The local Ray started on {address} instead of 127.0.0.1; run malmm in a fresh "
                         "process (ray must not be imported before --ray local starts it).")


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


# ---- the pool ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    workers: int
    cpus: float
    gpus: float
    fit: int  # workers the cluster holds at once with these reservations
    nodes: int


def plan_pool(nodes: list[Mapping[str, float]], spec: PoolSpec, n_items: int) -> Plan:
    """Workers and their reservations, from the alive nodes' resources (Ray's `Resources`).

    Defaults: one worker per GPU (with the CPUs of its share of the node), or, without GPUs,
    one per node with all of its CPUs; --workers alone shares the CPUs out among them.
    Never more workers than items."""
    if not nodes:
        raise UsageError("The Ray cluster has no alive nodes.")
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    gpus = spec.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total_gpus and spec.use_gpus else 0.0
    cpus = spec.cpus_per_worker
    if cpus is None:
        if gpus:
            gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= gpus]
            share = min((n.get("CPU", 0) * gpus / n["GPU"] for n in gpu_nodes), default=1)
            cpus = max(1.0, math.floor(share))
        elif spec.workers is not None:
            cpus = max(1.0, min(max(n.get("CPU", 0) for n in nodes), sum(n.get("CPU", 0) for n in nodes) // spec.workers))
        else:
            cpus = max(1.0, min(n.get("CPU", 0) for n in nodes))
    fit = sum(_fits(n, cpus, gpus) for n in nodes)
    if fit == 0:
        raise UsageError(f"No node of the Ray cluster has {plural(cpus, 'CPU')} and {plural(gpus, 'GPU')} for a "
                         "worker; "
                         "lower --cpus-per-worker or --gpus-per-worker.")
    workers = spec.workers if spec.workers is not None else fit
    return Plan(max(1, min(workers, n_items)), cpus, gpus, fit, len(nodes))


def _fits(node: Mapping[str, float], cpus: float, gpus: float) -> int:
    n = math.floor(node.get("CPU", 0) / cpus + 1e-9) if cpus else math.inf
    if gpus:
        n = min(n, math.floor(node.get("GPU", 0) / gpus + 1e-9))
    return 0 if n == math.inf else int(n)


def alive_nodes(ray) -> list[dict[str, float]]:
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


class _Worker:
    """The actor: builds its work function once (the model loads here), then runs items.

    The factory's errors are kept, not raised: Ray would report a raised one as a dead actor
    with a traceback; kept, the driver's ready probe gets the sentence and stops the run."""

    def __init__(self, factory: Callable[[], Callable[[Any], Any]]):
        self.work = None
        self.problem: str | None = None
        try:
            self.work = factory()
        except Exception as err:  # noqa: BLE001 - any failure to start is reported, whole, by the driver
            self.problem = describe(err)

    def ready(self) -> str | None:
        """None when the worker can take items, else why it cannot."""
        return self.problem

    def run(self, item: Any) -> Any:
        return self.work(item)


def describe(err: BaseException) -> str:
    """One sentence for an exception: ours (and the model loader's) already are one."""
    from models import ModelError

    if isinstance(err, (MalmmError, ModelError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


# ---- the driver's loop ----------------------------------------------------------------------


@dataclass
class _Task:
    item: Any
    attempts: int = 0  # runs that ended with the worker dead


def run_items(ray, items: Iterable[Any], factory: Callable[[], Callable[[Any], Any]], plan: Plan, *,
              env: Mapping[str, str] | None = None,
              notify: Callable[[str], None] | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield (item, outcome) for every item, in the order they finish.

    `factory` (picklable) runs once in each worker and returns `work`; the outcome is
    `work(item)`, or a Failure when the item's worker died MAX_ATTEMPTS times or `work`
    raised. `env` goes to the workers' environment; `notify` gets a line for each event
    worth telling (a worker died, one came back). Closing the generator (Ctrl-C) ends the
    workers; work already yielded is the caller's."""
    notify = notify or (lambda line: None)
    pending = deque(_Task(item) for item in items)
    actor_class = ray.remote(_Worker).options(
        max_restarts=-1, max_task_retries=0, num_cpus=plan.cpus, num_gpus=plan.gpus,
        scheduling_strategy="SPREAD", runtime_env={"env_vars": dict(env or {})})
    actors = [actor_class.remote(factory) for _ in range(plan.workers)]
    probes = {actor.ready.remote(): actor for actor in actors}  # ready probes in flight
    running: dict[Any, tuple[Any, _Task]] = {}  # call -> (actor, task)
    idle: list = []
    joined: set = set()  # actors that were ready once: one that dies for good later is dropped
    quiet_since = time.monotonic()  # last time some worker was able to run something
    try:
        while pending or running:
            while idle and pending:
                actor, task = idle.pop(), pending.popleft()
                running[actor.run.remote(task.item)] = (actor, task)
            if not running and not probes:
                raise WorkerStartError("Every Ray worker has died for good; see `ray status` and the Ray logs.")
            done, _ = ray.wait([*running, *probes], num_returns=1, timeout=POLL_S)
            if idle or running:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > NOT_READY_LIMIT_S:
                raise WorkerStartError(
                    f"No Ray worker has been ready for {NOT_READY_LIMIT_S / 60:.0f} minutes: the cluster has no room "
                    f"for one with {plural(plan.cpus, 'CPU')} and {plural(plan.gpus, 'GPU')} (see `ray status`).")
            for ref in done:
                if ref in probes:
                    _probed(ray, ref, probes, idle, joined, notify)
                    continue
                actor, task = running.pop(ref)
                outcome = _outcome(ray, ref, task, pending, notify)
                if outcome is _RETRY:
                    probes[actor.ready.remote()] = actor
                    continue
                idle.append(actor)
                yield task.item, outcome
    finally:
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone, or Ray shut down: nothing to end
                ray.kill(actor)


_RETRY = object()


def _outcome(ray, ref, task: _Task, pending: deque, notify) -> Any:
    """work(item) for a finished call; _RETRY after queueing the item again (its worker died)."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except RayActorError:
        task.attempts += 1
        if task.attempts >= MAX_ATTEMPTS:
            notify(f"{_name(task.item)}: its worker died {task.attempts} times; giving up on it")
            return Failure(f"the worker died {task.attempts} times running this input (killed, out of memory, "
                           "or crashed in decoding or the model); see the Ray logs")
        notify(f"{_name(task.item)}: its worker died (attempt {task.attempts} of {MAX_ATTEMPTS}); "
               "queued again")
        pending.append(task)  # at the back: an input that kills workers does not hold up the rest
        return _RETRY
    except RayTaskError as err:  # work() raised: a bug, reported as this item's error
        cause = err.cause if err.cause is not None else err
        return Failure(f"unexpected {type(cause).__name__}: {_last_line(cause)}")


def _probed(ray, ref, probes: dict, idle: list, joined: set, notify) -> None:
    """A ready probe came back: the worker joins the idle ones, is probed again while it
    restarts, is dropped if it died for good after working, or stops the run if it could
    never start (the others would fail the same way: same model, same installation)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    actor = probes.pop(ref)
    key = id(actor)  # the handles live in run_items' list until the end
    try:
        problem = ray.get(ref)
    except ActorUnavailableError:  # restarting: ask again
        probes[actor.ready.remote()] = actor
        return
    except ActorDiedError as err:
        if key in joined:
            notify(f"a Ray worker died for good ({_last_line(err)}); going on with the others")
            return
        raise WorkerStartError(f"A Ray worker could not start: {_last_line(err)}") from None
    if problem is not None:
        raise WorkerStartError(f"A Ray worker could not start: {problem}")
    if key in joined:
        notify("a restarted Ray worker is ready again")
    joined.add(key)
    idle.append(actor)


def _name(item: Any) -> str:
    """How notices name an item: its first element for tuples (OnRay sends the input first)."""
    return str(item[0] if isinstance(item, tuple) and item else item)
