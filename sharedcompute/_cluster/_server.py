"""A TCP server whose every connection is served by a thread of its own, after the handshake.

The head's control server and each node's transfer server are few-connection
servers (nodes, drivers, peers): a thread per connection keeps each one's code
straight-line and blocking, and a slow peer never holds up another. Subclasses
say what a connection does once it has proved the token (``serve``); a peer
that fails the handshake is logged once, with its address, and dropped before
anything it sent is unpickled. ``close`` stops accepting and wakes every
connection's thread (its socket is shut down). ``request`` is the client's side
of one request and its reply (``sharedcompute status``, a driver's status).
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from sharedcompute._cluster._messages import ErrorReply, HasPackage, PackageStatus, ShipPackage
from sharedcompute._env import Package
from sharedcompute._protocol._channel import Buffer, Channel, accept, connect
from sharedcompute.errors import AuthenticationError


class ThreadedServer:
    """Listens on ``host:port`` (0: any free port); ``start`` once the subclass is ready."""

    def __init__(self, name: str, token: bytes, host: str, port: int,
                 **limits: int) -> None:
        self._name = name
        self._token = token
        self._limits = limits
        self._listener = socket.create_server((host, port))
        bound_host, bound_port = self._listener.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"sharedcompute-{name}-accept", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def serve(self, channel: Channel) -> None:
        """Serve one authenticated connection until it ends (its own thread)."""
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._connections.add(sock)
            threading.Thread(
                target=self._connection, args=(sock, f"{address[0]}:{address[1]}"),
                name=f"sharedcompute-{self._name}", daemon=True,
            ).start()

    def _connection(self, sock: socket.socket, peer: str) -> None:
        try:
            try:
                channel = accept(sock, peer, self._token, bytearray, **self._limits)
            except AuthenticationError as error:
                print(f"sharedcompute {self._name}: refused a connection: {error}",
                      file=sys.stderr)
                return
            try:
                self.serve(channel)
            except ConnectionError:
                pass
            finally:
                channel.close()
        finally:
            with self._lock:
                self._connections.discard(sock)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = list(self._connections)
        for sock in [self._listener, *connections]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        self._thread.join(10)


def request(address: str, token: str, message: Any, *, timeout: float = 10.0) -> Any:
    """Send one request to the head at ``address`` and return its reply."""
    return request_with_buffers(address, token, message, timeout=timeout)[0]


def ship_package(address: str, token: str, package: Package) -> int:
    """Upload a runtime_env package to the head at ``address`` unless it holds it already;
    the bytes that went up."""
    status = request(address, token, HasPackage(package.id))
    if isinstance(status, PackageStatus) and status.present:
        return 0
    request_with_buffers(address, token, ShipPackage(package.id), [package.data], timeout=300)
    return len(package.data)


def request_with_buffers(
    address: str, token: str, message: Any, buffers: Sequence[Buffer | bytes] = (), *,
    timeout: float = 10.0,
) -> tuple[Any, list[Buffer]]:
    """One request with raw buffers (a package, say), and the reply with its own."""
    host, _, port = address.rpartition(":")
    channel: Channel = connect((host, int(port)), token.encode(), timeout=timeout)
    try:
        channel.sock.settimeout(timeout)
        channel.send(message, buffers)
        reply, received = channel.receive()
    finally:
        channel.close()
    if isinstance(reply, ErrorReply):
        raise RuntimeError(f"the head at {address} answered: {reply.message}")
    return reply, received
