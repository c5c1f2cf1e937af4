"""What worker processes say to the driver's runtime, and what it does about it.

The pool's I/O thread (or a thread leading it) hands every batch a worker sends
to :meth:`WorkerMessages._on_messages`, under the runtime's lock: results and
failures become scheduler events, a worker's own submits, puts, waits and
releases become theirs, and a worker's exit (its connection closed, every
message read) charges the task it was executing (``WorkerDied``). A worker of
another node, or a driver connected to a head, speaks the same messages
through its link (``_cluster``), so they are handled here too.

A mixin of :class:`~sharedcompute._runtime._driver.Runtime`: its methods use the
runtime's state (the core, the store, the Futures), as the docstring there says.
"""

from __future__ import annotations

import contextlib
import pickle
from typing import TYPE_CHECKING, Any

import cloudpickle

from sharedcompute._env import Env
from sharedcompute._protocol import ConnectionClosed, Msg
from sharedcompute._runtime._actor import ActorOptions
from sharedcompute._runtime._actors_driver import ActorCallSpec
from sharedcompute._runtime._base import TaskOptions, TaskSpec, options_from_wire
from sharedcompute._runtime._pool import WorkerHandle, WorkerSlot
from sharedcompute._scheduler import (
    UNIT,
    ActorFailed,
    CancelRequested,
    Event,
    KeyReleased,
    ObjectPut,
    PoolBroken,
    Resources,
    TaskFailed,
    TaskFinished,
    TaskReturned,
    TaskState,
    TaskSubmitted,
    WorkerBlocked,
    WorkerDied,
    WorkerUnblocked,
    node_resource,
)
from sharedcompute._serialization._pickled import PICKLE_HEADER
from sharedcompute._store import (
    InlineObject,
    RemoteObject,
    StoredObject,
    ref_from_wire,
    ref_to_wire,
)
from sharedcompute.errors import (
    ActorDiedError,
    DeserializationError,
    RemoteTraceback,
    SharedComputeError,
    WorkerCrashedError,
)

if TYPE_CHECKING:
    from collections import Counter, defaultdict

    from sharedcompute._runtime._actors_driver import ActorManager
    from sharedcompute._runtime._other_nodes import NodeHost
    from sharedcompute._runtime._pool import ProcessPool
    from sharedcompute._runtime._stream_host import StreamHost
    from sharedcompute._runtime._timeline import Timeline
    from sharedcompute._scheduler import SchedulerCore
    from sharedcompute._store import ObjectRef, OwnerStore
    from sharedcompute._sync import DrainingLock

_SHORT_TASK_SECONDS = 0.001  # prefetched deep, and chained (the core's ``short``)
_BRIEF_TASK_SECONDS = 0.1  # queued one deep behind a busy worker (the core's ``brief``)
_QUICK_FUNCTIONS_KEPT = 4096
_MAX_FAILED_STARTS = 3  # pool workers exiting before ready, in a row, before giving up
_START_BACKOFF = 0.1  # seconds before the first restart of a worker that could not start
_START_BACKOFF_MAX = 5.0
_CLIENT_REQUESTS = frozenset({Msg.CREATE_ACTOR, Msg.KILL_ACTOR, Msg.GET_ACTOR})


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


def task_resources(options: TaskOptions) -> Resources:
    """What a task with these options holds while it runs (``UNIT``: one CPU, the common case)."""
    if options.node is None:
        if options.num_cpus == 1.0 and not options.resources:
            return UNIT
        return Resources(options.num_cpus, options.resources)
    return Resources(options.num_cpus, (*options.resources, (node_resource(options.node), 1.0)))


