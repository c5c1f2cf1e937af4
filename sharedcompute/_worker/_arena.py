"""A worker's large numpy arrays, made in the object store: a result is sealed, not copied.

Without this, a task's array result is built in the worker's heap and then copied into
the store: one pass over its bytes per result, and for a moment two copies of it. Here
numpy's allocations of ``ARENA_BYTES`` or more in the worker's main thread (where tasks
run) come from the store instead, through a numpy memory handler (NEP 49, the C
extension ``_arena_handler``):

- each such allocation *leases* a block (``ObjectStore.lease``): one round trip to the
  owner, which makes the block for itself, in transit from this worker, as it does a
  result's; its pages are reserved before numpy writes them;
- ``_report`` seals the block of a result that is an array owning such a block and held
  by nothing but the task (``seal``): a one-way message, no copy; the worker's hold goes
  when numpy frees the array, right after;
- any other array gives its block back when numpy frees it: the owner discards an
  unsealed lease whose worker let go of it, or that died. While tasks run, the last two
  such blocks (up to ``AHEAD_MAX_BYTES`` each) are kept instead for the next arrays of
  about their size (a task's temporaries, a fused Dask task's intermediates), with no round
  trip, until the worker goes idle (``keep_freed_lease``); like the block leased ahead,
  they are not counted in ``LEASED_SHARE``.

Only below the store's spill threshold (a lease never waits and never spills), only while
this worker has less than ``capacity * LEASED_SHARE`` leased, and only when the store's
lock is free; otherwise numpy allocates from the C library as before, and such a result
is copied. A worker that hosts an actor turns it off: an actor's state would pin the
store for as long as the actor lives. Without the extension (no C compiler when the
package was installed), nothing changes but the copy.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sharedcompute._store import ObjectStore, StoredObject

__all__ = ["ARENA_BYTES", "Arena"]

ARENA_BYTES = 4 * 1024 * 1024
"""numpy allocations at least this large are leased from the store. A lease costs a round
trip to the owner (tens of microseconds): a few percent of what filling 4 MiB costs, and
an array this large that becomes a result saves a copy worth several times that."""

LEASED_SHARE = 0.25  # of the store's capacity, at most, leased by one worker at a time
_OFF = 1 << 63  # a threshold no allocation reaches


class Arena:
    """This process's leased blocks, and numpy's handler that leases them."""

    def __init__(self, store: ObjectStore, handler: Any) -> None:
        self._store = store
        self._handler = handler
        self._base = store.segment.address
        self._blocks: dict[int, tuple[int, int]] = {}  # address -> (object id, size)
        # Sealed results whose hold went to the owner with them: freed here, nothing to tell.
        self._handed: dict[int, tuple[int, int]] = {}
        # Sealed results whose hold stayed here (seal): released when freed, never reused.
        self._sealed: dict[int, tuple[int, int]] = {}
        self._leased = 0
        self._most = int(store.capacity * LEASED_SHARE)
        self._ndarray = sys.modules["numpy"].ndarray
        self._pid = os.getpid()

    @classmethod
    def install(cls, store: ObjectStore) -> Arena | None:
        """Make numpy lease large arrays in this thread's context (numpy is imported);
        None where the extension was not built."""
        try:
            from sharedcompute._worker import _arena_handler  # type: ignore[attr-defined]
        except ImportError:
            return None
        numpy_core = sys.modules.get("numpy._core._multiarray_umath") or sys.modules.get(
            "numpy.core._multiarray_umath")
        api = getattr(numpy_core, "_ARRAY_API", None)
        if api is None:
            return None
        arena = cls(store, _arena_handler)
        _arena_handler.install(api, arena._base, store.capacity, ARENA_BYTES,
                               arena._allocate, arena._free, arena._size)
        # A child forked by a task must not speak on this process's store connection.
        os.register_at_fork(after_in_child=arena.stop)
        return arena

    def stop(self) -> None:
        """Lease nothing more (arrays made so far give their blocks back as they go)."""
        self._handler.set_threshold(_OFF)

    # -- numpy's callbacks (GIL held, any error counts as a refusal) -------------------

    def _allocate(self, size: int) -> int:
        if self._leased + size > self._most or os.getpid() != self._pid:
            return 0
        leased = self._store.lease(size)
        if leased is None:
            return 0
        object_id, offset = leased
        address = self._base + offset
        if address in self._handed:
            # A result handed over is not freed here yet, and the owner has freed and lent
            # its block again: two arrays must never share it, nor one free the other's.
            self._store._queue_release(object_id)
            return 0
        self._blocks[address] = (object_id, size)
        self._leased += size
        return address

    def _free(self, address: int) -> None:
        if os.getpid() != self._pid:
            return  # a forked child's copy of an array: the parent holds the block
        handed = self._handed.pop(address, None)
        if handed is not None:
            self._leased -= handed[1]
            return  # its hold went with the result (seal)
        sealed = self._sealed.pop(address, None)
        if sealed is not None:
            self._leased -= sealed[1]
            self._store._queue_release(sealed[0])
            return
        block = self._blocks.pop(address, None)
        if block is not None:
            self._leased -= block[1]
            if not self._store.keep_freed_lease(block[0], address - self._base, block[1]):
                self._store._queue_release(block[0])  # never blocks: numpy frees anywhere

    def _size(self, address: int) -> int:
        block = self._blocks.get(address) or self._handed.get(address) or self._sealed[address]
        return block[1]

    # -- results ----------------------------------------------------------------------

    def seal(self, result: Any) -> StoredObject | None:
        """Seal ``result``'s block as the task's result, if it is an array made in one
        (the caller knows nothing else holds it, and lets go of it next: so this process's
        hold goes to the owner with it, in the same message); None: it must be copied."""
        if type(result) is not self._ndarray or result.nbytes < ARENA_BYTES:
            return None
        address = result.__array_interface__["data"][0]
        block = self._blocks.get(address)
        flags = result.flags
        if (block is None or block[1] != result.nbytes or not flags.owndata
                or not (flags.c_contiguous or flags.f_contiguous)):
            return None
        from sharedcompute._serialization._ndarray import serialize_ndarray, supports

        if not supports(result):
            return None
        header = serialize_ndarray(result).header
        ref, handed = self._store.seal_leased(block[0], address - self._base, header, block[1])
        if handed:
            self._handed[address] = self._blocks.pop(address)
        else:  # sealed, and still held here: released when freed, never kept for reuse
            self._sealed[address] = self._blocks.pop(address)
        return ref
