"""The public functions: thin wrappers that find the current runtime and call it."""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, overload

from sharedcompute import _config
from sharedcompute._cluster import ADDRESS_ENV, ClusterClient, connect
from sharedcompute._cluster._messages import WorkerProcess
from sharedcompute._env import check_option as check_runtime_env
from sharedcompute._runtime import _context
from sharedcompute._runtime._base import RuntimeBase, TaskOptions
from sharedcompute._runtime._driver import Runtime
from sharedcompute._runtime._future import Future
from sharedcompute._runtime._returns import check_num_returns, split
from sharedcompute._runtime._shared_args import store_shared
from sharedcompute._runtime._stream import FutureStream, check_backpressure, is_streaming
from sharedcompute._scheduler import public_resources

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
Y = TypeVar("Y")

ALL_COMPLETED = concurrent.futures.ALL_COMPLETED
FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION

_init_lock = threading.Lock()


# -- lifecycle -----------------------------------------------------------------------


def init(
    num_workers: int | None = None,
    scheduler: str = "processes",
    address: str | None = None,
    store_capacity: int | None = None,
    spill_dir: str | None = None,
    resources: dict[str, float] | None = None,
    worker_output_prefix: bool = True,
    runtime_env: dict[str, Any] | None = None,
    dashboard: bool = False,
    dashboard_port: int | None = None,
) -> Runtime | ClusterClient:
    """Start the default runtime (worker processes, store, scheduler) and return it.

    With ``address`` ("HOST:PORT", or "auto" for the head started on this host; also
    read from ``SHAREDCOMPUTE_ADDRESS``), connect to that cluster's head as a driver
    instead: the token comes from ``SHAREDCOMPUTE_TOKEN``, ``SHAREDCOMPUTE_TOKEN_FILE``
    or the sharedcompute home, as for the ``sharedcompute`` command.

    ``runtime_env`` (``working_dir``, ``py_modules``, ``env_vars``, ``excludes``) is the
    environment every task of this driver runs in: its directories are packed and shipped
    now, once per content, and unpacked once per host that runs its work.

    ``dashboard=True`` serves a live dashboard of this runtime on 127.0.0.1 (``dashboard_port``;
    None: a free port) at ``rt.dashboard_url``, printed once; it needs the ``dashboard`` extra.
    On a cluster the head serves it (``sharedcompute start --head --dashboard-port PORT``).
    """
    with _init_lock:
        if _context.in_worker():
            raise RuntimeError("init() cannot be called inside a task")
        current = _context.default()
        if current is not None and not getattr(current, "closed", False):
            raise RuntimeError(
                "sharedcompute is already initialized; call sharedcompute.shutdown() first"
            )
        address = address or os.environ.get(ADDRESS_ENV) or None
        if address is not None and dashboard:
            raise ValueError("on a cluster the head serves the dashboard: start it with "
                             "sharedcompute start --head --dashboard-port PORT")
        if address is not None:
            client = connect(address, store_capacity=store_capacity, runtime_env=runtime_env)
            _context.set_default(client)
            return client
        runtime = Runtime(
            num_workers=num_workers or _config.get("num_workers"),
            scheduler=scheduler,
            address=address,
            store_capacity=store_capacity,
            spill_dir=spill_dir,
            resources=resources,
            worker_output_prefix=worker_output_prefix,
            runtime_env=runtime_env,
        )
        if dashboard:
            try:
                start_dashboard(runtime, port=dashboard_port)
            except BaseException:
                runtime.shutdown()
                raise
        _context.set_default(runtime)
        return runtime


def start_dashboard(runtime: Runtime, *, host: str = "127.0.0.1", port: int | None = None,
                    token: str | None = None,
                    nodes: Callable[[], list[dict[str, Any]]] | None = None,
                    worker_processes: Callable[[], dict[int, WorkerProcess]] | None = None,
                    ) -> str:
    """Serve a dashboard of ``runtime`` (closed with it); its URL, printed once.

    A head passes ``nodes`` and ``worker_processes`` so that it shows every node's."""
    from sharedcompute.dashboard import Dashboard

    served = Dashboard(runtime, host=host, port=port, token=token, nodes=nodes,
                       worker_processes=worker_processes)
    runtime.close_with(served.close)
    runtime.dashboard_url = served.url
    print(f"sharedcompute dashboard: {served.url}", file=sys.stderr, flush=True)
    return served.url


