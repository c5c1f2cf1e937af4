"""Dask collections on sharedcompute: a Dask scheduler backed by the shared-memory store.

Use::

    import sharedcompute.dask
    x.compute(scheduler=sharedcompute.dask.get)        # per call
    dask.compute(a, b, scheduler=sharedcompute.dask.get)
    with dask.config.set(scheduler="sharedcompute"):   # named once this module is imported
        ...
    x.compute(scheduler=sharedcompute.dask.get, executor=ex)   # on an sc.Executor's runtime

Data flow::

    dask.compute ── expression / task-spec / legacy graph ──> get(dsk, keys)
                                                                 │ make_plan (_dask_graph)
                                                                 ▼
      DataNode ──> value inline, or sc.put once ──┐        GraphPlan: tasks, data, aliases,
      Alias    ──> the handle of its target ──────┤        producers / readers, priority
      Task     ──> submit(_run_task, node, {dep: Future | value}) ──> worker: node(values)
                                                  │                        │
                          Futures (by reference)  │   result sealed in the store
                                                  ▼                        ▼
                             next tasks' arguments       only requested keys: .result()

Each Dask task runs as one sharedcompute task whose arguments are that node and a dict of
its dependencies' Futures, never the whole graph: the runtime starts it when they are done
and hands it their values as zero-copy, read-only views of the store. Nothing but the
requested keys comes back to the driver.

State of one ``get`` (a :class:`_GraphRun`):

- ``handles``: producer key -> Future (a task, or a large DataNode put in the store) or
  :class:`_Inline` (a small DataNode). Dropped as soon as every reader is *submitted*
  (outputs excepted): from then on the runtime alone keeps the object, and frees it when
  the last reader finishes. This is what keeps memory flat along a long graph.
- ``missing``: for each unsubmitted task, how many producers have no handle yet; at 0 the
  task enters ``ready``, a heap on Dask's static ``dask.order`` priority.
- ``in_flight``: submitted tasks not finished. At most ``window`` (default
  ``2 * workers + 2``) at a time, so the runtime always has a task queued behind each
  running one (no driver round trip between two tasks) while the order Dask chose, and so
  the memory it bounds, still governs which intermediates exist at once.

Invariants: a task is submitted only after all its producers (so every argument is a
Future or a value); every key is submitted at most once; a failure cancels what is in
flight and raises the *first* error, its original type with the remote traceback as
``__cause__`` (a ``DependencyFailedError`` is unwrapped to the error that caused it).

Values read from the store are read-only views: a Dask task that writes into an input
array in place fails with numpy's "assignment destination is read-only", as on Ray (Dask
asks tasks not to mutate their inputs). What ``get`` returns, though, is the caller's to
change, as with every other Dask scheduler: read-only numpy arrays and pandas objects in a
result are copied once, in the driver (``writeable_results=False`` hands back the zero-copy
views instead).

Supported Dask: 2024.11.2 and later (the task-spec graph format; tested at 2024.11.2 and at
the latest release); see ``_dask_graph`` for the private Dask names it needs and how they are
guarded.
"""

from __future__ import annotations

import heapq
import os
import pickle
import sys
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import sharedcompute as sc
from sharedcompute._dask_graph import GraphPlan, make_plan, nested
from sharedcompute.errors import DependencyFailedError

__all__ = ["SCHEDULER_NAME", "get"]

SCHEDULER_NAME = "sharedcompute"
# Below this estimated size a DataNode's value rides inside its readers' arguments; above
# it the value is put in the store once and every reader gets it by reference.
INLINE_LIMIT = 64 * 1024

Key = Hashable


