"""Objects from node to node: a transfer server per node, and the puller that asks it.

::

    node A                                             node B
    +-------------------+   data connection (TCP,  +----------------------------+
    | TransferServer    |   its own port, token)   | Puller                     |
    |  thread per peer  |<-------------------------|  pull(RemoteObject)        |
    |  ("get", id)      |    header, then the      |   one pull per object;     |
    |  -> header, bytes |------------------------->|   recv_into a store block  |
    +-------------------+    object's bytes        +----------------------------+
        OwnerStore A                                   OwnerStore B

A data connection is separate from the control connection (head <-> node), so a
gigabyte on its way never delays a heartbeat or a small task. The server sends
an object's bytes straight from its store's mapping (``sendall`` on a view, no
copy); the puller receives them straight into a block of its own store
(``recv_into`` through the channel's ``allocate``), then seals it: the value is
never pickled, never joined, never held twice in memory.

The puller keeps one copy per remote object (``copies``): a value already here
is not pulled again, and concurrent readers of one object wait for the same
pull. A copy lives until ``forget`` (the object was freed where it was made).
Connections to each peer are pooled, one per pull in flight.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future as _Pending

from sharedcompute._cluster._server import ThreadedServer
from sharedcompute._protocol._channel import Buffer, Channel, FrameError, connect
from sharedcompute._store import OwnerStore, RemoteObject, StoredObject
from sharedcompute.errors import ObjectLostError

_GET = "get"
_OBJECT = "object"
_MISSING = "missing"
_IDLE_PER_PEER = 4  # idle data connections kept per peer


class TransferServer(ThreadedServer):
    """Serves the objects of ``store`` to other nodes on ``host:port`` (0: any free port)."""

    def __init__(self, store: OwnerStore, token: bytes, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        # Requests are tiny: a peer claiming big buffers is refused before anything is read.
        super().__init__("transfer", token, host, port, max_header=4096, max_buffers=0)
        self._store = store
        self.served = 0  # objects sent
        self.bytes_served = 0
        self.start()

    def serve(self, channel: Channel) -> None:
        while True:
            request, _ = channel.receive()
            if not (isinstance(request, tuple) and len(request) == 2 and request[0] == _GET
                    and type(request[1]) is int):
                raise FrameError(f"not a transfer request: {request!r:.80}")
            self._send_object(channel, request[1])

    def _send_object(self, channel: Channel, object_id: int) -> None:
        try:
            ref = self._store.locate(object_id)
        except ObjectLostError as error:
            channel.send((_MISSING, str(error)))
            return
        try:
            data = self._store.buffer(ref)  # in the arena, or mapped from its spill file
            with self._lock:  # counted before it goes: the puller may look once it has it
                self.served += 1
                self.bytes_served += ref.nbytes
            channel.send((_OBJECT, ref.header), [memoryview(data)])
            del data
        finally:
            self._store.delete(ref)


class Puller:
    """Brings objects of other nodes into ``store``; ``addresses`` maps node ids to servers."""

    def __init__(self, store: OwnerStore, token: bytes) -> None:
        self._store = store
        self._token = token
        self._lock = threading.Lock()
        self.addresses: dict[int, str] = {}
        self.copies: dict[tuple[int, int], StoredObject] = {}
        self._pulling: dict[tuple[int, int], _Pending[StoredObject]] = {}
        self._idle: dict[str, list[Channel]] = {}
        self._closed = False

    def local(self, ref: RemoteObject) -> StoredObject | None:
        """The copy here, if one was pulled already (no reference taken)."""
        return self.copies.get((ref.node, ref.object_id))

    def pull(self, ref: RemoteObject, timeout: float | None = None) -> StoredObject:
        """The object, here (pulled now unless a copy is here or on its way).

        The copy belongs to the puller (see ``forget``); ``ObjectLostError`` if
        its node no longer has it or cannot be reached.
        """
        name = (ref.node, ref.object_id)
        with self._lock:
            copy = self.copies.get(name)
            if copy is not None:
                return copy
            if self._closed:
                raise ObjectLostError(f"object {ref.object_id} of node {ref.node}: shut down")
            pending = self._pulling.get(name)
            mine = pending is None
            if pending is None:
                pending = self._pulling[name] = _Pending()
        if not mine:
            return pending.result(timeout)
        try:
            copy = self._fetch(ref)
        except BaseException as error:
            with self._lock:
                del self._pulling[name]
            pending.set_exception(error)
            raise
        with self._lock:
            del self._pulling[name]
            if self._closed:
                self._store.delete(copy)
            else:
                self.copies[name] = copy
        pending.set_result(copy)
        return copy

    def forget(self, node: int, object_id: int) -> None:
        """Drop the copy of an object freed where it was made."""
        with self._lock:
            copy = self.copies.pop((node, object_id), None)
        if copy is not None:
            self._store.delete(copy)

    def forget_node(self, node: int) -> None:
        """Drop the copies of a node's objects (it is gone) and its idle connections."""
        with self._lock:
            names = [name for name in self.copies if name[0] == node]
            copies = [self.copies.pop(name) for name in names]
            address = self.addresses.pop(node, None)
            idle = self._idle.pop(address, []) if address is not None else []
        for copy in copies:
            self._store.delete(copy)
        for channel in idle:
            channel.close()

    def _fetch(self, ref: RemoteObject) -> StoredObject:
        address = self.addresses.get(ref.node)
        if address is None:
            raise ObjectLostError(
                f"object {ref.object_id} lives on node {ref.node}, which is not known here "
                "(it left the cluster?)"
            )
        incoming: list[int] = []

        def allocate(size: int) -> Buffer:
            object_id, memory = self._store.allocate_incoming(size)
            incoming.append(object_id)
            return memory

        channel: Channel | None = None
        try:
            channel = self._channel(address)
            channel.send((_GET, ref.object_id))
            reply, _ = channel.receive(allocate)
        except BaseException as error:
            if channel is not None:
                channel.close()
            for object_id in incoming:
                self._store.delete_incoming(object_id)
            if isinstance(error, ConnectionError):
                raise ObjectLostError(
                    f"object {ref.object_id} of node {ref.node} could not be pulled from "
                    f"{address}: {error}"
                ) from error
            raise
        self._release(address, channel)
        if reply[0] == _MISSING:
            raise ObjectLostError(f"node {ref.node} ({address}) no longer has it: {reply[1]}")
        if reply[0] != _OBJECT or len(incoming) != 1:
            for object_id in incoming:
                self._store.delete_incoming(object_id)
            raise ObjectLostError(f"node {ref.node} ({address}) sent no object: {reply!r:.80}")
        (object_id,) = incoming
        return self._store.seal_incoming(object_id, reply[1])

    def _channel(self, address: str) -> Channel:
        with self._lock:
            idle = self._idle.get(address)
            if idle:
                return idle.pop()
        host, _, port = address.rpartition(":")
        return connect((host, int(port)), self._token)

    def _release(self, address: str, channel: Channel) -> None:
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if not self._closed and len(idle) < _IDLE_PER_PEER:
                idle.append(channel)
                return
        channel.close()

    def close(self) -> None:
        """Close the connections and drop every copy."""
        with self._lock:
            self._closed = True
            copies = list(self.copies.values())
            self.copies.clear()
            idle = [channel for channels in self._idle.values() for channel in channels]
            self._idle.clear()
        for copy in copies:
            self._store.delete(copy)
        for channel in idle:
            channel.close()

