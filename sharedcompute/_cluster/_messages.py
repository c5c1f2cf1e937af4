"""Typed messages of the cluster's control connections (the header of each channel message).

Each is a frozen dataclass; a server dispatches on the type, one handler per request.
They travel only on channels whose peer has proved the token (``_handshake``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StatusRequest:
    """Ask the head for its nodes and task counts."""


@dataclass(frozen=True)
class NodeInfo:
    """One node, as ``sc.nodes()`` and ``sharedcompute status --json`` give it."""

    node_id: int
    address: str
    alive: bool
    resources: dict[str, float]
    available: dict[str, float]
    store_used: int
    store_capacity: int
    workers: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class StatusReply:
    nodes: list[NodeInfo]
    tasks: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"nodes": [node.as_dict() for node in self.nodes], "tasks": dict(self.tasks)}


@dataclass(frozen=True)
class ErrorReply:
    """The request could not be answered; ``message`` says why."""

    message: str


@dataclass(frozen=True)
class RegisterNode:
    """A node joins: what it has. The head answers ``Registered``."""

    address: str
    resources: dict[str, float]
    workers: int
    store_capacity: int
    data_address: str = ""  # its transfer server, where other nodes pull its objects


@dataclass(frozen=True)
class Registered:
    node_id: int
    heartbeat_s: float  # how often the node must say it lives
    node_timeout_s: float  # silent this long, it is dead (and so is the head, for the node)


@dataclass(frozen=True)
class WorkerProcess:
    """One worker's process as its node read it, for the head's dashboard."""

    worker_id: int  # the head's number for it (``StartWorkers``)
    pid: int  # on its node's host
    cpu_percent: float | None  # since the node's previous heartbeat; None: not known yet
    rss: int | None  # bytes; None: not known (no psutil on the node, or it just ended)


@dataclass(frozen=True)
class Heartbeat:
    """A node lives; what it has free now, and its workers' processes. The head answers
    ``HeartbeatAck``."""

    node_id: int
    available: dict[str, float]
    store_used: int
    workers: tuple[WorkerProcess, ...] = ()


@dataclass(frozen=True)
class HeartbeatAck:
    """The head lives."""


@dataclass(frozen=True)
class Ping:
    """A connected driver asks whether the head lives; it answers ``HeartbeatAck``, with
    how long it lets a peer be silent (so the driver knows when to give up on it)."""


@dataclass(frozen=True)
class Pong:
    heartbeat_s: float
    node_timeout_s: float


# -- the work connection: a node's second connection, for its workers' traffic ----------------
#
# Opened once the node is registered, beside the control connection that carries its
# heartbeats: the two never wait on each other. Worker messages (``_protocol.Msg``
# tuples) ride inside, their object references named cluster-wide (``RemoteObject``
# wire tuples) on this connection.


@dataclass(frozen=True)
class AttachWork:
    """The first message of a work connection: whose it is."""

    node_id: int


@dataclass(frozen=True)
class WorkAttached:
    """Head -> node, once its workers are the scheduler's: ``start`` may return now."""


@dataclass(frozen=True)
class StartWorkers:
    """Head -> node: start workers with these ids (the head numbers every worker), in
    ``env`` (a runtime_env's ``Env``; None: none)."""

    worker_ids: tuple[int, ...]
    env: Any = None


@dataclass(frozen=True)
class HasPackage:
    """Driver -> head: do you hold this runtime_env package? (``PackageStatus``)"""

    package: str


@dataclass(frozen=True)
class ShipPackage:
    """Driver -> head: keep this package (its zip is the message's one buffer)."""

    package: str


@dataclass(frozen=True)
class PackageStatus:
    present: bool


@dataclass(frozen=True)
class SetClusterEnv:
    """Launcher -> head: the Env under every driver's from now on (its packages shipped)."""

    env: Any


@dataclass(frozen=True)
class ClusterEnvSet:
    """Head -> launcher: done."""


@dataclass(frozen=True)
class MemoryRequest:
    """Ask the head for its memory report (``sharedcompute memory``)."""


@dataclass(frozen=True)
class MemoryReply:
    text: str


@dataclass(frozen=True)
class TimelineRequest:
    """Ask the head for its timeline (``sc.timeline`` on a connected driver)."""


@dataclass(frozen=True)
class TimelineReply:
    trace: dict[str, Any]


@dataclass(frozen=True)
class FetchPackage:
    """Node -> head: send me this package (``PackageData`` with the zip as its buffer)."""

    package: str


@dataclass(frozen=True)
class PackageData:
    package: str


@dataclass(frozen=True)
class KillWorker:
    """Head -> node: SIGKILL this worker's process now (``sharedcompute.kill`` of an actor)."""

    worker_id: int


@dataclass(frozen=True)
class ToWorker:
    """Head -> node: messages for one of its workers, in order."""

    worker_id: int
    messages: list[tuple[object, ...]]


@dataclass(frozen=True)
class FromWorker:
    """Node -> head: what one of its workers said, in order."""

    worker_id: int
    messages: list[tuple[object, ...]]


@dataclass(frozen=True)
class WorkerExited:
    """Node -> head: a worker's process ended (everything it said was sent before)."""

    worker_id: int
    reason: str
    executing: int  # the task it was executing (0: none)
    ready: bool


@dataclass(frozen=True)
class FreeObjects:
    """Head -> node: objects of this node that nobody needs any more."""

    object_ids: tuple[int, ...]


@dataclass(frozen=True)
class ForgetCopies:
    """Head -> node: objects freed where they lived (node, id): drop copies pulled here."""

    names: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class NodeAddresses:
    """Head -> node: where each node's transfer server listens (the whole table)."""

    addresses: dict[int, str]


@dataclass(frozen=True)
class AttachDriver:
    """The first message of a driver's connection: where its objects can be pulled."""

    data_address: str


@dataclass(frozen=True)
class DriverAttached:
    """Head -> driver: its node id (for its objects), its worker id (for its keys)."""

    node_id: int
    worker_id: int
    addresses: dict[int, str]  # every node's transfer server
    runtime_env: Any = None  # the cluster's own Env, under the driver's (SetClusterEnv)
