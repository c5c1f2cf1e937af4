"""The head's side of its nodes: their workers in its runtime, their objects, its links.

::

    head process                                                    node process
    Runtime ── core: Dispatch(worker 7) ──▶ RemoteWorker 7 .conn ─┐
       ▲                                                          │  ToWorker(7, [RUN ...])
       │ worker_said / worker_exited          NodeLink ◀──────────┴── work connection ──▶ pool
       └────────────────────────────── reader thread ◀── FromWorker(7, [DONE ...]) ◀───────┘

A node's workers are workers of the head's runtime (``RemoteWorker``: the same
bookkeeping as a local process, with a connection that is a link to the node),
so the driver code that schedules local workers schedules them, unchanged.

Objects are named cluster-wide on a link: the head's own objects leave as
``RemoteObject(node 0, ...)``; a node's results arrive as its ``RemoteObject``.
The values stay where they were made. When the core frees an object,
``freed`` tells the node that holds it, and every node (the head too) drops the
copy it may have pulled. The head's own workers get their messages through a
``Localizer`` that pulls what they need from other nodes first.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import defaultdict
from typing import Any

from sharedcompute._cluster._localize import Localizer, failure_answer
from sharedcompute._cluster._messages import (
    DriverAttached,
    ForgetCopies,
    FreeObjects,
    FromWorker,
    KillWorker,
    NodeAddresses,
    StartWorkers,
    ToWorker,
    WorkAttached,
    WorkerExited,
)
from sharedcompute._cluster._transfer import Puller, TransferServer
from sharedcompute._env import Env
from sharedcompute._protocol import ConnectionClosed
from sharedcompute._protocol._channel import Channel
from sharedcompute._protocol._messages import map_refs
from sharedcompute._runtime._driver import Runtime
from sharedcompute._runtime._pool import WorkerSlot
from sharedcompute._scheduler import NO_TASK
from sharedcompute._store import ObjectRef, RemoteObject, StoredObject

HEAD_NODE = 0


def _named_here(wire: tuple[Any, ...]) -> tuple[Any, ...]:
    """A reference into the head's store, as other nodes name it."""
    if len(wire) == 4:
        object_id, _offset, nbytes, header = wire
        return (HEAD_NODE, object_id, nbytes, header, None)
    return wire


class _Reported:
    """The task a remote worker was executing when it died, as its node reported it."""

    def __init__(self) -> None:
        self.key = NO_TASK

    def get(self) -> int:
        return self.key

    def urgent_sent(self, count: int = 1) -> None:
        """Its node tells the worker itself, when it relays the DROP."""


class NodeLink:
    """The head's work connection to one node."""

    def __init__(self, node_id: int, channel: Channel, address: str) -> None:
        self.node_id = node_id
        self.channel = channel
        self.address = address
        self.workers: dict[int, WorkerSlot] = {}
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, message: Any) -> None:
        with self._send_lock:
            if self.closed:
                raise ConnectionClosed(f"node {self.node_id} is gone")
            try:
                self.channel.send(message)
            except ConnectionError as error:
                raise ConnectionClosed(f"node {self.node_id}: {error}") from error

    def new_worker(self, worker_id: int) -> WorkerSlot:
        worker = WorkerSlot(worker_id, _WorkerConn(self, worker_id), _Reported(), node=self.node_id)
        self.workers[worker_id] = worker
        return worker

    def close(self) -> None:
        # Not under the send lock: a send blocked on a node that stopped reading holds
        # it; shutting the socket down is what ends that send (with an error).
        self.closed = True
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        self.channel.close()


class _WorkerConn:
    """A remote worker's connection: its messages go to its node, in order."""

    def __init__(self, link: NodeLink, worker_id: int) -> None:
        self.link = link
        self.worker_id = worker_id

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_many([message])

    def send_many(self, messages: Any) -> None:
        converted = [map_refs(message, _named_here) for message in messages]
        self.link.send(ToWorker(self.worker_id, converted))


