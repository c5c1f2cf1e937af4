"""The store owner's server: one thread answering every client process over SEQPACKET.

Clients (workers, actors) connect to the owner's abstract Unix socket; the owner
accepts only peers of the same user (SO_PEERCRED), sends each the arena's file
descriptor and a client id, and then answers its requests (create, seal, incref,
decref, ...) one datagram each, under the owner's lock, in one selector loop over
every socket. A create that finds no room is answered at once (the client retries):
this thread also hears the releases that would make room. A client that
disconnects drops every reference it held, so a dead process never pins memory.
"""

from __future__ import annotations

import os
import pickle
import selectors
import socket
import struct
import threading
import traceback
from typing import TYPE_CHECKING, Any

from sharedcompute.errors import SharedComputeError

if TYPE_CHECKING:
    from sharedcompute._store._store import OwnerStore

MAX_MESSAGE = 1 << 20
OWNER = 0  # the owner process's own client id


# Requests that get no reply.
_ONE_WAY = frozenset({"decref", "deliver"})

class StoreServer:
    """Owner-side thread answering clients; one selector loop over every socket."""

    def __init__(self, owner: OwnerStore) -> None:
        self._owner = owner
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind("\0" + owner.address)
        self._listener.listen(64)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: dict[socket.socket, int] = {}
        self._pids: dict[int, int] = {}  # client -> its process (for error messages)
        self._request_buffer = bytearray(MAX_MESSAGE)
        self._next_client = OWNER + 1
        self._uid = os.getuid()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sharedcompute-store", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            for key, _events in self._selector.select():
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    return
                else:
                    assert isinstance(key.fileobj, socket.socket)
                    self._serve(key.fileobj)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (self._uid, 0):
            conn.close()
            return
        try:
            socket.send_fds(
                conn, [struct.pack("!QQ", self._owner.capacity, self._next_client)],
                [self._owner.segment.fd],
            )
        except OSError:  # the client died while connecting
            conn.close()
            return
        self._clients[conn] = self._next_client
        self._pids[self._next_client] = pid
        self._next_client += 1
        self._selector.register(conn, selectors.EVENT_READ, None)

    def _serve(self, conn: socket.socket) -> None:
        client = self._clients[conn]
        try:
            size = conn.recv_into(self._request_buffer)
        except OSError:
            size = 0
        if not size:
            self._drop(conn)
            return
        op, *args = pickle.loads(memoryview(self._request_buffer)[:size])
        try:
            with self._owner._lock:
                result = self._dispatch(client, op, args)
        except Exception as exc:
            if op in _ONE_WAY:  # the client waits for no reply: one would desync it
                traceback.print_exc()
            elif op == "lease_ahead":
                self._reply(conn, ("spare", None))
            else:
                self._reply(conn, ("err", exc))
            return
        if op not in _ONE_WAY:
            # A lease asked for ahead is answered as a "spare": the client takes it when it
            # next reads, before the reply to whatever it asks next.
            self._reply(conn, ("spare" if op == "lease_ahead" else "ok", result))

    def _dispatch(self, client: int, op: str, args: list[Any]) -> Any:
        table = self._owner._table
        if op == "create":  # no room: the client retries (this thread serves every client)
            if args[1]:  # for the owner: in transit from this client until adopted
                return self._owner._create_for(OWNER, args[0], courier=client, wait=False)
            return self._owner._create_for(client, args[0], wait=False)
        if op == "lease" or op == "lease_ahead":  # None: past the spill threshold, no room
            return self._owner.lease_for(client, args[0])
        if op == "abort":
            self._owner._abort(args[0])
            return None
        if op == "seal":
            return self._owner._sealed(args[0], args[1])
        if op == "deliver":  # sealed here, or by adopt if that came first
            self._owner.seal_delivered(args[0], args[1], args[2])
            if args[3]:  # and the client's hold with it: one message, not two
                table.decref(client, args[0])
            return None
        if op == "incref":
            self._owner.move_out_before_read(args[0])
            return table.incref(client, args[0])
        if op == "describe":
            self._owner.move_out_before_read(args[0])
            ref = table.incref(client, args[0])
            table.decref(client, args[0])
            return ref
        if op == "decref":
            for object_id, count in args[0].items():
                table.decref(client, object_id, count)
            self._owner.after_free()
            return None
        if op == "spill_dir":
            return self._owner._spiller.files.ensure()
        if op == "stats":
            stats = table.stats()
            stats["reserved_bytes"] = self._owner.segment.reserved
            return stats
        raise SharedComputeError(f"unknown object store request {op!r}")

    def _reply(self, conn: socket.socket, message: tuple[str, Any]) -> None:
        try:
            conn.send(pickle.dumps(message, protocol=5))
        except OSError:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        client = self._clients.pop(conn, None)
        if client is None:
            return
        self._selector.unregister(conn)
        conn.close()
        with self._owner._lock:
            self._owner._table.drop_client(client)
            self._owner.after_free()
        self._pids.pop(client, None)

    def describe_client(self, client: int) -> str:
        if client == OWNER:
            return f"the owner (pid {os.getpid()})"
        pid = self._pids.get(client)
        return f"client {client}" + (f" (pid {pid})" if pid else "")

    def close(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        for conn in list(self._clients):
            self._selector.unregister(conn)
            conn.close()
        self._clients.clear()
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
