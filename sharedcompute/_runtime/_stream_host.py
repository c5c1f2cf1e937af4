"""A driver's streaming tasks: where each generator task's items go (see ``_stream``).

State (``StreamHost``):

- ``states``: task key -> ``StreamState`` for each generator task still running (it
  leaves when the task's Future is settled, or when its stream is dropped).
- ``stops``: streams dropped by their user, queued by ``FutureStream.__del__`` (which
  may run anywhere, so it never takes a lock) and carried out with the releases
  (``flush``, the runtime's lock held): a running generator is sent ``STREAM_STOP``,
  one not started yet is cancelled; the items not taken go with the state.

- ``forwards``: generator tasks that a client submitted (a worker's task, a driver
  connected to a head): each item goes on to it (``STREAM_ITEM``, the item's key then
  held by it); its takes (``STREAM_ACK``) and its stop (``STREAM_STOP``) come back
  here and go on to the worker running the generator.

With ``scheduler="processes"`` the task runs on a worker, which sends an item at a
time (``YIELD``, handled in ``on_yield`` under the runtime's lock): each becomes a
Future of its own key (``ObjectPut``, so it is a dependency anywhere and is freed
when its Future is). A rerun after a worker crash yields from the first item again;
items below ``arrived`` are freed, not delivered twice. With ``"threads"`` a pool
thread runs the generator and settles each item's Future; with ``"sync"`` the
generator runs a step at a time in the thread that asks for the next item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sharedcompute._protocol import Msg
from sharedcompute._runtime._args import extract_dependencies, restore_dependencies
from sharedcompute._runtime._base import TaskOptions, future_or_none, task_name
from sharedcompute._runtime._future import Future, ValueRef, when_all_done
from sharedcompute._runtime._local import dependency_values, run_inline
from sharedcompute._runtime._stream import FutureStream, StreamState, open_stream
from sharedcompute._scheduler import CancelRequested, Event, ObjectPut, TaskState
from sharedcompute._store import ref_from_wire, ref_to_wire

if TYPE_CHECKING:
    from sharedcompute._runtime._driver import Runtime
    from sharedcompute._runtime._worker_messages import WorkerSlot


@dataclass
class Forward:
    """A generator task submitted by a client (a worker's task, a connected driver): its
    items go on to that client, which holds them."""

    client: int  # the worker slot (or connected driver) that submitted it
    backpressure: int
    arrived: int = 0
    taken: int = 0  # as the client last said (STREAM_ACK)
    worker: int | None = None  # where it last yielded from


class StreamHost:
    """The streams of one driver runtime (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self.states: dict[int, StreamState] = {}
        self.stops: deque[StreamState] = deque()
        self.forwards: dict[int, Forward] = {}

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
               options: TaskOptions) -> FutureStream[Any]:
        rt = self._rt
        scheduler = options.scheduler or rt._default_scheduler()
        name = task_name(fn, options)
        state = StreamState(0, name, max(0, int(options.generator_backpressure)))
        if scheduler == "processes":
            task = rt._submit_process(fn, args, kwargs, options, name, stream=state)
        else:
            task = self._submit_here(fn, args, kwargs, scheduler, state)
        return open_stream(rt, task, state, self.states)

    def submit_actor(self, actor_id: int, class_name: str, method: str,
                     args: tuple[Any, ...], kwargs: dict[str, Any],
                     backpressure: int) -> FutureStream[Any]:
        state = StreamState(0, f"{class_name}.{method}", backpressure)
        task = self._rt.actors.submit_actor_call(actor_id, class_name, method, args, kwargs,
                                                 stream=state)
        return open_stream(self._rt, task, state, self.states)

    def register(self, key: int, state: StreamState) -> None:
        """A generator task was just submitted as ``key`` (runtime's lock held)."""
        state.key = key
        self.states[key] = state

    # -- items from workers (runtime's lock held) ---------------------------------------

    def on_yield(self, worker: WorkerSlot, message: tuple[Any, ...], events: list[Event]) -> None:
        _, key, index, wire = message
        rt = self._rt
        ref = ref_from_wire(wire)
        rt.store.adopt(ref)
        if key in self.forwards:
            self._forward(worker, key, index, ref, events)
            return
        state = self.states.get(key)
        if state is None or index < state.arrived:  # a dropped stream's, or a rerun's repeat
            rt._free([ref])
            if state is not None and state.backpressure:
                rt._send_to(worker, [(Msg.STREAM_ACK, key, state.taken)])
            return
        state.worker = worker.id
        item_key = rt._next_key()
        future: Future[Any] = Future(rt, item_key, state.name)
        future.set_result(ValueRef(ref))
        events.append(ObjectPut(item_key, ref))
        state.push(future)

    def _forward(self, worker: WorkerSlot, key: int, index: int, ref: Any,
                 events: list[Event]) -> None:
        rt = self._rt
        forward = self.forwards[key]
        client = rt._worker(forward.client)
        if index < forward.arrived or client is None:  # a rerun's repeat, or its reader left
            rt._free([ref])
            if forward.backpressure:
                rt._send_to(worker, [(Msg.STREAM_ACK, key, forward.taken)])
            return
        forward.arrived += 1
        forward.worker = worker.id
        item_key = rt._next_key()
        events.append(ObjectPut(item_key, ref))
        client.held_keys.add(item_key)  # released as the client's Futures are
        rt._send_to(client, [(Msg.STREAM_ITEM, key, index, item_key, ref_to_wire(ref))])

    def submitted_by(self, client: WorkerSlot, key: int, backpressure: int) -> None:
        """A client submitted generator task ``key`` (runtime's lock held)."""
        self.forwards[key] = Forward(client.id, backpressure)

    def client_ack(self, key: int, taken: int) -> None:
        forward = self.forwards.get(key)
        if forward is None or taken <= forward.taken:
            return
        forward.taken = taken
        worker = self._rt._worker(forward.worker) if forward.worker is not None else None
        if worker is not None:
            self._rt._send_to(worker, [(Msg.STREAM_ACK, key, taken)])

    def client_stop(self, key: int, events: list[Event]) -> None:
        if self.forwards.pop(key, None) is not None:
            self._stop_task(key, events)

    def concluded(self, key: int) -> None:
        """Task ``key`` ended for good (runtime's lock held)."""
        self.forwards.pop(key, None)

    # -- from the user's side ----------------------------------------------------------------

    def taken(self, state: StreamState) -> None:
        rt = self._rt
        with rt._lock:
            if state.worker is None or state.key not in self.states:
                return
            worker = rt._worker(state.worker) if rt._pool is not None else None
            if worker is not None:
                rt._send_to(worker, [(Msg.STREAM_ACK, state.key, state.taken)])

    def stop(self, state: StreamState) -> None:
        """Called from ``FutureStream.__del__`` / ``close()``: queue, never block."""
        state.stopped = True
        with state.cond:
            state.cond.notify_all()  # a thread producing it for "threads" looks again
        self.stops.append(state)
        self._rt._wake_releases()

    def pending(self) -> bool:
        return bool(self.stops)

    def flush(self) -> None:
        """Carry out the queued stops (runtime's lock held)."""
        rt = self._rt
        events: list[Event] = []
        while self.stops:
            state = self.stops.popleft()
            if self.states.pop(state.key, None) is None:
                continue  # ended already (or never a worker's)
            with state.cond:
                state.items.clear()  # frees the items not taken
            self._stop_task(state.key, events)
        if events:
            rt._handle(events)

    def _stop_task(self, key: int, events: list[Event]) -> None:
        """Nobody reads stream ``key``: cancel it unstarted, or stop its generator."""
        rt = self._rt
        task_state = rt.core.state_of(key)
        if task_state is TaskState.WAITING or task_state is TaskState.READY:
            events.append(CancelRequested(key))
        elif task_state is TaskState.RUNNING:
            worker_id = rt.core.worker_of(key)
            worker = rt._worker(worker_id) if worker_id is not None else None
            if worker is not None:
                rt._send_to(worker, [(Msg.STREAM_STOP, key)])

    # -- "sync" and "threads" ------------------------------------------------------------------

    def _submit_here(self, fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any], scheduler: str,
                     state: StreamState) -> Future[Any]:
        rt = self._rt
        deps: dict[int, Future[Any]] = {}
        packed = extract_dependencies((args, kwargs), future_or_none, deps)
        task: Future[Any] = Future(rt, rt._next_key(), state.name)
        state.key = task.key
        if scheduler == "sync":
            state.pull = _Puller(rt, task, fn, packed, deps, state)
            return task

        def produce(*args: Any, **kwargs: Any) -> int:
            return _produce(rt, fn(*args, **kwargs), state)

        pool = rt._thread_pool()
        when_all_done(list(deps.values()), lambda: pool.submit(
            lambda: run_inline(task, produce, packed, deps)
        ))
        return task


