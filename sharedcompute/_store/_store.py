"""Handles on the shared-memory object store, one per process.

::

      owner process (driver)                       any other process (worker, actor)
    +---------------------------+                +---------------------------+
    | OwnerStore                |   SEQPACKET    | ClientStore               |
    |  ObjectTable (+allocator) |<-------------->|  request / reply, lock    |
    |  server thread            |  fd via        |  MappedSegment            |
    |  MappedSegment            |  SCM_RIGHTS    |                           |
    +---------------------------+                +---------------------------+
                 \\______________ one unnamed shm file _______________/

``ObjectStore`` (what both share) and ``OwnerStore`` live here, ``ClientStore`` in
``_client``. Every process maps the whole store once. A put serializes the value, asks the
owner for a block (one round trip from a client, a method call in the owner),
copies the buffers straight into the mapping and seals the object. A get builds
read-only ``pyarrow.Buffer`` views over the mapping and deserializes on them: no
copy, no page touched until the caller reads.

Values whose serialized form is smaller than ``INLINE_THRESHOLD`` never touch
shared memory: ``put`` returns an :class:`InlineObject` carrying the bytes.

Reference counting, per process: a process holds one owner-side reference to an
object while it has created it and not deleted it, or while any view of it is
alive here (``_local`` counts both; the owner sees one reference). Views carry a
``_Pin`` whose finalizer queues the release; the queue is drained by whichever
thread next takes the store lock, never inside a finalizer that might run
while this thread already holds it.

Objects may move: the owner spills those only it holds to files when the arena
fills (``_spill``), so a process reads an object where the owner last said it is
(the answer to the ``incref`` it makes before its first view) and the owner looks
its own objects up at each view. A spilled object is read from its file, mapped.
A create that finds no room waits (the owner) or retries (a client) for at most
the store's ``wait_s`` while spilling or readers make room.

The owner accepts only peers running as the same user (SO_PEERCRED) on an
abstract Unix socket, so there is no filesystem entry to leak either.
"""

from __future__ import annotations

import collections
import mmap
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sharedcompute._serialization import Serialized, deserialize, serialize
from sharedcompute._store._segment import (
    DEFAULT_SHM_DIR,
    MappedSegment,
    create_memory_file,
    default_capacity,
)
from sharedcompute._store._server import OWNER, StoreServer
from sharedcompute._store._spill import (
    DEFAULT_THRESHOLD,
    DEFAULT_WAIT_S,
    MIN_SPILL_BYTES,
    Spiller,
    SpillFiles,
)
from sharedcompute._store._table import SPILLED, NoRoom, ObjectTable, StoredObject
from sharedcompute._sync import DrainingLock
from sharedcompute.errors import ObjectLostError, ObjectStoreFullError

# Values whose serialized form is smaller than this travel inline in messages.
INLINE_THRESHOLD = 64 * 1024
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux
_M = TypeVar("_M", bound=mmap.mmap)


@dataclass(frozen=True, slots=True)
class InlineObject:
    """A small serialized value carried by value instead of through shared memory."""

    header: bytes
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """An object in the store of another node: the cluster-wide name of a stored value.

    ``object_id`` is that node's id for it (never an offset: each node resolves an
    id to its own memory); a process of another node reads it only once its node
    has pulled a copy (``_cluster._transfer``).
    """

    node: int
    object_id: int
    nbytes: int
    header: bytes


ObjectRef = StoredObject | InlineObject | RemoteObject


def ref_to_wire(ref: ObjectRef) -> tuple[Any, ...]:
    """A plain tuple for messages: it pickles ~6x faster than the dataclass.

    The length tells the kinds apart: 2 inline, 4 stored here, 5 on another node.
    """
    if type(ref) is InlineObject:
        return (ref.header, ref.payload)
    if type(ref) is RemoteObject:
        return (ref.node, ref.object_id, ref.nbytes, ref.header, None)
    assert isinstance(ref, StoredObject)
    return (ref.object_id, ref.offset, ref.nbytes, ref.header)


