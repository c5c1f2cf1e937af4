"""``sharedcompute.Future``: a ``concurrent.futures.Future`` whose value may live in the store.

A Future is resolved with a *reference* (an inline payload or a store
descriptor) or, for the sync and threads schedulers, with the value itself.
``result()`` turns a reference into the value once, on first use, in the
calling thread, and keeps it: the value's views keep the stored object alive,
and the Future keeps the key alive in the scheduler until it is garbage.

How a caller waits depends on where it runs: in the driver the runtime's I/O
thread resolves Futures, so the stdlib Condition wait is enough; inside a worker
nobody else reads the worker's connection, so ``result()`` asks the worker
runtime to pump messages (and run other tasks) until the Future is done.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Collection, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from sharedcompute._runtime._base import RuntimeBase

T = TypeVar("T")

_UNSET: Any = object()
_PENDING = concurrent.futures._base.PENDING
_FINISHED = concurrent.futures._base.FINISHED
_DONE_STATES = frozenset(
    (_FINISHED, concurrent.futures._base.CANCELLED, concurrent.futures._base.CANCELLED_AND_NOTIFIED)
)


def is_done(future: concurrent.futures.Future[Any]) -> bool:
    """``future.done()`` without taking its lock (a state, once done, never changes back)."""
    return future._state in _DONE_STATES


class ValueRef:
    """What a Future is resolved with when its value lives outside this process's memory."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any) -> None:
        self.ref = ref


class Future(concurrent.futures.Future, Generic[T]):
    """The result of a task, ``put`` or actor call; also awaitable in asyncio."""

    # A map's item (``pending_futures``): the scheduler knows its key only once it is
    # passed to a task (``_registered_local``), so only then is there a key to release.
    _unheld = False
    # Whether a wait for it polls a moment before sleeping: false for a task whose function
    # last ran for 1 to 100 ms (its answer cannot come sooner than a wake-up; a slower one's
    # duration is not kept, and a poll of 100 us is nothing beside it).
    _poll_first = True

    def __init__(self, runtime: RuntimeBase, key: int, name: str = "") -> None:
        super().__init__()
        self._runtime = runtime
        self.key = key
        self.name = name
        self._value: Any = _UNSET

    def __repr__(self) -> str:
        state = self._state.lower()
        return f"<sharedcompute.Future key={self.key} {self.name or 'value'} {state}>"

    def result(self, timeout: float | None = None) -> T:
        if self._state not in _DONE_STATES:
            self._runtime.wait_for([self], timeout, return_when="ALL_COMPLETED")
            timeout = 0
        if self._state is _FINISHED and self._exception is None:
            # Settled with a value: no lock needed (_result is set before _state).
            raw: Any = self._result
        else:
            raw = super().result(timeout)  # raises, or times out
        if type(raw) is not ValueRef:
            return raw
        value = self._value
        return self._materialize(raw) if value is _UNSET else value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state not in _DONE_STATES:
            self._runtime.wait_for([self], timeout, return_when="ALL_COMPLETED")
            timeout = 0
        return super().exception(timeout)

    def _private_result(self) -> tuple[T, bool]:
        """For a Future that is done: its value loaded afresh as copy-on-write views (its
        arrays writeable, each page copied for this process when first written), and True;
        or its ``result()`` and False where the value is not in a store (a value held in
        memory). Raises as ``result()`` does."""
        raw = super().result(0)
        if type(raw) is not ValueRef:
            return raw, False
        return self._runtime.load_result(self.key, raw.ref, private=True), True

    def _materialize(self, raw: Any) -> Any:
        if type(raw) is not ValueRef:
            return raw
        with self._condition:
            if self._value is _UNSET:
                self._value = self._runtime.load_result(self.key, raw.ref)
            return self._value

    @property
    def ref(self) -> Any:
        """The stored reference, or None for a value held in memory or an error."""
        raw = self._result if self._state == concurrent.futures._base.FINISHED else None
        return raw.ref if type(raw) is ValueRef else None

    def running(self) -> bool:
        """Whether a worker has it: it runs, or waits on that worker to run next.

        As in ``ProcessPoolExecutor`` (whose call queue holds work it calls running),
        such a Future can no longer be cancelled with ``cancel()``.
        """
        if self._state == concurrent.futures._base.PENDING:
            return self._runtime.is_running(self.key)
        return super().running()

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        return self._runtime.cancel(self)

    def _cancel_now(self) -> bool:
        if not super().cancel():
            return False
        # Nothing will pick this Future up later: move it to CANCELLED_AND_NOTIFIED now,
        # which is what concurrent.futures.wait() and as_completed() count as done.
        self.set_running_or_notify_cancel()
        return True

    def _invoke_callbacks(self) -> None:
        # Settled by the thread that reads the workers: a slow callback there would stall
        # every worker's messages, so the user's callbacks run on the runtime's callback
        # thread. The runtime's own (``inline``: short, never blocking) run here.
        callbacks: list[Callable[[Any], object]] = self._done_callbacks  # type: ignore[attr-defined]
        if not callbacks or not self._runtime.defer_callbacks():
            super()._invoke_callbacks()  # type: ignore[misc]
            return
        deferred = [cb for cb in callbacks if not getattr(cb, "inline", False)]
        if deferred:
            self._runtime.call_soon(lambda: _call_each(self, deferred))
        if len(deferred) < len(callbacks):
            _call_each(self, [cb for cb in callbacks if getattr(cb, "inline", False)])

    def __await__(self) -> Generator[Any, None, T]:
        import asyncio  # only code that awaits pays for importing asyncio

        self._runtime.watch(self)
        return asyncio.wrap_future(self).__await__()

    def __reduce__(self) -> Any:
        from sharedcompute.errors import SerializationError

        raise SerializationError(
            f"a Future (key {self.key}) can be passed to a task as an argument, at top level "
            "or inside a list, tuple or dict, but not pickled inside other objects; pass "
            "future.result() instead"
        )

    def __del__(self) -> None:
        runtime = getattr(self, "_runtime", None)
        if runtime is not None:
            if self._unheld and self.key not in getattr(runtime, "_registered_local", ()):
                return
            try:
                runtime.release_key(self.key)
            except Exception:
                pass


