"""The driver's side of actors: records, processes, restarts, names and handle counts.

An actor needs a process of its own. The fastest one to get is an idle pool
worker: it leaves the pool (``WorkerRetired``; the pool starts a replacement in
the background) and becomes the actor at once, so creating an actor costs one
message, not a process start. Only when no pool worker is idle is a new process
started for it.

The actor's calls are scheduler tasks bound to the actor (``TaskSubmitted.actor``);
the scheduler core keeps their order and their dependencies. This module
decides what the core cannot: which process an actor lives in, whether it
restarts after its process dies (``max_restarts``), and when it ends (killed,
constructor failed, or no handle left for an unnamed actor).

Handle counting: ``holds`` counts the driver's live handles, handles pickled and
not yet unpickled (leases), and handles held by workers. A worker that unpickles
a handle turns a lease into a hold; a worker that dies drops its holds.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sharedcompute._protocol import Msg
from sharedcompute._runtime._actor import ActorHandle, ActorOptions, public_methods
from sharedcompute._runtime._future import Future, when_all_done
from sharedcompute._scheduler import (
    UNIT,
    ActorFailed,
    ActorRequested,
    ActorStarted,
    Event,
    KeyRetained,
    Resources,
    TaskSubmitted,
    WorkerDied,
    WorkerRetired,
    node_resource,
)
from sharedcompute._store import ObjectRef, StoredObject, ref_to_wire
from sharedcompute.errors import ActorDiedError

if TYPE_CHECKING:
    from sharedcompute._runtime._driver import Runtime
    from sharedcompute._runtime._pool import WorkerSlot
    from sharedcompute._runtime._stream import StreamState


@dataclass(eq=False)
class ActorRecord:
    id: int
    description: str
    options: ActorOptions
    cls_key: bytes
    cls_bytes: bytes
    args_ref: ObjectRef
    dep_keys: tuple[int, ...]
    methods: dict[str, str]
    restarts_left: int
    # The constructor's Future arguments, held so their values outlive the caller's
    # Futures: every (re)start of the actor needs them.
    dep_futures: tuple[Future[Any], ...] = ()
    worker: WorkerSlot | None = None
    node: int = 0  # where its process is (or goes)
    holds: int = 0
    worker_holds: Counter[int] = field(default_factory=Counter)
    killed: bool = False
    dead: bool = False


def actor_resources(options: ActorOptions) -> Resources | None:
    """What the actor reserves for its life (None: nothing, as Ray's default of 0 CPUs).

    An actor pinned to a node reserves that node's pin: the core then places it there,
    or says at once that the node is not alive.
    """
    pin = () if options.node is None else ((node_resource(options.node), 1.0),)
    if not options.num_cpus and not options.resources and not pin:
        return None
    return Resources(float(options.num_cpus), (*options.resources, *pin))


@dataclass(slots=True)
class ActorCallSpec:
    """What the driver keeps about an actor call (``TaskSpec``'s counterpart)."""

    method: str
    args_ref: ObjectRef
    name: str
    stream: int | None = None  # a generator method's backpressure; None: not one


class ActorManager:
    """The driver runtime's actors; every method that says "lock held" runs under its lock."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._actor_records: dict[int, ActorRecord] = {}
        self._actor_names: dict[str, int] = {}
        # Handle finalizations, queued lock-free and applied under the runtime's lock.
        self._actor_holds: deque[tuple[int, int]] = deque()
        # Unnamed actors with no handle left, ending once their pending calls are done.
        self.ending: set[int] = set()

    def record(self, actor_id: int) -> ActorRecord | None:
        return self._actor_records.get(actor_id)

    # -- creating -----------------------------------------------------------------------

    def create_actor(
        self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any],
        options: ActorOptions,
    ) -> ActorHandle:
        if self.rt._pool is None:
            self.rt._start_processes()
        options = replace(options, runtime_env=self.rt.envs.resolve(options.runtime_env))
        label = f"actor {cls.__qualname__}" + (f" {options.name!r}" if options.name else "")
        needs = actor_resources(options)
        why = None if needs is None else self.rt.core.infeasible(needs, f"the {label}")
        if why:
            raise ValueError(f"cannot create the {label}: {why}")
        cls_key, cls_bytes = self.rt.functions.encode(cls)
        args_ref, deps = self.rt.prepare_args(args, kwargs)
        actor_id = self.rt._next_key()
        record = ActorRecord(
            id=actor_id,
            description=f"{label} (id {actor_id})",
            options=options,
            cls_key=cls_key,
            cls_bytes=cls_bytes,
            args_ref=args_ref,
            dep_keys=tuple(deps),
            dep_futures=tuple(deps.values()),
            methods=public_methods(cls),
            restarts_left=options.max_restarts,
        )
        handle = ActorHandle(self.rt, actor_id, cls.__qualname__, record.methods)
        with self.rt._lock:
            if options.name is not None:
                if options.name in self._actor_names:
                    raise ValueError(
                        f"an actor named {options.name!r} already exists; pick another name "
                        "or get it with sharedcompute.get_actor()"
                    )
                self._actor_names[options.name] = actor_id
            self._actor_records[actor_id] = record
            record.holds = 1
            events: list[Event] = self.rt._register_dependencies(deps) if deps else []
            if events:
                self.rt._handle(events)
        self.rt.watch_external()
        # Futures among the constructor's arguments must be done before it can run.
        when_all_done(list(deps.values()), lambda: self._launch_actor(record))
        self.rt._settle_futures()
        return handle

    def create_for_client(
        self, client: WorkerSlot, actor_id: int, cls_key: bytes, cls_bytes: bytes,
        args_ref: ObjectRef, dep_keys: tuple[int, ...], options: ActorOptions, class_name: str,
        methods: dict[str, str],
    ) -> None:
        """``create_actor`` for a driver connected to this head (lock held).

        Its Future arguments are done already (it waits for them before it asks); the
        head retains their keys for the actor's restarts. Raises as ``create_actor`` does.
        """
        label = f"actor {class_name}" + (f" {options.name!r}" if options.name else "")
        needs = actor_resources(options)
        why = None if needs is None else self.rt.core.infeasible(needs, f"the {label}")
        if why:
            raise ValueError(f"cannot create the {label}: {why}")
        if options.name is not None and options.name in self._actor_names:
            raise ValueError(f"an actor named {options.name!r} already exists; pick another "
                             "name or get it with sharedcompute.get_actor()")
        record = ActorRecord(
            id=actor_id, description=f"{label} (id {actor_id})", options=options,
            cls_key=cls_key, cls_bytes=cls_bytes, args_ref=args_ref, dep_keys=dep_keys,
            methods=methods, restarts_left=options.max_restarts,
        )
        if options.name is not None:
            self._actor_names[options.name] = actor_id
        self._actor_records[actor_id] = record
        record.holds = 1
        record.worker_holds[client.id] += 1  # its handle: dropped when it leaves
        self.rt._handle([KeyRetained(key) for key in dep_keys])
        self._launch_actor_locked(record)

    def describe_for_client(
        self, client: WorkerSlot, name: str
    ) -> tuple[int, str, dict[str, str]]:
        """``get_actor`` for a driver connected to this head: the handle's parts (lock held)."""
        actor_id = self._actor_names.get(name)
        record = self._actor_records.get(actor_id) if actor_id is not None else None
        if record is None or record.dead:
            raise ValueError(f"there is no live actor named {name!r}")
        record.holds += 1
        record.worker_holds[client.id] += 1
        return record.id, record.description.split()[1], record.methods

    def _launch_actor(self, record: ActorRecord) -> None:
        with self.rt._lock:
            self._launch_actor_locked(record)
        self.rt._settle_futures()  # calls failed with it, if it cannot start

    def _launch_actor_locked(self, record: ActorRecord) -> None:
        if record.dead or self.rt._closed:
            return
        failed = [k for k in record.dep_keys if (o := self.rt.core.outcome(k)) and o[2]]
        if failed:
            outcome = self.rt.core.outcome(failed[0])
            assert outcome is not None
            error = ActorDiedError(
                f"{record.description} was not created: a constructor argument failed"
            )
            error.__cause__ = outcome[2]
            self._end_actor(record, error)
            return
        needs = actor_resources(record.options)
        if needs is None:
            self._place_actor(record)
        else:  # placed once they are free (PlaceActor), held until it ends
            self.rt._handle(ActorRequested(record.id, needs))

    def place(self, actor_id: int, node: int) -> None:
        """The core reserved the actor's resources on ``node``: give it a process (lock held)."""
        record = self._actor_records.get(actor_id)
        if record is not None and not record.dead:
            record.node = node
            self._place_actor(record)

    def _place_actor(self, record: ActorRecord) -> None:
        """Give the actor a process: an idle pool worker if there is one (lock held)."""
        assert self.rt._pool is not None
        env = record.options.runtime_env  # an Env (resolved when it was created)
        if record.node:
            worker = self.rt._spawn_remote(record.node, env)
            if worker is None:
                self._end_actor(record, ActorDiedError(
                    f"{record.description} cannot start: node {record.node} is gone"
                ))
            else:
                worker.actor_id = record.id  # READY from it starts the actor
            return
        for worker_id in self.rt.core.idle_workers():
            worker = self.rt._pool.workers.get(worker_id)
            if (worker is not None and worker.ready and worker.actor_id is None
                    and worker.env == env):
                worker.actor_id = record.id
                self.rt._handle(WorkerRetired(worker_id))
                self._start_actor_on(record, worker)
                return
        worker = self.rt._pool.spawn(self.rt._next_worker_id(), env)
        worker.actor_id = record.id  # READY from it starts the actor

    def _start_actor_on(self, record: ActorRecord, worker: WorkerSlot) -> None:
        """Send the constructor; calls may follow at once, on the same ordered connection."""
        record.worker = worker
        worker.serial_calls = record.options.max_concurrency in (None, 1) and not any(
            record.methods.values()
        )
        cls_bytes = None
        known, forget = worker.functions.use(record.cls_key)
        if not known:
            cls_bytes = record.cls_bytes
        deps = []
        for key in record.dep_keys:
            outcome = self.rt.core.outcome(key)
            assert outcome is not None
            deps.append((key, ref_to_wire(outcome[1])))
        create = (
            Msg.CREATE, record.id, record.cls_key, cls_bytes, ref_to_wire(record.args_ref),
            tuple(deps), record.options.max_concurrency, record.description,
        )
        try:
            worker.conn.send_many([(Msg.FORGET, tuple(forget)), create] if forget else [create])
        except EOFError:
            return  # it died; its exit restarts or ends the actor
        self.rt._handle(ActorStarted(record.id, worker.id, record.description))

    # -- calls ------------------------------------------------------------------------------

    def submit_actor_call(
        self, actor_id: int, class_name: str, method: str,
        args: tuple[Any, ...], kwargs: dict[str, Any], stream: StreamState | None = None,
    ) -> Future[Any]:
        record = self._actor_records.get(actor_id)
        args_ref, deps = self.rt.prepare_args(args, kwargs)
        key = self.rt._next_key()
        name = f"{class_name}.{method}"
        future: Future[Any] = Future(self.rt, key, name)
        retries = record.options.max_task_retries if record is not None else 0
        event = TaskSubmitted(
            key, tuple(deps), UNIT, retries if retries >= 0 else 1 << 30, False,
            ActorCallSpec(method, args_ref, name,
                          None if stream is None else stream.backpressure), actor=actor_id,
        )
        with self.rt._lock:
            self.rt._futures[key] = future
            if stream is not None:  # before the actor can answer: its items find it
                self.rt.streams.register(key, stream)
            if type(args_ref) is StoredObject:
                self.rt._args_refs[key] = args_ref
            events: list[Event] = self.rt._register_dependencies(deps) if deps else []
            if record is None:
                events.append(ActorFailed(actor_id, ActorDiedError(
                    f"actor {actor_id} is unknown to this runtime (it was never created here)"
                )))
            events.append(event)
            self.rt._handle(events)
        self.rt.watch_external()
        self.rt._settle_futures()
        return future

    # -- ending, restarting ----------------------------------------------------------------------

    def _actor_exited(self, worker: WorkerSlot, reason: str) -> list[Event]:
        """Events for the death of an actor's process; restarts it if it may (lock held)."""
        assert worker.actor_id is not None
        record = self._actor_records.get(worker.actor_id)
        if record is None or (record.worker is not worker and record.worker is not None):
            return [WorkerDied(worker.id, reason)]
        return self._actor_exited_as(record, worker, reason)

    def _actor_exited_as(
        self, record: ActorRecord, worker: WorkerSlot, reason: str
    ) -> list[Event]:
        events: list[Event] = [WorkerDied(worker.id, reason)]
        record.worker = None
        self.rt._handle(events)
        if record.dead:
            return []
        if record.killed or record.restarts_left == 0:
            self._end_actor(record, ActorDiedError(f"{record.description} died: {reason}"))
        else:
            if record.restarts_left > 0:
                record.restarts_left -= 1
            if record.node and record.options.node is None and record.node not in (
                n.id for n in self.rt.core.nodes.alive()
            ):
                record.node = 0  # its node is gone: this one's
            self._place_actor(record)
        return []

    def _actor_constructor_failed(
        self, worker: WorkerSlot, error: BaseException
    ) -> None:
        record = self._actor_records.get(worker.actor_id) if worker.actor_id else None
        if record is None:
            return
        died = ActorDiedError(
            f"{record.description} could not be created: its constructor raised "
            f"{type(error).__name__}: {error}"
        )
        died.__cause__ = error
        self._end_actor(record, died)

    def _end_actor(self, record: ActorRecord, error: BaseException) -> None:
        """The actor is over: fail its calls, free its name and process (lock held)."""
        record.dead = True
        name = record.options.name
        if name is not None and self._actor_names.get(name) == record.id:
            del self._actor_names[name]
        self.rt._free([record.args_ref])
        worker, record.worker = record.worker, None
        if worker is not None and not getattr(worker, "exited", False):
            self.rt._kill_worker(worker)
        self.rt._handle(ActorFailed(record.id, error))

    def kill(self, handle: ActorHandle, *, no_restart: bool = True) -> None:
        with self.rt._lock:
            self.kill_locked(handle.actor_id, no_restart)
        self.rt._settle_futures()

    def kill_locked(self, actor_id: int, no_restart: bool) -> None:
        """Kill the actor's process; it restarts if ``no_restart`` is false (lock held)."""
        record = self._actor_records.get(actor_id)
        if record is None or record.dead:
            return
        record.killed = no_restart
        worker = record.worker
        if worker is not None:
            self.rt._kill_worker(worker)
            if not no_restart:
                # Restart now, not when the exit is noticed: a call made right after
                # kill() must wait for the new process, never reach the dying one.
                worker.actor_id = None  # its exit is then a plain worker's, ignored
                self.rt._handle(self._actor_exited_as(
                    record, worker, f"{_process(worker)} was killed by sharedcompute.kill()"
                ))
        elif no_restart:
            self._end_actor(record, ActorDiedError(f"{record.description} was killed"))

    def get_actor(self, name: str) -> ActorHandle:
        with self.rt._lock:
            actor_id = self._actor_names.get(name)
            record = self._actor_records.get(actor_id) if actor_id is not None else None
            if record is None or record.dead:
                raise ValueError(f"there is no live actor named {name!r}")
            record.holds += 1
        class_name = record.description.split()[1]
        return ActorHandle(self.rt, record.id, class_name, record.methods)

    # -- handle counting ------------------------------------------------------------------------

    def lease_actor(self, actor_id: int) -> None:
        self._actor_holds.append((actor_id, +1))
        self._try_flush_actor_holds()

    def adopt_actor_lease(self, actor_id: int) -> None:
        # Unpickled in the driver: the lease becomes a driver handle; the count is unchanged.
        pass

    def release_actor(self, actor_id: int) -> None:
        """From ``ActorHandle.__del__``: queue, never block."""
        self._actor_holds.append((actor_id, -1))
        self._try_flush_actor_holds()

    def _worker_actor_hold(
        self, worker: WorkerSlot, actor_id: int, delta: int
    ) -> None:
        """A worker took (+1), converted a lease into (0 net), or dropped (-1) a handle."""
        record = self._actor_records.get(actor_id)
        if record is None:
            return
        if delta == 0:
            record.worker_holds[worker.id] += 1
            return
        if delta < 0:
            if record.worker_holds[worker.id] <= 0:
                return
            record.worker_holds[worker.id] -= 1
        self._change_holds(record, delta)

    def _drop_worker_actor_holds(self, worker: WorkerSlot) -> None:
        for record in list(self._actor_records.values()):
            held = record.worker_holds.pop(worker.id, 0)
            if held:
                self._change_holds(record, -held)

    def _try_flush_actor_holds(self) -> None:
        self.rt._lock.try_drain()

    def pending_holds(self) -> bool:
        return bool(self._actor_holds)

    def clear_holds(self) -> None:
        self._actor_holds.clear()

    def _flush_actor_holds(self) -> None:
        while self._actor_holds:
            actor_id, delta = self._actor_holds.popleft()
            record = self._actor_records.get(actor_id)
            if record is not None:
                self._change_holds(record, delta)

    def _change_holds(self, record: ActorRecord, delta: int) -> None:
        record.holds += delta
        if record.holds <= 0 and record.options.name is None and not record.dead:
            self.ending.add(record.id)
            self.check_ending()

    def check_ending(self) -> None:
        """End handle-less actors whose calls have all finished (lock held)."""
        for actor_id in list(self.ending):
            record = self._actor_records.get(actor_id)
            if record is None or record.dead or record.holds > 0:
                self.ending.discard(actor_id)
            elif not self.rt.core.actor_busy(actor_id):
                self.ending.discard(actor_id)
                self._end_actor(record, ActorDiedError(
                    f"{record.description} was ended: no handle to it is left"
                ))


def _process(worker: WorkerSlot) -> str:
    pid = getattr(worker, "pid", None)
    return f"pid {pid}" if pid is not None else f"worker {worker.id} on node {worker.node}"