def ref_from_wire(wire: tuple[Any, ...]) -> ObjectRef:
    if len(wire) == 2:
        return InlineObject(*wire)
    if len(wire) == 5:
        return RemoteObject(*wire[:4])
    return StoredObject(*wire)


class _Pin:
    """Base object of every view; its death releases this process's hold on the object."""

    __slots__ = ("object_id", "store")

    def __init__(self, store: ObjectStore, object_id: int) -> None:
        self.store = store
        self.object_id = object_id

    def __del__(self) -> None:
        try:
            self.store._queue_release(self.object_id)
        except Exception:  # interpreter shutdown: the owner drops us with the socket
            pass


class _PrivateMapping(mmap.mmap):
    """A copy-on-write mapping of one object, holding the object while it is mapped."""

    pin: _Pin
    skip: int  # where the object starts in it (a mapping starts on a page)

    @classmethod
    def of(cls, fd: int, start: int, nbytes: int) -> _PrivateMapping:
        skip = start % mmap.ALLOCATIONGRANULARITY
        mapped = cls(fd, skip + nbytes, flags=mmap.MAP_PRIVATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start - skip)
        mapped.skip = skip
        return mapped


class _ViewPin(_Pin):
    """An owner's view: while one lives, its object stays where the view points."""

    __slots__ = ()

    def __del__(self) -> None:
        try:
            self.store._queue_view_release(self.object_id)
        except Exception:
            pass


