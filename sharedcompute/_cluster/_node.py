"""A node: a host's worker pool and store, joined to a head.

It registers with the head (``RegisterNode``: its address, resources, workers and
store), then a thread of its own says every ``heartbeat_s`` that it lives
(``Heartbeat``, with what it has free) and waits for the head's answer: no
answer within ``node_timeout_s`` means the head is gone (``lost`` is set, and
``sharedcompute start --address --block`` exits). Both sides thus learn of the
other's death within the timeout, whatever the cause.

Running the head's tasks here is the next step of the cluster work.
"""

from __future__ import annotations

import threading

from sharedcompute._cluster._messages import (
    ErrorReply,
    Heartbeat,
    Registered,
    RegisterNode,
)
from sharedcompute._protocol._channel import connect
from sharedcompute._runtime._driver import Runtime


class Node:
    def __init__(
        self, head_address: str, token: str, *, num_workers: int | None = None,
        resources: dict[str, float] | None = None, store_capacity: int | None = None,
    ) -> None:
        self.head_address = head_address
        self.runtime = Runtime(
            num_workers=num_workers, resources=resources, store_capacity=store_capacity
        )
        self.lost = threading.Event()
        self.lost_reason = ""
        try:
            host, _, port = head_address.rpartition(":")
            self._channel = connect((host, int(port)), token.encode())
            self._channel.sock.settimeout(30)
            store = self.runtime.store
            self._channel.send(RegisterNode(
                address=self._channel.sock.getsockname()[0], resources=self.runtime.core.total,
                workers=self.runtime.num_workers, store_capacity=store.capacity,
            ))
            reply, _ = self._channel.receive()
            if not isinstance(reply, Registered):
                message = reply.message if isinstance(reply, ErrorReply) else repr(reply)
                raise ConnectionError(f"the head at {head_address} refused the node: {message}")
        except BaseException:
            self.runtime.shutdown()
            raise
        self.node_id = reply.node_id
        self._heartbeat_s = reply.heartbeat_s
        self._channel.sock.settimeout(reply.node_timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name="sharedcompute-node-heartbeat", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                stats = self.runtime.store.stats()
                self._channel.send(Heartbeat(
                    self.node_id, self.runtime.core.available, stats["used_bytes"]
                ))
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

    def close(self) -> None:
        self._stop.set()
        self._channel.close()
        self._thread.join(10)
        self.runtime.shutdown()
