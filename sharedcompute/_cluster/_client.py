"""A driver whose scheduler is a head elsewhere: ``sharedcompute.init(address=...)``.

::

    driver process                                        head
    ClusterClient ── SUBMIT / PUT / WAIT / RELEASE ──▶ its runtime: the driver is
       │   ▲          (a work connection)                 a worker that runs nothing
       │   └──── RESOLVED (key, ref named cluster-wide) ◀─┘
       │
       ├─ OwnerStore + TransferServer: the driver's own objects (puts, large arguments)
       │  stay here; the node that runs a task pulls them from here
       └─ Puller: ``result()`` pulls a value from the node that made it

The driver speaks the messages a worker speaks to its driver (``_protocol.Msg``):
the head's runtime keeps it as a worker with no slot in the scheduler, so its
submits, puts, waits and releases go through the same code as a nested task's.
Its keys are its own (the head gives it a worker id; keys carry it in their high
bits), so several drivers never collide; when it goes, the head releases what it
held, and only that. Its store is a node without workers in the head's table of
data servers, so its objects travel node to node like any other.

Every Future it makes is watched at once (``WAIT`` goes with the ``SUBMIT``), so
the head pushes each answer as soon as it exists. If the head goes away, every
pending Future fails with ``ConnectionError`` naming the head.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from typing import Any

from sharedcompute._cluster._messages import (
    AttachDriver,
    DriverAttached,
    ErrorReply,
    ForgetCopies,
    FreeObjects,
    FromWorker,
    MemoryRequest,
    NodeAddresses,
    Ping,
    Pong,
    StatusReply,
    StatusRequest,
    TimelineRequest,
    ToWorker,
)
from sharedcompute._cluster._server import ship_package
from sharedcompute._cluster._transfer import Puller, TransferServer
from sharedcompute._env import EnvResolver, Package
from sharedcompute._protocol import Msg
from sharedcompute._protocol._channel import Channel, connect
from sharedcompute._protocol._messages import map_refs
from sharedcompute._runtime._actor import ActorHandle, ActorOptions, public_methods
from sharedcompute._runtime._base import (
    DefaultScope,
    QueuedActorHolds,
    RuntimeBase,
    TaskOptions,
    options_to_wire,
    task_name,
)
from sharedcompute._runtime._future import Future, ValueRef, when_all_done
from sharedcompute._runtime._local import ThreadPool
from sharedcompute._runtime._stream import StreamClient, StreamState
from sharedcompute._scheduler import public_resources
from sharedcompute._serialization import serialize
from sharedcompute._store import (
    ObjectRef,
    OwnerStore,
    RemoteObject,
    StoredObject,
    ref_from_wire,
    ref_to_wire,
)
from sharedcompute.errors import SharedComputeError


class ClusterClient(StreamClient, QueuedActorHolds, DefaultScope, RuntimeBase):
    """The runtime of a driver connected to a cluster's head."""

    def __init__(self, address: str, token: str, *, store_capacity: int | None = None,
                 host: str | None = None, runtime_env: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.address = address
        self._token = token.encode()
        self._lock = threading.Lock()
        self._futures: dict[int, Future[Any]] = {}
        self._control: deque[tuple[Any, ...]] = deque()  # actor handle counts, to send
        self._client_streams: dict[int, StreamState] = {}  # generator tasks' streams
        # Callers waiting for a task to finish again (its result was on a node that died).
        self._rewaits: dict[int, list[concurrent.futures.Future[ObjectRef]]] = {}
        self._closed = False
        self.lost: BaseException | None = None
        self._own: dict[int, StoredObject] = {}  # objects put here, held for the head
        self._owner = OwnerStore(store_capacity)
        self.store = self._owner
        self._made: list[Any] = []
        try:
            self._connect(host)
            # Packed and shipped now: a directory too large fails init, not a later submit.
            self.envs = EnvResolver(runtime_env, self._ship_to_head, under=self._cluster_env)
        except BaseException:
            self._close_made()
            raise
        self._callbacks = ThreadPool(1, name="sharedcompute-callbacks")
        self._reader = threading.Thread(
            target=self._read, name="sharedcompute-driver-read", daemon=True
        )
        self._reader.start()
        self._beat_stop = threading.Event()
        self._beat_thread = threading.Thread(
            target=self._beat, name="sharedcompute-driver-heartbeat", daemon=True
        )
        self._beat_thread.start()

    def _ship_to_head(self, package: Package) -> int:
        return ship_package(self.address, self._token.decode(), package)

    def _connect(self, host: str | None) -> None:
        head_host, _, port = self.address.rpartition(":")
        self._channel: Channel = connect((head_host, int(port)), self._token)
        self._made.append(self._channel)
        here = host or self._channel.sock.getsockname()[0]
        self.transfer = TransferServer(self._owner, self._token, host=here)
        self._made.append(self.transfer)
        self._channel.sock.settimeout(30)
        self._channel.send(AttachDriver(self.transfer.address))
        reply, _ = self._channel.receive()
        if not isinstance(reply, DriverAttached):
            said = reply.message if isinstance(reply, ErrorReply) else repr(reply)
            raise ConnectionError(f"the head at {self.address} refused the driver: {said}")
        self._channel.sock.settimeout(None)
        self.node_id = reply.node_id
        self.worker_id = reply.worker_id
        self._cluster_env = reply.runtime_env
        self._next_key = self._key_counter((reply.worker_id + 1) << 40)
        # A second connection, for heartbeats only: a head that stops answering (a
        # stopped process, a cut network) fails this driver's Futures within its
        # node timeout, whatever the work connection is doing.
        self._pings: Channel = connect((head_host, int(port)), self._token)
        self._made.append(self._pings)
        self._pings.sock.settimeout(30)
        self._pings.send(Ping())
        pong, _ = self._pings.receive()
        if not isinstance(pong, Pong):
            raise ConnectionError(f"the head at {self.address} answered {pong!r} to a ping")
        self._heartbeat_s, self._head_timeout_s = pong.heartbeat_s, pong.node_timeout_s
        self._pings.sock.settimeout(self._head_timeout_s)
        self.puller = Puller(self._owner, self._token)
        self.puller.addresses.update(reply.addresses)
        self._made.append(self.puller)
        self._send_lock = threading.Lock()

    # -- what the head says (the reader thread) ----------------------------------------

    def _read(self) -> None:
        try:
            while True:
                message, _ = self._channel.receive()
                kind = type(message)
                if kind is ToWorker:
                    for answer in message.messages:
                        if answer[0] == Msg.RESOLVED:
                            self._resolved(answer)
                        elif answer[0] == Msg.STREAM_ITEM:
                            self.stream_item(answer)
                elif kind is ForgetCopies:
                    for node, object_id in message.names:
                        self.puller.forget(node, object_id)
                elif kind is FreeObjects:
                    self._free(message.object_ids)
                elif kind is NodeAddresses:
                    self.puller.addresses.update(message.addresses)
        except ConnectionError as error:
            if not self._closed:
                self._head_lost(error)

    def _beat(self) -> None:
        while not self._beat_stop.wait(self._heartbeat_s):
            try:
                self._pings.send(Ping())
                self._pings.receive()
            except (ConnectionError, OSError) as error:
                if not self._closed:
                    timed_out = isinstance(error, TimeoutError) or isinstance(
                        error.__cause__, TimeoutError)
                    silent = f"silent for {self._head_timeout_s:g} s" if timed_out else str(error)
                    self._head_lost(ConnectionError(silent))
                    self._channel.close()  # the reader stops too
                return

    def _resolved(self, message: tuple[Any, ...]) -> None:
        _, key, ok, payload = message
        with self._lock:
            waiters = self._rewaits.pop(key, ()) if self._rewaits else ()
            future = self._futures.pop(key, None)
        for waiter in waiters:
            if ok:
                waiter.set_result(ref_from_wire(payload))
            else:
                waiter.set_exception(payload)
        if future is None or future.done():
            return
        if ok:
            future.set_result(ValueRef(ref_from_wire(payload)))
        else:
            future.set_exception(payload)

    def _free(self, object_ids: Iterable[int]) -> None:
        with self._lock:
            refs = [self._own.pop(object_id, None) for object_id in object_ids]
        for ref in refs:
            if ref is not None:
                self.store.delete(ref)

    def _head_lost(self, error: BaseException) -> None:
        lost = ConnectionError(f"the head at {self.address} is gone: {error}")
        with self._lock:
            if self.lost is not None:
                return
            self.lost = lost
            pending = list(self._futures.values())
            self._futures.clear()
        for future in pending:
            if not future.done():
                future.set_exception(ConnectionError(*lost.args))

    # -- sending -----------------------------------------------------------------------------

    def _send(self, messages: list[tuple[Any, ...]]) -> None:
        if self.lost is not None:
            raise ConnectionError(*self.lost.args)
        if self._closed:
            raise RuntimeError("this runtime has been shut down")
        named = [map_refs(message, self._named) for message in messages]
        with self._send_lock:
            self._channel.send(FromWorker(self.worker_id, named))

    def _named(self, wire: tuple[Any, ...]) -> tuple[Any, ...]:
        """An object in this driver's store, as the cluster names it."""
        if len(wire) != 4:
            return wire
        object_id, _offset, nbytes, header = wire
        return (self.node_id, object_id, nbytes, header, None)

    def _hold_for_head(self, ref: ObjectRef) -> None:
        """The head now holds ``ref`` (the reference ``put`` took); it frees it."""
        if type(ref) is StoredObject:
            with self._lock:
                self._own[ref.object_id] = ref

    def _track(self, future: Future[Any]) -> None:
        with self._lock:
            if self.lost is not None:
                raise ConnectionError(*self.lost.args)
            self._futures[future.key] = future

    # -- the API -------------------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions, stream: StreamState | None = None,
    ) -> Future[Any]:
        if options.scheduler not in (None, "processes"):
            raise ValueError(f"scheduler={options.scheduler!r} runs in this process; a "
                             "driver connected to a cluster sends every task to it")
        env = self.task_env(options)  # before anything is stored: it may raise
        args_ref, deps = self.prepare_args(args, kwargs)
        fn_key, fn_bytes = self.functions.encode(fn)
        key = self._next_key()
        name = task_name(fn, options)
        future: Future[Any] = Future(self, key, name)
        self._track(future)
        self._hold_for_head(args_ref)
        if stream is not None:  # a generator: the head forwards its items (STREAM_ITEM)
            stream.key = key
            self._client_streams[key] = stream
        self._send([
            (Msg.SUBMIT, key, fn_key, fn_bytes, ref_to_wire(args_ref), tuple(deps),
             options_to_wire(options, env, name), None,
             None if stream is None else stream.backpressure),
            (Msg.WAIT, [key]),
        ])
        return future

    def put(self, value: Any) -> Future[Any]:
        ref = self.store.put_serialized(serialize(value))
        key = self._next_key()
        future: Future[Any] = Future(self, key, "put")
        future.set_result(ValueRef(ref))
        self._hold_for_head(ref)
        self._send([(Msg.PUT, key, ref_to_wire(ref))])
        return future

    def load(self, ref: ObjectRef, *, private: bool = False) -> Any:
        if type(ref) is RemoteObject:
            if ref.node == self.node_id:
                with self._lock:
                    own = self._own.get(ref.object_id)
                if own is None:
                    raise SharedComputeError(f"object {ref.object_id} of this driver was freed")
                ref = own
            else:
                ref = self.puller.pull(ref)
        return super().load(ref, private=private)

    def _made_again(self, key: int, lost: ObjectRef) -> ObjectRef | None:
        """The head's answer for the task once it has run again (its node died)."""
        waiter: concurrent.futures.Future[ObjectRef] = concurrent.futures.Future()
        with self._lock:
            self._rewaits.setdefault(key, []).append(waiter)
        self._send([(Msg.WAIT, [key])])
        return waiter.result()

    def cancel(self, future: Future[Any]) -> bool:
        self._send([(Msg.CANCEL, future.key)])
        return False

    # -- what an Executor on a cluster asks (``Executor(address=...)``) ----------------------

    broken: BaseException | None = None  # a cluster never breaks as a pool does

    @property
    def num_workers(self) -> int:
        """The CPUs of the cluster's live nodes (what a Dask graph is sized to)."""
        return max(1, int(self.cluster_resources().get("CPU", 1)))

    def cancel_pending(self) -> None:
        """Cancel every task not started yet (the head says which have)."""
        with self._lock:
            keys = list(self._futures)
        if keys and self.lost is None and not self._closed:
            self._send([(Msg.CANCEL, key) for key in keys])

    def wait_idle(self) -> None:
        """Return once no Future of this driver is pending."""
        while True:
            with self._lock:
                pending = list(self._futures.values())
            if not pending:
                return
            concurrent.futures.wait(pending)

    def defer_callbacks(self) -> bool:
        return threading.current_thread() is self._reader

    def call_soon(self, callback: Callable[[], None]) -> None:
        try:
            self._callbacks.submit(callback)
        except RuntimeError:
            callback()

    def _flush_releases(self) -> None:
        keys = []
        while self._released:
            keys.append(self._released.popleft())
        messages: list[tuple[Any, ...]] = [(Msg.RELEASE, keys)] if keys else []
        while self._control:
            messages.append(self._control.popleft())
        if messages and not self._closed and self.lost is None:
            # From a finalizer, maybe mid-send in this very thread: never wait for the lock.
            if self._send_lock.acquire(blocking=False):
                try:
                    self._channel.send(FromWorker(self.worker_id, messages))
                except ConnectionError:
                    pass
                finally:
                    self._send_lock.release()
            else:
                self._released.extend(keys)
                self._control.extendleft(reversed(messages[1 if keys else 0:]))

    def _releases_pending(self) -> bool:
        return bool(self._released or self._control) and (
            threading.current_thread() is not self._reader
        )

    # -- actors: the head keeps them; this driver holds handles ------------------------------

    def create_actor(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any],
                     options: ActorOptions) -> ActorHandle:
        """Ask the head to start the actor; waits for its answer unless arguments are pending.

        With Future arguments not done yet, the request goes once they are (errors then
        reach the actor's calls, as ``ActorDiedError``).
        """
        options = replace(options, runtime_env=self.envs.resolve(options.runtime_env))
        args_ref, deps = self.prepare_args(args, kwargs)
        cls_key, cls_bytes = self.functions.encode(cls)
        actor_id, reply_key = self._next_key(), self._next_key()
        methods = public_methods(cls)
        reply: Future[Any] = Future(self, reply_key, "create_actor")
        self._track(reply)
        self._hold_for_head(args_ref)
        request = (
            Msg.CREATE_ACTOR, reply_key, actor_id, cls_key, cls_bytes, ref_to_wire(args_ref),
            tuple(deps), tuple(getattr(options, f.name) for f in fields(options)),
            cls.__qualname__, methods,
        )
        handle = ActorHandle(self, actor_id, cls.__qualname__, methods)
        pending = [future for future in deps.values() if not future.done()]
        if pending:
            when_all_done(pending, lambda: self._send([request]))
        else:
            self._send([request])
            reply.result()  # raises what the head raised (a taken name, no node to fit it)
        return handle

    def get_actor(self, name: str) -> ActorHandle:
        reply_key = self._next_key()
        reply: Future[Any] = Future(self, reply_key, "get_actor")
        self._track(reply)
        self._send([(Msg.GET_ACTOR, reply_key, name)])
        actor_id, class_name, methods = reply.result()
        return ActorHandle(self, actor_id, class_name, methods)

    def kill(self, handle: ActorHandle, *, no_restart: bool = True) -> None:
        self._send([(Msg.KILL_ACTOR, handle.actor_id, no_restart)])

    def submit_actor_call(
        self, actor_id: int, class_name: str, method: str, args: tuple[Any, ...],
        kwargs: dict[str, Any], stream: StreamState | None = None,
    ) -> Future[Any]:
        args_ref, deps = self.prepare_args(args, kwargs)
        key = self._next_key()
        future: Future[Any] = Future(self, key, f"{class_name}.{method}")
        self._track(future)
        self._hold_for_head(args_ref)
        if stream is not None:  # a generator method: the head forwards its items
            stream.key = key
            self._client_streams[key] = stream
        self._send([
            (Msg.SUBMIT_CALL, key, actor_id, class_name, method, ref_to_wire(args_ref),
             tuple(deps), None if stream is None else stream.backpressure),
            (Msg.WAIT, [key]),
        ])
        return future

    # -- the cluster -------------------------------------------------------------------------

    def status(self) -> StatusReply:
        from sharedcompute._cluster._server import request

        reply: StatusReply = request(self.address, self._token.decode(), StatusRequest())
        return reply

    def node_table(self) -> list[dict[str, Any]]:
        return [node.as_dict() for node in self.status().nodes]

    def timeline_trace(self) -> dict[str, Any]:
        """The head's timeline: every node's workers."""
        from sharedcompute._cluster._server import request

        reply = request(self.address, self._token.decode(), TimelineRequest(), timeout=60)
        trace: dict[str, Any] = reply.trace
        return trace

    def memory_summary(self) -> str:
        """The head's memory report, then this driver's own store (its puts)."""
        from sharedcompute._cluster._server import request
        from sharedcompute._memory import size

        reply = request(self.address, self._token.decode(), MemoryRequest())
        stats = self._owner.stats()
        return (f"{reply.text}\n\nthis driver (node {self.node_id}): "
                f"{size(stats['used_bytes'])} in its store ({stats['num_objects']} objects put)")

    def cluster_resources(self) -> dict[str, float]:
        return _summed(node.resources for node in self.status().nodes if node.alive)

    def available_resources(self) -> dict[str, float]:
        return _summed(node.available for node in self.status().nodes if node.alive)

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Leave the cluster: the head frees this driver's tasks and objects."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._futures.values())
            self._futures.clear()
        self._beat_stop.set()
        self._close_made()
        self._reader.join(10)
        self._beat_thread.join(10)
        self._callbacks.close()
        for future in pending:
            future._cancel_now()

    def _close_made(self) -> None:
        for thing in reversed(self._made):
            thing.close()
        self._made.clear()
        self.store.close()


def _summed(pools: Iterable[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for pool in pools:
        for name, amount in public_resources(pool).items():
            total[name] = total.get(name, 0.0) + amount
    return total

