"""``sharedcompute.Pool``: a drop-in for ``multiprocessing.Pool`` on a runtime of its own.

The same names, results and exceptions as ``multiprocessing.Pool`` for the calls
people use: ``apply``/``map``/``starmap`` and their ``_async`` forms (``callback``,
``error_callback``), ``imap`` (in order) and ``imap_unordered`` (as they finish),
``AsyncResult.get(timeout)`` (``multiprocessing.TimeoutError``), ``wait``, ``ready``,
``successful``; ``close``, ``join``, ``terminate``; a context manager that
terminates on exit, as the stdlib's does; ``ValueError("Pool not running")`` once
closed. Workers are fresh interpreters (``initializer``/``initargs`` run in each,
``maxtasksperchild`` retires them); large arrays travel through the shared store.
``map(chunksize=)`` sends that many items per task; by default ``map`` and ``starmap`` size
chunks as ``multiprocessing.Pool`` does (about four per worker), ``imap`` sends one item per task.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sharedcompute._runtime._base import TaskOptions
from sharedcompute._runtime._driver import Runtime
from sharedcompute._runtime._future import Future
from sharedcompute._runtime._shared_args import store_shared

_OPTIONS = TaskOptions()


class _Chunk:
    """Runs ``fn`` over a chunk of argument tuples in one task (picklable)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [self.fn(*args) for args in chunk]


class AsyncResult:
    """What ``apply_async`` returns (``multiprocessing.pool.AsyncResult``)."""

    def __init__(self, futures: list[Future[Any]], unpack: Callable[[list[Any]], Any],
                 callback: Callable[[Any], object] | None,
                 error_callback: Callable[[BaseException], object] | None) -> None:
        self._futures = futures
        self._unpack = unpack
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback, self._error_callback = callback, error_callback
        self._left = len(futures)
        self._lock = threading.Lock()
        if not futures:
            self._settle()
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, _: object) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._settle()

    def _settle(self) -> None:
        try:
            self._value = self._unpack([f.result() for f in self._futures])
        except BaseException as error:
            self._error = error
        if self._error is None and self._callback is not None:
            self._callback(self._value)
        if self._error is not None and self._error_callback is not None:
            self._error_callback(self._error)
        self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise multiprocessing.TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


class Pool:
    """``multiprocessing.Pool(processes, initializer, initargs, maxtasksperchild)``."""

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, context: Any = None) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        self._runtime = Runtime(
            num_workers=processes, initializer=initializer, initargs=tuple(initargs),
            max_tasks_per_child=maxtasksperchild, worker_output_prefix=False,
        )
        self._state = "RUN"
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()

    # -- submitting ----------------------------------------------------------------------

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                kwds: dict[str, Any]) -> Future[Any]:
        with self._lock:
            if self._state != "RUN":
                raise ValueError("Pool not running")
        future = self._runtime.submit(fn, args, kwds, _OPTIONS)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: object) -> None:
        with self._lock:
            self._pending.discard(future)

    def _sized(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
               chunksize: int | None) -> tuple[list[Future[Any]], int]:
        """``map``'s chunks: by default as ``multiprocessing.Pool.map`` sizes them (about
        four per worker), so a thousand tiny calls cost a few tasks, not a thousand."""
        items = list(items)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._runtime.num_workers * 4)
            chunksize = max(chunksize + (1 if extra else 0), 1)
        return self._chunked(fn, items, chunksize), chunksize

    def _chunked(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
                 chunksize: int | None) -> list[Future[Any]]:
        # A large value in many calls goes into the store once, not once a task.
        items = store_shared(self._runtime.put, list(items))
        size = 1 if chunksize is None else chunksize
        if size < 1:
            raise ValueError(f"Chunksize must be 1+, not {size}")
        if size == 1:
            return [self._submit(fn, args, {}) for args in items]
        runner = _Chunk(fn)  # one for every chunk: pickled and sent to each worker once
        return [self._submit(runner, (items[i:i + size],), {})
                for i in range(0, len(items), size)]

    @staticmethod
    def _flatten(size: int | None) -> Callable[[list[Any]], list[Any]]:
        if not size or size == 1:
            return list
        return lambda chunks: [value for chunk in chunks for value in chunk]

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: dict[str, Any] | None = None) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: dict[str, Any] | None = None,
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    ) -> AsyncResult:
        future = self._submit(func, tuple(args), dict(kwds or {}))
        return AsyncResult([future], lambda values: values[0], callback, error_callback)

    def map(self, func: Callable[..., Any], iterable: Iterable[Any],
            chunksize: int | None = None) -> list[Any]:
        return self.map_async(func, iterable, chunksize).get()

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                  chunksize: int | None = None,
                  callback: Callable[[Any], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None,
                  ) -> AsyncResult:
        futures, size = self._sized(func, ((item,) for item in iterable), chunksize)
        return AsyncResult(futures, self._flatten(size), callback, error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[Any], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None,
                      ) -> AsyncResult:
        futures, size = self._sized(func, (tuple(args) for args in iterable), chunksize)
        return AsyncResult(futures, self._flatten(size), callback, error_callback)

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any],
             chunksize: int = 1) -> Iterator[Any]:
        """Results in order, each as soon as it and those before it are done."""
        futures = self._chunked(func, ((item,) for item in iterable), chunksize)

        def results() -> Iterator[Any]:
            for future in futures:
                value = future.result()
                yield from (value if chunksize > 1 else [value])

        return results()

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> Iterator[Any]:
        """Results as they finish."""
        from sharedcompute._api import as_completed

        futures = self._chunked(func, ((item,) for item in iterable), chunksize)

        def results() -> Iterator[Any]:
            for future in as_completed(futures):
                value = future.result()
                yield from (value if chunksize > 1 else [value])

        return results()

    # -- ending ----------------------------------------------------------------------------

    def close(self) -> None:
        """No more work; what was submitted still runs (``join`` waits for it)."""
        with self._lock:
            if self._state == "RUN":
                self._state = "CLOSE"

    def terminate(self) -> None:
        """Stop now: work not finished is cancelled and the workers end."""
        with self._lock:
            self._state = "TERMINATE"
        self._runtime.shutdown()

    def join(self) -> None:
        with self._lock:
            state = self._state
        if state == "RUN":
            raise ValueError("Pool is still running")
        if state == "CLOSE":
            self._runtime.wait_idle()
            self._runtime.shutdown()

    def __enter__(self) -> Pool:
        with self._lock:
            if self._state != "RUN":
                raise ValueError("Pool not running")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<sharedcompute.Pool state={self._state} pool_size={self._runtime.num_workers}>"
