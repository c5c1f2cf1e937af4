"""Dask collections on sharedcompute: a Dask scheduler backed by the shared-memory store.

Use::

    import sharedcompute.dask
    x.compute(scheduler=sharedcompute.dask.get)        # per call
    dask.compute(a, b, scheduler=sharedcompute.dask.get)
    with dask.config.set(scheduler="sharedcompute"):   # named once this module is imported
        ...
    x.compute(scheduler=sharedcompute.dask.get, executor=ex)   # on an sc.Executor's runtime
    x.compute(scheduler=ex)   # also works: Dask's generic Executor path (see below)

Data flow::

    dask.compute ── expression / task-spec / legacy graph ──> get(dsk, keys)
                                                                 │ make_plan, fuse (_dask_graph)
                                                                 ▼
      DataNode ──> value inline, or sc.put once ──┐        GraphPlan: tasks, data, aliases,
      Alias    ──> the handle of its target ──────┤        producers / readers, priority
      Task     ──> submit(_run_task, (node, deps), *(Future | value)) ──> worker: node(values)
                                                  │                        │
                          Futures (by reference)  │   result sealed in the store
                                                  ▼                        ▼
                             next tasks' arguments       only requested keys: .result()

Each Dask task runs as one sharedcompute task whose arguments are that node with its
dependencies' keys, then their Futures, never the whole graph: the runtime starts it when
they are done and hands it their values as zero-copy, read-only views of the store.
Nothing but the requested keys comes back to the driver. Chains, and reductions where the
graph is wide enough for the workers, are first fused into one task each (``fuse=False``
not): a task costs the driver a few hundred microseconds of CPU, see ``_dask_graph.fuse``.

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
change, as with every other Dask scheduler: a result in the store is read through a private
(copy-on-write) mapping, so its arrays are writeable yet nothing is copied up front: a page
is copied for the driver only when first written, and the store's object is never changed
(it stays held while the result lives). ``writeable_results=False`` hands back read-only
views instead. A small result that travelled inline has its read-only parts copied.

Passing an ``sc.Executor`` itself as ``scheduler=`` takes Dask's path for any
``concurrent.futures.Executor`` (``dask.local.get_async``): correct and parallel, but every
intermediate comes back to the driver (as a zero-copy view) and goes out again with its
readers (one copy an edge). ``scheduler=get, executor=ex`` keeps them in the store.
Dask's diagnostics (``ProgressBar``, ``Profiler``, ``callbacks=``) are called as its local
schedulers call them, with ``None`` for each task's result.

Supported Dask: 2024.11.2 and later (the task-spec graph format; tested at 2024.11.2 and at
the latest release); see ``_dask_graph`` for the private Dask names it needs and how they are
guarded.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
import shutil
import sys
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from dask.utils import key_split

import sharedcompute as sc
from sharedcompute._dask_graph import GraphPlan, make_plan, nested
from sharedcompute._dask_graph import fuse as fused_plan
from sharedcompute.errors import DependencyFailedError

__all__ = ["SCHEDULER_NAME", "get"]

SCHEDULER_NAME = "sharedcompute"
# Below this estimated size a DataNode's value rides inside its readers' arguments; above
# it the value is put in the store once and every reader gets it by reference.
INLINE_LIMIT = 64 * 1024
# Reductions are fused (see _dask_graph.fuse) only where at least this many per worker,
# alike in size, stand at one height of the graph: every worker still has groups to run.
_FUSE_WIDTH_PER_WORKER = 2
# How long a failed graph waits for its tasks already on workers before it removes its
# disk shuffles' directories (which they may still write to).
_SCRATCH_GRACE_SECONDS = 30.0

Key = Hashable


def get(
    dsk: Any,
    keys: Any,
    *,
    executor: sc.Executor | None = None,
    max_in_flight: int | None = None,
    num_workers: int | None = None,
    writeable_results: bool = True,
    fuse: bool = True,
    callbacks: Any = None,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` of the Dask graph ``dsk`` on sharedcompute; a Dask scheduler function.

    ``dsk`` is what Dask passes a scheduler (an expression, a task-spec or legacy graph);
    ``keys`` a key or a nested list of keys; the result has the same nesting (lists become
    tuples, as with Dask's own schedulers). Tasks run on ``executor``'s runtime if given,
    else on the default runtime (``sc.init``, ``with sc.Runtime()``, or one started now).
    ``max_in_flight`` caps the tasks submitted and unfinished (default ``2 * workers + 2``).
    Results are writeable copy-on-write views of the store (a page copied only when
    written); with ``writeable_results=False``, read-only views. Chains of tasks, and
    reductions where the graph is wide enough, run as one task each (see
    ``sharedcompute._dask_graph.fuse``); ``fuse=False`` runs every Dask task on its own.
    Dask's local callbacks (``dask.diagnostics.ProgressBar``, ``Profiler``, or
    ``callbacks=``) see every task start and finish; ``posttask`` gets ``None`` for the
    result, which stays in the store. Other keywords Dask forwards are accepted and ignored,
    as its local schedulers do.
    """
    from dask.callbacks import local_callbacks

    plan = make_plan(dsk, keys)
    backend = _Backend(executor)
    workers = num_workers or backend.num_workers()
    window = max_in_flight or 2 * workers + 2
    if window < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {window}")
    run = fused_plan(plan, _FUSE_WIDTH_PER_WORKER * workers, _makes_scratch) if fuse else plan
    with local_callbacks(callbacks) as active:
        hooks = _Hooks(plan, run.members, active) if active else None
        values = _GraphRun(run, backend, window, writeable_results, hooks).run()
    return nested(keys, values)


