"""The actor inside its process: the instance, and where each call runs.

- ``max_concurrency`` 1 (the default for plain methods): calls run on the main
  thread, one at a time, in arrival order, exactly like tasks (they may wait
  on Futures, and the worker keeps reading its connection meanwhile).
- ``max_concurrency > 1``: plain methods run on a thread pool of that size.
- Coroutine methods run on the actor's own event loop (uvloop when present),
  in a thread of their own, at most ``max_concurrency`` (default 1000) at once.

A constructor that raises reports CREATE_FAILED; the driver then fails every
call, and this process ignores the calls still in flight.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sharedcompute._protocol import Msg

if TYPE_CHECKING:
    from sharedcompute._worker._main import WorkerRuntime


class ActorHost:
    def __init__(self, runtime: WorkerRuntime, message: tuple[Any, ...]) -> None:
        from sharedcompute._worker._main import pack_error

        _, actor_id, cls_key, cls_bytes, args_wire, dep_refs, max_concurrency, description = (
            message
        )
        self.runtime = runtime
        self.actor_id = actor_id
        self.description = description
        self.max_concurrency = max_concurrency
        self.instance: Any = None
        self.failed = False
        self._threads: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit: asyncio.Semaphore | None = None
        try:
            cls = runtime._function(cls_key, cls_bytes)
            args, kwargs = runtime._arguments(args_wire, dep_refs)
            self.instance = cls(*args, **kwargs)
        except BaseException as exc:
            self.failed = True
            where = f"The constructor of {description} failed (pid {os.getpid()})"
            runtime._send((Msg.CREATE_FAILED, actor_id, pack_error(exc, where)))

    # -- routing ---------------------------------------------------------------------

    def take(self, message: tuple[Any, ...]) -> bool:
        """Start a call off the main thread if it runs elsewhere; False: queue it."""
        if self.failed:
            return True  # the driver has failed it already
        method = getattr(self.instance, message[2], None)
        if method is not None and asyncio.iscoroutinefunction(method):
            self._start_async(message)
            return True
        if self.max_concurrency is not None and self.max_concurrency > 1:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="actor-call"
                )
            self._threads.submit(self._call, message, False)
            return True
        return False

    def call_here(self, message: tuple[Any, ...]) -> None:
        """A call that was queued (it arrived before the constructor ran): route it now."""
        if not self.take(message):
            self._call(message, True)

    def _call(self, message: tuple[Any, ...], on_main: bool) -> None:
        _, key, method, args_wire, dep_refs, name, stream = message
        self.runtime._execute(
            key, lambda: getattr(self.instance, method), args_wire, dep_refs, name, method,
            on_main=on_main, stream=stream,
        )

    # -- coroutine methods ----------------------------------------------------------------

    def _start_async(self, message: tuple[Any, ...]) -> None:
        if self._loop is None:
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run_loop, args=(ready,), name="actor-loop", daemon=True
            )
            thread.start()
            ready.wait()
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._call_async(message), self._loop)

    def _run_loop(self, ready: threading.Event) -> None:
        loop: asyncio.AbstractEventLoop
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # uvloop is a dependency, but a missing one must not break actors
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._limit = asyncio.Semaphore(self.max_concurrency or 1000)
        ready.set()
        loop.run_forever()

    async def _call_async(self, message: tuple[Any, ...]) -> None:
        from sharedcompute._worker._main import pack_error

        _, key, method, args_wire, dep_refs, name, _ = message
        runtime = self.runtime
        assert self._limit is not None
        async with self._limit:
            started = time.perf_counter()
            try:
                args, kwargs = runtime._arguments(args_wire, dep_refs)
                bound = getattr(self.instance, method)
                result = await bound(*args, **kwargs)
            except BaseException as exc:
                where = f"Call {name} failed in {self.description} (pid {os.getpid()})"
                runtime.conn.send((Msg.FAILED, key, pack_error(exc, where)))
                return
            runtime._report(key, result, name, started, method, runtime.conn.send, False, bound)


__all__ = ["ActorHost"]
