"""Streaming tasks: a generator function's ``submit()`` returns a ``FutureStream``.

::

    worker:  for item in gen: store it ─▶ YIELD(key, index, ref) ─▶ ... ─▶ DONE(key, count)
                 ▲ pauses while ``generator_backpressure`` items are unconsumed
                 │ STREAM_ACK(key, taken) / STREAM_STOP(key)
    runtime: YIELD ─▶ an item Future (its own key: a dependency anywhere) ─▶ StreamState
    user:    for fut in stream: ...      (each ready as soon as its item was yielded)

``StreamState`` is what the runtime feeds and the stream reads: the item Futures that
arrived and were not yet taken (``items``), how many arrived in all (``arrived``: a
rerun after a worker crash yields from 0 again, and items below it are dropped, so
none is delivered twice), how many the user took (``taken``), and the end: None while
the task runs, then ``_DONE`` or the error that ended it (an exception in the generator
or a crash past its retries), which the stream hands out as one failed Future after
the last good item before it stops. Every change is made under ``cond`` and wakes the
readers.

The runtime holds the state, the user holds the ``FutureStream`` (which holds the
task's Future and the state). Dropping the stream (or ``close()``) tells the runtime
(``stop_stream``): the generator is stopped at its next item, or the task cancelled if
it has not started, and the items not taken are freed with the state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sharedcompute._protocol import Msg
from sharedcompute._runtime._base import task_name
from sharedcompute._runtime._future import Future, ValueRef
from sharedcompute._store import ref_from_wire

if TYPE_CHECKING:
    from sharedcompute._runtime._base import RuntimeBase, TaskOptions

T = TypeVar("T")

_DONE = object()  # the end of a stream that ran to its end


def check_backpressure(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"generator_backpressure must be an int >= 0 (0: no limit), got {value!r}")
    return value


def is_streaming(fn: Any) -> bool:
    """Whether ``fn`` is a generator function (partials of one included): a streaming task."""
    return inspect.isgeneratorfunction(fn)


class StreamState:
    """The runtime's side of one stream (see the module docstring)."""

    def __init__(self, key: int, name: str, backpressure: int) -> None:
        self.key = key
        self.name = name
        self.backpressure = backpressure
        self.cond = threading.Condition()
        self.items: deque[Future[Any]] = deque()
        self.arrived = 0
        self.taken = 0
        self.end: Any = None  # None: running; _DONE; or the error that ended it
        self.worker: int | None = None  # where it last yielded from (for acks and stops)
        self.stopped = False  # its stream was dropped or closed
        # Set by a stream that pulls its own items (scheduler="sync"): called, lock not
        # held, when the user wants an item and none has arrived.
        self.pull: Callable[[], None] | None = None
        self.wakers: list[Callable[[], None]] = []  # ``async for``s waiting for a change

    def push(self, future: Future[Any]) -> None:
        with self.cond:
            self.items.append(future)
            self.arrived += 1
            self._changed()

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            if self.end is None:
                self.end = _DONE if error is None else error
            self._changed()

    def _changed(self) -> None:
        self.cond.notify_all()
        wakers, self.wakers = self.wakers, []
        for wake in wakers:
            wake()

    def take(self, runtime: RuntimeBase, timeout: float | None) -> Future[Any]:
        """The next item's Future (waiting up to ``timeout``); StopIteration at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # A worker's runtime reads its connection only in the thread that waits on it.
        pumped = runtime.needs_pump
        while True:
            with self.cond:
                if self.items:
                    self.taken += 1
                    return self.items.popleft()
                end = self.end
                if end is _DONE:
                    raise StopIteration
                if end is not None:
                    self.end = _DONE  # the error goes out once, as the last Future
                    failed: Future[Any] = Future(runtime, runtime.new_key(), self.name)
                    failed.set_exception(end)
                    return failed
                if self.pull is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"no item of stream {self.name!r} came within {timeout} s"
                        )
                    if not pumped:
                        self.cond.wait(remaining)
                        continue
            if self.pull is not None:
                self.pull()
            else:
                runtime.wait_until(self._changed_since(self.arrived), deadline)

    def _changed_since(self, arrived: int) -> Callable[[], bool]:
        return lambda: self.arrived != arrived or self.end is not None


def open_stream(runtime: RuntimeBase, task: Future[Any], state: StreamState,
                registry: dict[int, StreamState]) -> FutureStream[Any]:
    """The stream of a generator task just submitted as ``task``: it ends when the task
    does (with its error, if any), and leaves ``registry`` (where its items are routed)."""

    def ended(future: concurrent.futures.Future[Any]) -> None:
        registry.pop(state.key, None)
        if future.cancelled():
            state.finish(concurrent.futures.CancelledError(f"stream {state.name!r} was cancelled"))
        else:
            state.finish(future.exception())

    ended.inline = True  # type: ignore[attr-defined]  # the runtime's own: never deferred
    task.add_done_callback(ended)
    runtime.watch(task)  # its end comes as the task's answer, after its items
    return FutureStream(runtime, task, state)


class StreamClient:
    """Streams of a runtime whose tasks the head runs: a worker's nested tasks, a driver
    connected to a cluster. The head forwards each item (``STREAM_ITEM``: the key, the
    index, the item's own key and reference); takes and stops go back to it as control
    messages, flushed with the releases (``stop_stream`` may run in a finalizer)."""

    _client_streams: dict[int, StreamState]

    if TYPE_CHECKING:  # what the runtime it is mixed into provides
        def submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any], options: TaskOptions,
                   stream: StreamState | None = None) -> Future[Any]: ...
        def submit_actor_call(self, actor_id: int, class_name: str, method: str,
                              args: tuple[Any, ...], kwargs: dict[str, Any],
                              stream: StreamState | None = None) -> Future[Any]: ...
        def _queue_control(self, message: tuple[Any, ...]) -> None: ...
        def watch(self, future: Future[Any]) -> None: ...

    def submit_stream(self, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any], options: TaskOptions) -> FutureStream[Any]:
        name = task_name(fn, options)
        state = StreamState(0, name, max(0, int(options.generator_backpressure)))
        if options.scheduler not in (None, "processes"):
            raise ValueError(f"a streaming task submitted here runs on the cluster's workers, "
                             f"not with scheduler={options.scheduler!r}")
        task = self.submit(fn, args, kwargs, options, stream=state)
        return open_stream(self, task, state, self._client_streams)  # type: ignore[arg-type]

    def submit_actor_stream(self, actor_id: int, class_name: str, method: str,
                            args: tuple[Any, ...], kwargs: dict[str, Any],
                            backpressure: int) -> FutureStream[Any]:
        state = StreamState(0, f"{class_name}.{method}", backpressure)
        task = self.submit_actor_call(actor_id, class_name, method, args, kwargs, stream=state)
        return open_stream(self, task, state, self._client_streams)  # type: ignore[arg-type]

    def stream_item(self, message: tuple[Any, ...]) -> None:
        """The head forwards an item of a stream of ours."""
        _, key, _index, item_key, wire = message
        state = self._client_streams.get(key)
        future: Future[Any] = Future(self, item_key, state.name if state else "")  # type: ignore[arg-type]
        future.set_result(ValueRef(ref_from_wire(wire)))
        if state is not None:
            state.push(future)
        # (else: dropped meanwhile; the Future's release frees the item)

    def stream_taken(self, state: StreamState) -> None:
        self._queue_control((Msg.STREAM_ACK, state.key, state.taken))

    def stop_stream(self, state: StreamState) -> None:
        if self._client_streams.pop(state.key, None) is not None:
            self._queue_control((Msg.STREAM_STOP, state.key))


class FutureStream(Generic[T]):
    """The Futures of a generator task's items, in yield order, each ready as soon as
    its item is yielded; iterate it (``for`` or ``async for``). An exception in the
    generator fails the Future after the last good item, then the stream ends.

    Dropping the stream (or ``close()``) stops the generator and frees the items not
    taken yet."""

    def __init__(self, runtime: RuntimeBase, task: Future[Any], state: StreamState) -> None:
        self._runtime = runtime
        self._task = task
        self._state = state
        self._closed = False

    def __iter__(self) -> Iterator[Future[T]]:
        return self

    def __next__(self) -> Future[T]:
        return self.next()

    def next(self, timeout: float | None = None) -> Future[T]:
        """The next item's Future, waiting up to ``timeout`` seconds for it to be yielded
        (``TimeoutError`` then); ``StopIteration`` once the stream has ended."""
        state = self._state
        future = state.take(self._runtime, timeout)
        if state.backpressure and state.pull is None:
            self._runtime.stream_taken(state)
        return future

    def __aiter__(self) -> AsyncIterator[Future[T]]:
        return self

    async def __anext__(self) -> Future[T]:
        state = self._state
        loop = asyncio.get_running_loop()
        while True:
            with state.cond:
                # (in a task, only the waiting thread reads what brings items: it waits)
                ready = (bool(state.items) or state.end is not None or state.pull is not None
                         or self._runtime.needs_pump)
                if not ready:  # woken (from the runtime's thread) by the next change
                    changed = loop.create_future()

                    def wake(changed: asyncio.Future[None] = changed) -> None:
                        try:
                            loop.call_soon_threadsafe(_settle, changed)
                        except RuntimeError:
                            pass  # that loop has closed (its `async for` was cancelled)

                    state.wakers.append(wake)
            if ready:
                try:
                    return self.next()
                except StopIteration:
                    raise StopAsyncIteration from None
            await changed  # (cancelled: nothing was taken)

    @property
    def task(self) -> Future[int]:
        """The generator task's own Future: the number of items it yielded, once it ends."""
        return self._task

    def close(self) -> None:
        """Stop the generator (at its next item) and free the items not taken; the
        stream then ends (iterating it stops at once)."""
        if not self._closed:
            self._closed = True
            state = self._state
            with state.cond:
                state.items.clear()
                state.end = _DONE
                state._changed()
            self._runtime.stop_stream(state)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = self._state
        where = "ended" if state.end is not None else "running"
        return (f"<sharedcompute.FutureStream {state.name} {where}: {state.arrived} yielded, "
                f"{state.taken} taken>")


def _settle(changed: asyncio.Future[None]) -> None:
    if not changed.done():
        changed.set_result(None)
