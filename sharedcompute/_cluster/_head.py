"""The head: a runtime that also answers authenticated requests over TCP.

::

    sharedcompute status ──TCP──▶ accept thread ──▶ one thread per connection
                                     │                 handshake (token, 10 s)
                                     │                 receive request ─▶ handler ─▶ reply
                                  Runtime (the head's own node: workers, store, core)

What it serves: the head's own node (``start --head`` runs one, as
``ray start --head`` does), status requests, and nodes that join
(``RegisterNode``) and then say they live (``Heartbeat``, answered so that they
know the head lives too; each carries the node's workers' pid, CPU and memory,
kept per live node for the dashboard: ``worker_processes``). A node silent for
``node_timeout`` seconds, or whose connection drops, is dead from then on: its
tasks rerun elsewhere under their retries; one that comes back registers anew,
with a new id. A registered node opens a second connection for its workers'
traffic (``AttachWork``), served by ``ClusterHost`` (``_links``): the head's
scheduler places tasks on its workers.

Requests and replies are typed (``_messages``), one handler per request type.
A connection that fails the handshake is logged once with its address and
closed; nothing it sent is unpickled.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sharedcompute._cluster._links import ClusterHost, NodeLink
from sharedcompute._cluster._messages import (
    AttachDriver,
    AttachWork,
    ClusterEnvSet,
    ErrorReply,
    FetchPackage,
    HasPackage,
    Heartbeat,
    HeartbeatAck,
    MemoryReply,
    MemoryRequest,
    NodeInfo,
    PackageData,
    PackageStatus,
    Ping,
    Pong,
    Registered,
    RegisterNode,
    SetClusterEnv,
    ShipPackage,
    StatusReply,
    StatusRequest,
    TimelineReply,
    TimelineRequest,
    WorkerProcess,
)
from sharedcompute._cluster._server import ThreadedServer
from sharedcompute._env import Env
from sharedcompute._protocol._channel import Channel
from sharedcompute._runtime._driver import Runtime
from sharedcompute._scheduler import PINS_PER_NODE, node_resource, public_resources

HEARTBEAT_SECONDS = 1.0
NODE_TIMEOUT_SECONDS = 5.0


@dataclass
class _Connection:
    """What the head knows of one connection: the node it registered, if any."""

    sock: socket.socket
    peer: str
    node_id: int | None = None


@dataclass
class _RemoteNode:
    info: NodeInfo
    last_seen: float
    connection: _Connection
    data_address: str
    attached: bool = False
    workers: tuple[WorkerProcess, ...] = ()  # as its latest heartbeat read them
    lost: bool = False  # declared dead (its info says so once the runtime knows)


class Head(ThreadedServer):
    """A runtime plus the control server, on ``host:port`` (port 0: any free one)."""

    def __init__(
        self, token: str, *, host: str = "127.0.0.1", port: int = 6380,
        num_workers: int | None = None, resources: dict[str, float] | None = None,
        store_capacity: int | None = None, node_timeout: float = NODE_TIMEOUT_SECONDS,
    ) -> None:
        self.node_timeout = node_timeout
        self._nodes: dict[int, _RemoteNode] = {}
        self._next_node_id = 1
        self.cluster_env: Env | None = None  # under every driver's (sharedcompute launch)
        self.runtime = Runtime(
            num_workers=num_workers, resources=resources, store_capacity=store_capacity
        )
        try:
            super().__init__("head", token.encode(), host, port)
        except OSError:
            self.runtime.shutdown()
            raise
        try:
            self.cluster = ClusterHost(self.runtime, self._token, self.address.rpartition(":")[0])
        except BaseException:
            self._listener.close()
            self.runtime.shutdown()
            raise
        self._handlers: dict[type, Callable[[Any, _Connection], Any]] = {
            StatusRequest: self._status, RegisterNode: self._register, Heartbeat: self._heartbeat,
            Ping: lambda _, __: Pong(HEARTBEAT_SECONDS, self.node_timeout),
            HasPackage: self._has_package, SetClusterEnv: self._set_cluster_env,
            MemoryRequest: self._memory,
            TimelineRequest: lambda _, __: TimelineReply(self.runtime.timeline_trace()),
        }
        self.start()
        self._stop_watch = threading.Event()
        self._watch_thread = threading.Thread(
            target=self._watch_nodes, name="sharedcompute-head-watch", daemon=True
        )
        self._watch_thread.start()

    # -- requests ---------------------------------------------------------------------------

    def status(self) -> StatusReply:
        return self._status(StatusRequest(), None)

    def _status(self, _: StatusRequest, __: _Connection | None) -> StatusReply:
        nodes = [NodeInfo(**node) for node in self.runtime.node_table(self.address)]
        with self.runtime._lock:
            table = self.runtime.core.nodes
            available = {n: dict(table[n].available) for n in self._nodes if n in table}
        with self._lock:
            for node_id, remote in sorted(self._nodes.items()):
                info = remote.info
                if info.alive:
                    info = replace(info, available=public_resources(available.get(node_id, {})))
                nodes.append(info)
        return StatusReply(nodes=nodes, tasks=self.runtime.core.counts())

    def _memory(self, _: MemoryRequest, __: _Connection) -> MemoryReply:
        others = [node.as_dict() for node in self.status().nodes if node.node_id]
        return MemoryReply(self.runtime.memory_summary(self.address, others))

    def _register(self, request: RegisterNode, connection: _Connection) -> Registered:
        with self._lock:
            node_id = self._next_node_id
            self._next_node_id += 1
            info = NodeInfo(
                node_id=node_id, address=request.address, alive=True,
                resources=public_resources(request.resources),
                available=public_resources(request.resources),
                store_used=0, store_capacity=request.store_capacity, workers=request.workers,
            )
            self._nodes[node_id] = _RemoteNode(
                info, time.monotonic(), connection, request.data_address
            )
            connection.node_id = node_id
        print(f"sharedcompute head: node {node_id} joined from {connection.peer} "
              f"({request.workers} workers, {request.resources})", file=sys.stderr)
        return Registered(node_id, HEARTBEAT_SECONDS, self.node_timeout)

    def _heartbeat(self, request: Heartbeat, connection: _Connection) -> Any:
        with self._lock:
            remote = self._nodes.get(request.node_id)
            if remote is None or remote.connection is not connection or not remote.info.alive:
                return ErrorReply(f"node {request.node_id} is not alive here; register anew")
            remote.last_seen = time.monotonic()
            remote.info = replace(remote.info, store_used=request.store_used)
            remote.workers = request.workers
        return HeartbeatAck()

    def worker_processes(self) -> dict[int, WorkerProcess]:
        """The processes of the live nodes' workers, by worker id (this head's own are the
        runtime's, not here), as their nodes' latest heartbeats read them."""
        with self._lock:
            return {
                process.worker_id: process
                for remote in self._nodes.values() if remote.info.alive
                for process in remote.workers
            }

    # -- runtime_env packages: drivers ship them here, nodes fetch them from here -----------------

    def _has_package(self, request: HasPackage, _: _Connection) -> PackageStatus:
        return PackageStatus(self.runtime.packages().has(request.package))

    def _ship_package(self, request: ShipPackage, buffers: list[Any]) -> Any:
        if len(buffers) != 1:
            return ErrorReply(f"ShipPackage carries one buffer, not {len(buffers)}")
        self.runtime.packages().add(request.package, buffers[0], pin=True)
        return PackageStatus(True)

    def _set_cluster_env(self, request: SetClusterEnv, _: _Connection) -> Any:
        if request.env is not None and not isinstance(request.env, Env):
            return ErrorReply(f"SetClusterEnv carries an Env, not {type(request.env).__name__}")
        missing = self.runtime.packages().missing(request.env.packages) if request.env else []
        if missing:
            return ErrorReply(f"the cluster's runtime_env names packages never shipped: {missing}")
        self.cluster_env = request.env
        return ClusterEnvSet()

    def _fetch_package(self, request: FetchPackage) -> tuple[Any, list[bytes]]:
        data = self.runtime.packages().read(request.package)
        return PackageData(request.package), [data]

    def _node_lost(self, node_id: int, reason: str) -> None:
        with self._lock:
            remote = self._nodes.get(node_id)
            if remote is None or remote.lost or not remote.info.alive:
                return
            remote.lost = True
            sock = remote.connection.sock
        print(f"sharedcompute head: node {node_id} is dead: {reason}", file=sys.stderr)
        self.cluster.node_lost(node_id, f"node {node_id} ({remote.info.address}) died: {reason}")
        # Shown dead only now: whoever sees that (``status()``) and asks for a value that
        # lived there finds its task already running again, not the lost copy.
        with self._lock:
            remote.info = replace(remote.info, alive=False, available={}, workers=0)
            remote.workers = ()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # its serving thread ends too
        except OSError:
            pass

    def _watch_nodes(self) -> None:
        """Declare dead the nodes silent for ``node_timeout`` (a thread of its own)."""
        while not self._stop_watch.wait(min(0.5, self.node_timeout / 4)):
            now = time.monotonic()
            with self._lock:
                silent = [
                    node_id for node_id, remote in self._nodes.items()
                    if remote.info.alive and now - remote.last_seen > self.node_timeout
                ]
            for node_id in silent:
                self._node_lost(node_id, f"silent for more than {self.node_timeout:g} s")

    # -- the server -------------------------------------------------------------------------

    def serve(self, channel: Channel) -> None:
        connection = _Connection(channel.sock, channel.peer)
        try:
            while True:
                request, buffers = channel.receive()
                if type(request) is ShipPackage or type(request) is FetchPackage:
                    self._package_request(channel, request, buffers)
                    continue
                if type(request) is AttachWork:
                    self._serve_work(request.node_id, channel)
                    return
                if type(request) is AttachDriver:
                    self._serve_driver(request, channel)
                    return
                channel.send(self._answer(request, connection))
        finally:
            if connection.node_id is not None:
                self._node_lost(connection.node_id,
                                f"its connection from {channel.peer} closed")

    def _package_request(self, channel: Channel, request: Any, buffers: list[Any]) -> None:
        out: list[bytes] = []
        try:
            if type(request) is ShipPackage:
                reply = self._ship_package(request, buffers)
            else:
                reply, out = self._fetch_package(request)
        except Exception as error:  # the caller gets it; the head goes on
            reply = ErrorReply(f"{type(error).__name__}: {error}")
        channel.send(reply, out)

    def _serve_work(self, node_id: int, channel: Any) -> None:
        """A node's work connection: its workers join the head's runtime, until it ends."""
        with self._lock:
            remote = self._nodes.get(node_id)
            if remote is None or not remote.info.alive or remote.attached:
                print(f"sharedcompute head: refused a work connection for node {node_id} "
                      f"from {channel.peer}", file=sys.stderr)
                return
            remote.attached = True
        resources = {**remote.info.resources, node_resource(node_id): PINS_PER_NODE}
        link: NodeLink = self.cluster.attach(
            node_id, channel, resources, remote.info.workers, remote.data_address
        )
        reason = self.cluster.serve(link)
        self._node_lost(node_id, f"its work connection closed ({reason})")

    def _serve_driver(self, request: AttachDriver, channel: Any) -> None:
        with self._lock:
            node_id = self._next_node_id
            self._next_node_id += 1
        print(f"sharedcompute head: a driver connected from {channel.peer} (node {node_id})",
              file=sys.stderr)
        link = self.cluster.attach_driver(node_id, channel, request.data_address,
                                          self.cluster_env)
        reason = self.cluster.serve(link)
        self.cluster.driver_lost(link)
        print(f"sharedcompute head: the driver from {channel.peer} left ({reason})",
              file=sys.stderr)

    def _answer(self, request: Any, connection: _Connection) -> Any:
        handler = self._handlers.get(type(request))
        if handler is None:
            return ErrorReply(f"unknown request {type(request).__name__}")
        try:
            return handler(request, connection)
        except Exception as error:  # the caller gets it; the head goes on
            return ErrorReply(f"{type(error).__name__}: {error}")

    def close(self) -> None:
        """Stop serving and shut the runtime down (its workers and store go with it)."""
        with self._lock:
            if self._closed:
                return
        super().close()
        self._stop_watch.set()
        self._watch_thread.join(10)
        self.cluster.close()
        self.runtime.shutdown()
        self.cluster.close_data()