def _run_task(task: Any, *inputs: Any) -> Any:
    """Runs in a worker: one Dask node, given its dependencies' values in the order of the
    keys that ``task`` (the node and those keys, maybe pickled) names."""
    node, keys = pickle.loads(task) if type(task) is bytes else task
    values = dict(zip(keys, inputs, strict=True))
    # Some Dask versions leave the call's frame in a reference cycle: holding neither the
    # inputs nor (emptied, below) this dict, it cannot keep their store views alive.
    del inputs
    try:
        return node(values)
    finally:
        values.clear()


def _pickled_node(node: Any, keys: tuple[Key, ...]) -> Any:
    """The node and its dependencies' keys as plain-pickle bytes where that is safe and
    small, else as they are.

    Most Dask nodes hold module-level functions, which the standard pickler writes by
    reference about twice as fast as cloudpickle; with the Futures as the other arguments,
    the runtime then packs a task's arguments without walking or serializing anything
    more. That is a good share of the driver's cost per task on graphs of small tasks.
    Anything that names ``__main__`` (a script's own functions, which a worker cannot
    import) or does not pickle plainly (lambdas, closures) and anything big (arrays inside
    a node travel better out of band) is left to the runtime's serializer (cloudpickle).
    """
    try:
        data = pickle.dumps((node, keys), protocol=5)
    except Exception:
        return node, keys
    if len(data) > INLINE_LIMIT or b"__main__" in data:
        return node, keys
    return data


def _shuffle_scratch(node: Any) -> tuple[Any, str] | None:
    """A disk shuffle's partd, made here, and its directory; None for any other node.

    Dask's disk shuffle starts with a task that makes a partd (a directory of files that
    the shuffle's tasks append to and read from). partd removes that directory at the
    exit of the process that made it, and workers leave without running exit handlers, so
    run in a worker it would stay for good. Made here instead, unbuffered as a worker
    would make it, its directory goes when the graph ends (``_GraphRun.run``).
    """
    if not _makes_scratch(node):
        return None
    reduced: Any = node.func.__reduce__()  # what a worker unpickles: not buffered in memory
    rebuild, args = reduced
    made = rebuild(*args)()
    outer, inner = None, made
    while not hasattr(inner, "path") and hasattr(inner, "partd"):
        outer, inner = inner, inner.partd
    path = getattr(inner, "path", None)
    if not isinstance(path, str):
        return None
    scratch_file = _scratch_file_class()
    if outer is not None and type(inner) is scratch_file.__base__:
        outer.partd = scratch_file(path)
    return made, path