class ClusterHost:
    """What the head's runtime reaches other nodes through (``Runtime.cluster``)."""

    def __init__(self, runtime: Runtime, token: bytes, host: str) -> None:
        self.runtime = runtime
        self.lost_input_recheck_s = 6.0  # the head sets it from its node timeout
        store = runtime.store
        self.transfer = TransferServer(store, token, host=host)
        self.puller = Puller(store, token)
        self.localizer = Localizer(
            HEAD_NODE, self.puller, {}, self._send_here, self._undeliverable
        )
        self._lock = threading.Lock()
        self.links: dict[int, NodeLink] = {}
        self.data_addresses: dict[int, str] = {HEAD_NODE: self.transfer.address}
        runtime.cluster = self

    # -- nodes ------------------------------------------------------------------------------

    def attach(self, node_id: int, channel: Channel, resources: dict[str, float],
               workers: int, data_address: str) -> NodeLink:
        """A registered node opened its work connection: give it workers, then serve it."""
        link = NodeLink(node_id, channel, channel.peer)
        with self._lock:
            self.links[node_id] = link
            self.data_addresses[node_id] = data_address
            self.puller.addresses[node_id] = data_address
        ids = [self.runtime.new_worker_id() for _ in range(workers)]
        slots = [link.new_worker(worker_id) for worker_id in ids]
        self._broadcast_addresses()
        link.send(StartWorkers(tuple(ids)))  # before any task for them
        self.runtime.add_node(node_id, resources, slots)
        link.send(WorkAttached())
        return link

    def serve(self, link: NodeLink) -> str:
        """Read what the node's workers say until the connection ends; return why it ended."""
        runtime = self.runtime
        try:
            while True:
                message, _ = link.channel.receive()
                if type(message) is FromWorker:
                    worker = link.workers.get(message.worker_id)
                    if worker is not None:
                        runtime.worker_said(worker, message.messages)
                elif type(message) is WorkerExited:
                    gone = link.workers.pop(message.worker_id, None)
                    if gone is not None:
                        assert isinstance(gone.running, _Reported)
                        gone.running.key = message.executing
                        gone.ready = message.ready
                        runtime.worker_exited(gone, message.reason)
                else:
                    raise ConnectionError(f"unexpected {type(message).__name__} from a node")
        except ConnectionError as error:
            return str(error)

    def attach_driver(self, node_id: int, channel: Channel, data_address: str,
                      runtime_env: Env | None = None) -> NodeLink:
        """A driver connected: it submits as a worker would, and its store serves its objects."""
        link = NodeLink(node_id, channel, channel.peer)
        worker = link.new_worker(self.runtime.new_worker_id())
        with self._lock:
            self.links[node_id] = link
            self.data_addresses[node_id] = data_address
            self.puller.addresses[node_id] = data_address
            addresses = dict(self.data_addresses)
        self.runtime.add_driver(worker)
        link.send(DriverAttached(node_id, worker.id, addresses, runtime_env))
        self._broadcast_addresses()
        return link

    def driver_lost(self, link: NodeLink) -> None:
        """A driver left (or its connection broke): what it held is released, only that."""
        with self._lock:
            self.links.pop(link.node_id, None)
            self.data_addresses.pop(link.node_id, None)
        link.close()
        for worker in list(link.workers.values()):
            self.runtime.remove_driver(worker)
        self.puller.forget_node(link.node_id)
        self._broadcast_addresses()

    def node_lost(self, node_id: int, reason: str) -> None:
        with self._lock:
            link = self.links.pop(node_id, None)
            self.data_addresses.pop(node_id, None)
        if link is None:
            return
        link.close()
        self.puller.forget_node(node_id)
        self.runtime.remove_node(node_id, reason)
        self._broadcast_addresses()

    def _broadcast_addresses(self) -> None:
        with self._lock:
            links = list(self.links.values())
            message = NodeAddresses(dict(self.data_addresses))
        for link in links:
            with contextlib.suppress(ConnectionClosed):
                link.send(message)

    # -- what the runtime asks (NodeHost) --------------------------------------------------

    def deliver(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        try:
            if worker.node:
                worker.conn.send_many(messages)  # its node makes the objects local
            else:
                self.localizer.deliver(worker, messages)
        except ConnectionClosed:
            pass  # the node is gone: its loss sends the tasks elsewhere

    def spawn(self, node: int, worker_id: int, env: Env | None = None) -> WorkerSlot | None:
        link = self.links.get(node)
        if link is None:
            return None
        worker = link.new_worker(worker_id)
        worker.env = env
        try:
            link.send(StartWorkers((worker_id,), env))
        except ConnectionClosed:
            link.workers.pop(worker_id, None)
            return None
        return worker

    def freed(self, refs: list[ObjectRef]) -> None:
        owned: defaultdict[int, list[int]] = defaultdict(list)
        names: list[tuple[int, int]] = []
        for ref in refs:
            if type(ref) is RemoteObject:
                owned[ref.node].append(ref.object_id)
                names.append((ref.node, ref.object_id))
                self.localizer.forget(ref.node, ref.object_id)
            elif type(ref) is StoredObject:
                names.append((HEAD_NODE, ref.object_id))
        with self._lock:
            links = list(self.links.values())
        if not links or not names:
            return
        forget = ForgetCopies(tuple(names))
        for link in links:
            with contextlib.suppress(ConnectionClosed):
                ids = owned.get(link.node_id)
                if ids:
                    link.send(FreeObjects(tuple(ids)))
                link.send(forget)

    def pull(self, ref: RemoteObject) -> StoredObject:
        return self.puller.pull(ref)

    def kill(self, worker: WorkerSlot) -> None:
        link = self.links.get(worker.node)
        if link is not None:
            with contextlib.suppress(ConnectionClosed):
                link.send(KillWorker(worker.id))

    # -- the head's own workers ------------------------------------------------------------

    @staticmethod
    def _send_here(worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        with contextlib.suppress(ConnectionClosed):
            worker.conn.send_many(messages)

    def _undeliverable(self, worker: WorkerSlot, message: tuple[Any, ...],
                       error: BaseException) -> None:
        answer = failure_answer(message, error)
        if answer is not None:
            self.runtime.worker_said(worker, [answer])

    def close(self) -> None:
        with self._lock:
            links = list(self.links.values())
            self.links.clear()
        for link in links:
            link.close()
        self.runtime.cluster = None

    def close_data(self) -> None:
        """After the runtime: no pull or transfer is needed any more."""
        self.localizer.close()
        self.puller.close()
        self.transfer.close()