class ObjectStore:
    """What every process can do with the store; transports differ in subclasses."""

    segment: MappedSegment

    def __init__(self) -> None:
        self._local: collections.Counter[int] = collections.Counter()
        # Where each object held here was when this process took its hold (objects move
        # only while no other process holds them).
        self._where: dict[int, StoredObject] = {}
        self._pending: collections.deque[int] = collections.deque()
        # Objects the owner holds for this process while tasks of it that read them run
        # (``take_grants``): how many such tasks, and where each object is.
        self._granted: collections.Counter[int] = collections.Counter()
        self._granted_at: dict[int, StoredObject] = {}
        # Objects held here under a grant only, with no reference of this process's own.
        self._borrowed: set[int] = set()
        self._lock = DrainingLock(self._drain, lambda: self._pending)
        self._closed = False

    # -- public API -------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.segment.capacity

    def put(self, value: object) -> ObjectRef:
        """Store ``value``; return a reference that any process of this store can read."""
        return self.put_serialized(serialize(value))

    def put_serialized(
        self, serialized: Serialized, *, for_owner: bool = False, consume: bool = False,
    ) -> ObjectRef:
        """Store a serialized value.

        With ``for_owner`` the reference goes to the store's owner process
        instead of this one (the owner takes it with ``adopt``): how a worker
        hands a result to the driver without a second round trip. Such an
        object is sealed by a one-way message or by ``adopt``, whichever the
        owner reads first: one round trip to the owner, not two. ``consume``
        promises that nothing reads the value afterwards: its pages are given
        back as they are copied (see ``Serialized.write_into``).
        """
        nbytes = serialized.nbytes
        if nbytes < INLINE_THRESHOLD:
            return InlineObject(serialized.header, serialized.to_bytes())
        hand_over = for_owner and not isinstance(self, OwnerStore)
        spare = self._leased_ahead(nbytes) if hand_over else None
        if spare is not None:  # a block the owner leased this process ahead, pages reserved
            object_id, offset = spare
            fresh = offset + nbytes
        else:
            object_id, offset, fresh = self._create_waiting(nbytes, hand_over)
        try:
            dest = self.segment.writable(offset, nbytes)
            if fresh < offset + nbytes:
                # This process reserves the pages as it writes, and a value nothing reads
                # again gives its own back as they are copied: one copy at a time, not two.
                prepare = self.segment.preparer(offset, fresh, nbytes)
                serialized.write_into(dest, prepare=prepare, consume=consume)
                prepare(0, nbytes)
            else:  # warm pages: giving the value's back early would save nothing
                serialized.write_into(dest)
            with self._lock:
                if spare is not None:
                    ref, handed = self._deliver_lease(object_id, offset, nbytes,
                                                      serialized.header)
                    if not handed:
                        self._pending.append(object_id)  # the lease's hold, after the deliver
                    return ref
                if hand_over:
                    return self._deliver(object_id, offset, nbytes, serialized.header)
                return self._seal(object_id, serialized.header)
        except BaseException:
            if hand_over and spare is None:
                with self._lock:
                    self._abort(object_id)
            else:
                self._queue_release(object_id)
            raise

    def lease(self, nbytes: int) -> tuple[int, int] | None:
        """A block of ``nbytes`` to fill in place, its pages reserved: (object id, offset).

        Made for the owner and held here; ``seal_leased`` hands it to the owner as a
        ``put_serialized(for_owner=True)`` would, and releasing it unsealed (``delete`` of
        a ``StoredObject`` with its id, or this process's exit) discards it. None, never a
        wait: the store is past its spill threshold, or its lock is held (this thread may
        hold it: numpy may allocate anywhere), or this process cannot lease.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            leased = self._lease(nbytes)
            if leased is not None:
                self._local[leased[0]] += 1
            return leased
        finally:
            self._lock.release()

    def seal_leased(self, object_id: int, offset: int, header: bytes,
                    nbytes: int) -> tuple[StoredObject, bool]:
        """Seal a leased block holding a value of ``nbytes`` (``header`` from its
        ``Serialized``) for the owner, which takes it with ``adopt``; and whether this
        process's hold went with it (see ``_deliver_lease``: the caller, who lets go of
        the block next, must then not release it again)."""
        with self._lock:
            return self._deliver_lease(object_id, offset, nbytes, header)

    def _deliver_lease(self, object_id: int, offset: int, nbytes: int,
                       header: bytes) -> tuple[StoredObject, bool]:
        """Deliver a leased block to the owner (lock held), this process's hold with it in
        the same message where the lease is all this process holds of it; whether it went
        (else the hold stays until this process releases the block)."""
        handed = self._local[object_id] == 1
        ref = self._deliver(object_id, offset, nbytes, header, handed)
        if handed:
            del self._local[object_id]
        return ref, handed

    def get(self, ref: ObjectRef, *, private: bool = False) -> Any:
        """Return the value; arrays and Arrow data are read-only views of the store, or with
        ``private`` copy-on-write views that this process may write to (``private_view``)."""
        if isinstance(ref, InlineObject):
            return deserialize(ref.header, bytearray(ref.payload) if private else ref.payload)
        if isinstance(ref, RemoteObject):
            raise ObjectLostError(
                f"object {ref.object_id} lives on node {ref.node}: pull it to this node first"
            )
        return deserialize(ref.header, self.buffer(ref, private=private))

    def buffer(self, ref: StoredObject, *, private: bool = False) -> Any:
        """A read-only ``pyarrow.Buffer`` over the object (``private``: a writeable one, see
        ``private_view``); it keeps the object alive."""
        where = self._hold(ref.object_id) or ref
        return self._view(where, _Pin(self, ref.object_id), private)

    def _view(self, where: StoredObject, pin: _Pin, private: bool) -> Any:
        import pyarrow as pa

        if private and where.nbytes:
            return self.private_view(where, pin)
        if where.offset == SPILLED:
            return self._mapped(where, pin)
        return pa.foreign_buffer(self.segment.address + where.offset, where.nbytes, base=pin)

    def private_view(self, where: StoredObject, pin: _Pin) -> Any:
        """A writeable ``pyarrow.Buffer`` over a private (copy-on-write) mapping of the object.

        Nothing is copied up front: a page is copied for this process when first written,
        and writes never reach the store. A page not yet written shows the store's page,
        so the mapping holds ``pin``: while it lives the object is neither freed nor moved
        (spilled), and sealed, it never changes.
        """
        import pyarrow as pa

        if where.offset != SPILLED:
            mapped = _PrivateMapping.of(self.segment.fd, where.offset, where.nbytes)
        else:
            mapped = self._map_spilled(where, lambda fd: _PrivateMapping.of(fd, 0, where.nbytes))
        skip = mapped.skip
        mapped.pin = pin
        return pa.py_buffer(memoryview(mapped)[skip : skip + where.nbytes])

    def _mapped(self, where: StoredObject, pin: _Pin) -> Any:
        """A spilled object's file, mapped: the view reads the page cache, no copy. Its
        pages are mapped at once (MAP_POPULATE): one pass, twice as fast as a fault per page."""
        import pyarrow as pa

        mapped = self._map_spilled(where, lambda fd: mmap.mmap(
            fd, where.nbytes, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ))
        data = pa.py_buffer(mapped)
        return pa.foreign_buffer(data.address, data.size, base=(pin, data))

    def _map_spilled(self, where: StoredObject, mapping: Callable[[int], _M]) -> _M:
        """``mapping(fd)`` of a spilled object's file; a file that cannot be read is a lost
        object."""
        try:
            fd = os.open(self._spill_file(where.object_id), os.O_RDONLY | os.O_CLOEXEC)
            try:
                return mapping(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise ObjectLostError(
                f"object {where.object_id} was spilled, and its file cannot be read: {error}"
            ) from error

    def _spill_file(self, object_id: int) -> str:
        raise NotImplementedError

    def _create_waiting(self, nbytes: int, hand_over: bool) -> tuple[int, int, int]:
        """Make room for an object (held here unless ``hand_over``), retrying while the
        store is full for as long as its owner says: its id, offset, and where the
        writer must reserve pages from (see ``MappedSegment.reserve_block``)."""
        deadline = None
        pause = 0.002
        while True:
            with self._lock:
                try:
                    object_id, offset, fresh = self._create(nbytes, for_owner=hand_over)
                except NoRoom as full:
                    if deadline is None:
                        deadline = time.monotonic() + full.wait_s
                    if time.monotonic() >= deadline:
                        raise ObjectStoreFullError(str(full)) from None
                else:
                    if not hand_over:
                        self._local[object_id] += 1
                    return object_id, offset, fresh
            time.sleep(pause)  # without the lock: this process's releases may make room
            pause = min(pause * 2, 0.05)

    def locate(self, object_id: int) -> StoredObject:
        """Look an object up by id and take a reference to it (released by ``delete``)."""
        with self._lock:
            ref = self._incref(object_id) if not self._local[object_id] else None
            if ref is not None:
                self._where[object_id] = ref
            self._local[object_id] += 1
        return ref if ref is not None else self._describe(object_id)

    def delete(self, ref: ObjectRef) -> None:
        """Drop the reference that ``put`` or ``locate`` gave this process.

        The memory is reused as soon as no process holds the object and no view
        of it is alive anywhere.
        """
        if isinstance(ref, StoredObject):
            self._queue_release(ref.object_id)

    def retain(self, ref: ObjectRef) -> None:
        """Take one more reference to an object this process already holds."""
        if isinstance(ref, StoredObject):
            self._hold(ref.object_id)

    def take_grants(self, refs: list[StoredObject]) -> None:
        """The owner holds these objects for this process until ``end_grants``: views of
        them need no reference of this process's own (no round trip)."""
        with self._lock:
            for ref in refs:
                self._granted[ref.object_id] += 1
                self._granted_at[ref.object_id] = ref

    def end_grants(self, refs: list[StoredObject]) -> None:
        """The task the owner held ``refs`` for is over; call it before saying so to the
        owner's process. Views that outlive the task get a reference of their own here:
        a round trip, before the owner can let go."""
        with self._lock:
            self._drain()  # views that died already
            for ref in refs:
                object_id = ref.object_id
                self._granted[object_id] -= 1
                if self._granted[object_id] <= 0:
                    del self._granted[object_id]
                    del self._granted_at[object_id]
                    if object_id in self._borrowed:  # views alive: a reference of our own
                        self._borrowed.discard(object_id)
                        self._incref(object_id)

    def held(self) -> dict[int, int]:
        """Objects this process holds, with how many local holders each has."""
        with self._lock:
            return dict(self._local)

    # -- reference counting ----------------------------------------------

    def _hold(self, object_id: int) -> StoredObject | None:
        """Take a hold; where the object is (None: where this process made it)."""
        with self._lock:
            if not self._local[object_id]:
                granted = self._granted_at.get(object_id)
                if granted is not None:
                    self._borrowed.add(object_id)
                    self._where[object_id] = granted
                else:
                    self._where[object_id] = self._incref(object_id)
            self._local[object_id] += 1
            return self._where.get(object_id)

    def _queue_release(self, object_id: int) -> None:
        # Runs from finalizers: must not block on a lock this thread may hold.
        self._pending.append(object_id)
        self._lock.try_drain()

    def _queue_view_release(self, object_id: int) -> None:
        self._queue_release(object_id)

    def _drain(self) -> None:
        released: collections.Counter[int] = collections.Counter()
        while self._pending:
            object_id = self._pending.popleft()
            self._local[object_id] -= 1
            if self._local[object_id] <= 0:
                del self._local[object_id]
                self._where.pop(object_id, None)
                if object_id in self._borrowed:  # the owner's hold: it drops it
                    self._borrowed.discard(object_id)
                else:
                    released[object_id] += 1
        if released and not self._closed:
            self._decref(released)

    # -- transport hooks ----------------------------------------------------

    def _create(self, nbytes: int, *, for_owner: bool = False) -> tuple[int, int, int]:
        raise NotImplementedError

    def _abort(self, object_id: int) -> None:
        raise NotImplementedError

    def _lease(self, nbytes: int) -> tuple[int, int] | None:
        return None  # the owner fills its own objects by put

    def _leased_ahead(self, nbytes: int) -> tuple[int, int] | None:
        """A block leased ahead for a value of ``nbytes`` handed to the owner, held here."""
        return None

    def keep_freed_lease(self, object_id: int, offset: int, nbytes: int) -> bool:
        """Keep a leased block this process let go of unsealed for its next lease of about
        that size (no round trip), rather than release it; False: release it (never blocks)."""
        return False

    def release_spares(self) -> None:
        """Give back the blocks leased ahead or kept (this process has gone idle)."""

    def _seal(self, object_id: int, header: bytes) -> StoredObject:
        raise NotImplementedError

    def _deliver(self, object_id: int, offset: int, nbytes: int, header: bytes,
                 hand_over: bool = False) -> StoredObject:
        raise NotImplementedError

    def _incref(self, object_id: int) -> StoredObject:
        raise NotImplementedError

    def _describe(self, object_id: int) -> StoredObject:
        raise NotImplementedError

    def _decref(self, released: collections.Counter[int]) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OwnerStore(ObjectStore):
    """The store's owner: holds the object table and serves other processes."""

    def __init__(self, capacity: int | None = None, directory: str | None = None, *,
                 spill_dir: str | None = None, spill_threshold: float = DEFAULT_THRESHOLD,
                 wait_s: float = DEFAULT_WAIT_S) -> None:
        super().__init__()
        directory = directory or DEFAULT_SHM_DIR
        capacity = capacity if capacity is not None else default_capacity(directory)
        if capacity <= 0:
            raise ValueError(f"store_capacity must be positive, got {capacity}")
        self._table = ObjectTable(capacity)
        # Views of objects alive in this process (they pin an object where it is).
        self._views: collections.Counter[int] = collections.Counter()
        self._pending_views: collections.deque[int] = collections.deque()
        self._lock = DrainingLock(self._drain, lambda: self._pending or self._pending_views)
        self.segment = MappedSegment(create_memory_file(directory, capacity), capacity)
        # Blocks whose writers reserve their pages: id -> the range, counted once sealed.
        self._writers: dict[int, tuple[int, int]] = {}
        self._spiller = Spiller(self, SpillFiles(spill_dir), spill_threshold, wait_s)
        self.address = f"sharedcompute-{os.getpid()}-{secrets.token_hex(8)}"
        self._server = StoreServer(self)

    def _create(self, nbytes: int, *, for_owner: bool = False) -> tuple[int, int, int]:
        return self._create_for(OWNER, nbytes)

    def _abort(self, object_id: int) -> None:
        self._writers.pop(object_id, None)
        self._table.abort(OWNER, object_id)

    def allocate_incoming(self, nbytes: int) -> tuple[int, memoryview]:
        """Room for an object that arrives from elsewhere: (its id, the memory to fill).

        Seal it with ``seal_incoming`` once every byte is in, or give it back with
        ``delete_incoming`` if the transfer fails; this process holds it as a ``put``.
        """
        with self._lock:  # written as it arrives: its pages are reserved now
            object_id, offset, _ = self._create_for(OWNER, nbytes, writer_reserves=False)
            self._local[object_id] += 1
        return object_id, self.segment.writable(offset, nbytes)

    def seal_incoming(self, object_id: int, header: bytes) -> StoredObject:
        with self._lock:
            return self._seal(object_id, header)

    def delete_incoming(self, object_id: int) -> None:
        self._queue_release(object_id)

    def adopt(self, ref: ObjectRef) -> None:
        """Take the reference a client handed over with ``put_serialized(for_owner=True)``."""
        if isinstance(ref, StoredObject):
            with self._lock:
                self.seal_delivered(ref.object_id, ref.header, ref.nbytes)
                self._local[ref.object_id] += 1
                self._table.delivered(ref.object_id)

    def seal_delivered(self, object_id: int, header: bytes, nbytes: int) -> None:
        """Seal an object a client made for this process, unless sealed already (lock held):
        its one-way ``deliver`` and ``adopt`` both do, whichever comes first."""
        if self._table.unsealed(object_id):
            self._sealed(object_id, header, nbytes)

    def drop_deliveries(self, client: int) -> int:
        """Free the objects ``client`` made for this process that it never handed over.

        Call it once everything that client said has been read (it has exited): a
        result it stored and then died before reporting would otherwise stay.
        """
        with self._lock:
            return self._table.drop_deliveries(client, OWNER)

    def _create_for(
        self, client: int, nbytes: int, *, courier: int | None = None, wait: bool = True,
        writer_reserves: bool = True,
    ) -> tuple[int, int, int]:
        """Allocate (lock held): id, offset, and where its writer reserves pages from. No
        room: ``wait`` for the spiller or for releases (the lock let go meanwhile), else
        raise ``NoRoom`` for the client to retry. Without ``writer_reserves`` every page is
        reserved here (a writer that does not reserve as it writes: numpy, a transfer)."""
        try:
            object_id, offset = self._table.create(client, nbytes, courier=courier)
        except NoRoom:
            if self._spiller.disk_error is not None:
                raise ObjectStoreFullError(self._spiller.disk_error) from None
            if not wait:
                self._spiller.wake()
                full = NoRoom(self._full_message(nbytes))
                full.wait_s = self._spiller.wait_s
                raise full from None
            object_id, offset = self._wait_for_room(client, nbytes, courier)
        self._spiller.check(self._table.allocator.used_bytes)
        try:
            end = offset + self._table.allocator.block_size(offset)
            fresh = self.segment.reserve_block(offset, end, requested=nbytes,
                                               writer_share=writer_reserves)
        except BaseException:
            self._table.abort(client, object_id)
            raise
        if fresh < end:
            writers = self._writers
            if len(writers) >= 16:  # forget writers that died before sealing
                for gone in [i for i in writers if i not in self._table]:
                    del writers[gone]
            writers[object_id] = (fresh, offset + nbytes)
        return object_id, offset, fresh

    def lease_for(self, client: int, nbytes: int) -> tuple[int, int] | None:
        """A block ``client`` fills in place for this process, its pages reserved (lock
        held; see ``lease``): only below the spill threshold, so a lease neither waits nor
        makes room by spilling. None: no lease, or a full shared-memory filesystem."""
        spiller = self._spiller
        if spiller.disk_error or self._table.allocator.used_bytes + nbytes > spiller.limit:
            return None
        try:
            object_id, offset, _ = self._create_for(OWNER, nbytes, courier=client, wait=False,
                                                    writer_reserves=False)
        except (ObjectStoreFullError, ObjectLostError):  # NoRoom included
            return None
        self._table.lease(object_id, client, OWNER)
        return object_id, offset

    def grant(self, client: int, refs: list[StoredObject]) -> list[StoredObject] | None:
        """Hold ``refs`` for ``client`` while a task of it reads them (it calls
        ``take_grants``): where each is now. None: no grant (past the spill threshold,
        where a queued task must not pin its inputs, or an object is gone already)."""
        with self._lock:
            if self._table.allocator.used_bytes > self._spiller.limit:
                return None
            located = []
            try:
                for ref in refs:
                    located.append(self._table.incref(client, ref.object_id))
            except ObjectLostError:
                for taken in located:
                    self._table.decref(client, taken.object_id)
                return None
            return located

    def end_grant(self, client: int, refs: list[StoredObject]) -> None:
        """The task ``grant`` held ``refs`` for is over (ignored for a client gone)."""
        with self._lock:
            for ref in refs:
                self._table.decref(client, ref.object_id)
            self.after_free()

    def _sealed(self, object_id: int, header: bytes, nbytes: int | None = None) -> StoredObject:
        """Seal (lock held); pages its writer reserved count as reserved from now on."""
        ref = self._table.seal(object_id, header, nbytes)
        reserved = self._writers.pop(object_id, None)
        if reserved is not None:
            self.segment.written(*reserved)
        return ref

    def _wait_for_room(self, client: int, nbytes: int,
                       courier: int | None) -> tuple[int, int]:
        made: list[tuple[int, int]] = []

        def attempt() -> bool:
            with self._lock:
                try:
                    made.append(self._table.create(client, nbytes, courier=courier))
                except NoRoom:
                    return False
            return True

        self._lock.release()
        try:
            self._spiller.wait_for_room(time.monotonic() + self._spiller.wait_s, attempt)
        except NoRoom:
            with self._lock:
                message = self._full_message(nbytes)
            raise ObjectStoreFullError(message) from None
        finally:
            self._lock.acquire()
        return made[0]

    def _full_message(self, nbytes: int) -> str:
        """Why an object of ``nbytes`` does not fit (lock held): sizes, spilled, holders."""
        table = self._table
        largest = []
        for object_id, size, spilled, holders in table.largest(3):
            who = ", ".join(self._server.describe_client(c) for c in sorted(holders))
            largest.append(f"object {object_id} ({size:,} bytes, "
                           f"{'spilled' if spilled else 'in memory'}, held by {who or 'none'})")
        return (
            f"the object store has no room for an object of {nbytes:,} bytes after waiting "
            f"{self._spiller.wait_s:g} s: capacity {table.capacity:,} bytes, in memory "
            f"{table.allocator.used_bytes:,} bytes (largest free block "
            f"{table.allocator.largest_free():,}), spilled {table.spilled_bytes:,} bytes to "
            f"{self._spiller.files.path or self._spiller.files.parent}; the largest objects: "
            f"{'; '.join(largest) or 'none'}. Objects held by a process other than the "
            "driver, or viewed, cannot be spilled: let go of some, or raise store_capacity"
        )

    def buffer(self, ref: StoredObject, *, private: bool = False) -> Any:
        object_id = ref.object_id
        with self._lock:
            self.move_out_before_read(object_id)
            where = self._table.locate(object_id)  # it may have moved to a file
            if not self._local[object_id]:
                self._table.incref(OWNER, object_id)
            self._local[object_id] += 1
            self._views[object_id] += 1
        return self._view(where, _ViewPin(self, object_id), private)

    def move_out_before_read(self, object_id: int) -> None:
        """Past the spill threshold, write an object to its file before a reader takes it
        (lock held): read mapped, it pins no arena memory while the reader holds it, so
        tasks that read large inputs never hold the room their results need."""
        spiller = self._spiller
        if self._table.allocator.used_bytes <= spiller.limit or spiller.disk_error:
            return
        found = self._table.spill_candidate(object_id, OWNER, self._views, MIN_SPILL_BYTES)
        if found is None:
            return
        offset, nbytes, refs = found
        try:
            written = spiller.files.write(object_id, self.segment.writable(offset, nbytes))
        except OSError:
            return  # read from the arena, then; the spill thread reports a full disk
        if self._table.spilled(object_id, offset, refs, OWNER, self._views):
            spiller.files.keep(object_id, written)
            spiller.written_bytes += nbytes
            spiller.freed()
        else:
            spiller.files.discard(written)

    def _queue_view_release(self, object_id: int) -> None:
        self._pending_views.append(object_id)
        self._lock.try_drain()

    def _drain(self) -> None:
        while self._pending_views:
            object_id = self._pending_views.popleft()
            self._views[object_id] -= 1
            if self._views[object_id] <= 0:
                del self._views[object_id]
            self._pending.append(object_id)  # and its hold
        super()._drain()
        self.after_free()

    def after_free(self) -> None:
        """Objects may have gone (lock held): remove their files, tell who waits for room."""
        unlinks = self._table.unlinks
        while unlinks:
            self._spiller.files.unlink(unlinks.pop())
            self._spiller.freed()
        if self._spiller._waiting:
            self._spiller.freed()

    def _spill_file(self, object_id: int) -> str:
        return self._spiller.files.file(object_id)

    def _seal(self, object_id: int, header: bytes) -> StoredObject:
        return self._sealed(object_id, header)

    def _incref(self, object_id: int) -> StoredObject:
        return self._table.incref(OWNER, object_id)

    def _describe(self, object_id: int) -> StoredObject:
        with self._lock:
            ref = self._table.incref(OWNER, object_id)
            self._table.decref(OWNER, object_id)
        return ref

    def _decref(self, released: collections.Counter[int]) -> None:
        for object_id, count in released.items():
            self._table.decref(OWNER, object_id, count)

    def stats(self) -> dict[str, int]:
        with self._lock:
            stats = self._table.stats()
        stats["reserved_bytes"] = self.segment.reserved
        stats["spill_written_bytes"] = self._spiller.written_bytes
        return stats

    def objects(self) -> list[tuple[int, int, bool, list[str], bool]]:
        """(id, nbytes, spilled, holders named, sealed) of every object, largest first
        (unsealed: being written, or a block a worker keeps for its next result)."""
        with self._lock:
            listed = self._table.largest()
            return [(object_id, nbytes, spilled,
                     [self._server.describe_client(c) for c in sorted(holders)],
                     not self._table.unsealed(object_id))
                    for object_id, nbytes, spilled, holders in listed]

    @property
    def spill_path(self) -> str | None:
        """The directory of this store's spill files (None: nothing spilled yet)."""
        return self._spiller.files.path

    def close(self) -> None:
        if self._closed:
            return
        self._spiller.close()
        self._server.close()
        with self._lock:
            self._closed = True
            views_alive = bool(self._local)
        self.segment.close(unmap=not views_alive)