def pending_futures(runtime: RuntimeBase, count: int, name: str) -> list[Future[Any]]:
    """``count`` new pending Futures of ``runtime`` (a map's items), made in bulk.

    They share one Condition: making one per Future is most of a Future's cost, and
    none is ever waited on here (``result()`` and ``exception()`` wait through the
    runtime, then ask the stdlib with timeout 0; ``concurrent.futures.wait`` and
    ``as_completed`` install waiters), so it only guards their state changes."""
    condition = threading.Condition()
    next_key = runtime._next_key
    make = Future.__new__
    futures: list[Future[Any]] = []
    for _ in range(count):
        future: Future[Any] = make(Future)
        future.__dict__.update(
            _condition=condition, _state=_PENDING, _result=None, _exception=None,
            _waiters=[], _done_callbacks=[], _runtime=runtime, key=next_key(), name=name,
            _value=_UNSET, _unheld=True,
        )
        futures.append(future)
    return futures


def settle_results(futures: list[Future[Any]], values: list[Any]) -> None:
    """Give each pending Future its value: ``set_result`` for each, in one pass under
    their shared Condition (see ``pending_futures``) for those that nobody waits on
    or called back; the others (and cancelled ones) as usual."""
    if not futures:
        return
    condition = futures[0]._condition
    slow = []
    with condition:
        for future, value in zip(futures, values, strict=True):
            if (future._condition is not condition
                    or future._waiters or future._done_callbacks):  # type: ignore[attr-defined]
                slow.append((future, value))
            elif future._state is _PENDING:
                future._result = value
                future._state = _FINISHED
    for future, value in slow:
        try:
            future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile


def _call_each(future: Future[Any], callbacks: list[Callable[[Any], object]]) -> None:
    for callback in callbacks:
        try:
            callback(future)
        except Exception:  # as concurrent.futures does: logged, the others still run
            concurrent.futures._base.LOGGER.exception(
                "exception calling callback for %r", future
            )


def when_all_done(futures: Collection[Future[Any]], callback: Callable[[], None]) -> None:
    """Call ``callback()`` once every one of ``futures`` is done (at once if they all are).

    It runs in the thread that settles the last one; the count is locked, since
    Futures may be settled by different threads at the same time.
    """
    if not futures:
        callback()
        return
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            callback()

    one_done.inline = True  # type: ignore[attr-defined]  # the runtime's own: never deferred
    for future in futures:
        future.add_done_callback(one_done)
