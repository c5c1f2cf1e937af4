"""The word of shared memory through which a worker tells which task it is executing.

The driver creates it (a memfd of 8 bytes) for each worker it starts and keeps
its own mapping; the worker writes a task's key there before the task starts and
clears it, or restores the task below on its stack, when the task ends. Writing
it costs a store into memory, no message. After a worker dies the driver reads
it: the task named there crashed the worker; the tasks sent before it had
finished (their results may have sat in an unsent batch) and the ones after it
never started, so only the crasher's retry budget is charged.
"""

from __future__ import annotations

import mmap
import os


class RunningSlot:
    """The key of the task a worker executes (0: none), in memory both processes map."""

    __slots__ = ("_map", "word")

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, 8)
        self.word = memoryview(self._map).cast("q")

    @classmethod
    def create(cls) -> tuple[RunningSlot, int]:
        """A new slot and its file descriptor (for the worker; close it once passed)."""
        fd = os.memfd_create("sharedcompute-running", os.MFD_CLOEXEC)
        os.ftruncate(fd, 8)
        return cls(fd), fd

    def get(self) -> int:
        return int(self.word[0])

    def set(self, key: int) -> None:
        self.word[0] = key
