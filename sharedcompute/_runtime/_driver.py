"""The driver's runtime: the scheduler core, the store's owner and the worker pool, wired.

Every change of scheduling state happens under ``_lock`` through
``_handle(events)``, which feeds the pure :class:`SchedulerCore` and carries out
its instructions: messages to workers are sent while the lock is held (so
each worker receives tasks in the order the core assigned them), Futures are
settled after it is released (their callbacks are user code and may submit).

Threads: the caller's threads (submit, put, cancel, Future finalizers) and the
pool's I/O thread (worker messages, worker deaths). Nothing else runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import signal
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import cloudpickle

from sharedcompute import _config
from sharedcompute._protocol import ConnectionClosed, Msg
from sharedcompute._runtime._actor import ActorHandle, ActorOptions
from sharedcompute._runtime._actors_driver import ActorCallSpec, ActorManager
from sharedcompute._runtime._args import extract_dependencies
from sharedcompute._runtime._base import (
    DefaultScope,
    RuntimeBase,
    TaskOptions,
    TaskSpec,
    future_or_none,
    options_from_wire,
)
from sharedcompute._runtime._future import Future, ValueRef, is_done, when_all_done
from sharedcompute._runtime._local import ThreadPool, run_inline
from sharedcompute._runtime._pool import ProcessPool, WorkerHandle, WorkerSlot, pickle_for_workers
from sharedcompute._scheduler import (
    PINS_PER_NODE,
    UNIT,
    ActorFailed,
    CancelRequested,
    Dispatch,
    Event,
    ExternalTask,
    FreeObject,
    Instruction,
    KeyReleased,
    NodeJoined,
    NodeLeft,
    ObjectPut,
    PlaceActor,
    PoolBroken,
    Reject,
    Resolve,
    Resources,
    SchedulerCore,
    StartWorker,
    StopWorker,
    TaskFailed,
    TaskFinished,
    TaskReturned,
    TaskState,
    TaskSubmitted,
    Withdraw,
    WithdrawRequested,
    WorkerBlocked,
    WorkerDied,
    WorkerJoined,
    WorkerUnblocked,
    node_resource,
    public_resources,
)
from sharedcompute._serialization._pickled import PICKLE_HEADER
from sharedcompute._store import (
    InlineObject,
    ObjectRef,
    OwnerStore,
    RemoteObject,
    StoredObject,
    ref_from_wire,
    ref_to_wire,
)
from sharedcompute.errors import (
    ActorDiedError,
    DeserializationError,
    ObjectLostError,
    RemoteTraceback,
    SharedComputeError,
    WorkerCrashedError,
)

SCHEDULERS = ("sync", "threads", "processes")
_CLIENT_REQUESTS = frozenset({Msg.CREATE_ACTOR, Msg.KILL_ACTOR, Msg.GET_ACTOR})
_SHORT_TASK_SECONDS = 0.001
_SHORT_FUNCTIONS_KEPT = 4096
_MAX_FAILED_STARTS = 3  # pool workers exiting before ready, in a row, before giving up
_START_BACKOFF = 0.1  # seconds before the first restart of a worker that could not start
_START_BACKOFF_MAX = 5.0


def unpack_error(data: bytes) -> BaseException:
    """The exception a worker sent (see ``pack_error``), with its traceback as the cause."""
    tb, type_name, text, exc_bytes = pickle.loads(data)
    try:
        exc: BaseException = cloudpickle.loads(exc_bytes)
    except (Exception, SystemExit) as error:
        exc = DeserializationError(
            f"a task raised {type_name}: {text}, and that exception could not be loaded in "
            f"the driver ({type(error).__name__}: {error})"
        )
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class NodeHost(Protocol):
    """What a head adds to its runtime: the workers and objects of other nodes."""

    def deliver(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        """Send to a worker (of any node) once the objects the messages name are there."""

    def spawn(self, node: int, worker_id: int) -> WorkerSlot | None:
        """Start a worker on a node other than this one (None: that node is gone)."""

    def freed(self, refs: list[ObjectRef]) -> None:
        """Objects nobody needs: free them where they live, and drop their copies."""

    def kill(self, worker: WorkerSlot) -> None:
        """SIGKILL a worker of another node."""

    def pull(self, ref: RemoteObject) -> StoredObject:
        """A copy here of another node's object (held by the host)."""


