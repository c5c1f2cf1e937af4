"""Spilling: the owner's objects written to files when the arena fills, and read back mapped.

::

    put / result ──create──▶ table ──past threshold──▶ wake ──▶ spill thread
         ▲  no room: wait (owner) or retry (client)            │ LRU objects only the owner
         └──────────── room ◀── block freed ◀── spilled() ◀────┘ holds: arena ──write──▶ file

A thread of its own (``Spiller``) keeps the arena under ``threshold`` of its
capacity: it picks the least recently used objects that may move (``ObjectTable.
spill_candidates``: held by the owner alone, no view alive), writes each to a file
outside the store's lock, then, under the lock, records the move if nothing
changed meanwhile and frees the block. Nobody waits on a spill write unless the
store is full: then an owner thread that needs room waits for the spiller (or for
readers to let go), at most ``wait_s``, and a client retries for as long (its
request must not hold up the owner's server thread, which also hears the releases
that would make room).

A spilled object is read by memory-mapping its file: numpy and Arrow values are
views of the page cache, no copy. It is not moved back into shared memory: that
would write the same bytes again and push something else out, while the page
cache already keeps a file that is read often in memory.

Files live in ``sharedcompute-spill-<pid>-<random>`` under ``spill_dir`` (default:
the system temp dir), one per object, named by its id; a file goes with its
object, the directory with the store. One left by a process that was killed is
swept by the next store to start there: its pid is dead (a live pid is never
touched, so another runtime running beside it is safe).

A write that fails (a full disk) stops spilling until an object's file is
removed; who waits for room is told at once, with ``spill_dir`` and its free space.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sharedcompute._files import make_own_dir
from sharedcompute._store._table import NoRoom
from sharedcompute.errors import ObjectStoreFullError

if TYPE_CHECKING:
    from sharedcompute._store._store import OwnerStore

PREFIX = "sharedcompute-spill-"
DEFAULT_THRESHOLD = 0.8
DEFAULT_WAIT_S = 30.0
MIN_SPILL_BYTES = 64 * 1024  # smaller objects are not worth a file each


class SpillFiles:
    """The store's spill directory, made on first use."""

    def __init__(self, parent: str | None) -> None:
        self.parent = parent or tempfile.gettempdir()
        self.path: str | None = None

    def ensure(self) -> str:
        if self.path is None:
            self.path = make_own_dir(PREFIX, self.parent)
        return self.path

    def file(self, object_id: int) -> str:
        return os.path.join(self.ensure(), str(object_id))

    def write(self, object_id: int, data: memoryview) -> str:
        """Write an object's bytes to a file of their own; its path (``keep`` it, or
        ``discard`` it if the object did not move after all)."""
        path = f"{self.file(object_id)}.{threading.get_ident()}.part"
        try:
            with open(path, "wb", buffering=0) as file:
                written = 0
                while written < len(data):
                    written += file.write(data[written:])
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return path

    def keep(self, object_id: int, written: str) -> None:
        os.rename(written, self.file(object_id))

    @staticmethod
    def discard(written: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(written)

    def unlink(self, object_id: int) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.path, str(object_id)))

    def free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.path or self.parent).free
        except OSError:
            return 0

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


class Spiller:
    """The owner's spill thread, and the wait for room when the arena is full."""

    def __init__(self, owner: OwnerStore, files: SpillFiles, threshold: float,
                 wait_s: float) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"the spill threshold is a fraction of the store, got {threshold}")
        self._owner = owner
        self.files = files
        self.threshold = threshold
        self.wait_s = wait_s
        self.limit = int(owner.capacity * threshold)
        self._wake = threading.Condition(threading.Lock())
        self._woken = False
        self._room = threading.Condition(threading.Lock())
        self._waiting = 0  # owner threads waiting for room
        self.disk_error: str | None = None  # a failed write: no spilling until a file goes
        self.written_bytes = 0
        self.written_seconds = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called under the owner's lock ----------------------------------------------------------

    def check(self, used_bytes: int) -> None:
        """After an allocation: past the threshold, the spill thread starts working."""
        if used_bytes > self.limit and self.disk_error is None:
            self.wake()

    def wake(self) -> None:
        with self._wake:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="sharedcompute-spill",
                                                daemon=True)
                self._thread.start()
            self._woken = True
            self._wake.notify()

    def freed(self) -> None:
        """An object's memory or file went back: who waits for room looks again."""
        if self.disk_error is not None and self._owner._table.spilled_objects == 0:
            self.disk_error = None
        with self._room:
            self._room.notify_all()

    # -- waiting for room (an owner thread, the owner's lock released) --------------------------

    def wait_for_room(self, deadline: float, attempt: Callable[[], bool]) -> None:
        """Wake the spiller and wait until ``attempt()`` (which takes the lock itself) finds
        room; raise ObjectStoreFullError past ``deadline`` or once the disk is full."""
        import time

        with self._room:
            self._waiting += 1
        try:
            while True:
                self.wake()
                if attempt():
                    return
                if self.disk_error is not None:
                    raise ObjectStoreFullError(self.disk_error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoRoom("timed out")
                with self._room:
                    self._room.wait(min(left, 0.05))
        finally:
            with self._room:
                self._waiting -= 1

    # -- the spill thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._woken and not self._stopping:
                    self._wake.wait()
                self._woken = False
                if self._stopping:
                    return
            try:
                self._spill_until_under()
            except Exception as error:  # keep the thread: a later wake may succeed
                self.disk_error = self._describe_failure(error)
                with self._room:
                    self._room.notify_all()

    def _spill_until_under(self) -> None:
        import time

        owner = self._owner
        while not self._stopping and self.disk_error is None:
            with owner._lock:
                used = owner._table.allocator.used_bytes
                pressed = self._waiting > 0
                if used <= self.limit * 0.9 and not pressed:
                    return
                candidates = owner._table.spill_candidates(0, owner._views, MIN_SPILL_BYTES)
            if not candidates:
                return  # only readers can make room now (freed() wakes the waiters)
            for object_id, offset, nbytes, refs in candidates[:8]:
                started = time.perf_counter()
                try:
                    written = self.files.write(object_id, owner.segment.writable(offset, nbytes))
                except OSError as error:
                    self.disk_error = self._describe_failure(error, nbytes)
                    with self._room:
                        self._room.notify_all()
                    return
                with owner._lock:
                    moved = owner._table.spilled(object_id, offset, refs, 0, owner._views)
                    if moved:
                        self.files.keep(object_id, written)
                if moved:
                    self.written_bytes += nbytes
                    self.written_seconds += time.perf_counter() - started
                    with self._room:
                        self._room.notify_all()
                else:
                    self.files.discard(written)  # freed, read or moved meanwhile
                with owner._lock:
                    if owner._table.allocator.used_bytes <= self.limit * 0.9 and not (
                        self._waiting
                    ):
                        return

    def _describe_failure(self, error: BaseException, nbytes: int = 0) -> str:
        what = f" of an object of {nbytes:,} bytes" if nbytes else ""
        return (
            f"the object store is full and cannot spill: the write{what} to spill_dir "
            f"{self.files.path or self.files.parent} failed ({error}); "
            f"{self.files.free_bytes():,} bytes are free there; free some objects, "
            "or give spill_dir more room"
        )

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(10)
        self.files.close()