def shutdown() -> None:
    """Stop the default runtime; the next call that needs one starts a new one."""
    with _init_lock:
        runtime = _context.default()
        _context.set_default(None)
    if isinstance(runtime, (Runtime, ClusterClient)):
        runtime.shutdown()


def is_initialized() -> bool:
    runtime = _context.default()
    return runtime is not None and not getattr(runtime, "closed", False)


def _runtime() -> RuntimeBase:
    runtime = _context.current()
    if runtime is not None and not getattr(runtime, "closed", False):
        if _context.exiting() and not _context.in_worker():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        return runtime
    if _context.exiting():
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")
    with _init_lock:
        runtime = _context.default()
        if runtime is None or getattr(runtime, "closed", False):
            runtime = Runtime(num_workers=_config.get("num_workers"))
            _context.set_default(runtime)
        return runtime


_context.set_starter(_runtime)


@atexit.register
def _shutdown_at_exit() -> None:
    # The default runtime ends with the program (after its other threads), as a Ray
    # driver's work does: what is still pending is cancelled, and new work refused (an
    # Executor, like the stdlib's, finishes its work instead).
    if not _context.in_worker():
        _context.mark_exiting()
        shutdown()


# -- futures API --------------------------------------------------------------------------


@overload
def submit(  # type: ignore[overload-overlap]  # a generator function is also a Callable
    fn: Callable[P, Generator[Y, Any, Any]], /, *args: P.args, **kwargs: P.kwargs
) -> FutureStream[Y]: ...
@overload
def submit(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]: ...
def submit(fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
    """Run ``fn(*args, **kwargs)`` as a task; every keyword goes to ``fn``. A generator
    function streams: a ``FutureStream`` of its items' Futures, each ready once yielded."""
    if is_streaming(fn):
        return _runtime().submit_stream(fn, args, kwargs, _DEFAULT_OPTIONS)
    return _runtime().submit(fn, args, kwargs, _DEFAULT_OPTIONS)


def map(fn: Callable[..., R], *iterables: Iterable[Any]) -> list[Future[R]]:
    """Submit ``fn`` once per item (several iterables are zipped); return the Futures.

    On a local runtime tiny calls run in batches, learnt as they go (each item keeps its own
    Future, error and order; long calls run one a task and spread over every worker)."""
    runtime = _runtime()
    # A large value in many calls goes into the store once, not once a call.
    items = store_shared(runtime.put, list(zip(*iterables, strict=False)))
    if isinstance(runtime, Runtime) and runtime._default_scheduler() == "processes":
        return runtime.batched_map(fn, items, _DEFAULT_OPTIONS)
    return [runtime.submit(fn, args, {}, _DEFAULT_OPTIONS) for args in items]


def put(value: T) -> Future[T]:
    """Store ``value`` once; pass the returned Future to any number of tasks."""
    return _runtime().put(value)


@overload
def get(refs: Future[T], timeout: float | None = None) -> T: ...
@overload
def get(
    refs: list[Future[Any]] | tuple[Future[Any], ...], timeout: float | None = None
) -> list[Any]: ...
def get(refs: Any, timeout: float | None = None) -> Any:
    """The value of a Future, or the values of a list of Futures (in order)."""
    if isinstance(refs, (list, tuple)):
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for ref in refs:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(ref.result(remaining) if isinstance(ref, Future) else ref)
        return values
    if isinstance(refs, Future):
        return refs.result(timeout)
    return refs


def gather(futures: Iterable[Future[T]], timeout: float | None = None) -> list[T]:
    """The values of ``futures``, in order (like ``dask.distributed.Client.gather``)."""
    return get(list(futures), timeout)


def wait(
    futures: Iterable[Future[Any]],
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """Like ``concurrent.futures.wait``, for sharedcompute Futures (also inside tasks)."""
    return _context.wait(futures, timeout, return_when)


def as_completed(
    futures: Iterable[Future[T]], timeout: float | None = None, *, progress: bool = False
) -> Iterator[Future[T]]:
    """Yield Futures as they finish, like ``concurrent.futures.as_completed``; with
    ``progress``, under a tqdm bar (a notebook widget or terminal text)."""
    futures = list(futures)
    if progress:
        from sharedcompute._progress import counted

        yield from counted(as_completed(futures, timeout), len(futures))
        return
    runtime = _context.current()
    if runtime is None or not (runtime.needs_pump or runtime.in_task_thread()):
        yield from concurrent.futures.as_completed(futures, timeout)  # type: ignore[misc]
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(dict.fromkeys(futures))
    while pending:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"{len(pending)} (of {len(futures)}) futures unfinished")
        runtime.wait_for(pending, remaining, FIRST_COMPLETED)
        for future in [f for f in pending if f.done()]:
            pending.remove(future)
            yield future


def progress(futures: Iterable[Future[T]], timeout: float | None = None,
             **options: Any) -> list[Future[T]]:
    """Show a progress bar (tqdm: a widget in a notebook, text in a terminal) until every
    Future is done, failed or cancelled; return them. ``options`` go to tqdm (``desc``,
    ``file``, ``leave``...). Needs ``pip install "sharedcompute[progress]"``."""
    from sharedcompute._progress import progress as show

    return show(futures, as_completed, timeout, **options)


# -- remote functions --------------------------------------------------------------------

_DEFAULT_OPTIONS = TaskOptions()
_OPTION_NAMES = frozenset(
    {"num_cpus", "resources", "max_retries", "retry_exceptions", "scheduler", "name", "node",
     "runtime_env", "num_returns", "generator_backpressure"}
)


def _make_options(base: TaskOptions, **changes: Any) -> TaskOptions:
    unknown = sorted(set(changes) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown task option(s) {unknown}; known: {sorted(_OPTION_NAMES)}")
    values: dict[str, Any] = {
        "num_cpus": base.num_cpus,
        "resources": base.resources,
        "max_retries": base.max_retries,
        "retry_exceptions": base.retry_exceptions,
        "scheduler": base.scheduler,
        "name": base.name,
        "node": base.node,
        "runtime_env": base.runtime_env,
        "num_returns": base.num_returns,
        "generator_backpressure": base.generator_backpressure,
    }
    values.update(changes)
    values["num_returns"] = check_num_returns(values["num_returns"])
    values["generator_backpressure"] = check_backpressure(values["generator_backpressure"])
    if "runtime_env" in changes and changes["runtime_env"] is not None:
        values["runtime_env"] = check_runtime_env(changes["runtime_env"])
    resources = values["resources"]
    if isinstance(resources, dict):
        values["resources"] = tuple(sorted((str(k), float(v)) for k, v in resources.items()))
    if float(values["num_cpus"]) < 0:
        raise ValueError(f"num_cpus must be >= 0, got {values['num_cpus']}")
    if int(values["max_retries"]) < 0:
        raise ValueError(f"max_retries must be >= 0, got {values['max_retries']}")
    if values["scheduler"] not in (None, "sync", "threads", "processes"):
        raise ValueError(
            f"scheduler must be 'sync', 'threads' or 'processes', got {values['scheduler']!r}"
        )
    if values["node"] is not None and (
        not isinstance(values["node"], int) or isinstance(values["node"], bool)
    ):
        raise TypeError(f"node must be a node id (an int, see sharedcompute.nodes()), "
                        f"got {values['node']!r}")
    values["num_cpus"] = float(values["num_cpus"])
    return TaskOptions(**values)


class RemoteFunction(Generic[P, R]):
    """A function that runs as a task with ``.submit()`` / ``.remote()``; a call runs it here."""

    def __init__(self, fn: Callable[P, R], options: TaskOptions = _DEFAULT_OPTIONS) -> None:
        self._fn = fn
        self._options = options
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "remote_function")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run it as a task; with ``num_returns=N`` (N > 1), a list of N Futures; a
        generator function streams (a ``FutureStream`` of its items' Futures)."""
        runtime = _runtime()
        if is_streaming(self._fn):
            if self._options.num_returns != 1:
                raise ValueError(f"{self.__qualname__} is a generator function: it streams "
                                 "its items (a FutureStream), so num_returns does not apply")
            return runtime.submit_stream(  # type: ignore[return-value]
                self._fn, args, kwargs, self._options)
        future = runtime.submit(self._fn, args, kwargs, self._options)
        if self._options.num_returns == 1:
            return future
        return split(runtime, future, self._options.num_returns,  # type: ignore[return-value]
                     self.__qualname__)

    remote = submit

    def options(self, **options: Any) -> RemoteFunction[P, R]:
        """A copy with other task options (num_cpus, resources, max_retries, ...)."""
        return RemoteFunction(self._fn, _make_options(self._options, **options))

    def __repr__(self) -> str:
        return f"<sharedcompute.remote function {self.__qualname__}>"


def remote(*args: Any, **options: Any) -> Any:
    """Make a function a remote function (``@remote`` or ``@remote(num_cpus=2, ...)``)."""
    if args and len(args) == 1 and not options and callable(args[0]):
        return _wrap(args[0], _DEFAULT_OPTIONS, {})
    if args:
        raise TypeError("use @remote or @remote(option=value, ...)")

    def decorate(target: Any) -> Any:
        if isinstance(target, type):
            return _wrap(target, _DEFAULT_OPTIONS, options)
        return _wrap(target, _make_options(_DEFAULT_OPTIONS, **options), {})

    return decorate


def _wrap(target: Any, options: TaskOptions, actor_options: dict[str, Any]) -> Any:
    if isinstance(target, type):
        from sharedcompute._runtime._actor import ActorClass, ActorOptions, make_actor_options

        return ActorClass(target, make_actor_options(ActorOptions(), **actor_options))
    return RemoteFunction(target, options)


def nodes() -> list[dict[str, Any]]:
    """The nodes work runs on, each a dict: ``node_id``, ``address``, ``alive``, ``resources``,
    ``available``, ``store_used``, ``store_capacity``, ``workers`` (local mode: one node)."""
    return _driver_runtime("nodes").node_table()


def memory_summary() -> str:
    """What holds memory, as a report: each store's totals (in memory, spilled, where), then
    every object, largest first, with what made it (a task, a put, a task's arguments), where
    it is (memory or spilled, which node) and who holds it (Futures, pending tasks, the
    processes reading it). On a cluster, the head's report (``sharedcompute memory``)."""
    return _driver_runtime("memory_summary").memory_summary()


def timeline(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The recent task executions (up to 100,000) as Chrome trace events: a row per worker,
    grouped by node, an event per task with its function's name and its stored arguments'
    size. Written to ``path`` (JSON) when given; open it in Perfetto or chrome://tracing.
    On a cluster, the head's record of every node's workers."""
    from sharedcompute._runtime._timeline import write_trace

    trace: dict[str, Any] = _driver_runtime("timeline").timeline_trace()
    if path is not None:
        write_trace(trace, path)
    return trace


def cluster_resources() -> dict[str, float]:
    """Resources of all live nodes together (``{"CPU": 8.0, "gpu": 1.0}``, say)."""
    runtime = _driver_runtime("cluster_resources")
    if isinstance(runtime, ClusterClient):
        return runtime.cluster_resources()
    return public_resources(runtime.core.total)


def available_resources() -> dict[str, float]:
    """What of ``cluster_resources()`` no task or actor holds now."""
    runtime = _driver_runtime("available_resources")
    if isinstance(runtime, ClusterClient):
        return runtime.available_resources()
    return public_resources(runtime.core.available)


def _driver_runtime(what: str) -> Runtime | ClusterClient:
    runtime = _runtime()
    if not isinstance(runtime, (Runtime, ClusterClient)):
        raise NotImplementedError(f"{what}() is available in the driver only")
    return runtime


def get_actor(name: str) -> Any:
    """The handle of the live actor started with ``options(name=name)``."""
    runtime = _runtime()
    if not isinstance(runtime, (Runtime, ClusterClient)):
        raise NotImplementedError("get_actor() is available in the driver only")
    return runtime.get_actor(name)


def kill(actor: Any, *, no_restart: bool = True) -> None:
    """Kill an actor's process now; with ``no_restart=False`` it may restart (max_restarts)."""
    runtime = _runtime()
    if not isinstance(runtime, (Runtime, ClusterClient)):
        raise NotImplementedError("kill() is available in the driver only")
    runtime.kill(actor, no_restart=no_restart)