def _makes_scratch(node: Any) -> bool:
    """Whether ``node`` starts a disk shuffle (see :func:`_shuffle_scratch`)."""
    shuffle = sys.modules.get("dask.dataframe.shuffle")
    maker = getattr(shuffle, "maybe_buffered_partd", None)
    func = getattr(node, "func", None)
    return maker is not None and type(func) is maker and not node.dependencies


def _scratch_file_class() -> type:
    """``_ScratchFile``: a disk shuffle's files, appended to without an fsync each time.

    Dask's disk shuffle asks partd to fsync every file it appends to: one per output
    partition, for every input partition, each blocking a worker about half a
    millisecond on a virtual disk. These files are scratch: this machine's workers read
    them back through the page cache, and they are removed when the graph ends; nothing
    needs them on the disk itself. (Dask's threaded scheduler buffers them in memory.)
    Made on first use, since partd imports pandas: a worker that never shuffles (or
    unpickles one) never pays for that import.
    """
    made: type | None = globals().get("_ScratchFile")
    if made is not None:
        return made
    import partd

    class _ScratchFile(partd.File):
        def append(self, data: Any, lock: bool = True, fsync: bool = False,
                   **kwargs: Any) -> None:
            super().append(data, lock=lock, fsync=False, **kwargs)

    _ScratchFile.__module__ = __name__
    _ScratchFile.__qualname__ = "_ScratchFile"
    globals()["_ScratchFile"] = _ScratchFile
    return _ScratchFile


def __getattr__(name: str) -> Any:
    if name == "_ScratchFile":  # a worker unpickling a disk shuffle's partd
        return _scratch_file_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, slots=True)
class _Inline:
    """A DataNode's value small enough to travel inside its readers' arguments."""

    value: Any


class _Backend:
    """Where tasks go: the default runtime, or an ``sc.Executor``'s."""

    def __init__(self, executor: sc.Executor | None) -> None:
        self.executor = executor
        self._task = sc.remote(_run_task)
        self._named: dict[str, Any] = {}  # task name -> the remote function that bears it

    def num_workers(self) -> int:
        if self.executor is not None:
            return int(self.executor.runtime.num_workers)
        from sharedcompute._runtime import _context

        runtime = _context.current()
        workers = getattr(runtime, "num_workers", None)
        return int(workers or sc.config.get("num_workers") or os.cpu_count() or 1)

    def submit(
        self, key: Key, node: Any, deps: tuple[Key, ...], inputs: list[Any]
    ) -> sc.Future[Any]:
        task = _pickled_node(node, deps)
        if self.executor is not None:
            return self.executor.submit(_run_task, task, *inputs)
        name = _task_name(key)
        named = self._named.get(name)
        if named is None:
            named = self._named[name] = self._task.options(name=name)
        return named.submit(task, *inputs)

    def put(self, value: Any) -> sc.Future[Any]:
        if self.executor is not None:
            return self.executor.runtime.put(value)
        return sc.put(value)


