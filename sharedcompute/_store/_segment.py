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
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import warnings

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
        self.reserved = 0

    def writable(self, offset: int, size: int) -> memoryview:
        return self._view[offset : offset + size]

    def reserve(self, end: int, *, requested: int) -> None:
        """Make sure every page below ``end`` is allocated in the backing file."""
        if end <= self.reserved:
            return
        try:
            os.posix_fallocate(self.fd, self.reserved, end - self.reserved)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ObjectStoreFullError(
                    f"cannot reserve shared memory for an object of {requested:,} bytes: "
                    f"the shared-memory filesystem is full ({exc.strerror}); "
                    f"store capacity is {self.capacity:,} bytes"
                ) from exc
            raise
        self.reserved = end

    def close(self, *, unmap: bool) -> None:
        """Close the descriptor; unmap only when no view into the mapping can be alive."""
        os.close(self.fd)
        if unmap:
            self._view.release()
            del self._anchor
            self.map.close()
