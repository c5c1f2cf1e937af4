"""``sc.map`` on a local runtime: tiny calls run in batches, every item still its own Future.

::

    map(fn, items) ─▶ an item Future per item (settled by its batch; not in the core)
        │ fn's speed known?  no: the first items go out alone (probes), the rest wait
        ▼
    batches of b items ─▶ _run_batch(fn, items) in a worker ─▶ [(ok, value | packed error)]
        │ done-callback: each item's Future gets its value (as the batch's result holds
        ▼                  it: arrays are views of the batch's stored result) or its error
    item Futures: a task given one as an argument waits for it as for a Future of another
    scheduler (the core learns of it then, and its value is stored when it is done)

Batch size (joblib's rule of thumb): batches of about ``TARGET_S`` of work, and at least
``SPREAD`` batches a worker so that every worker gets some; a call of ``LONG_S`` or more
runs alone. The seconds a call of a function takes are learnt from the probes (the wall time
from submit to done: an upper bound) and from every batch after, per function, so a second
``map`` of the same function batches at once. Items are placed in batches in order.

An item cancelled before its batch finishes stays cancelled (its call may still run, as an
item in ``ProcessPoolExecutor``'s call queue does); a batch that fails as a whole (its worker
crashed past its retries, the runtime shut down) fails or cancels each of its items.

The maps under way are kept: the items of a map whose probes run (``_probing``), and
each map's ``_Feed`` until its last batch is settled (``_feeds``; then it is forgotten,
and its items live only as long as their holders keep them). The scheduler knows only
the batches sent, so the runtime's ``wait_idle`` asks here what else is pending
(``pending``), and its ``cancel_pending`` cancels the items not sent yet
(``cancel_unsent``), as ``Executor.shutdown`` needs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sharedcompute._runtime._base import SCALARS, task_name
from sharedcompute._runtime._future import Future, pending_futures, settle_results
from sharedcompute._runtime._timeline import BATCH_SUFFIX

if TYPE_CHECKING:
    from sharedcompute._runtime._base import TaskOptions
    from sharedcompute._runtime._driver import Runtime

TARGET_S = 0.02  # seconds of work a batch aims at
LONG_S = 0.05  # a call this long runs alone
SPREAD = 4  # at least this many batches per worker
IN_FLIGHT = 2  # batches sent and not back yet, per worker
_SEEN = 4096  # functions whose speed is remembered


class _Calls(list):
    """A batch's argument tuples, known to hold no dependency: a list of its own type, so
    submitting it does not walk every argument looking for Futures (``_args``)."""

    __slots__ = ()


def _run_batch(fn: Callable[..., Any],
               items: list[tuple[Any, ...]]) -> list[tuple[bool, Any, float]]:
    """In a worker: every call, its value or its error (packed with its traceback), and
    the seconds it ran (for the timeline and the next batches' size)."""
    from sharedcompute._worker._main import pack_error

    out: list[tuple[bool, Any, float]] = []
    clock = time.perf_counter
    for args in items:
        start = clock()
        try:
            value = fn(*args)
        except Exception as error:
            out.append((False, pack_error(error, "A call of a batch of sc.map failed"),
                        clock() - start))
        else:
            out.append((True, value, clock() - start))
    return out


class BatchedMap:
    """The batched ``map`` of one runtime (it remembers how fast functions are)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._seconds: dict[Any, float] = {}  # fn -> seconds a call took (most recent)
        self._probing: list[list[Future[Any]]] = []  # the items of maps that probe
        self._feeds: set[_Feed] = set()  # the maps whose batches go out or run
        self._lock = threading.Lock()

    def pending(self) -> list[Future[Any]]:
        """The items not settled yet, of every map under way."""
        with self._lock:
            lists = [*self._probing, *(feed._futures for feed in self._feeds)]
        return [f for items in lists for f in items if not f.done()]

    def _forget(self, feed: _Feed) -> None:
        with self._lock:
            self._feeds.discard(feed)

    def cancel_unsent(self) -> None:
        """Cancel the items no batch has taken yet (``shutdown(cancel_futures=True)``)."""
        with self._lock:
            feeds = list(self._feeds)
        for feed in feeds:
            feed.cancel_rest()

    def map(self, fn: Callable[..., Any], items: list[tuple[Any, ...]],
            options: TaskOptions) -> list[Future[Any]]:
        rt = self._rt
        workers = max(rt.num_workers, 1)
        if len(items) <= 2 * workers:
            return [rt.submit(fn, args, {}, options) for args in items]
        name = task_name(fn)
        seconds = self._seconds.get(fn)
        if seconds is None:  # probes: the first items alone, their time tells the rest
            probes = [rt.submit(fn, args, {}, options) for args in items[:workers]]
            waiting = self._externals(len(items) - workers, name)
            with self._lock:
                self._probing.append(waiting)
            remaining = items[workers:]
            left = [len(probes)]

            def probed(_: Any) -> None:
                left[0] -= 1
                if left[0] == 0:  # how long the workers say the probes ran
                    self._learn(fn, rt.timeline.seconds_of({p.key for p in probes}), 1)
                    self._dispatch(fn, remaining, waiting, options)

            for probe in probes:
                probe.add_done_callback(probed)
            return probes + waiting
        waiting = self._externals(len(items), name)
        self._dispatch(fn, items, waiting, options)
        return list(waiting)  # the caller's to change; the feed keeps its own

    def _externals(self, count: int, name: str) -> list[Future[Any]]:
        return pending_futures(self._rt, count, name)

    def _dispatch(self, fn: Callable[..., Any], items: list[tuple[Any, ...]],
                  futures: list[Future[Any]], options: TaskOptions) -> None:
        feed = _Feed(self, fn, items, futures, options)
        with self._lock:
            self._feeds.add(feed)
            self._probing = [items for items in self._probing if items is not futures]
        feed.pump()

    def _learn(self, fn: Any, seconds: list[float], calls: int) -> None:
        """Remember a call's time: the longest of these runs, over the calls each made."""
        if not seconds:
            return  # it failed before it ran, or fell out of the timeline
        self._seconds[fn] = max(seconds) / calls
        if len(self._seconds) > _SEEN:
            del self._seconds[next(iter(self._seconds))]

    def _resolve(self, owners: list[Future[Any]], batch: Future[Any] | None,
                 error: BaseException | None) -> list[tuple[bool, Any, float]]:
        """A batch finished (or could not start): settle each item's Future, and record
        its calls in the timeline. Returns the batch's outcomes ([] when it gave none)."""
        from sharedcompute._runtime._worker_messages import unpack_error

        outcomes: list[tuple[bool, Any, float]] = []
        if batch is not None and error is None:
            if batch.cancelled():
                for future in owners:
                    future._cancel_now()
            else:
                try:
                    outcomes = batch.result()
                except BaseException as failed:  # the batch as a whole: a crash, a shutdown
                    error = failed
        timeline = self._rt.timeline
        if batch is not None:
            name = batch.name.removesuffix(BATCH_SUFFIX)
            timeline.add_items(batch.key, name, [
                (future.key, seconds, ok)
                for future, (ok, _, seconds) in zip(owners, outcomes, strict=False)
            ])
        if error is None and all(ok for ok, _, _ in outcomes):  # the common case, in bulk
            settle_results(owners, [value for _, value, _ in outcomes])
            return outcomes
        for index, future in enumerate(owners):
            if future.done():
                continue  # cancelled meanwhile
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                if error is not None:
                    future.set_exception(error)
                    continue
                ok, value, _ = outcomes[index]
                if ok:
                    future.set_result(value)
                else:
                    failure = unpack_error(value)
                    timeline.add_error(future.key, future.name, failure)
                    future.set_exception(failure)
        return outcomes


class _Feed:
    """One ``map``'s items not yet sent: batches go out as earlier ones come back, about
    ``IN_FLIGHT`` a worker at a time, each sized by the latest time per call (as joblib's
    auto-batching does: a first call that also imported the function's module makes the
    first batches small, and the next ones grow)."""

    def __init__(self, mapper: BatchedMap, fn: Callable[..., Any],
                 items: list[tuple[Any, ...]], futures: list[Future[Any]],
                 options: TaskOptions) -> None:
        self._mapper = mapper
        self._fn = fn
        self._items = items
        self._futures = futures
        name = task_name(fn)
        self._options = dataclasses.replace(options, name=name + BATCH_SUFFIX)
        # Only scalars: a batch needs no walk through its arguments when it is submitted.
        self._plain = all(type(value) in SCALARS for args in items for value in args)
        self._next = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def cancel_rest(self) -> None:
        with self._lock:
            rest, self._next = self._futures[self._next:], len(self._items)
        for future in rest:
            future._cancel_now()
        self._check_done()

    def _check_done(self) -> None:
        """Once every batch is back and none is left to send, the map is done here."""
        with self._lock:
            done = self._in_flight == 0 and self._next >= len(self._items)
        if done:
            self._mapper._forget(self)

    def pump(self) -> None:
        rt = self._mapper._rt
        workers = max(rt.num_workers, 1)
        while True:
            with self._lock:
                left = len(self._items) - self._next
                if not left or self._in_flight >= IN_FLIGHT * workers:
                    return
                seconds = self._mapper._seconds.get(self._fn, LONG_S)
                size = 1 if seconds >= LONG_S else max(1, min(
                    int(TARGET_S / max(seconds, 1e-6)), -(-left // (SPREAD * workers)),
                ))
                start, self._next = self._next, self._next + size
                self._in_flight += 1
            chunk = self._items[start:start + size]
            if self._plain:
                chunk = _Calls(chunk)
            owners = self._futures[start:start + size]
            try:
                batch = rt.submit(_run_batch, (self._fn, chunk), {}, self._options)
            except BaseException as error:  # the runtime closed, say: the items fail
                self._mapper._resolve(owners, None, error)
                with self._lock:
                    self._in_flight -= 1
                self._check_done()
                continue
            batch.add_done_callback(self._finished(owners, len(chunk)))

    def _finished(self, owners: list[Future[Any]], calls: int) -> Callable[[Any], None]:
        def finished(batch: Any) -> None:
            mapper = self._mapper
            outcomes = mapper._resolve(owners, batch, None)
            if outcomes:  # how long its calls ran, as the worker timed them
                mapper._learn(self._fn, [sum(seconds for _, _, seconds in outcomes)], calls)
            with self._lock:
                self._in_flight -= 1
            if not batch.cancelled():
                self.pump()
                self._check_done()
            else:  # the runtime is going: what was not sent is cancelled with it
                self.cancel_rest()

        return finished