class _GraphRun:
    """Submits one plan's tasks in Dask's order, a window at a time; see the module docstring."""

    def __init__(
        self,
        plan: GraphPlan,
        backend: _Backend,
        window: int,
        writeable_results: bool,
        hooks: _Hooks | None = None,
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.window = window
        self.writeable_results = writeable_results
        self.hooks = hooks
        self._tie = itertools.count()
        self.handles: dict[Key, sc.Future[Any] | _Inline] = {}
        self.unsubmitted_readers = {key: len(r) for key, r in plan.readers.items()}
        self.missing = {key: len(producers) for key, producers in plan.producers.items()}
        self.ready: list[tuple[int, int, Key]] = []
        self.in_flight: dict[sc.Future[Any], Key] = {}
        self.outputs = {plan.resolve(key) for key in plan.outputs}
        self.unsubmitted = len(plan.tasks)
        self.scratch: list[str] = []  # disk shuffles' directories: removed when it ends

    def run(self) -> dict[Key, Any]:
        failed = True
        try:
            if self.hooks is not None:
                self.hooks.started()
            self._start()
            while self.unsubmitted or self.in_flight:
                self._submit_ready()
                self._wait_for_one()
            results = self._results()
            failed = False
            return results
        finally:
            started = self._abandon()
            if self.scratch:
                if started:  # they may still write there (bounded: a hung task must not
                    sc.wait(started, timeout=_SCRATCH_GRACE_SECONDS)  # hang the error)
                for path in self.scratch:
                    shutil.rmtree(path, ignore_errors=True)
            if self.hooks is not None:
                self.hooks.finished(failed)

    def _start(self) -> None:
        from dask.sizeof import sizeof

        for key, producers in self.plan.producers.items():
            if producers:
                continue
            scratch = _shuffle_scratch(self.plan.tasks[key])
            if scratch is None:
                self._make_ready(key)
                continue
            # A disk shuffle's partd, made here: its directory is this run's to remove.
            self.scratch.append(scratch[1])
            self.unsubmitted -= 1
            self.handles[key] = _Inline(scratch[0])
            if self.hooks is not None:
                self.hooks.move(key, "waiting", "ready")
                self.hooks.running(key)
                self.hooks.done(key)
            self._published(key)
        for key, value in self.plan.data.items():
            if not self.plan.readers[key]:
                continue  # an output only: returned from the plan as it is
            if sizeof(value) > INLINE_LIMIT:
                self.handles[key] = self.backend.put(value)
            else:
                self.handles[key] = _Inline(value)
            self._published(key)

    def _make_ready(self, key: Key) -> None:
        heapq.heappush(self.ready, (self.plan.priority[key], next(self._tie), key))
        if self.hooks is not None:
            self.hooks.move(key, "waiting", "ready")

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
            deps = tuple(node.dependencies)
            inputs = [self._argument(dep) for dep in deps]
            if self.hooks is not None:
                self.hooks.running(key)
            future = self.backend.submit(key, node, deps, inputs)
            del inputs
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
            key = self.in_flight.pop(future)  # type: ignore[call-overload]
            error = future.exception()
            if error is not None:
                raise _root_error(error)
            if self.hooks is not None:
                self.hooks.done(key)

    def _results(self) -> dict[Key, Any]:
        results: dict[Key, Any] = {}
        for key in self.plan.outputs:
            source = self.plan.resolve(key)
            if source in self.plan.data:
                results[key] = self.plan.data[source]
            else:
                handle = self.handles[source]
                assert not isinstance(handle, _Inline)
                results[key] = _owned(handle) if self.writeable_results else handle.result()
        return results

    def _abandon(self) -> list[sc.Future[Any]]:
        """Let go of everything: cancel what has not started, drop every Future; those
        that could not be cancelled (sent to a worker: running, or queued behind a running
        task) are returned."""
        started = [future for future in self.in_flight if not future.cancel()]
        self.in_flight.clear()
        self.handles.clear()
        self.ready.clear()
        return started


class _Hooks:
    """Dask's local-scheduler callbacks, fed with a state shaped like ``dask.local``'s.

    ``state`` holds the sets ``dask.diagnostics`` reads (waiting, ready, running, finished,
    released) and the constant dependencies / dependents; ``cache`` stays empty, since
    intermediate values never come to the driver.
    """

    def __init__(
        self, plan: GraphPlan, members: Mapping[Key, tuple[Key, ...]], callbacks: Any
    ) -> None:
        from dask.callbacks import unpack_callbacks

        self.callbacks = list(callbacks)
        _, self._start_state, self._pretask, self._posttask, _ = unpack_callbacks(self.callbacks)
        self.dsk = plan.tasks
        self.state: dict[str, Any] = {
            "dependencies": {key: set(deps) for key, deps in plan.producers.items()},
            "dependents": {key: set(readers) for key, readers in plan.readers.items()},
            "waiting": set(plan.tasks),
            "ready": set(),
            "running": set(),
            "finished": set(),
            "released": set(),
            "cache": {},
            "waiting_data": {},
        }
        self._started: list[Any] = []
        self._members = members  # a fused task's keys: each seen by the callbacks

    def started(self) -> None:
        for callback in self.callbacks:
            if callback[0]:
                callback[0](self.dsk)
            self._started.append(callback)
        for start_state in self._start_state:
            start_state(self.dsk, self.state)

    def move(self, key: Key, source: str, target: str) -> tuple[Key, ...]:
        """Move ``key`` (a fused task: each of its keys); those keys."""
        keys = self._members.get(key, (key,))
        for member in keys:
            self.state[source].discard(member)
            self.state[target].add(member)
        return keys

    def running(self, key: Key) -> None:
        for member in self.move(key, "ready", "running"):
            for pretask in self._pretask:
                pretask(member, self.dsk, self.state)

    def done(self, key: Key) -> None:
        for member in self.move(key, "running", "finished"):
            for posttask in self._posttask:
                posttask(member, None, self.dsk, self.state, None)

    def finished(self, failed: bool) -> None:
        for callback in self._started:
            if callback[4]:
                callback[4](self.dsk, self.state, failed)


def _root_error(error: BaseException) -> BaseException:
    """The error that started a failure: DependencyFailedError unwrapped to its cause."""
    seen: set[int] = set()
    while isinstance(error, DependencyFailedError) and error.__cause__ is not None:
        if id(error) in seen:
            break
        seen.add(id(error))
        error = error.__cause__
    return error


def _owned(future: sc.Future[Any]) -> Any:
    """A result the caller may change: views of the store whose pages are copied for the
    driver only if it writes to them (so a large result costs no copy, and no memory twice,
    unless it is written to); a value not in the store has its read-only parts copied."""
    value, private = future._private_result()
    return value if private else _writeable(value)


def _writeable(value: Any) -> Any:
    """A task's result with every read-only numpy array and pandas object in it copied.

    Looks inside lists, tuples and dicts (where Dask results nest), rebuilding only a
    container that held something to copy; other objects are returned as they are. pandas
    objects are always copied: their numeric columns from the store are read-only views, and
    pandas (copy-on-write) hides which arrays are. A long container (a bag partition of
    records, which unpickle writeable) is looked into only if its first item is an array.
    """
    cls = type(value)
    if cls is list or cls is tuple or cls is dict:
        items = list(value.values()) if cls is dict else value
        if len(items) > _SCAN_LIMIT and not _is_array_like(items[0]):
            return value
        copied = [_writeable(item) for item in items]
        if all(new is old for new, old in zip(copied, items, strict=True)):
            return value
        if cls is dict:
            return dict(zip(value.keys(), copied, strict=True))
        return copied if cls is list else tuple(copied)
    flags = getattr(value, "flags", None)
    if flags is not None and getattr(flags, "writeable", True) is False:
        return value.copy()  # a read-only numpy array
    if _is_pandas(value):
        return value.copy(deep=True)
    return value


_SCAN_LIMIT = 10_000


def _is_pandas(value: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series, pandas.Index))


def _is_array_like(value: Any) -> bool:
    return hasattr(value, "flags") or _is_pandas(value)


def _task_name(key: Key) -> str:
    """What the timeline and the dashboard call a Dask task: its key's prefix, as Dask's
    own dashboard groups them ("sum-aggregate", "getitem"), not one name per key."""
    return f"dask {key_split(key)}"


def _register_named_scheduler() -> None:
    """Let ``dask.config.set(scheduler="sharedcompute")`` find :func:`get`."""
    import dask.base

    named: Mapping[str, Any] | None = getattr(dask.base, "named_schedulers", None)
    if isinstance(named, dict):
        named.setdefault(SCHEDULER_NAME, get)


_register_named_scheduler()