def _produce(rt: Runtime, items: Iterator[Any], state: StreamState) -> int:
    """Run a generator in this thread (``"threads"``): a settled Future per item."""
    count = 0
    for item in items:
        future: Future[Any] = Future(rt, rt._next_key(), state.name)
        future.set_result(item)
        state.push(future)
        count += 1
        with state.cond:
            while (state.backpressure and not state.stopped
                   and state.arrived - state.taken >= state.backpressure):
                state.cond.wait()
        if state.stopped:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            break
    return count


class _Puller:
    """``"sync"``: the generator advances a step each time the user asks for an item."""

    def __init__(self, rt: Runtime, task: Future[Any], fn: Callable[..., Any], packed: Any,
                 deps: dict[int, Future[Any]], state: StreamState) -> None:
        self._rt = rt
        self._task = task
        self._start: Callable[[], Iterator[Any]] | None = lambda: self._begin(fn, packed, deps)
        self._items: Iterator[Any] | None = None
        self._state = state
        self._count = 0

    def _begin(self, fn: Callable[..., Any], packed: Any,
               deps: dict[int, Future[Any]]) -> Iterator[Any]:
        if deps:
            packed = restore_dependencies(packed, dependency_values(self._task.key, deps))
        args, kwargs = packed
        items: Iterator[Any] = fn(*args, **kwargs)
        return items

    def __call__(self) -> None:
        task, state = self._task, self._state
        try:
            if self._items is None:
                assert self._start is not None
                self._items, self._start = self._start(), None
                task.set_running_or_notify_cancel()
            item = next(self._items)
        except StopIteration:
            task.set_result(self._count)
            return
        except BaseException as exc:
            task.set_exception(exc)
            return
        future: Future[Any] = Future(self._rt, self._rt._next_key(), state.name)
        future.set_result(item)
        self._count += 1
        state.push(future)