class Runtime(DefaultScope, RuntimeBase):
    """A sharedcompute runtime: worker processes, a shared-memory store and a scheduler.

    Use it as a context manager, or through ``sharedcompute.init()``. What workers print
    reaches the driver's stdout and stderr, each line after ``(worker N, pid P) `` as in
    Ray; ``worker_output_prefix=False`` passes it through exactly as printed.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        scheduler: str = "processes",
        address: str | None = None,
        store_capacity: int | None = None,
        spill_dir: str | None = None,
        resources: dict[str, float] | None = None,
        worker_output_prefix: bool = True,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
    ) -> None:
        super().__init__()
        if address is not None:
            raise ValueError(
                f"Runtime() runs on this machine; connect to the cluster at {address!r} with "
                "sharedcompute.init(address=...) instead"
            )
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1
        ):
            raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # Run in every worker before its first task (replacements too): pickled now, so a
        # value that cannot travel fails here, before any process or memory is made. The
        # objects are kept while workers may start: the descriptors sent refer to them.
        self._initializer = (initializer, tuple(initargs)) if initializer is not None else None
        self._init_payload = (
            pickle_for_workers(self._initializer) if self._initializer is not None else None
        )
        # 0: none here (a head whose nodes do the work, as `ray start --head --num-cpus 0`).
        self.num_workers = num_workers if num_workers is not None else os.cpu_count() or 1
        self.scheduler = scheduler
        self.spill_dir = spill_dir
        self.worker_output_prefix = worker_output_prefix
        self._store_capacity = store_capacity
        self._resources = {
            "CPU": float(self.num_workers), **(resources or {}),
            node_resource(0): PINS_PER_NODE,
        }
        # One lock for all of it; releasing it also turns queued Future and handle
        # finalizations into events (see _sync.DrainingLock).
        self._lock = self._release_lock
        self._next_key = self._key_counter(1)
        self._next_worker_id = self._key_counter(0)
        self.core = SchedulerCore(self._resources, max_tasks_per_worker=max_tasks_per_child)
        self._futures: dict[int, Future[Any]] = {}
        self._args_refs: dict[int, ObjectRef] = {}
        # Pickled functions of pending tasks (to send to a worker that lacks one), and how
        # many pending tasks use each: dropped with the last, so they never pile up.
        self._fn_bytes: dict[bytes, bytes] = {}
        self._fn_users: Counter[bytes] = Counter()
        self._task_fn: dict[int, bytes] = {}  # the function of each pending task
        # Functions whose last run took under _SHORT_TASK_SECONDS (they may be queued
        # behind one another on a worker); insertion-ordered, bounded.
        self._short_functions: dict[bytes, None] = {}
        self._waiters: defaultdict[int, set[int]] = defaultdict(set)
        self._registered_local: set[int] = set()
        self._settle: deque[tuple[Future[Any], Instruction]] = deque()
        self._to_watch: deque[Future[Any]] = deque()  # Futures of other schedulers to hook
        # id -> (weak reference, stored object) of arrays read from the store here.
        self._views: dict[int, tuple[weakref.ref[Any], StoredObject]] = {}
        self._pool: ProcessPool | None = None
        self._threads: ThreadPool | None = None
        # Done-callbacks of Futures settled by the thread that reads the workers run here.
        self._callbacks = ThreadPool(1, name="sharedcompute-callbacks")
        self._store: OwnerStore | None = None
        self._closed = False
        # Pool workers that exited before they were ready, in a row; past the limit, with
        # none alive, the runtime is broken: its tasks fail with this error.
        self._failed_starts = 0
        self.broken: BaseException | None = None
        self.actors = ActorManager(self)
        # Set by a head: the workers of other nodes (by id), and how to reach them.
        self.cluster: NodeHost | None = None
        self._remote_workers: dict[int, WorkerSlot] = {}
        # Finished tasks whose result is on another node: their function and arguments
        # are kept while the result lives (they may run again); and callers waiting for
        # such a task to finish again.
        self._lineage: set[int] = set()
        self._rewaits: dict[int, list[concurrent.futures.Future[ObjectRef]]] = {}
        if scheduler == "processes":
            self._start_processes()

    # -- lifecycle -----------------------------------------------------------------

    @property
    def store(self) -> OwnerStore:  # type: ignore[override]
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = OwnerStore(self._store_capacity, self.spill_dir)
        return self._store

    def _start_processes(self) -> None:
        with self._lock:
            if self._pool is not None:
                return
            if self._closed:
                raise RuntimeError("this runtime has been shut down")
        store = self.store
        try:
            with self._lock:
                if self._pool is not None:
                    return
                self._pool = ProcessPool(
                    store.address, self._on_messages, self._on_exit,
                    on_idle=self._release_lock.try_drain, idle_pending=self._releases_pending,
                    initializer=self._init_payload, output_prefix=self.worker_output_prefix,
                )
                for _ in range(self.num_workers):
                    self._spawn_pool_worker()
        except BaseException:
            # Nothing half-made may stay: the workers started, the I/O thread, the store.
            self.shutdown()
            raise
        self._settle_futures()

    def _spawn_pool_worker(self) -> None:
        """Start a pool worker (lock held). It may be sent tasks at once: they wait in its
        connection while it starts, which saves the first task a round trip (and a task
        sent there counts as running, as one in ProcessPoolExecutor's call queue does)."""
        assert self._pool is not None
        worker = self._pool.spawn(self._next_worker_id())
        self._handle(WorkerJoined(worker.id))

    def _thread_pool(self) -> ThreadPool:
        with self._lock:
            if self._closed:
                raise RuntimeError("this runtime has been shut down")
            if self._threads is None:
                self._threads = ThreadPool(max(1, self.num_workers))
            return self._threads

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers and free the store. Pending Futures fail with CancelledError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, threads = self._pool, self._threads
            self._initializer = self._init_payload = None  # its arguments are the caller's again
        if threads is not None:
            threads.close()
        if pool is not None:
            pool.close()
        with self._lock:
            pending = list(self._futures.values())
            self._futures.clear()
            self._waiters.clear()
        for future in pending:
            future._cancel_now()
        self._callbacks.close()
        if self._store is not None:
            self._store.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the lock and the core -----------------------------------------------------------

    def release_key(self, key: int) -> None:
        """Called from ``Future.__del__``: queue; the pool's next idle moment hands it on."""
        self._released.append(key)
        pool = self._pool
        if pool is None or self._closed:
            self._release_lock.try_drain()
        else:
            pool.wake()

    def _releases_pending(self) -> bool:
        return bool(self._released) or self.actors.pending_holds()

    def _flush_releases(self) -> None:
        """Turn queued Future and handle finalizations into events (lock held)."""
        if self._closed:  # nothing left to release; drop them so the lock stops draining
            self._released.clear()
            self.actors.clear_holds()
            return
        if self.actors.pending_holds():
            self.actors._flush_actor_holds()
        if self._released:
            events: list[Event] = []
            while self._released:
                key = self._released.popleft()
                self._registered_local.discard(key)
                events.append(KeyReleased(key))
            self._handle(events)

    def _handle(self, events: Event | list[Event]) -> None:
        """Feed the core and carry out its instructions (lock held)."""
        outbox: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        urgent: list[int] = []  # workers sent a DROP: they must read before their queue
        freed: list[ObjectRef] = []
        for instruction in self.core.handle(events):
            if type(instruction) is Dispatch:
                self._dispatch(instruction, outbox)
            elif type(instruction) is Resolve or type(instruction) is Reject:
                self._conclude(instruction, outbox, freed)
            elif type(instruction) is FreeObject:
                freed.append(instruction.ref)
                if self._lineage and instruction.key in self._lineage:
                    self._lineage.discard(instruction.key)
                    self._release_task(instruction.key, freed)
            elif type(instruction) is StartWorker and self._pool is not None and not self._closed:
                self._replace_worker(instruction.replaces)
            elif type(instruction) is Withdraw:
                outbox[instruction.worker].append((Msg.DROP, instruction.key))
                urgent.append(instruction.worker)
            elif type(instruction) is StopWorker:
                outbox[instruction.worker].append((Msg.SHUTDOWN,))
            elif type(instruction) is PlaceActor:
                self.actors.place(instruction.actor, instruction.node)
        if self.actors.ending:
            self.actors.check_ending()
        if freed:
            self._free(freed)
        if outbox and self._pool is not None:
            for worker_id, messages in outbox.items():
                worker = self._worker(worker_id)
                if worker is not None:
                    self._send_to(worker, messages)
        for worker_id in urgent:  # once per DROP, after the send: read before its queue
            worker = self._worker(worker_id) if self._pool is not None else None
            if worker is not None:
                worker.running.urgent_sent()

    def _worker(self, worker_id: int) -> WorkerSlot | None:
        """The worker with this id, on this node or (on a head) another."""
        assert self._pool is not None
        worker = self._pool.workers.get(worker_id)
        if worker is None and self._remote_workers:
            return self._remote_workers.get(worker_id)
        return worker

    def _free(self, refs: list[ObjectRef]) -> None:
        """Objects nobody needs any more (lock held)."""
        for ref in refs:
            self.store.delete(ref)
        if self.cluster is not None:
            self.cluster.freed(refs)

    def _replace_worker(self, replaces: int | None) -> None:
        """A worker for the core, on the node of the one it replaces (lock held)."""
        old = self._remote_workers.pop(replaces, None) if replaces is not None else None
        if old is None or self.cluster is None:
            self._spawn_pool_worker()
            return
        worker_id = self._next_worker_id()
        worker = self.cluster.spawn(old.node, worker_id)
        if worker is not None:
            self._remote_workers[worker_id] = worker
            self._handle(WorkerJoined(worker_id, old.node))

    def _spawn_remote(self, node: int) -> WorkerSlot | None:
        """A process for an actor on another node, outside the pool (lock held)."""
        if self.cluster is None:
            return None
        worker_id = self._next_worker_id()
        worker = self.cluster.spawn(node, worker_id)
        if worker is not None:
            self._remote_workers[worker_id] = worker
        return worker

    def _kill_worker(self, worker: WorkerSlot) -> None:
        """SIGKILL a worker's process, wherever it runs (lock held)."""
        if isinstance(worker, WorkerHandle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        elif self.cluster is not None:
            self.cluster.kill(worker)

    def _send_to(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        if worker.serial_calls:
            messages = worker.hold_calls(messages)
        if messages:
            if self.cluster is not None:
                self.cluster.deliver(worker, messages)
                return
            with contextlib.suppress(ConnectionClosed):
                worker.conn.send_many(messages)

    def _dispatch(self, instruction: Dispatch, outbox: dict[int, list[tuple[Any, ...]]]) -> None:
        worker = self._worker(instruction.worker)
        if worker is None:
            return  # it just died; WorkerDied will send the task back to READY
        spec = instruction.payload
        # None: a dependency still running ahead of this task on that worker (a chain).
        deps = tuple(
            (k, None if ref is None else ref_to_wire(ref)) for k, ref in instruction.dependency_refs
        )
        if type(spec) is ActorCallSpec:
            outbox[instruction.worker].append((
                Msg.CALL, instruction.key, spec.method, ref_to_wire(spec.args_ref), deps, spec.name,
            ))
            return
        known, forget = worker.functions.use(spec.fn_key)
        if forget:
            outbox[instruction.worker].append((Msg.FORGET, tuple(forget)))
        fn_bytes = None if known else self._fn_bytes[spec.fn_key]
        outbox[instruction.worker].append((
            Msg.RUN, instruction.key, spec.fn_key, fn_bytes, ref_to_wire(spec.args_ref), deps,
            spec.name, spec.parent,
        ))

    def _conclude(
        self, instruction: Resolve | Reject, outbox: dict[int, list[tuple[Any, ...]]],
        freed: list[ObjectRef],
    ) -> None:
        key = instruction.key
        if type(instruction) is Resolve and type(instruction.ref) is RemoteObject and (
            key in self._task_fn
        ):
            # Its result lives on another node, which may die: the core may run it again
            # (lineage), so its function and arguments stay until the result is freed.
            self._lineage.add(key)
        else:
            self._lineage.discard(key)
            self._release_task(key, freed)
        if self._rewaits:
            for waiter in self._rewaits.pop(key, ()):
                if isinstance(instruction, Resolve):
                    waiter.set_result(instruction.ref)
                else:
                    waiter.set_exception(instruction.error)
        future = self._futures.pop(key, None)
        if future is not None:
            self._settle.append((future, instruction))
        waiting = self._waiters.pop(key, None)
        if waiting:
            if isinstance(instruction, Resolve):
                message: tuple[Any, ...] = (Msg.RESOLVED, key, True, ref_to_wire(instruction.ref))
            else:
                message = (Msg.RESOLVED, key, False, _portable(instruction.error))
            for worker_id in waiting:
                outbox[worker_id].append(message)

    def _release_task(self, key: int, freed: list[ObjectRef]) -> None:
        """What a task needed to run: its function (if no other task uses it), its arguments."""
        self._release_function(key)
        args_ref = self._args_refs.pop(key, None)
        if args_ref is not None:
            freed.append(args_ref)

    def load_result(self, key: int, ref: ObjectRef) -> Any:
        """A task's value; made again if the node that held it died (see ``_recompute_lost``)."""
        try:
            return self.load(ref)
        except ObjectLostError:
            if type(ref) is not RemoteObject:
                raise
            again = self._made_again(key, ref)
            if again is None:
                raise
            return self.load(again)

    def _made_again(self, key: int, lost: ObjectRef) -> ObjectRef | None:
        """The new result of a task whose result was lost, once it has run again (or None)."""
        waiter: concurrent.futures.Future[ObjectRef] = concurrent.futures.Future()
        with self._lock:
            outcome = self.core.outcome(key)
            if outcome is None:
                return None
            if outcome[0] is TaskState.FINISHED:
                return outcome[1] if outcome[1] != lost else None
            if outcome[0] in (TaskState.ERRED, TaskState.CANCELLED):
                return None
            self._rewaits.setdefault(key, []).append(waiter)
        return waiter.result()

    def watch_external(self) -> None:
        """Hook the Futures of other schedulers just registered as dependencies.

        Called by the submitting thread once it has let go of the lock: a Future
        already done calls back at once, and its value is stored then, in this
        thread (never in the one that reads the workers).
        """
        while self._to_watch:
            try:
                external = self._to_watch.popleft()
            except IndexError:
                return
            external.add_done_callback(self._external_done)

    def _settle_futures(self) -> None:
        """Settle Futures outside the lock: their callbacks may call back into us."""
        settled = False
        while self._settle:
            try:
                future, instruction = self._settle.popleft()
            except IndexError:
                break
            settled = True
            if type(instruction) is Resolve:
                future.set_result(ValueRef(instruction.ref))
            else:
                assert isinstance(instruction, Reject)
                if instruction.cancelled:
                    future._cancel_now()
                else:
                    future.set_exception(instruction.error)
        pool = self._pool
        if settled and pool is not None and not pool.is_reading_thread():
            # A thread reading the workers for a Future of its own sleeps in select: one
            # settled here (a callback, a submit) must wake it.
            pool.wake()

    # -- submit, put, cancel ------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions,
    ) -> Future[Any]:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {type(fn).__name__}")
        scheduler = options.scheduler or self._default_scheduler()
        name = options.name or getattr(fn, "__qualname__", "") or type(fn).__name__
        if scheduler == "processes":
            return self._submit_process(fn, args, kwargs, options, name)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        return self._submit_local(fn, args, kwargs, scheduler, name)

    def _default_scheduler(self) -> str:
        return _config.get("scheduler") or self.scheduler

    def _submit_process(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions, name: str,
    ) -> Future[Any]:
        if self._pool is None:
            self._start_processes()
        if self.broken is not None:
            raise self._broken_error()
        fn_key, fn_bytes = self.functions.encode(fn)
        args_ref, deps = self.prepare_args(args, kwargs)
        key = self._next_key()
        future: Future[Any] = Future(self, key, name)
        resources = task_resources(options)
        event = TaskSubmitted(
            key, tuple(deps), resources, options.max_retries, options.retry_exceptions,
            TaskSpec(fn_key, args_ref, name), short=fn_key in self._short_functions,
        )
        self._lock.acquire()
        try:
            if self._closed:
                self.store.delete(args_ref)
                raise RuntimeError("this runtime has been shut down")
            self._hold_function(key, fn_key, fn_bytes)
            self._futures[key] = future
            if type(args_ref) is StoredObject:
                self._args_refs[key] = args_ref
            if deps:
                events: list[Event] = self._register_dependencies(deps)
                events.append(event)
                self._handle(events)
            else:
                self._handle(event)
        finally:
            self._lock.release()
        if self._to_watch:
            self.watch_external()
        if self._settle:
            self._settle_futures()
        return future

    def _register_dependencies(self, deps: dict[int, Future[Any]]) -> list[Event]:
        """Make Futures of other schedulers known to the core (lock held)."""
        events: list[Event] = []
        for key, dep in deps.items():
            if dep._runtime is not self:
                raise ValueError(
                    f"{dep!r} belongs to another runtime (one that was shut down?); "
                    "Futures only work within the runtime that made them"
                )
            if key in self.core or key in self._registered_local:
                continue
            self._registered_local.add(key)
            events.append(ExternalTask(key))
            self._to_watch.append(dep)  # hooked by watch_external, after the lock
        return events

    def _external_done(self, future: concurrent.futures.Future[Any]) -> None:
        assert isinstance(future, Future)
        if future.cancelled():
            event: Event = TaskFailed(future.key, None, concurrent_cancelled(future.key))
        elif future.exception() is not None:
            event = TaskFailed(future.key, None, future.exception())  # type: ignore[arg-type]
        else:
            try:
                event = ObjectPut(future.key, self.store_value(future.result()))
            except BaseException as exc:
                event = TaskFailed(future.key, None, exc)
        with self._lock:
            if not self._closed:
                self._handle([event])
        self._settle_futures()

    def _submit_local(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        scheduler: str, name: str,
    ) -> Future[Any]:
        deps: dict[int, Future[Any]] = {}
        packed = extract_dependencies((args, kwargs), future_or_none, deps)
        future: Future[Any] = Future(self, self._next_key(), name)
        if scheduler == "sync":
            run_inline(future, fn, packed, deps)
            return future
        pool = self._thread_pool()
        when_all_done(list(deps.values()), lambda: pool.submit(
            lambda: run_inline(future, fn, packed, deps)
        ))
        return future

    def wait_for(
        self, futures: Iterable[Future[Any]], timeout: float | None, return_when: str
    ) -> None:
        futures = list(futures)
        pool = self._pool
        threads = self._threads
        if (
            pool is None
            or (threads is not None and threads.in_pool())
            or not all(f.key in self._futures or is_done(f) for f in futures)
        ):
            # Futures settled by other threads (or a pool thread lending its slot):
            # the stdlib wait is right.
            super().wait_for(futures, timeout, return_when)
            return
        if len(futures) == 1:
            only = futures[0]
            pool.lead(lambda: is_done(only), timeout)
        elif return_when == "FIRST_COMPLETED":
            pool.lead(lambda: any(is_done(f) for f in futures), timeout)
        elif return_when == "FIRST_EXCEPTION":
            pool.lead(
                lambda: all(is_done(f) for f in futures)
                or any(is_done(f) and not f.cancelled() and f.exception(0) for f in futures),
                timeout,
            )
        else:
            pool.lead(lambda: all(is_done(f) for f in futures), timeout)

    def defer_callbacks(self) -> bool:
        pool = self._pool
        return pool is not None and pool.is_reading_thread()

    def call_soon(self, callback: Callable[[], None]) -> None:
        try:
            self._callbacks.submit(callback)
        except RuntimeError:  # shut down: nothing reads the workers any more
            callback()

    def in_task_thread(self) -> bool:
        threads = self._threads
        return threads is not None and threads.in_pool()

    def blocking(self) -> AbstractContextManager[None]:
        threads = self._threads
        if threads is not None and threads.in_pool():
            return _pool_blocking(threads)
        return nullcontext()

    def put(self, value: Any) -> Future[Any]:
        existing = self._stored_view(value)
        if existing is not None:
            return self._put_again(existing)
        return self._publish(self.store_value(value))

    def _put_again(self, ref: StoredObject) -> Future[Any]:
        """A new Future for an object already stored: its own reference, no copy."""
        self.store.retain(ref)
        return self._publish(ref)

    def _publish(self, ref: ObjectRef) -> Future[Any]:
        key = self._next_key()
        future: Future[Any] = Future(self, key, "put")
        future.set_result(ValueRef(ref))
        with self._lock:
            self._handle([ObjectPut(key, ref)])
        return future

    # -- values already in the store --------------------------------------------------

    def load(self, ref: ObjectRef) -> Any:
        if type(ref) is RemoteObject:
            if self.cluster is None:
                raise SharedComputeError(f"object {ref.object_id} lives on node {ref.node}, "
                                         "and this runtime has no other nodes")
            ref = self.cluster.pull(ref)
        value = super().load(ref)
        if type(ref) is StoredObject and type(value).__name__ == "ndarray":
            # Remember the view, so that passing it on again passes the object by reference.
            ident = id(value)
            self._views[ident] = (weakref.ref(value, lambda _: self._views.pop(ident, None)), ref)
        return value

    def _stored_view(self, value: Any) -> StoredObject | None:
        """The stored object ``value`` is a whole view of (from ``load``), if it is one."""
        entry = self._views.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def as_dependency(self, value: Any) -> Future[Any] | None:
        """A Future, or a stored view as a Future of its object (passed on without a copy)."""
        if isinstance(value, Future):
            return value
        ref = self._stored_view(value) if self._views else None
        return None if ref is None else self._put_again(ref)

    def cancel(self, future: Future[Any]) -> bool:
        with self._lock:
            if future.key in self.core:
                self._handle([CancelRequested(future.key)])
        self._settle_futures()
        if future.cancelled():
            return True
        return future._cancel_now() if future.key not in self.core and not future.done() else False

    def cancel_pending(self) -> None:
        """Cancel every task not started yet, those queued on workers included."""
        with self._lock:
            events: list[Event] = []
            for key in list(self._futures):
                state = self.core.state_of(key)
                if state is TaskState.WAITING or state is TaskState.READY:
                    events.append(CancelRequested(key))
                elif state is TaskState.RUNNING:
                    events.append(WithdrawRequested(key))  # its worker says if it had started
            self._handle(events)
        self._settle_futures()

    def new_key(self) -> int:
        """A key no task or object of this runtime has."""
        return self._next_key()

    def wait_idle(self) -> None:
        """Return once no Future this runtime settles is pending (more may come meanwhile)."""
        while True:
            with self._lock:
                pending = list(self._futures.values())
            if not pending:
                return
            concurrent.futures.wait(pending)

    def is_running(self, key: int) -> bool:
        """Whether the task was sent to a worker (it runs, or waits there to run next)."""
        return key in self._futures and self.core.state_of(key) is TaskState.RUNNING

    # -- what workers say (I/O thread) -----------------------------------------------------

    def _on_messages(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        events: list[Event] = []
        answered = 0
        with self._lock:
            if self._closed:
                return
            for message in messages:
                kind = message[0]
                if kind == Msg.DONE:
                    self._learn_duration(message[1], message[3])
                    ref = ref_from_wire(message[2])
                    self.store.adopt(ref)
                    # Its size, for placing the tasks that read it (inline: it travels anyway).
                    nbytes = 0 if type(ref) is InlineObject else ref.nbytes
                    events.append(TaskFinished(message[1], worker.id, ref, message[3], nbytes))
                    answered += 1
                elif kind == Msg.FAILED:
                    answered += 1
                    events.append(TaskFailed(message[1], worker.id, unpack_error(message[2])))
                elif kind == Msg.WAIT:
                    if events:
                        self._handle(events)
                        events = []
                    self._answer_wait(worker, message[1])
                else:
                    self._on_request(worker, message, events)
            if answered and worker.serial_calls:
                held = worker.release_calls(answered)
                if held:
                    with contextlib.suppress(ConnectionClosed):
                        worker.conn.send_many(held)
            if events:
                self._handle(events)
        self._settle_futures()

    def _hold_function(self, key: int, fn_key: bytes, fn_bytes: bytes) -> None:
        self._fn_bytes[fn_key] = fn_bytes
        self._fn_users[fn_key] += 1
        self._task_fn[key] = fn_key

    def _release_function(self, key: int) -> None:
        fn_key = self._task_fn.pop(key, None)
        if fn_key is not None:
            self._fn_users[fn_key] -= 1
            if self._fn_users[fn_key] <= 0:
                del self._fn_users[fn_key]
                del self._fn_bytes[fn_key]

    def _learn_duration(self, key: int, duration: float) -> None:
        fn_key = self._task_fn.get(key)
        if fn_key is not None:
            if duration < _SHORT_TASK_SECONDS:
                self._short_functions[fn_key] = None
                if len(self._short_functions) > _SHORT_FUNCTIONS_KEPT:
                    del self._short_functions[next(iter(self._short_functions))]
            else:
                self._short_functions.pop(fn_key, None)

    def _on_request(
        self, worker: WorkerSlot, message: tuple[Any, ...], events: list[Event]
    ) -> None:
        kind = message[0]
        if kind == Msg.READY:
            worker.ready = True
            self._failed_starts = 0
            worker.store_client = message[2]
            if worker.actor_id is not None:
                record = self.actors.record(worker.actor_id)
                if record is not None and not record.dead:
                    if events:
                        self._handle(events)
                        events.clear()
                    self.actors._start_actor_on(record, worker)
        elif kind == Msg.INIT_FAILED:
            error = unpack_error(message[1])
            broken = WorkerCrashedError(
                f"the initializer failed in worker {worker.id} "
                f"(pid {getattr(worker, 'pid', '?')}): "
                f"{type(error).__name__}: {error}; no task can run"
            )
            broken.__cause__ = error
            events.extend(self._break(broken))
        elif kind == Msg.CREATE_FAILED:
            if events:
                self._handle(events)
                events.clear()
            self.actors._actor_constructor_failed(worker, unpack_error(message[2]))
        elif kind == Msg.ACTOR_RETAIN:
            self.actors._worker_actor_hold(worker, message[1], 0)
        elif kind == Msg.ACTOR_RELEASE:
            self.actors._worker_actor_hold(worker, message[1], -1)
        elif kind == Msg.ACTOR_LEASE:
            self.actors._worker_actor_hold(worker, message[1], +1)
        elif kind == Msg.SUBMIT:
            _, key, fn_key, fn_bytes, args_wire, dep_keys, options_wire, parent = message
            args_ref = ref_from_wire(args_wire)
            options = options_from_wire(options_wire)
            self._hold_function(key, fn_key, fn_bytes)
            self.store.adopt(args_ref)
            if isinstance(args_ref, (StoredObject, RemoteObject)):
                self._args_refs[key] = args_ref
            worker.held_keys.add(key)
            events.append(TaskSubmitted(
                key, dep_keys, task_resources(options),
                options.max_retries, options.retry_exceptions,
                TaskSpec(fn_key, args_ref, options.name or str(key), parent), parent=parent,
                short=fn_key in self._short_functions,
            ))
        elif kind == Msg.SUBMIT_CALL:
            _, key, actor_id, class_name, method, args_wire, dep_keys = message
            args_ref = ref_from_wire(args_wire)
            self.store.adopt(args_ref)
            if isinstance(args_ref, (StoredObject, RemoteObject)):
                self._args_refs[key] = args_ref
            worker.held_keys.add(key)
            record = self.actors.record(actor_id)
            retries = record.options.max_task_retries if record is not None else 0
            if record is None:
                events.append(ActorFailed(actor_id, ActorDiedError(f"actor {actor_id} is unknown")))
            events.append(TaskSubmitted(
                key, dep_keys, UNIT, retries if retries >= 0 else 1 << 30, False,
                ActorCallSpec(method, args_ref, f"{class_name}.{method}"), actor=actor_id,
            ))
        elif kind == Msg.PUT:
            ref = ref_from_wire(message[2])
            self.store.adopt(ref)
            worker.held_keys.add(message[1])
            events.append(ObjectPut(message[1], ref))
        elif kind == Msg.BLOCKED:
            events.append(WorkerBlocked(worker.id, message[1]))
        elif kind == Msg.UNBLOCKED:
            events.append(WorkerUnblocked(worker.id, message[1]))
        elif kind == Msg.RELEASE:
            for key in message[1]:
                if key in worker.held_keys:
                    worker.held_keys.discard(key)
                    events.append(KeyReleased(key))
        elif kind == Msg.CANCEL:
            events.append(CancelRequested(message[1]))
        elif kind == Msg.RETURN:
            events.append(TaskReturned(worker.id, message[1]))
        elif kind in _CLIENT_REQUESTS:
            if events:
                self._handle(events)
                events.clear()
            self._answer_client(worker, message)

    def _answer_client(self, client: WorkerSlot, message: tuple[Any, ...]) -> None:
        """The actor requests of a driver connected to this head (lock held)."""
        kind = message[0]
        if kind == Msg.KILL_ACTOR:
            self.actors.kill_locked(message[1], message[2])
            return
        reply_key = message[1]
        try:
            if kind == Msg.CREATE_ACTOR:
                (_, _, actor_id, cls_key, cls_bytes, args_wire, dep_keys, options_wire,
                 class_name, methods) = message
                args_ref = ref_from_wire(args_wire)
                self.actors.create_for_client(
                    client, actor_id, cls_key, cls_bytes, args_ref, tuple(dep_keys),
                    ActorOptions(*options_wire), class_name, dict(methods),
                )
                answer: Any = None
            else:
                answer = self.actors.describe_for_client(client, message[2])
        except Exception as error:
            reply: tuple[Any, ...] = (Msg.RESOLVED, reply_key, False, _portable(error))
        else:
            value = InlineObject(PICKLE_HEADER, pickle.dumps(answer, protocol=5))
            reply = (Msg.RESOLVED, reply_key, True, ref_to_wire(value))
        self._send_to(client, [reply])

    def _answer_wait(self, worker: WorkerSlot, keys: list[int]) -> None:
        replies: list[tuple[Any, ...]] = []
        for key in keys:
            outcome = self.core.outcome(key)
            if outcome is None:
                error = SharedComputeError(f"key {key} is unknown to the scheduler")
                replies.append((Msg.RESOLVED, key, False, error))
            elif outcome[0] is TaskState.FINISHED:
                replies.append((Msg.RESOLVED, key, True, ref_to_wire(outcome[1])))
            elif outcome[0] in (TaskState.ERRED, TaskState.CANCELLED):
                replies.append((Msg.RESOLVED, key, False, _portable(outcome[2])))
            else:
                self._waiters[key].add(worker.id)
        if replies:
            with contextlib.suppress(ConnectionClosed):
                worker.conn.send_many(replies)

    def _on_exit(self, worker: WorkerSlot, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            if worker.store_client is not None:
                # Everything it said has been read: results it stored but never reported
                # are nobody's now.
                self.store.drop_deliveries(worker.store_client)
            if worker.actor_id is not None:
                self._remote_workers.pop(worker.id, None)
                events = self.actors._actor_exited(worker, reason)
            elif worker.node:
                # Another node's worker: replaced there, unless it never started (that
                # node shrinks rather than retry a worker that cannot start).
                if not worker.ready:
                    self._remote_workers.pop(worker.id, None)
                # (else kept until StartWorker names it: its node gets the replacement)
                events = [WorkerDied(worker.id, reason, worker.running.get(), worker.ready)]
            else:
                events = [WorkerDied(worker.id, reason, worker.running.get(), worker.ready)]
                if not worker.ready:
                    events += self._start_failed(worker, reason)
            events += [KeyReleased(key) for key in worker.held_keys]
            worker.held_keys.clear()
            self.actors._drop_worker_actor_holds(worker)
            for waiting in self._waiters.values():
                waiting.discard(worker.id)
            self._handle(events)
        self._settle_futures()

    # -- workers that cannot start -----------------------------------------------------------

    def _start_failed(self, worker: WorkerSlot, reason: str) -> list[Event]:
        """A pool worker exited before it was ready: start another later, or give up (lock held).

        Restarts back off (0.1 s, doubling, at most ``_START_BACKOFF_MAX``); after
        ``_MAX_FAILED_STARTS`` in a row with no pool worker alive, the runtime is
        broken, as a ``ProcessPoolExecutor`` is: waiting tasks fail, submits raise.
        """
        assert self._pool is not None
        self._failed_starts += 1
        alive = any(w.ready and w.actor_id is None for w in self._pool.workers.values())
        if self.broken is not None:
            return []
        if self._failed_starts < _MAX_FAILED_STARTS or alive:
            delay = min(_START_BACKOFF_MAX, _START_BACKOFF * 2 ** (self._failed_starts - 1))
            self._pool.call_later(delay, self._respawn)
            return []
        tail = worker.stderr_tail() if isinstance(worker, WorkerHandle) else []
        said = (
            "; the last lines it wrote to stderr:\n" + "\n".join(f"    {line}" for line in tail)
            if tail else "; it wrote nothing to stderr"
        )
        return self._break(WorkerCrashedError(
            f"worker processes cannot start: {self._failed_starts} tried in a row, and the "
            f"last one ({reason}) exited before it was ready{said}"
        ))

    def _respawn(self) -> None:
        with self._lock:
            if self._pool is not None and not self._closed and self.broken is None:
                self._spawn_pool_worker()
        self._settle_futures()

    def _break(self, error: BaseException) -> list[Event]:
        """No task can run any more: the events that fail those waiting (lock held).

        New submits raise ``error`` from now on, as a broken ProcessPoolExecutor does.
        """
        if self.broken is not None:
            return []
        self.broken = error
        return [PoolBroken(error)]

    def _broken_error(self) -> BaseException:
        error = self.broken
        assert error is not None
        fresh = type(error)(*error.args)
        fresh.__cause__ = error.__cause__
        return fresh

    # -- actors (see _actors_driver) -------------------------------------------------------

    def create_actor(
        self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], options: ActorOptions
    ) -> ActorHandle:
        return self.actors.create_actor(cls, args, kwargs, options)

    def submit_actor_call(
        self, actor_id: int, class_name: str, method: str, args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Future[Any]:
        return self.actors.submit_actor_call(actor_id, class_name, method, args, kwargs)

    def get_actor(self, name: str) -> ActorHandle:
        return self.actors.get_actor(name)

    def kill(self, handle: ActorHandle, *, no_restart: bool = True) -> None:
        self.actors.kill(handle, no_restart=no_restart)

    def lease_actor(self, actor_id: int) -> None:
        self.actors.lease_actor(actor_id)

    def adopt_actor_lease(self, actor_id: int) -> None:
        self.actors.adopt_actor_lease(actor_id)

    def release_actor(self, actor_id: int) -> None:
        self.actors.release_actor(actor_id)

    # -- other nodes (on a head) ---------------------------------------------------------

    def add_node(self, node: int, resources: dict[str, float], workers: list[WorkerSlot]) -> None:
        """A node joins with these workers (ids from ``new_worker_id``); tasks may go there now."""
        with self._lock:
            if self._closed:
                return
            events: list[Event] = [NodeJoined(node, dict(resources))]
            for worker in workers:
                self._remote_workers[worker.id] = worker
                events.append(WorkerJoined(worker.id, node))
            self._handle(events)
        self._settle_futures()

    def remove_node(self, node: int, reason: str) -> None:
        """A node is gone: its tasks rerun elsewhere under their retries."""
        with self._lock:
            if self._closed:
                return
            gone = [w for w in self._remote_workers.values() if w.node == node]
            events: list[Event] = []
            for worker in gone:
                del self._remote_workers[worker.id]
                events += [KeyReleased(key) for key in worker.held_keys]
                worker.held_keys.clear()
                self.actors._drop_worker_actor_holds(worker)
                for waiting in self._waiters.values():
                    waiting.discard(worker.id)
            events.append(NodeLeft(node, reason))
            self._handle(events)
            for worker in gone:  # after NodeLeft: a restart goes to a node that lives
                if worker.actor_id is not None:
                    self._handle(self.actors._actor_exited(worker, reason))
        self._settle_futures()

    def add_driver(self, driver: WorkerSlot) -> None:
        """A driver elsewhere: it speaks as a worker does, and runs nothing."""
        with self._lock:
            self._remote_workers[driver.id] = driver

    def remove_driver(self, driver: WorkerSlot) -> None:
        """A driver left: the keys it held are released (its Futures are gone)."""
        with self._lock:
            if self._remote_workers.pop(driver.id, None) is None or self._closed:
                return
            events: list[Event] = [KeyReleased(key) for key in driver.held_keys]
            driver.held_keys.clear()
            self.actors._drop_worker_actor_holds(driver)  # its actor handles
            for waiting in self._waiters.values():
                waiting.discard(driver.id)
            self._handle(events)
        self._settle_futures()

    def new_worker_id(self) -> int:
        return self._next_worker_id()

    def worker_said(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        """What a worker of another node said (its node relays it, in order)."""
        self._on_messages(worker, messages)

    def worker_exited(self, worker: WorkerSlot, reason: str) -> None:
        """A worker of another node ended, after all it said was relayed."""
        if self._remote_workers.get(worker.id) is worker:
            self._on_exit(worker, reason)

    # -- introspection -------------------------------------------------------------------

    def node_table(self, address: str | None = None) -> list[dict[str, Any]]:
        """This node as ``sc.nodes()`` gives it (a head adds the others)."""
        import socket

        store = self._store
        stats = store.stats() if store is not None else {"used_bytes": 0, "capacity": 0}
        return [{
            "node_id": 0,
            "address": address or socket.gethostname(),
            "alive": not self._closed,
            "resources": public_resources(self.core.nodes[0].total),
            "available": public_resources(self.core.nodes[0].available),
            "store_used": stats["used_bytes"],
            "store_capacity": stats["capacity"],
            "workers": len(self.worker_pids()),
        }]

    def worker_pids(self) -> list[int]:
        pool = self._pool
        return [w.pid for w in pool.workers.values()] if pool is not None else []


def task_resources(options: TaskOptions) -> Resources:
    """What a task with these options holds while it runs (``UNIT``: one CPU, the common case)."""
    if options.node is None:
        if options.num_cpus == 1.0 and not options.resources:
            return UNIT
        return Resources(options.num_cpus, options.resources)
    return Resources(options.num_cpus, (*options.resources, (node_resource(options.node), 1.0)))


@contextlib.contextmanager
def _pool_blocking(threads: ThreadPool) -> Iterator[None]:
    threads.blocking()
    try:
        yield
    finally:
        threads.unblocked()


def concurrent_cancelled(key: int) -> BaseException:
    from concurrent.futures import CancelledError

    return CancelledError(f"task {key} was cancelled")


def _portable(error: BaseException | None) -> BaseException:
    """An exception that survives pickling to a worker (the original if it can)."""
    try:
        pickle.dumps(error)
        return error if error is not None else SharedComputeError("unknown error")
    except Exception:
        return SharedComputeError(f"{type(error).__name__}: {error}")
