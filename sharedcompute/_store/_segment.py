"""The store's backing memory: one unnamed shared-memory file, mapped once per process.

The file is created with ``O_TMPFILE`` inside the shared-memory filesystem
(``/dev/shm`` unless configured), so it never has a name: no crash, not even a
SIGKILL of its creator between two instructions, can leave an entry behind.
Where ``O_TMPFILE`` is unavailable it is created under a random name and
unlinked at once. Other processes receive the open descriptor (SCM_RIGHTS) and
map it; the memory is returned to the system when the last process holding the
descriptor or a mapping exits.

The file is sparse. Pages are reserved with ``posix_fallocate`` before anything
writes to them, so a full filesystem surfaces as ENOSPC here (turned into
``ObjectStoreFullError``) rather than as SIGBUS on a page fault later. Reserved
pages are never given back while the store lives: they stay warm and mapped, so
the next put into them costs a memcpy, not a page-zeroing fault storm.

The owner keeps the ranges reserved so far. A new block with ``SLICED_BYTES`` or
more not yet reserved is left to its writer, which reserves it slice by slice as it
copies (``Serialized.write_into``'s ``prepare``): a worker handing over a 1 GiB
result gives its own pages back as the store's are taken, so the two never add up
to two copies. The owner counts such a block reserved once it is sealed (its writer
may fail half way: then the next block there reserves it again).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import warnings
from collections.abc import Callable

from sharedcompute._serialization._format import SLICED_BYTES
from sharedcompute.errors import ObjectStoreFullError

DEFAULT_SHM_DIR = "/dev/shm"
# Share of physical memory, and of the free space in the shared-memory
# filesystem, that a store takes by default (Ray uses 30% of RAM).
DEFAULT_RAM_FRACTION = 0.3
DEFAULT_SHM_FRACTION = 0.9


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_shm_bytes(directory: str = DEFAULT_SHM_DIR) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def default_capacity(directory: str = DEFAULT_SHM_DIR) -> int:
    by_ram = int(_total_ram() * DEFAULT_RAM_FRACTION)
    by_shm = int(free_shm_bytes(directory) * DEFAULT_SHM_FRACTION)
    return max(min(by_ram, by_shm), 64 * 1024 * 1024)


def create_memory_file(directory: str, capacity: int) -> int:
    """Create the sparse, nameless backing file and return its descriptor."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError):
        path = os.path.join(directory, f"sharedcompute-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.unlink(path)
    try:
        os.ftruncate(fd, capacity)
    except BaseException:
        os.close(fd)
        raise
    free = free_shm_bytes(directory)
    if capacity > free:
        warnings.warn(
            f"sharedcompute object store capacity ({capacity:,} bytes) exceeds the free space "
            f"in {directory} ({free:,} bytes); puts past that point will raise "
            "ObjectStoreFullError. Pass a smaller store_capacity or enlarge the filesystem.",
            ResourceWarning,
            stacklevel=3,
        )
    return fd


class _Spans:
    """Disjoint, sorted ``[start, stop)`` ranges of the file known to be reserved.

    Blocks are reserved where they are first used and never given back, so the ranges
    merge as the store warms up: a handful at most, soon one.
    """

    __slots__ = ("_ranges",)

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def total(self) -> int:
        return sum(hi - lo for lo, hi in self._ranges)

    def missing(self, start: int, stop: int) -> list[tuple[int, int]]:
        gaps = []
        at = start
        for lo, hi in self._ranges:
            if hi <= at:
                continue
            if lo >= stop:
                break
            if lo > at:
                gaps.append((at, lo))
            at = max(at, hi)
            if at >= stop:
                break
        if at < stop:
            gaps.append((at, stop))
        return gaps

    def add(self, start: int, stop: int) -> None:
        merged = []
        for lo, hi in self._ranges:
            if hi < start or lo > stop:
                merged.append((lo, hi))
            else:
                start, stop = min(lo, start), max(hi, stop)
        merged.append((start, stop))
        merged.sort()
        self._ranges = merged


class MappedSegment:
    """A whole-file shared mapping of the store's memory in this process."""

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self.map = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
        # The address is taken once; the mapping lives as long as the process
        # uses the store, so views built on it never outlive it.
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)
        self._view = memoryview(self.map)
        self._spans = _Spans()

    def writable(self, offset: int, size: int) -> memoryview:
        return self._view[offset : offset + size]

    @property
    def reserved(self) -> int:
        """Bytes of the file known to be reserved."""
        return self._spans.total()

    def reserve_block(self, offset: int, end: int, *, requested: int,
                      writer_share: bool = True) -> int:
        """Reserve a new block ``[offset, end)``, or leave a large fresh part to its writer
        (``writer_share``: it reserves as it writes).

        Returns where the writer must reserve from (``end`` when nothing is left to it);
        when it has, ``written`` records that those pages are reserved now.
        """
        missing = self._spans.missing(offset, end)
        if not missing:
            return end
        if writer_share and sum(stop - start for start, stop in missing) >= SLICED_BYTES:
            return missing[0][0]
        for start, stop in missing:
            self._allocate(start, stop, requested)
            self._spans.add(start, stop)
        return end

    def written(self, fresh: int, end: int) -> None:
        """A writer reserved ``[fresh, end)`` as it wrote (the object is sealed)."""
        self._spans.add(fresh, end)

    def preparer(self, offset: int, fresh: int, requested: int) -> Callable[[int, int], None]:
        """``prepare`` for writing an object at ``offset`` whose pages from ``fresh`` on are
        not all reserved: each call reserves what the next write reaches."""
        done = [fresh]

        def prepare(lo: int, hi: int) -> None:
            stop = offset + hi
            if stop > done[0]:
                self._allocate(done[0], stop, requested)
                done[0] = stop

        return prepare

    def _allocate(self, start: int, stop: int, requested: int) -> None:
        try:
            os.posix_fallocate(self.fd, start, stop - start)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ObjectStoreFullError(
                    f"cannot reserve shared memory for an object of {requested:,} bytes: "
                    f"the shared-memory filesystem is full ({exc.strerror}); "
                    f"store capacity is {self.capacity:,} bytes"
                ) from exc
            raise

    def close(self, *, unmap: bool) -> None:
        """Close the descriptor; unmap only when no view into the mapping can be alive."""
        os.close(self.fd)
        if unmap:
            self._view.release()
            del self._anchor
            self.map.close()
