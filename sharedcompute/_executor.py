"""``sharedcompute.Executor``: a drop-in for ``concurrent.futures.ProcessPoolExecutor``.

It owns a runtime of its own and behaves as the stdlib executor does, down to
what CPython's own ``test_concurrent_futures`` checks (``tools/cpython_futures_suite.py``
runs it):

- the constructor takes ``max_workers``, ``mp_context`` (workers are always fresh
  interpreters, as with "spawn"; a "fork" context is refused with the reason),
  ``initializer`` / ``initargs`` (run in every worker, replacements too; one that
  raises breaks the executor) and ``max_tasks_per_child``;
- ``submit`` never raises for a value that cannot be pickled: the Future carries
  the error, as the stdlib's does; it raises ``RuntimeError`` after ``shutdown``
  or once the interpreter is exiting, and the executor's error once it is broken;
- ``map(chunksize=)`` sends items in chunks of that size, one task each; without
  one, tiny calls are batched as ``sc.map`` batches them (learnt as they go; each
  item keeps its Future, error and order), unless ``max_tasks_per_child`` counts
  tasks (a batch would count as one);
- ``shutdown(wait, cancel_futures)``: ``cancel_futures`` cancels every task not
  started yet, those already queued on a worker included; ``wait=False`` returns
  at once and the runtime closes when its work is done;
- work still pending when the interpreter exits completes first (the runtime's
  Futures hold it, not the caller's), also after ``shutdown(wait=False)`` or when
  the executor was dropped without a shutdown.

``Executor(address="HOST:PORT")`` runs the same way on a cluster: its runtime is
then a driver connected to that head (``max_workers`` and the worker options do
not apply: the cluster's nodes are the workers).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from sharedcompute._cluster import ClusterClient, connect
from sharedcompute._runtime._base import TaskOptions
from sharedcompute._runtime._driver import Runtime
from sharedcompute._runtime._future import Future
from sharedcompute._runtime._shared_args import store_shared
from sharedcompute.errors import SerializationError

P = ParamSpec("P")
R = TypeVar("R")

_DEFAULT_OPTIONS = TaskOptions()
# Set once the interpreter exits (before its threads are joined, as concurrent.futures).
_exiting = False
_live: weakref.WeakSet[Executor] = weakref.WeakSet()
_closers: set[threading.Thread] = set()
_closers_lock = threading.Lock()


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` on a sharedcompute runtime of its own."""

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        **runtime_options: Any,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        _check_context(mp_context)
        address = runtime_options.pop("address", None)
        self._runtime: Runtime | ClusterClient
        if address is not None:
            if initializer is not None or max_tasks_per_child is not None or runtime_options:
                raise ValueError(
                    "an Executor on a cluster (address=...) runs on the cluster's workers: "
                    "initializer, max_tasks_per_child and worker options do not apply"
                )
            self._runtime = connect(address)
        else:
            # Workers print what the task printed, unprefixed, as the stdlib executors' do.
            runtime_options.setdefault("worker_output_prefix", False)
            self._runtime = Runtime(
                num_workers=max_workers, initializer=initializer, initargs=initargs,
                max_tasks_per_child=max_tasks_per_child, **runtime_options,
            )
        self._max_tasks_per_child = max_tasks_per_child
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        # Dropped without shutdown(): close when its work is done, as the stdlib's does.
        self._finalizer = weakref.finalize(self, _close_later, self._runtime)
        _live.add(self)

    @property
    def runtime(self) -> Runtime | ClusterClient:
        return self._runtime

    @property
    def _broken(self) -> BaseException | bool:
        """The error that broke the executor, or False (as ``ProcessPoolExecutor._broken``)."""
        return self._runtime.broken or False

    def _check_open(self) -> None:
        """The stdlib's refusals of new work (``_shutdown_lock`` held)."""
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        with self._shutdown_lock:
            self._check_open()
            try:
                return self._runtime.submit(fn, args, kwargs, _DEFAULT_OPTIONS)
            except SerializationError as error:
                # The stdlib pickles in a thread of its own, so this reaches the Future.
                future: Future[R] = Future(self._runtime, self._runtime.new_key(), "submit")
                future.set_exception(error)
                return future

    def map(
        self, fn: Callable[..., R], *iterables: Iterable[Any], timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """Like ``ProcessPoolExecutor.map``: ``chunksize`` items go to a worker per task."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        runtime = self._runtime
        # A large value in many calls goes into the store once, not once a call.
        items = store_shared(runtime.put, list(zip(*iterables, strict=False)))
        if (chunksize == 1 and isinstance(runtime, Runtime) and self._max_tasks_per_child is None
                and runtime._default_scheduler() == "processes"):
            return self._batched_map(runtime, fn, items, timeout)
        if chunksize == 1:
            return super().map(fn, *zip(*items, strict=False), timeout=timeout)
        chunks = super().map(_ChunkRunner(fn), _chunks(iter(items), chunksize), timeout=timeout)
        return itertools.chain.from_iterable(chunks)

    def _batched_map(self, runtime: Runtime, fn: Callable[..., R], items: list[tuple[Any, ...]],
                     timeout: float | None) -> Iterator[R]:
        """``map`` as the stdlib's (every item submitted now, results in order, what is left
        cancelled when the iterator is dropped), its tiny calls in batches."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._shutdown_lock:
            self._check_open()
            try:
                futures = runtime.batched_map(fn, items, _DEFAULT_OPTIONS)
            except SerializationError:  # one at a time: each Future carries its own error
                futures = [self.submit(fn, *args) for args in items]
        return _results(futures, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            self._runtime.cancel_pending()
        self._finalizer.detach()
        if wait:
            _close_when_idle(self._runtime)
        else:
            _close_later(self._runtime)


def _results(futures: list[Future[R]], end: float | None) -> Iterator[R]:
    """Each result in order, as ``Executor.map``'s iterator yields them (CPython's
    ``result_iterator``): the rest cancelled if it is closed or a result raises."""
    futures = futures[::-1]  # popped from the end: a result is not held once yielded
    try:
        while futures:
            if end is None:
                yield futures.pop().result()
            else:
                yield futures.pop().result(end - time.monotonic())
    finally:
        for future in futures:
            future.cancel()


class _ChunkRunner:
    """Runs ``fn`` over a chunk of argument tuples in a worker (picklable, unlike a lambda)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [self.fn(*args) for args in chunk]


def _chunks(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _check_context(mp_context: Any) -> None:
    if mp_context is None:
        return
    method = mp_context.get_start_method(allow_none=False)
    if method == "fork":
        raise ValueError(
            "sharedcompute starts every worker as a fresh interpreter (as the 'spawn' start "
            "method does), so a 'fork' context cannot be honoured: workers would not inherit "
            "this process's memory. Pass mp_context=None or a 'spawn' or 'forkserver' context"
        )
    if method not in ("spawn", "forkserver"):
        raise ValueError(f"unknown multiprocessing start method {method!r}")


def _close_when_idle(runtime: Runtime | ClusterClient) -> None:
    """Wait until the runtime's pending Futures are done, then shut it down."""
    runtime.wait_idle()
    runtime.shutdown()


def _close_later(runtime: Runtime | ClusterClient) -> None:
    """``_close_when_idle`` on a thread of its own; the interpreter's exit waits for it."""
    if runtime.closed:
        return
    thread = threading.Thread(
        target=_close_and_forget, args=(runtime,), name="sharedcompute-executor-close",
        daemon=True,
    )
    with _closers_lock:
        _closers.add(thread)
    thread.start()


def _close_and_forget(runtime: Runtime | ClusterClient) -> None:
    try:
        _close_when_idle(runtime)
    finally:
        with _closers_lock:
            _closers.discard(threading.current_thread())


def _at_exit() -> None:
    """Before the interpreter's own exit: no new work; pending work completes first."""
    global _exiting
    _exiting = True
    for executor in list(_live):
        executor.shutdown(wait=False)
    with _closers_lock:
        closers = list(_closers)
    for thread in closers:
        thread.join()


# Like concurrent.futures: run before threads are joined and atexit handlers run, while
# the runtime's threads still serve.
try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
except RuntimeError:  # first imported while the interpreter exits
    _exiting = True
