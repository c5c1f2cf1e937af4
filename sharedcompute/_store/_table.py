"""The store owner's object table: which objects exist, where, and who holds them.

Pure bookkeeping with no I/O, guarded by the caller's lock. Every process that
uses the store is a *client* (the owner process itself is client 0). A client
holds references to objects: one for each object it created and has not
deleted, plus one while any view of the object lives in that process (the
client collapses its local views into a single reference). An object's memory
goes back to the allocator when no client holds a reference any more, and a
client that disconnects (exit, crash, SIGKILL) drops all of its references at
once, so a dead process can never pin memory.

A client may also create an object *for the owner* (a worker's task result): the
owner holds it from the start, and until the owner takes delivery (``delivered``)
the object is in transit from that client. If the client dies first, its
message naming the object never arrives, so the owner drops what that client
had in transit once it has read everything the client said (``drop_deliveries``).

Invariants:
- ``entry.refs == sum(holders[c][id] for c in holders)`` for every entry;
- an object in ``_in_transit[c]`` is held by the owner (client 0), created by ``c``;
- an entry exists exactly while ``entry.refs > 0``;
- only sealed entries can be looked up by clients that did not create them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sharedcompute._store._allocator import Allocator
from sharedcompute.errors import ObjectLostError, ObjectStoreFullError


@dataclass(frozen=True, slots=True)
class StoredObject:
    """Where a sealed object lives in the store; small enough to travel in any message."""

    object_id: int
    offset: int
    nbytes: int
    header: bytes


@dataclass(slots=True)
class _Entry:
    offset: int
    nbytes: int
    header: bytes | None
    refs: int


class ObjectTable:
    def __init__(self, capacity: int) -> None:
        self.allocator = Allocator(capacity)
        self._entries: dict[int, _Entry] = {}
        self._holders: dict[int, Counter[int]] = {}
        self._in_transit: dict[int, set[int]] = {}  # client -> objects it made for the owner
        self._courier: dict[int, int] = {}  # object in transit -> the client that made it
        # Clients whose deliveries were dropped (they died): a create for the owner that
        # reaches the table after that, from one of them, is refused.
        self._gone: set[int] = set()
        self._next_id = 1

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def __len__(self) -> int:
        return len(self._entries)

    def create(self, client: int, nbytes: int, *, courier: int | None = None) -> tuple[int, int]:
        """Allocate an unsealed object held once by ``client``; return (id, offset).

        ``courier``: the client that makes the object for ``client`` (the owner).
        """
        if courier in self._gone:
            raise ObjectLostError(f"client {courier} has died: nobody would take this object")
        if nbytes > self.capacity:
            raise ObjectStoreFullError(
                f"an object of {nbytes:,} bytes cannot fit in the object store, whose "
                f"capacity is {self.capacity:,} bytes; raise store_capacity"
            )
        offset = self.allocator.allocate(nbytes)
        if offset is None:
            raise ObjectStoreFullError(
                f"the object store has no room for an object of {nbytes:,} bytes: "
                f"{self.allocator.used_bytes:,} of {self.capacity:,} bytes are in use by "
                f"{len(self._entries)} objects (largest free block "
                f"{self.allocator.largest_free():,} bytes); free some objects or raise "
                "store_capacity"
            )
        object_id = self._next_id
        self._next_id += 1
        self._entries[object_id] = _Entry(offset, nbytes, None, 1)
        self._holders.setdefault(client, Counter())[object_id] += 1
        if courier is not None:
            self._in_transit.setdefault(courier, set()).add(object_id)
            self._courier[object_id] = courier
        return object_id, offset

    def abort(self, client: int, object_id: int) -> None:
        """Forget an object whose creator failed before sealing it."""
        self.delivered(object_id)
        self.decref(client, object_id)

    def delivered(self, object_id: int) -> None:
        """The owner took delivery of an object a client made for it (or it was aborted)."""
        courier = self._courier.pop(object_id, None)
        if courier is not None:
            in_transit = self._in_transit[courier]
            in_transit.discard(object_id)
            if not in_transit:
                del self._in_transit[courier]

    def drop_deliveries(self, client: int, owner: int) -> int:
        """Free what ``client`` made for ``owner`` that never arrived; return how many.

        The client is gone for good: what it asks for afterwards (a request still
        queued when it died) is refused.
        """
        self._gone.add(client)
        lost = self._in_transit.pop(client, set())
        for object_id in lost:
            del self._courier[object_id]
            self.decref(owner, object_id)
        return len(lost)

    def seal(self, object_id: int, header: bytes) -> StoredObject:
        entry = self._entries[object_id]
        entry.header = header
        return StoredObject(object_id, entry.offset, entry.nbytes, header)

    def incref(self, client: int, object_id: int) -> StoredObject:
        entry = self._entries.get(object_id)
        if entry is None or entry.header is None:
            raise ObjectLostError(f"object {object_id} is not in the store (freed or never sealed)")
        entry.refs += 1
        self._holders.setdefault(client, Counter())[object_id] += 1
        return StoredObject(object_id, entry.offset, entry.nbytes, entry.header)

    def decref(self, client: int, object_id: int, count: int = 1) -> None:
        held = self._holders.get(client)
        if held is None or held[object_id] < count:
            # A client can only drop what it holds; anything else is a bug in
            # the caller, and ignoring it keeps other clients' objects alive.
            return
        held[object_id] -= count
        if not held[object_id]:
            del held[object_id]
        self._release(object_id, count)

    def drop_client(self, client: int) -> int:
        """Release every reference ``client`` holds; return how many objects it held."""
        held = self._holders.pop(client, Counter())
        for object_id, count in held.items():
            self._release(object_id, count)
        return len(held)

    def _release(self, object_id: int, count: int) -> None:
        entry = self._entries[object_id]
        entry.refs -= count
        if entry.refs <= 0:
            del self._entries[object_id]
            self.allocator.release(entry.offset)

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "used_bytes": self.allocator.used_bytes,
            "num_objects": len(self._entries),
            "high_water": self.allocator.high_water,
        }
