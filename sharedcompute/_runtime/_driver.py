"""The driver's runtime: the scheduler core, the store's owner and the worker pool, wired.

Every change of scheduling state happens under ``_lock`` through
``_handle(events)``, which feeds the pure :class:`SchedulerCore` and carries out
its instructions: messages to workers are sent while the lock is held (so
each worker receives tasks in the order the core assigned them), Futures are
settled after it is released (their callbacks are user code and may submit).

Threads: the caller's threads (submit, put, cancel, Future finalizers) and the
pool's I/O thread (worker messages, worker deaths); on a head, also the threads
that read its links to other nodes and drivers.

Beside this file, mixed into :class:`Runtime`: ``_worker_messages`` (what workers
say, and their exits) and ``_other_nodes`` (a head's other nodes and drivers,
and results made again when a node is lost).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import threading
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from sharedcompute import _config
from sharedcompute._env import Env, EnvResolver, Package, PackageCache
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
    task_name,
)
from sharedcompute._runtime._future import Future, ValueRef, is_done, when_all_done
from sharedcompute._runtime._local import ThreadPool, run_inline
from sharedcompute._runtime._other_nodes import NodeHost, OtherNodes
from sharedcompute._runtime._pool import ProcessPool, WorkerSlot, pickle_for_workers
from sharedcompute._runtime._stream import FutureStream, StreamState
from sharedcompute._runtime._stream_host import StreamHost
from sharedcompute._runtime._timeline import Timeline

if TYPE_CHECKING:
    from sharedcompute._runtime._batched_map import BatchedMap
from sharedcompute._runtime._worker_messages import WorkerMessages, _portable, task_resources
from sharedcompute._scheduler import (
    PINS_PER_NODE,
    CancelRequested,
    Dispatch,
    Event,
    ExternalTask,
    FreeObject,
    Instruction,
    KeyReleased,
    ObjectPut,
    PlaceActor,
    Reject,
    Resolve,
    SchedulerCore,
    StartWorker,
    StealCheck,
    StealLater,
    StopWorker,
    TaskFailed,
    TaskState,
    TaskSubmitted,
    Withdraw,
    WithdrawRequested,
    WorkerJoined,
    node_resource,
    public_resources,
)
from sharedcompute._store import (
    ObjectRef,
    OwnerStore,
    RemoteObject,
    StoredObject,
    ref_to_wire,
)
from sharedcompute.errors import (
    SharedComputeError,
)

SCHEDULERS = ("sync", "threads", "processes")
# A task's stored inputs up to this size are held for its worker while it runs (one round
# trip each saved); larger ones cost a round trip worth little next to reading them, and
# the worker takes its own hold once it reads them, not while the task waits in its queue.
GRANT_MAX_BYTES = 32 * 1024 * 1024
# A thread waiting for the first of at most this many Futures reads the workers itself,
# checking them all after each message; more, and the stdlib wait is cheaper.
_LEAD_MAX_FUTURES = 64
# A worker idle this long while a task waits queued behind another's takes it back (the
# core's Pipelining); most such gaps close sooner, when the driver sends the next task.
_STEAL_AFTER_SECONDS = 0.005


class Runtime(WorkerMessages, OtherNodes, DefaultScope, RuntimeBase):
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
        runtime_env: dict[str, Any] | None = None,
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
        # This host's runtime_env packages (a head's: what its drivers shipped), made on
        # first use; then the runtime's own env, packed and shipped now so that a directory
        # too large fails here.
        self._packages: PackageCache | None = None
        self._packages_lock = threading.Lock()
        try:
            self.envs = EnvResolver(runtime_env, self._ship_here)
        except BaseException:
            self._close_packages()
            raise
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
        self.core = SchedulerCore(
            self._resources, max_tasks_per_worker=max_tasks_per_child, pipeline=True
        )
        self._futures: dict[int, Future[Any]] = {}
        self._args_refs: dict[int, ObjectRef] = {}
        # Pickled functions of pending tasks (to send to a worker that lacks one), and how
        # many pending tasks use each: dropped with the last, so they never pile up.
        self._fn_bytes: dict[bytes, bytes] = {}
        self._fn_users: Counter[bytes] = Counter()
        self._task_fn: dict[int, bytes] = {}  # the function of each pending task
        # Inputs the store holds for the worker running a task (see _grant_inputs).
        self._grants: dict[int, tuple[int, list[StoredObject]]] = {}
        self._task_names: dict[int, str] = {}  # ... and its name (for the timeline)
        self.timeline = Timeline()  # the recent task executions (sc.timeline)
        self._batched: BatchedMap | None = None  # sc.map's batches (made on first use)
        self.streams = StreamHost(self)  # generator tasks' items on their way
        # What closes before the workers do (a dashboard reading this runtime, say).
        self._on_shutdown: list[Callable[[], None]] = []
        self.dashboard_url: str | None = None  # set when a dashboard serves this runtime
        # Functions whose last run took under _SHORT_TASK_SECONDS (they may be queued
        # behind one another on a worker); insertion-ordered, bounded.
        # Functions last seen to run under _BRIEF_TASK_SECONDS, with that time (LRU-bounded).
        self._quick_functions: dict[bytes, float] = {}
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
                    self._store = OwnerStore(
                        self._store_capacity, spill_dir=self.spill_dir,
                        spill_threshold=float(_config.get("spill_threshold", 0.8)),
                        wait_s=float(_config.get("object_store_wait_s", 30.0)),
                    )
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
                    packages=self.packages,
                )
                for _ in range(self.num_workers):
                    self._spawn_pool_worker(self.envs.base)  # in this runtime's own env
        except BaseException:
            # Nothing half-made may stay: the workers started, the I/O thread, the store.
            self.shutdown()
            raise
        self._settle_futures()

    def _spawn_pool_worker(self, env: Env | None = None) -> None:
        """Start a pool worker (lock held). It may be sent tasks at once: they wait in its
        connection while it starts, which saves the first task a round trip (and a task
        sent there counts as running, as one in ProcessPoolExecutor's call queue does)."""
        assert self._pool is not None
        worker = self._pool.spawn(self._next_worker_id(), env)
        self._handle(WorkerJoined(worker.id, env=env))

    def packages(self) -> PackageCache:
        """This host's runtime_env packages (made on first use)."""
        with self._packages_lock:
            if self._packages is None:
                self._packages = PackageCache(where="node 0")
            return self._packages

    def _ship_here(self, package: Package) -> int:
        cache = self.packages()
        if cache.has(package.id):
            return 0
        cache.add(package.id, package.data, pin=True)
        return len(package.data)

    def _close_packages(self) -> None:
        with self._packages_lock:
            if self._packages is not None:
                self._packages.close()

    def _thread_pool(self) -> ThreadPool:
        with self._lock:
            if self._closed:
                raise RuntimeError("this runtime has been shut down")
            if self._threads is None:
                self._threads = ThreadPool(max(1, self.num_workers))
            return self._threads

    def close_with(self, close: Callable[[], None]) -> None:
        """Call ``close`` first when this runtime shuts down."""
        self._on_shutdown.append(close)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers and free the store. Pending Futures fail with CancelledError."""
        while self._on_shutdown:
            try:
                self._on_shutdown.pop()()
            except Exception as error:  # the runtime must still stop
                print(f"sharedcompute: closing: {type(error).__name__}: {error}",
                      file=sys.stderr)
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
        self._close_packages()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the lock and the core -----------------------------------------------------------

    def release_key(self, key: int) -> None:
        """Called from ``Future.__del__``: queue; the pool's next idle moment hands it on."""
        self._released.append(key)
        self._wake_releases()

    def _wake_releases(self) -> None:
        pool = self._pool
        if pool is None or self._closed:
            self._release_lock.try_drain()
        else:
            pool.wake()

    def _releases_pending(self) -> bool:
        return bool(self._released) or self.actors.pending_holds() or bool(self.streams.stops)

    def _flush_releases(self) -> None:
        """Turn queued Future and handle finalizations into events (lock held)."""
        if self._closed:  # nothing left to release; drop them so the lock stops draining
            self._released.clear()
            self.actors.clear_holds()
            self.streams.states.clear()
            while self.streams.pending():
                self.streams.flush()
            return
        if self.actors.pending_holds():
            self.actors._flush_actor_holds()
        if self.streams.pending():
            self.streams.flush()
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
                self._replace_worker(instruction.replaces, instruction.env)
            elif type(instruction) is Withdraw:
                outbox[instruction.worker].append((Msg.DROP, instruction.key))
                urgent.append(instruction.worker)
            elif type(instruction) is StopWorker:
                # At once: the StartWorker that follows forgets a worker of another node.
                # (A retired worker is idle: nothing for it waits in the outbox.)
                stopping = self._worker(instruction.worker)
                if stopping is not None:
                    self._send_to(stopping, [(Msg.SHUTDOWN,)])
            elif type(instruction) is PlaceActor:
                self.actors.place(instruction.actor, instruction.node)
            elif type(instruction) is StealLater and self._pool is not None:
                self._pool.call_later(_STEAL_AFTER_SECONDS, self._steal_check)
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

    def _steal_check(self) -> None:
        with self._lock:
            if not self._closed:
                self._handle(StealCheck())
        self._settle_futures()

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
        refs = instruction.dependency_refs
        if type(spec) is ActorCallSpec:
            outbox[instruction.worker].append((
                Msg.CALL, instruction.key, spec.method, ref_to_wire(spec.args_ref),
                _wires(refs), spec.name, spec.stream,
            ))
            return
        known, forget = worker.functions.use(spec.fn_key)
        if forget:
            outbox[instruction.worker].append((Msg.FORGET, tuple(forget)))
        fn_bytes = None if known else self._fn_bytes[spec.fn_key]
        granted = False
        if refs and self.cluster is None and worker.store_client is not None:
            refs, granted = self._grant_inputs(instruction.key, worker.store_client, refs)
        outbox[instruction.worker].append((
            Msg.RUN, instruction.key, spec.fn_key, fn_bytes, ref_to_wire(spec.args_ref),
            _wires(refs), spec.name, spec.parent, spec.stream, granted,
        ))

    def _grant_inputs(
        self, key: int, client: int, refs: tuple[tuple[int, ObjectRef | None], ...]
    ) -> tuple[tuple[tuple[int, ObjectRef | None], ...], bool]:
        """Have the store hold a task's stored inputs for its worker until the task is
        over, so that the worker reads them without a round trip each: the inputs as they
        are now, and whether it did (True: every stored input it names is held)."""
        previous = self._grants.pop(key, None)
        if previous is not None:  # sent before, and handed back or lost with its worker
            self.store.end_grant(*previous)
        stored = [ref for _, ref in refs if type(ref) is StoredObject]
        if not stored or any(ref.nbytes > GRANT_MAX_BYTES for ref in stored):
            return refs, False
        located = self.store.grant(client, stored)
        if located is None:
            return refs, False
        self._grants[key] = (client, located)
        where = {ref.object_id: ref for ref in located}
        return tuple(
            (k, where[ref.object_id] if type(ref) is StoredObject else ref) for k, ref in refs
        ), True

    def _conclude(
        self, instruction: Resolve | Reject, outbox: dict[int, list[tuple[Any, ...]]],
        freed: list[ObjectRef],
    ) -> None:
        key = instruction.key
        if self._grants:
            grant = self._grants.pop(key, None)
            if grant is not None:
                self.store.end_grant(*grant)
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
        if self.streams.forwards:
            self.streams.concluded(key)
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
        name = task_name(fn, options)
        if scheduler == "processes":
            return self._submit_process(fn, args, kwargs, options, name)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        return self._submit_local(fn, args, kwargs, scheduler, name)

    def _default_scheduler(self) -> str:
        return _config.get("scheduler") or self.scheduler

    def submit_stream(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions,
    ) -> FutureStream[Any]:
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {type(fn).__name__}")
        return self.streams.submit(fn, args, kwargs, options)

    def stream_taken(self, state: StreamState) -> None:
        self.streams.taken(state)

    def stop_stream(self, state: StreamState) -> None:
        self.streams.stop(state)

    def _submit_process(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions, name: str, stream: StreamState | None = None,
    ) -> Future[Any]:
        if self._pool is None:
            self._start_processes()
        if self.broken is not None:
            raise self._broken_error()
        env = self.task_env(options)  # before anything is stored: it may raise
        fn_key, fn_bytes = self.functions.encode(fn)
        args_ref, deps = self.prepare_args(args, kwargs)
        key = self._next_key()
        future: Future[Any] = Future(self, key, name)
        resources = task_resources(options)
        short, brief = self._speed(fn_key)
        if brief and not short:  # it last ran for a millisecond or more
            future._poll_first = False
        event = TaskSubmitted(
            key, tuple(deps), resources, options.max_retries, options.retry_exceptions,
            TaskSpec(fn_key, args_ref, name,
                     stream=None if stream is None else stream.backpressure),
            env=env, pass_errors=options.pass_errors, short=short, brief=brief,
        )
        self._lock.acquire()
        try:
            if self._closed:
                self.store.delete(args_ref)
                raise RuntimeError("this runtime has been shut down")
            self._hold_function(key, fn_key, fn_bytes, name)
            self._futures[key] = future
            if stream is not None:  # before a worker can answer: its items find it
                self.streams.register(key, stream)
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
            or (len(futures) > _LEAD_MAX_FUTURES and return_when != "ALL_COMPLETED")
            or not all(self._settled_here(f) for f in futures)
        ):
            # Futures settled by other threads (or a pool thread lending its slot), or
            # too many to look over after each message: the stdlib wait is right.
            super().wait_for(futures, timeout, return_when)
            return
        # Polling before sleeping pays only if some answer may come within microseconds.
        poll = any(f._poll_first for f in futures if not is_done(f))
        if len(futures) == 1:
            only = futures[0]
            pool.lead(lambda: is_done(only), timeout, poll_first=poll)
        elif return_when == "FIRST_COMPLETED":
            pool.lead(lambda: any(is_done(f) for f in futures), timeout, poll_first=poll)
        elif return_when == "FIRST_EXCEPTION":
            pool.lead(
                lambda: all(is_done(f) for f in futures)
                or any(is_done(f) and not f.cancelled() and f.exception(0) for f in futures),
                timeout, poll_first=poll,
            )
        else:
            pool.lead(_all_done(futures), timeout, poll_first=poll)

    def _settled_here(self, future: concurrent.futures.Future[Any]) -> bool:
        """Whether reading the workers is what settles ``future`` (or it is done)."""
        return is_done(future) or (
            isinstance(future, Future) and future._runtime is self and future.key in self._futures
        )

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

    def load(self, ref: ObjectRef, *, private: bool = False) -> Any:
        if type(ref) is RemoteObject:
            if self.cluster is None:
                raise SharedComputeError(f"object {ref.object_id} lives on node {ref.node}, "
                                         "and this runtime has no other nodes")
            ref = self.cluster.pull(ref)
        value = super().load(ref, private=private)
        # (A private view may be written to: passed on, it must go as its own value.)
        if type(ref) is StoredObject and not private and type(value).__name__ == "ndarray":
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
        if self._batched is not None:
            self._batched.cancel_unsent()
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

    def wait_idle(self) -> None:
        """Return once no Future this runtime settles is pending (more may come meanwhile)."""
        while True:
            with self._lock:
                pending = list(self._futures.values())
            if self._batched is not None:  # sc.map's items that no batch has settled yet
                pending += self._batched.pending()
            if not pending:
                return
            concurrent.futures.wait(pending)

    def is_running(self, key: int) -> bool:
        """Whether the task was sent to a worker (it runs, or waits there to run next)."""
        return key in self._futures and self.core.state_of(key) is TaskState.RUNNING

    # -- actors (see _actors_driver) -------------------------------------------------------

    def create_actor(
        self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], options: ActorOptions
    ) -> ActorHandle:
        return self.actors.create_actor(cls, args, kwargs, options)

    def submit_actor_stream(
        self, actor_id: int, class_name: str, method: str, args: tuple[Any, ...],
        kwargs: dict[str, Any], backpressure: int,
    ) -> FutureStream[Any]:
        return self.streams.submit_actor(actor_id, class_name, method, args, kwargs,
                                         backpressure)

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

    def memory_summary(self, address: str | None = None,
                       other_nodes: list[dict[str, Any]] | None = None) -> str:
        """The memory report (``sc.memory_summary()``): stores, objects, holders (a head
        passes its other nodes, as ``sc.nodes()`` lists them)."""
        from sharedcompute._runtime._memory_report import memory_report

        return memory_report(self, address, other_nodes)

    def batched_map(self, fn: Callable[..., Any], items: list[tuple[Any, ...]],
                    options: TaskOptions) -> list[Future[Any]]:
        """``sc.map`` here: tiny calls in batches, each item its own Future."""
        if self._batched is None:
            from sharedcompute._runtime._batched_map import BatchedMap

            self._batched = BatchedMap(self)
        return self._batched.map(fn, items, options)

    def timeline_trace(self) -> dict[str, Any]:
        """The recent task executions as Chrome trace events (``sc.timeline``)."""
        return self.timeline.trace()

    def worker_pids(self) -> list[int]:
        pool = self._pool
        return [w.pid for w in pool.workers.values()] if pool is not None else []


@contextlib.contextmanager
def _pool_blocking(threads: ThreadPool) -> Iterator[None]:
    threads.blocking()
    try:
        yield
    finally:
        threads.unblocked()


def _wires(refs: tuple[tuple[int, ObjectRef | None], ...]) -> tuple[tuple[int, Any], ...]:
    """A task's inputs as messages carry them (None: made ahead of it on its worker)."""
    return tuple((k, None if ref is None else ref_to_wire(ref)) for k, ref in refs)


def _all_done(futures: list[Future[Any]]) -> Callable[[], bool]:
    """``all(is_done(f) for f in futures)``, looking at each Future once it is done."""
    first_pending = 0

    def all_done() -> bool:
        nonlocal first_pending
        while first_pending < len(futures) and is_done(futures[first_pending]):
            first_pending += 1
        return first_pending == len(futures)

    return all_done


def concurrent_cancelled(key: int) -> BaseException:
    from concurrent.futures import CancelledError

    return CancelledError(f"task {key} was cancelled")
