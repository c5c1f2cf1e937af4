"""The head: a runtime that also answers authenticated requests over TCP.

::

    sharedcompute status ──TCP──▶ accept thread ──▶ one thread per connection
                                     │                 handshake (token, 10 s)
                                     │                 receive request ─▶ handler ─▶ reply
                                  Runtime (the head's own node: workers, store, core)

What it serves today: the head's own node (``start --head`` runs one, as
``ray start --head`` does) and status requests. Nodes joining from other
hosts and drivers connecting are the next steps of the cluster work; the
control server, the handshake and the typed messages are what they build on.

Requests and replies are typed (``_messages``), one handler per request type.
A connection that fails the handshake is logged once with its address and
closed; nothing it sent is unpickled.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from sharedcompute._cluster._messages import ErrorReply, NodeInfo, StatusReply, StatusRequest
from sharedcompute._protocol._channel import Channel, accept
from sharedcompute._runtime._driver import Runtime
from sharedcompute.errors import AuthenticationError


class Head:
    """A runtime plus the control server, on ``host:port`` (port 0: any free one)."""

    def __init__(
        self, token: str, *, host: str = "127.0.0.1", port: int = 6380,
        num_workers: int | None = None, resources: dict[str, float] | None = None,
        store_capacity: int | None = None,
    ) -> None:
        self.runtime = Runtime(
            num_workers=num_workers, resources=resources, store_capacity=store_capacity
        )
        try:
            self._listener = socket.create_server((host, port), reuse_port=False)
        except OSError:
            self.runtime.shutdown()
            raise
        bound_host, bound_port = self._listener.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._token = token.encode()
        self._handlers: dict[type, Callable[[Any], Any]] = {StatusRequest: self._status}
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop, name="sharedcompute-head-accept", daemon=True
        )
        self._thread.start()

    # -- requests ---------------------------------------------------------------------------

    def status(self) -> StatusReply:
        return self._status(StatusRequest())

    def _status(self, _: StatusRequest) -> StatusReply:
        nodes = [NodeInfo(**node) for node in self.runtime.node_table(self.address)]
        return StatusReply(nodes=nodes, tasks=self.runtime.core.counts())

    # -- the server -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, address = self._listener.accept()
            except OSError:
                return  # closed
            peer = f"{address[0]}:{address[1]}"
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._connections.add(sock)
            threading.Thread(
                target=self._serve, args=(sock, peer), name="sharedcompute-head-conn",
                daemon=True,
            ).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            channel = accept(sock, peer, self._token)
        except AuthenticationError as error:
            print(f"sharedcompute head: refused a connection: {error}", file=sys.stderr)
            self._forget(sock)
            return
        try:
            while True:
                request, _ = channel.receive()
                channel.send(self._answer(request))
        except ConnectionError:
            pass
        finally:
            channel.close()
            self._forget(sock)

    def _answer(self, request: Any) -> Any:
        handler = self._handlers.get(type(request))
        if handler is None:
            return ErrorReply(f"unknown request {type(request).__name__}")
        try:
            return handler(request)
        except Exception as error:  # the caller gets it; the head goes on
            return ErrorReply(f"{type(error).__name__}: {error}")

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)

    def close(self) -> None:
        """Stop serving and shut the runtime down (its workers and store go with it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = list(self._connections)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)
        self.runtime.shutdown()


def request(address: str, token: str, message: Any, *, timeout: float = 10.0) -> Any:
    """Send one request to the head at ``address`` and return its reply."""
    from sharedcompute._protocol._channel import connect

    host, _, port = address.rpartition(":")
    channel: Channel = connect((host, int(port)), token.encode(), timeout=timeout)
    try:
        channel.sock.settimeout(timeout)
        channel.send(message)
        reply, _ = channel.receive()
    finally:
        channel.close()
    if isinstance(reply, ErrorReply):
        raise RuntimeError(f"the head at {address} answered: {reply.message}")
    return reply