def get(
    dsk: Any,
    keys: Any,
    *,
    executor: sc.Executor | None = None,
    max_in_flight: int | None = None,
    num_workers: int | None = None,
    writeable_results: bool = True,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` of the Dask graph ``dsk`` on sharedcompute; a Dask scheduler function.

    ``dsk`` is what Dask passes a scheduler (an expression, a task-spec or legacy graph);
    ``keys`` a key or a nested list of keys; the result has the same nesting (lists become
    tuples, as with Dask's own schedulers). Tasks run on ``executor``'s runtime if given,
    else on the default runtime (``sc.init``, ``with sc.Runtime()``, or one started now).
    ``max_in_flight`` caps the tasks submitted and unfinished (default ``2 * workers + 2``).
    With ``writeable_results=False`` results may be read-only views of the store (no copy).
    Other keywords Dask forwards are accepted and ignored, as its local schedulers do.
    """
    plan = make_plan(dsk, keys)
    backend = _Backend(executor)
    workers = num_workers or backend.num_workers()
    window = max_in_flight or 2 * workers + 2
    if window < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {window}")
    values = _GraphRun(plan, backend, window, writeable_results).run()
    return nested(keys, values)


def _run_task(node: Any, values: dict[Key, Any]) -> Any:
    """Runs in a worker: one Dask node, given its dependencies' values (by key)."""
    if type(node) is bytes:
        node = pickle.loads(node)
    try:
        return node(values)
    finally:
        # Some Dask versions leave the call's frame in a reference cycle that holds this
        # dict; emptied, it cannot keep the inputs' store views alive until the next GC.
        values.clear()


def _pickled_node(node: Any) -> Any:
    """The node as plain-pickle bytes where that is safe and small, else the node itself.

    Most Dask nodes hold module-level functions, which the standard pickler writes by
    reference about twice as fast as cloudpickle; that is a good share of the driver's cost
    per task on graphs of small tasks. Anything that names ``__main__`` (a script's own
    functions, which a worker cannot import) or does not pickle plainly (lambdas, closures)
    and anything big (arrays inside a node travel better out of band) is left to the
    runtime's serializer, which uses cloudpickle.
    """
    try:
        data = pickle.dumps(node, protocol=5)
    except Exception:
        return node
    if len(data) > INLINE_LIMIT or b"__main__" in data:
        return node
    return data


@dataclass(frozen=True, slots=True)
class _Inline:
    """A DataNode's value small enough to travel inside its readers' arguments."""

    value: Any


class _Backend:
    """Where tasks go: the default runtime, or an ``sc.Executor``'s."""

    def __init__(self, executor: sc.Executor | None) -> None:
        self.executor = executor
        self._task = sc.remote(_run_task)

    def num_workers(self) -> int:
        if self.executor is not None:
            return int(self.executor.runtime.num_workers)
        from sharedcompute._runtime import _context

        runtime = _context.current()
        workers = getattr(runtime, "num_workers", None)
        return int(workers or sc.config.get("num_workers") or os.cpu_count() or 1)

    def submit(self, key: Key, node: Any, values: dict[Key, Any]) -> sc.Future[Any]:
        node = _pickled_node(node)
        if self.executor is not None:
            return self.executor.submit(_run_task, node, values)
        return self._task.options(name=_task_name(key)).submit(node, values)

    def put(self, value: Any) -> sc.Future[Any]:
        if self.executor is not None:
            return self.executor.runtime.put(value)
        return sc.put(value)


class _GraphRun:
    """Submits one plan's tasks in Dask's order, a window at a time; see the module docstring."""

    def __init__(
        self, plan: GraphPlan, backend: _Backend, window: int, writeable_results: bool
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.window = window
        self.writeable_results = writeable_results
        self.handles: dict[Key, sc.Future[Any] | _Inline] = {}
        self.unsubmitted_readers = {key: len(r) for key, r in plan.readers.items()}
        self.missing = {key: len(producers) for key, producers in plan.producers.items()}
        self.ready: list[tuple[int, int, Key]] = []
        self.in_flight: dict[sc.Future[Any], Key] = {}
        self.outputs = {plan.resolve(key) for key in plan.outputs}
        self.unsubmitted = len(plan.tasks)

    def run(self) -> dict[Key, Any]:
        try:
            self._start()
            while self.unsubmitted or self.in_flight:
                self._submit_ready()
                self._wait_for_one()
            return self._results()
        finally:
            self._abandon()

    def _start(self) -> None:
        from dask.sizeof import sizeof

        for key, producers in self.plan.producers.items():
            if not producers:
                self._make_ready(key)
        for key, value in self.plan.data.items():
            if not self.plan.readers[key]:
                continue  # an output only: returned from the plan as it is
            if sizeof(value) > INLINE_LIMIT:
                self.handles[key] = self.backend.put(value)
            else:
                self.handles[key] = _Inline(value)
            self._published(key)

    def _make_ready(self, key: Key) -> None:
        heapq.heappush(self.ready, (self.plan.priority[key], len(self.ready), key))

    def _published(self, key: Key) -> None:
        """``key`` has a handle now: readers waiting only on it become ready."""
        for reader in self.plan.readers[key]:
            self.missing[reader] -= 1
            if self.missing[reader] == 0:
                self._make_ready(reader)

    def _submit_ready(self) -> None:
        while self.ready and len(self.in_flight) < self.window:
            key = heapq.heappop(self.ready)[2]
            node = self.plan.tasks[key]
            values = {dep: self._argument(dep) for dep in node.dependencies}
            future = self.backend.submit(key, node, values)
            self.unsubmitted -= 1
            self.handles[key] = future
            self.in_flight[future] = key
            self._published(key)
            for producer in self.plan.producers[key]:
                self.unsubmitted_readers[producer] -= 1
                if self.unsubmitted_readers[producer] == 0 and producer not in self.outputs:
                    # The runtime keeps the object until this last reader has finished.
                    del self.handles[producer]

    def _argument(self, dep: Key) -> Any:
        handle = self.handles[self.plan.resolve(dep)]
        return handle.value if type(handle) is _Inline else handle

    def _wait_for_one(self) -> None:
        if not self.in_flight:
            return
        done, _ = sc.wait(list(self.in_flight), return_when=sc.FIRST_COMPLETED)
        for future in done:
            del self.in_flight[future]  # type: ignore[arg-type]
            error = future.exception()
            if error is not None:
                raise _root_error(error)

    def _results(self) -> dict[Key, Any]:
        results: dict[Key, Any] = {}
        for key in self.plan.outputs:
            source = self.plan.resolve(key)
            if source in self.plan.data:
                results[key] = self.plan.data[source]
            else:
                handle = self.handles[source]
                assert not isinstance(handle, _Inline)
                value = handle.result()
                results[key] = _writeable(value) if self.writeable_results else value
        return results

    def _abandon(self) -> None:
        """Let go of everything: cancel what has not started, drop every Future."""
        for future in self.in_flight:
            future.cancel()
        self.in_flight.clear()
        self.handles.clear()
        self.ready.clear()


def _root_error(error: BaseException) -> BaseException:
    """The error that started a failure: DependencyFailedError unwrapped to its cause."""
    seen: set[int] = set()
    while isinstance(error, DependencyFailedError) and error.__cause__ is not None:
        if id(error) in seen:
            break
        seen.add(id(error))
        error = error.__cause__
    return error


def _writeable(value: Any) -> Any:
    """A task's result with every read-only numpy array and pandas object in it copied.

    Walks lists, tuples and dicts (where Dask results nest); other objects are returned as
    they are. pandas objects are always copied: their numeric columns from the store are
    read-only views, and pandas (copy-on-write) hides which arrays are.
    """
    cls = type(value)
    if cls is list:
        return [_writeable(item) for item in value]
    if cls is tuple:
        return tuple(_writeable(item) for item in value)
    if cls is dict:
        return {key: _writeable(item) for key, item in value.items()}
    flags = getattr(value, "flags", None)
    if flags is not None and getattr(flags, "writeable", True) is False:
        return value.copy()  # a read-only numpy array
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series, pandas.Index)):
        return value.copy(deep=True)
    return value


def _task_name(key: Key) -> str:
    return f"dask {key!r}" if not isinstance(key, str) else f"dask {key}"


def _register_named_scheduler() -> None:
    """Let ``dask.config.set(scheduler="sharedcompute")`` find :func:`get`."""
    import dask.base

    named: Mapping[str, Any] | None = getattr(dask.base, "named_schedulers", None)
    if isinstance(named, dict):
        named.setdefault(SCHEDULER_NAME, get)


_register_named_scheduler()
