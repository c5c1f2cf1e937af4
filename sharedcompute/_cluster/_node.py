"""A node: a host's worker pool, store and transfer server, joined to a head.

::

    head ══ control connection ══ heartbeat thread     (RegisterNode, Heartbeat)
         ══ work connection ═════ reader thread ──▶ Localizer ──▶ workers (AF_UNIX)
                                       ▲                │ pulls ──▶ other nodes' TransferServer
                              pool I/O thread ◀── DONE, SUBMIT, PUT ... ◀── workers
    other nodes ══ data connections ══▶ TransferServer (this node's objects)

It registers with the head (``RegisterNode``: its address, resources, workers,
store and transfer server), then a thread of its own says every ``heartbeat_s``
that it lives (``Heartbeat``, with what it has free, and its workers' CPU and
memory for the head's dashboard) and waits for the head's answer: no answer
within ``node_timeout_s`` means the head is gone (``lost`` is set, and
``sharedcompute start --address --block`` exits). Both sides thus learn of the
other's death within the timeout, whatever the cause.

A second connection carries the work: the head starts workers here
(``StartWorkers``, with ids it chose) and sends them messages (``ToWorker``); the
node makes every object they name local (``Localizer``) and relays what its
workers say back (``FromWorker``), naming the objects they made as this node's
(``RemoteObject``): results stay here until the head frees them (``FreeObjects``)
or another node pulls a copy. There is no scheduler here: the head decides.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any

from sharedcompute._cluster._localize import Localizer, failure_answer
from sharedcompute._cluster._messages import (
    AttachWork,
    ErrorReply,
    FetchPackage,
    ForgetCopies,
    FreeObjects,
    FromWorker,
    Heartbeat,
    KillWorker,
    NodeAddresses,
    PackageData,
    Registered,
    RegisterNode,
    StartWorkers,
    ToWorker,
    WorkAttached,
    WorkerExited,
    WorkerProcess,
)
from sharedcompute._cluster._server import request_with_buffers
from sharedcompute._cluster._transfer import Puller, TransferServer
from sharedcompute._env import PackageCache
from sharedcompute._protocol import ConnectionClosed, Msg
from sharedcompute._protocol._channel import Channel, connect
from sharedcompute._protocol._messages import map_refs
from sharedcompute._runtime._meter import ProcessMeter
from sharedcompute._runtime._pool import ProcessPool, WorkerHandle
from sharedcompute._store import OwnerStore, StoredObject, ref_from_wire

ATTACH_TIMEOUT = 30.0


class Node:
    def __init__(
        self, head_address: str, token: str, *, num_workers: int | None = None,
        resources: dict[str, float] | None = None, store_capacity: int | None = None,
        host: str | None = None,
    ) -> None:
        self.head_address = head_address
        self.host = host
        self.num_workers = num_workers if num_workers is not None else os.cpu_count() or 1
        self.resources = {"CPU": float(self.num_workers), **(resources or {})}
        self.lost = threading.Event()
        self.lost_reason = ""
        self._closed = False
        self._own: dict[int, StoredObject] = {}  # objects made here that the head knows of
        self._own_lock = threading.Lock()
        self.store = OwnerStore(store_capacity)
        self._made: list[Any] = []  # what to close, last first, if setting up fails
        try:
            self._setup(token.encode())
        except BaseException:
            self._close_made()
            raise
        self._stop = threading.Event()
        self._attached = threading.Event()
        self._meter = ProcessMeter()  # the heartbeat thread's alone
        self._thread = threading.Thread(
            target=self._beat, name="sharedcompute-node-heartbeat", daemon=True
        )
        self._thread.start()
        self._reader = threading.Thread(
            target=self._read_work, name="sharedcompute-node-work", daemon=True
        )
        self._reader.start()
        if not self._attached.wait(ATTACH_TIMEOUT):
            self.close()
            raise ConnectionError(
                f"the head at {self.head_address} did not take this node's workers within "
                f"{ATTACH_TIMEOUT:g} s" + (f": {self.lost_reason}" if self.lost_reason else "")
            )

    def _setup(self, token: bytes) -> None:
        host, _, port = self.head_address.rpartition(":")
        self._channel = connect((host, int(port)), token)
        self._made.append(self._channel)
        self._channel.sock.settimeout(30)
        # Where other nodes reach this one: as told, or the address the head sees us at.
        here = self.host or self._channel.sock.getsockname()[0]
        self.transfer = TransferServer(self.store, token, host=here)
        self._made.append(self.transfer)
        self._channel.send(RegisterNode(
            address=here, resources=self.resources, workers=self.num_workers,
            store_capacity=self.store.capacity, data_address=self.transfer.address,
        ))
        reply, _ = self._channel.receive()
        if not isinstance(reply, Registered):
            message = reply.message if isinstance(reply, ErrorReply) else repr(reply)
            raise ConnectionError(f"the head at {self.head_address} refused the node: {message}")
        self.node_id = reply.node_id
        self._heartbeat_s = reply.heartbeat_s
        self._channel.sock.settimeout(reply.node_timeout_s)
        self.puller = Puller(self.store, token)
        self._made.append(self.puller)
        self.localizer = Localizer(
            self.node_id, self.puller, self._own, self._send_local, self._undeliverable
        )
        self._made.append(self.localizer)
        self._packages: PackageCache | None = None
        self._packages_lock = threading.Lock()
        self._token_text = token.decode()
        self.pool = ProcessPool(self.store.address, self._relay, self._exited,
                                packages=self.packages, node=self.node_id)
        self._made.append(self.pool)
        self._work: Channel = connect((host, int(port)), token)
        self._made.append(self._work)
        self._work_lock = threading.Lock()
        self._work.send(AttachWork(self.node_id))

    # -- runtime_env packages -----------------------------------------------------------------

    def packages(self) -> PackageCache:
        """This node's packages (made on first use), fetched from the head as needed."""
        with self._packages_lock:
            if self._packages is None:
                self._packages = PackageCache(self._fetch_package, where=f"node {self.node_id}")
                self._made.insert(0, self._packages)  # closed last, after the pool
            return self._packages

    def _fetch_package(self, package: str) -> bytes:
        reply, buffers = request_with_buffers(
            self.head_address, self._token_text, FetchPackage(package), timeout=300
        )
        if not isinstance(reply, PackageData) or len(buffers) != 1:
            raise ConnectionError(f"the head answered {reply!r} to a package request")
        return bytes(buffers[0])

    # -- the head's work --------------------------------------------------------------------

    def _read_work(self) -> None:
        try:
            while True:
                message, _ = self._work.receive()
                kind = type(message)
                if kind is ToWorker:
                    self._to_worker(message.worker_id, message.messages)
                elif kind is StartWorkers:
                    for worker_id in message.worker_ids:
                        self.pool.spawn(worker_id, message.env)
                elif kind is KillWorker:
                    victim = self.pool.workers.get(message.worker_id)
                    if victim is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(victim.pid, signal.SIGKILL)
                elif kind is FreeObjects:
                    self._free(message.object_ids)
                elif kind is ForgetCopies:
                    for node, object_id in message.names:
                        self.localizer.forget(node, object_id)
                elif kind is WorkAttached:
                    self._attached.set()
                elif kind is NodeAddresses:
                    self.puller.addresses.update(message.addresses)
                    for gone in set(self.puller.addresses) - set(message.addresses):
                        self.puller.forget_node(gone)
        except ConnectionError as error:
            if not self._closed:
                self.lost_reason = f"the head at {self.head_address} is gone: {error}"
                self.lost.set()

    def _to_worker(self, worker_id: int, messages: list[tuple[Any, ...]]) -> None:
        worker = self.pool.workers.get(worker_id)
        if worker is None:
            return  # it died; the head hears of it (WorkerExited)
        self.localizer.deliver(worker, messages)
        for message in messages:
            if message[0] == Msg.DROP:  # it must read before its queue
                worker.running.urgent_sent()

    def _send_local(self, worker: WorkerHandle, messages: list[tuple[Any, ...]]) -> None:
        with contextlib.suppress(ConnectionClosed):
            worker.conn.send_many(messages)

    def _undeliverable(self, worker: WorkerHandle, message: tuple[Any, ...],
                       error: BaseException) -> None:
        answer = failure_answer(message, error)
        if answer is not None:
            self._to_head(FromWorker(worker.id, [answer]))

    def _free(self, object_ids: tuple[int, ...]) -> None:
        with self._own_lock:
            refs = [self._own.pop(object_id, None) for object_id in object_ids]
        for ref in refs:
            if ref is not None:
                self.store.delete(ref)

    # -- what the workers say (the pool's I/O thread) -------------------------------------

    def _relay(self, worker: WorkerHandle, messages: list[tuple[Any, ...]]) -> None:
        relayed = []
        for message in messages:
            if message[0] == Msg.READY:
                worker.ready = True
                worker.store_client = message[2]
                message = (Msg.READY, message[1], None)  # its store is not the head's
            else:
                message = map_refs(message, self._name_for_head)
            relayed.append(message)
        self._to_head(FromWorker(worker.id, relayed))

    def _name_for_head(self, wire: tuple[Any, ...]) -> tuple[Any, ...]:
        """A worker's new object, taken by this node and named cluster-wide."""
        if len(wire) != 4:
            return wire
        ref = ref_from_wire(wire)
        assert isinstance(ref, StoredObject)
        self.store.adopt(ref)
        with self._own_lock:
            self._own[ref.object_id] = ref
        return (self.node_id, ref.object_id, ref.nbytes, ref.header, None)

    def _exited(self, worker: WorkerHandle, reason: str) -> None:
        if worker.store_client is not None:
            self.store.drop_deliveries(worker.store_client)
        self.localizer.worker_gone(worker.id)
        self.pool.workers.pop(worker.id, None)
        self._to_head(WorkerExited(worker.id, reason, worker.running.get(), worker.ready))

    def _to_head(self, message: Any) -> None:
        with self._work_lock:
            try:
                self._work.send(message)
            except ConnectionError:
                pass  # the reader notices, and the node stops

    # -- heartbeats ---------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            workers = self._worker_processes()
            try:
                stats = self.store.stats()
                self._channel.send(Heartbeat(self.node_id, {}, stats["used_bytes"], workers))
                reply, _ = self._channel.receive()
            except (ConnectionError, OSError) as error:
                if not self._stop.is_set():
                    self.lost_reason = f"the head at {self.head_address} is gone: {error}"
                    self.lost.set()
                return
            if isinstance(reply, ErrorReply):
                self.lost_reason = f"the head at {self.head_address} dropped us: {reply.message}"
                self.lost.set()
                return

    def _worker_processes(self) -> tuple[WorkerProcess, ...]:
        """This node's workers' processes, read now (a few /proc reads per worker)."""
        pids = {worker_id: worker.pid for worker_id, worker in dict(self.pool.workers).items()}
        try:
            readings = self._meter.read(pids.values())
        except Exception as error:  # a dashboard's figures are not worth the node's heartbeat
            print(f"sharedcompute node: reading the workers' processes: {error}", file=sys.stderr)
            readings = {}
        return tuple(
            WorkerProcess(worker_id, pid, *readings.get(pid, (None, None)))
            for worker_id, pid in pids.items()
        )

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        self._close_made()
        self._thread.join(10)
        self._reader.join(10)

    def _close_made(self) -> None:
        for thing in reversed(self._made):
            try:
                thing.close()
            except Exception as error:  # go on: the rest must still close
                print(f"sharedcompute node: closing {type(thing).__name__}: {error}",
                      file=sys.stderr)
        self._made.clear()
        self.store.close()
