"""A process's connection to a store another process owns: ``ClientStore``.

Every request is one datagram on an ``AF_UNIX`` ``SOCK_SEQPACKET`` connection to the owner's
store thread (``StoreServer``), answered in order; the shared-memory segment comes once, as a
file descriptor in the owner's hello, and is mapped here. Round trips are kept off a task's
path by leasing a result's block ahead of need and by keeping freed blocks for the next
arrays (``_lease_ahead``, ``keep_freed_lease``).
"""

from __future__ import annotations

import collections
import os
import pickle
import select
import socket
import struct
import sys
from typing import Any

from sharedcompute._store._segment import MappedSegment
from sharedcompute._store._server import MAX_MESSAGE
from sharedcompute._store._store import ObjectStore
from sharedcompute._store._table import StoredObject
from sharedcompute.errors import SharedComputeError

# A client leases its next result's block ahead of need up to this size.
AHEAD_MAX_BYTES = 32 * 1024 * 1024
_FREED_LEASES_KEPT = 2  # blocks a process keeps after freeing them (keep_freed_lease)
_DECREFS_PER_MESSAGE = 4096  # about 40 KiB pickled: far below any datagram limit


class ClientStore(ObjectStore):
    """A process's connection to a store owned by another process."""

    client_id: int  # how the owner knows this connection (see ``OwnerStore.drop_deliveries``)

    def __init__(self, address: str) -> None:
        super().__init__()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # Replies land in one reused buffer (recv(n) would allocate n bytes every time).
        self._reply_buffer = bytearray(MAX_MESSAGE)
        try:
            self._sock.connect("\0" + address)
            hello, fds, _flags, _addr = socket.recv_fds(self._sock, 256, 1)
        except OSError as exc:
            self._sock.close()
            raise SharedComputeError(
                f"cannot connect to the object store {address!r}: {exc}"
            ) from exc
        if not fds:
            self._sock.close()
            raise SharedComputeError(f"object store {address!r} refused the connection")
        capacity, self.client_id = struct.unpack("!QQ", hello)
        self.segment = MappedSegment(fds[0], capacity)
        self.address = address
        self._spill_dir: str | None = None
        # Blocks the owner leased this process ahead of need (see _lease_ahead): (id, offset,
        # size); and the size of the one asked for and not received yet (0: none).
        self._spares: list[tuple[int, int, int]] = []
        self._ahead = 0
        # Whether freed leased blocks are kept (keep_freed_lease): from this process's next
        # lease (a task making arrays) until it goes idle (release_spares).
        self._keep_freed = True

    def _request(self, *message: object) -> Any:
        try:
            self._sock.send(pickle.dumps(message, protocol=5))
            while True:
                status, value = self._reply()
                if status != "spare":
                    break
                self._got_spare(value)  # answers a lease_ahead sent before this request
        except OSError as exc:
            raise SharedComputeError(f"lost the connection to the object store: {exc}") from exc
        if status == "err":
            raise value
        return value

    def _reply(self, flags: int = 0) -> tuple[str, Any]:
        size = self._sock.recv_into(self._reply_buffer, 0, flags)
        if not size:
            raise SharedComputeError("the object store's owner has exited")
        reply: tuple[str, Any] = pickle.loads(memoryview(self._reply_buffer)[:size])
        return reply

    # -- blocks leased ahead ------------------------------------------------------------
    #
    # A worker's results tend to come one after another at like sizes. After each one that
    # takes a block from the owner, this process asks (one way) for the next block ahead
    # of need; the owner answers when it reads that, and the answer waits on the socket
    # until this process next looks. The next result of about that size then takes it
    # with no round trip. At most one is asked for at a time, only for sizes up to
    # AHEAD_MAX_BYTES, given back when it does not fit or when this process goes idle.
    # Blocks this process freed unsealed join the spares too (keep_freed_lease).

    def _lease_ahead(self, nbytes: int) -> None:
        """Ask for a block of ``nbytes`` ahead of need, unless one is kept or coming."""
        if self._ahead or self._spares or nbytes > AHEAD_MAX_BYTES or self._closed:
            return
        try:
            self._sock.send(pickle.dumps(("lease_ahead", nbytes), protocol=5))
        except OSError:
            return  # the next request says so
        self._ahead = nbytes

    def _got_spare(self, spare: tuple[int, int] | None) -> None:
        if spare is not None:
            self._spares.append((spare[0], spare[1], self._ahead))
        self._ahead = 0

    def _collect_spares(self, wait: float = 0.0) -> None:
        """Take the answer to a lease_ahead if it has come (lock held), waiting ``wait``."""
        if not self._ahead:
            return
        if wait and not select.select([self._sock], [], [], wait)[0]:
            return
        try:
            status, value = self._reply(socket.MSG_DONTWAIT)
        except (OSError, SharedComputeError):
            return  # nothing yet (or the owner is gone: the next request says so)
        assert status == "spare", status
        self._got_spare(value)

    def _spare(self, nbytes: int) -> tuple[int, int] | None:
        """A block leased ahead that fits ``nbytes`` (lock held), or None; either way the
        next one is asked for."""
        found = None
        if nbytes <= AHEAD_MAX_BYTES:
            self._collect_spares()
            for index, (object_id, offset, size) in enumerate(self._spares):
                if nbytes <= size <= nbytes + (nbytes >> 2):
                    found = (object_id, offset)
                    del self._spares[index]
                    break
            if found is None:
                self._drop_spares()  # they fit what this process made before, not now
            self._lease_ahead(nbytes)
        return found

    def _drop_spares(self) -> None:
        for object_id, _offset, _size in self._spares:
            self._local[object_id] += 1
            self._pending.append(object_id)  # an unsealed lease let go of: discarded
        self._spares.clear()

    def _leased_ahead(self, nbytes: int) -> tuple[int, int] | None:
        with self._lock:
            found = self._spare(nbytes)
            if found is not None:
                self._local[found[0]] += 1
            return found

    def keep_freed_lease(self, object_id: int, offset: int, nbytes: int) -> bool:
        # A task's temporaries (and a fused Dask task's intermediates) come and go at like
        # sizes: the next one takes the last one's block. Kept as a spare: given back by
        # release_spares when this process goes idle, or when a lease of another size comes.
        if (not self._keep_freed or nbytes > AHEAD_MAX_BYTES
                or len(self._spares) >= _FREED_LEASES_KEPT):
            return False
        if not self._lock.acquire(blocking=False):
            return False  # numpy frees anywhere, even inside this store's own calls
        try:
            if (self._closed or len(self._spares) >= _FREED_LEASES_KEPT
                    or self._local.get(object_id) != 1):
                return False
            del self._local[object_id]  # a spare's hold is its place in _spares
            self._spares.append((object_id, offset, nbytes))
            return True
        finally:
            self._lock.release()

    def release_spares(self) -> None:
        self._keep_freed = False  # an array freed later (by a thread, a cycle) goes back
        if not self._ahead and not self._spares:
            return
        with self._lock:
            self._collect_spares(wait=1.0)  # the owner answers in order: it is on its way
            self._drop_spares()

    def _create(self, nbytes: int, *, for_owner: bool = False) -> tuple[int, int, int]:
        result: tuple[int, int, int] = self._request("create", nbytes, for_owner)
        if for_owner:
            self._lease_ahead(nbytes)  # the next result of about this size: no round trip
        return result

    def _abort(self, object_id: int) -> None:
        self._request("abort", object_id)

    def _lease(self, nbytes: int) -> tuple[int, int] | None:
        self._keep_freed = True  # a task is making arrays again
        spare = self._spare(nbytes)
        if spare is not None:
            return spare
        result: tuple[int, int] | None = self._request("lease", nbytes)
        return result

    def _seal(self, object_id: int, header: bytes) -> StoredObject:
        result: StoredObject = self._request("seal", object_id, header)
        return result

    def _deliver(self, object_id: int, offset: int, nbytes: int, header: bytes,
                 hand_over: bool = False) -> StoredObject:
        # No reply: this connection's later requests (a read of it) come after it in order,
        # and everyone else learns of the object from the owner, which seals it on adopt.
        message = ("deliver", object_id, header, nbytes, hand_over)
        try:
            self._sock.send(pickle.dumps(message, protocol=5))
        except OSError as exc:
            raise SharedComputeError(f"lost the connection to the object store: {exc}") from exc
        return StoredObject(object_id, offset, nbytes, header)

    def _incref(self, object_id: int) -> StoredObject:
        result: StoredObject = self._request("incref", object_id)
        return result

    def _describe(self, object_id: int) -> StoredObject:
        with self._lock:
            result: StoredObject = self._request("describe", object_id)
        return result

    def _spill_file(self, object_id: int) -> str:
        if self._spill_dir is None:
            with self._lock:
                self._spill_dir = self._request("spill_dir")
        return os.path.join(str(self._spill_dir), str(object_id))

    def _decref(self, released: collections.Counter[int]) -> None:
        # In slices: one datagram must stay well under the socket's limit (EMSGSIZE).
        items = list(released.items())
        for start in range(0, len(items), _DECREFS_PER_MESSAGE):
            message = ("decref", dict(items[start : start + _DECREFS_PER_MESSAGE]))
            try:
                self._sock.send(pickle.dumps(message, protocol=5))
            except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
                return  # the owner is gone, and with it every reference
            except OSError as exc:
                if not self._closed:
                    # Not raised: this runs in whichever store call lets the lock go.
                    print(
                        f"sharedcompute: cannot release {len(items)} objects in the object "
                        f"store ({exc}); they stay until this process exits", file=sys.stderr,
                    )
                return

    def stats(self) -> dict[str, int]:
        with self._lock:
            result: dict[str, int] = self._request("stats")
        return result

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._sock.close()
            views_alive = bool(self._local)
        self.segment.close(unmap=not views_alive)
