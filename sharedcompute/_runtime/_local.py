"""The ``"sync"`` and ``"threads"`` schedulers: tasks run in this process, values by reference.

``sync`` runs a task in the calling thread at submit time, so pdb, profilers and
tracebacks see ordinary frames. ``threads`` runs tasks on a pool of threads that
grows by one while a pool thread waits on a Future, so tasks that wait on the
tasks they submit never deadlock a small pool. Neither copies a value: a
Future holds the object itself.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from sharedcompute._runtime._args import restore_dependencies
from sharedcompute._runtime._future import Future
from sharedcompute.errors import DependencyFailedError


def dependency_values(key: int, deps: dict[int, Future[Any]]) -> dict[int, Any]:
    values = {}
    for dep_key, dep in deps.items():
        try:
            values[dep_key] = dep.result()
        except BaseException as exc:
            error = DependencyFailedError(
                f"task {key} did not run: its dependency {dep_key} failed "
                f"({type(exc).__name__}: {exc})"
            )
            raise error from exc
    return values


def run_inline(
    future: Future[Any], fn: Callable[..., Any], packed: Any, deps: dict[int, Future[Any]]
) -> None:
    """Run ``fn`` here and settle ``future``; the user's exception keeps its traceback."""
    if not future.set_running_or_notify_cancel():
        return  # cancelled while it waited
    try:
        if deps:
            packed = restore_dependencies(packed, dependency_values(future.key, deps))
        args, kwargs = packed
        value = fn(*args, **kwargs)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(value)


class ThreadPool:
    """A FIFO of callables served by up to ``size`` threads, plus one per blocked thread."""

    def __init__(self, size: int, name: str = "sharedcompute-thread") -> None:
        self.size = size
        self.name = name
        self._queue: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._blocked = 0
        self._closed = False
        self._local = threading.local()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the thread scheduler has been shut down")
            self._queue.append(job)
            if self._idle:
                self._cond.notify()
            elif len(self._threads) < self.size + self._blocked:
                self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def in_pool(self) -> bool:
        return getattr(self._local, "member", False)

    def blocking(self) -> None:
        """A pool thread is about to wait: let one more thread take its place."""
        with self._cond:
            self._blocked += 1
            if self._queue and not self._idle:
                self._start_thread()

    def unblocked(self) -> None:
        with self._cond:
            self._blocked -= 1

    def _serve(self) -> None:
        self._local.member = True
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                if not self._queue:
                    return
                job = self._queue.popleft()
            job()
            del job  # not kept (with all it holds) while this thread waits for the next

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(timeout)