class WorkerMessages:
    """The runtime's handling of what workers say (mixed into ``Runtime``)."""

    if TYPE_CHECKING:  # the runtime's state and methods that these use (see ``Runtime``)
        core: SchedulerCore
        actors: ActorManager
        broken: BaseException | None
        cluster: NodeHost | None
        _lock: DrainingLock
        _closed: bool
        _pool: ProcessPool | None
        _failed_starts: int
        _quick_functions: dict[bytes, float]
        _fn_bytes: dict[bytes, bytes]
        _fn_users: Counter[bytes]
        _task_fn: dict[int, bytes]
        _task_names: dict[int, str]
        timeline: Timeline
        _args_refs: dict[int, ObjectRef]
        _waiters: defaultdict[int, set[int]]
        _remote_workers: dict[int, WorkerSlot]
        streams: StreamHost

        @property
        def store(self) -> OwnerStore: ...
        def _handle(self, events: Event | list[Event]) -> None: ...
        def _settle_futures(self) -> None: ...
        def _spawn_pool_worker(self, env: Env | None = None) -> None: ...
        def _send_to(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None: ...
        def _recheck_later(self, key: int) -> None: ...

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
                    self._record(message[1], worker, message[3], True)
                    ref = ref_from_wire(message[2])
                    self.store.adopt(ref)
                    # Its size, for placing the tasks that read it (inline: it travels anyway).
                    nbytes = 0 if type(ref) is InlineObject else ref.nbytes
                    events.append(TaskFinished(message[1], worker.id, ref, message[3], nbytes))
                    answered += 1
                elif kind == Msg.FAILED:
                    answered += 1
                    self._record(message[1], worker, 0.0, False)
                    error = unpack_error(message[2])
                    self.timeline.add_error(
                        message[1], self._task_names.get(message[1], ""), error
                    )
                    if len(message) > 3:  # it never ran: an input of that node was lost
                        events.append(TaskFailed(message[1], worker.id, error,
                                                 lost_node=message[3]))
                        self._recheck_later(message[1])
                    else:
                        events.append(TaskFailed(message[1], worker.id, error))
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

    def _hold_function(self, key: int, fn_key: bytes, fn_bytes: bytes, name: str) -> None:
        self._fn_bytes[fn_key] = fn_bytes
        self._fn_users[fn_key] += 1
        self._task_fn[key] = fn_key
        self._task_names[key] = name

    def _record(self, key: int, worker: WorkerSlot, duration: float, ok: bool) -> None:
        """A worker answered for a task: one record of the timeline (``sc.timeline``)."""
        args = self._args_refs.get(key)
        self.timeline.add(key, self._task_names.get(key, ""), worker.id, worker.node, duration,
                          0 if args is None else args.nbytes, ok)

    def _release_function(self, key: int) -> None:
        self._task_names.pop(key, None)
        fn_key = self._task_fn.pop(key, None)
        if fn_key is not None:
            self._fn_users[fn_key] -= 1
            if self._fn_users[fn_key] <= 0:
                del self._fn_users[fn_key]
                del self._fn_bytes[fn_key]

    def _learn_duration(self, key: int, duration: float) -> None:
        fn_key = self._task_fn.get(key)
        if fn_key is not None:
            if duration < _BRIEF_TASK_SECONDS:
                self._quick_functions[fn_key] = duration
                if len(self._quick_functions) > _QUICK_FUNCTIONS_KEPT:
                    del self._quick_functions[next(iter(self._quick_functions))]
            else:
                self._quick_functions.pop(fn_key, None)

    def _speed(self, fn_key: bytes) -> tuple[bool, bool]:
        """(short, brief) of a task of this function, from how long it last ran."""
        seconds = self._quick_functions.get(fn_key)
        if seconds is None:
            return False, False
        return seconds < _SHORT_TASK_SECONDS, True

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
            _, key, fn_key, fn_bytes, args_wire, dep_keys, options_wire, parent, stream = message
            args_ref = ref_from_wire(args_wire)
            options = options_from_wire(options_wire)
            self._hold_function(key, fn_key, fn_bytes, options.name or str(key))
            self.store.adopt(args_ref)
            if isinstance(args_ref, (StoredObject, RemoteObject)):
                self._args_refs[key] = args_ref
            worker.held_keys.add(key)
            if stream is not None:  # a generator task: its items go on to this client
                self.streams.submitted_by(worker, key, stream)
            short, brief = self._speed(fn_key)
            events.append(TaskSubmitted(
                key, dep_keys, task_resources(options),
                options.max_retries, options.retry_exceptions,
                TaskSpec(fn_key, args_ref, options.name or str(key), parent, stream),
                parent=parent, env=options.runtime_env, pass_errors=options.pass_errors,
                short=short, brief=brief,
            ))
        elif kind == Msg.SUBMIT_CALL:
            _, key, actor_id, class_name, method, args_wire, dep_keys, stream = message
            args_ref = ref_from_wire(args_wire)
            self.store.adopt(args_ref)
            if isinstance(args_ref, (StoredObject, RemoteObject)):
                self._args_refs[key] = args_ref
            worker.held_keys.add(key)
            record = self.actors.record(actor_id)
            retries = record.options.max_task_retries if record is not None else 0
            if record is None:
                events.append(ActorFailed(actor_id, ActorDiedError(f"actor {actor_id} is unknown")))
            if stream is not None:  # a generator method: its items go on to this client
                self.streams.submitted_by(worker, key, stream)
            events.append(TaskSubmitted(
                key, dep_keys, UNIT, retries if retries >= 0 else 1 << 30, False,
                ActorCallSpec(method, args_ref, f"{class_name}.{method}", stream),
                actor=actor_id,
            ))
        elif kind == Msg.YIELD:
            self.streams.on_yield(worker, message, events)
        elif kind == Msg.STREAM_ACK:  # from a client reading a stream it submitted
            self.streams.client_ack(message[1], message[2])
        elif kind == Msg.STREAM_STOP:
            self.streams.client_stop(message[1], events)
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


def _portable(error: BaseException | None) -> BaseException:
    """An exception that survives pickling to a worker (the original if it can)."""
    try:
        pickle.dumps(error)
        return error if error is not None else SharedComputeError("unknown error")
    except Exception:
        return SharedComputeError(f"{type(error).__name__}: {error}")
