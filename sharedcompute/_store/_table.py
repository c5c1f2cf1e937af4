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

A client may also *lease* a block to fill in place (a worker's numpy array that may become
its task's result): it is created for the owner, in transit from that client, and held by
the client too while the array lives. Sealed, it is an ordinary delivery; if the client
lets go of it unsealed (the array was a temporary) or disconnects, it is discarded.

Spilling: an object may move out of the arena into a file (``_spill``) while only
the owner holds it and no view of it is alive in the owner (the caller says
which objects have views): a client that holds an object may read it by offset at
any moment, so it never moves under a holder. ``spill_candidates`` lists such
objects, least recently used first; ``spilled`` records the move, once the file
is written, only if nothing changed meanwhile (else the write is thrown away), and
frees the block. A spilled object is located with offset ``SPILLED``; when it is
freed its id goes to ``unlinks`` (the owner removes its file).

Invariants:
- ``entry.refs == sum(holders[c][id] for c in holders)`` for every entry;
- a spilled entry holds no block; ``spilled_bytes`` is the sum of their sizes;
- an object in ``_in_transit[c]`` is held by the owner (client 0), created by ``c``;
- an entry exists exactly while ``entry.refs > 0``;
- only sealed entries can be looked up by clients that did not create them.
"""

from __future__ import annotations

import itertools
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


SPILLED = -1  # the offset of an object that lives in a spill file


class NoRoom(ObjectStoreFullError):
    """No block fits now (others may be freed or spilled): the caller may wait and retry."""

    wait_s: float = 0.0  # how long a client should keep trying (set by the owner)


@dataclass(slots=True)
class _Entry:
    offset: int
    nbytes: int
    header: bytes | None
    refs: int
    last_use: int = 0


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
        self._leases: dict[int, tuple[int, int]] = {}  # unsealed leased object -> (client, owner)
        self._next_id = 1
        self._clock = itertools.count(1)
        self.spilled_bytes = 0
        self.spilled_objects = 0
        self._unsealed = 0  # entries without a header yet (stats: counted, not looked for)
        self.unlinks: list[int] = []  # spilled objects freed: their files go (owner drains)

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, object_id: int) -> bool:
        return object_id in self._entries

    def unsealed(self, object_id: int) -> bool:
        entry = self._entries.get(object_id)
        return entry is not None and entry.header is None

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
            raise NoRoom(
                f"the object store has no room for an object of {nbytes:,} bytes: "
                f"{self.allocator.used_bytes:,} of {self.capacity:,} bytes are in use by "
                f"{len(self._entries)} objects (largest free block "
                f"{self.allocator.largest_free():,} bytes); free some objects or raise "
                "store_capacity"
            )
        object_id = self._next_id
        self._next_id += 1
        self._entries[object_id] = _Entry(offset, nbytes, None, 1, next(self._clock))
        self._unsealed += 1
        self._holders.setdefault(client, Counter())[object_id] += 1
        if courier is not None:
            self._in_transit.setdefault(courier, set()).add(object_id)
            self._courier[object_id] = courier
        return object_id, offset

    def lease(self, object_id: int, client: int, owner: int) -> None:
        """``client`` fills the object ``owner`` holds in transit from it, and holds it too."""
        self._entries[object_id].refs += 1
        self._holders.setdefault(client, Counter())[object_id] += 1
        self._leases[object_id] = (client, owner)

    def _let_go_unsealed(self, object_id: int, client: int) -> None:
        """Its leaseholder holds a leased object no more: unsealed, it goes."""
        lease = self._leases.get(object_id)
        if lease is not None and lease[0] == client:
            del self._leases[object_id]
            self.abort(lease[1], object_id)

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

    def seal(self, object_id: int, header: bytes, nbytes: int | None = None) -> StoredObject:
        """Seal an object; ``nbytes``: its size, where its writer used less of the block
        than it asked for (a block leased ahead of knowing the size)."""
        entry = self._entries[object_id]
        if entry.header is None:
            self._unsealed -= 1
        entry.header = header
        if nbytes is not None:
            entry.nbytes = nbytes
        self._leases.pop(object_id, None)
        return StoredObject(object_id, entry.offset, entry.nbytes, header)

    def incref(self, client: int, object_id: int) -> StoredObject:
        entry = self._entries.get(object_id)
        if entry is None or entry.header is None:
            raise ObjectLostError(f"object {object_id} is not in the store (freed or never sealed)")
        entry.refs += 1
        entry.last_use = next(self._clock)
        self._holders.setdefault(client, Counter())[object_id] += 1
        return StoredObject(object_id, entry.offset, entry.nbytes, entry.header)

    def locate(self, object_id: int) -> StoredObject:
        """Where a sealed object is now (``SPILLED``: in its file), as a use of it."""
        entry = self._entries.get(object_id)
        if entry is None or entry.header is None:
            raise ObjectLostError(f"object {object_id} is not in the store (freed or never sealed)")
        entry.last_use = next(self._clock)
        return StoredObject(object_id, entry.offset, entry.nbytes, entry.header)

    # -- spilling ---------------------------------------------------------------------

    def spill_candidates(self, owner: int, viewed: Counter[int] | dict[int, int],
                         min_bytes: int) -> list[tuple[int, int, int, int]]:
        """(id, offset, nbytes, refs) of the objects that may move to a file, least
        recently used first: sealed, in the arena, held by ``owner`` alone, not in transit
        and with no view alive in the owner."""
        owned = self._holders.get(owner, Counter())
        found = []
        for object_id, held in owned.items():
            entry = self._entries[object_id]
            if self._movable(object_id, entry, held, viewed, min_bytes):
                found.append((entry.last_use, object_id, entry.offset, entry.nbytes, entry.refs))
        found.sort()
        return [(object_id, offset, nbytes, refs) for _, object_id, offset, nbytes, refs in found]

    def spill_candidate(self, object_id: int, owner: int, viewed: Counter[int] | dict[int, int],
                        min_bytes: int) -> tuple[int, int, int] | None:
        """(offset, nbytes, refs) if this object may move to a file now, else None."""
        entry = self._entries.get(object_id)
        held = self._holders.get(owner, Counter()).get(object_id, 0)
        if entry is None or not self._movable(object_id, entry, held, viewed, min_bytes):
            return None
        return entry.offset, entry.nbytes, entry.refs

    def _movable(self, object_id: int, entry: _Entry, held: int,
                 viewed: Counter[int] | dict[int, int], min_bytes: int) -> bool:
        return not (
            entry.header is None or entry.offset == SPILLED or entry.refs != held
            or entry.nbytes < min_bytes or object_id in self._courier or viewed.get(object_id)
        )

    def spilled(self, object_id: int, offset: int, refs: int, owner: int,
                viewed: Counter[int] | dict[int, int]) -> bool:
        """Record that the object is in its file now, if it is still as it was when the
        write began (same place, same holders, no view); its block is freed."""
        entry = self._entries.get(object_id)
        if (entry is None or entry.offset != offset or entry.refs != refs
                or self._holders.get(owner, Counter())[object_id] != refs
                or viewed.get(object_id)):
            return False
        self.allocator.release(entry.offset)
        entry.offset = SPILLED
        self.spilled_bytes += entry.nbytes
        self.spilled_objects += 1
        return True

    def largest(self, count: int | None = None) -> list[tuple[int, int, bool, dict[int, int]]]:
        """(id, nbytes, spilled, {client: refs}) of the largest objects (all: no count)."""
        biggest = sorted(self._entries.items(), key=lambda item: -item[1].nbytes)[:count]
        return [
            (object_id, entry.nbytes, entry.offset == SPILLED,
             {client: held[object_id] for client, held in self._holders.items()
              if held.get(object_id)})
            for object_id, entry in biggest
        ]

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
            self._let_go_unsealed(object_id, client)
            return
        self._release(object_id, count)

    def drop_client(self, client: int) -> int:
        """Release every reference ``client`` holds; return how many objects it held."""
        held = self._holders.pop(client, Counter())
        for object_id, count in held.items():
            self._release(object_id, count)
            self._let_go_unsealed(object_id, client)
        return len(held)

    def _release(self, object_id: int, count: int) -> None:
        entry = self._entries[object_id]
        entry.refs -= count
        if entry.refs <= 0:
            del self._entries[object_id]
            if entry.header is None:
                self._unsealed -= 1
            self._leases.pop(object_id, None)
            if entry.offset == SPILLED:
                self.spilled_bytes -= entry.nbytes
                self.spilled_objects -= 1
                self.unlinks.append(object_id)
            else:
                self.allocator.release(entry.offset)

    def stats(self) -> dict[str, int]:
        unsealed = self._unsealed
        return {
            "capacity": self.capacity,
            "used_bytes": self.allocator.used_bytes,
            # Sealed objects; those being written (a put under way, a block leased to a
            # worker that fills it in place or keeps it for its next result) apart.
            "num_objects": len(self._entries) - unsealed,
            "unsealed_objects": unsealed,
            "high_water": self.allocator.high_water,
            "spilled_bytes": self.spilled_bytes,
            "spilled_objects": self.spilled_objects,
        }
