"""Two words of memory a worker and its driver share, read without a message.

The driver creates them (a memfd of 16 bytes) for each worker it starts.

- Word 0, written by the worker: the key of the task it executes (0: none). It is
  set before a task starts and cleared, or set back to the task below on the
  stack, when it ends. After a worker dies the driver reads it: the task named
  there crashed the worker; the tasks sent before it had finished (their
  results may have sat in an unsent batch) and the ones after it never started,
  so only the crasher's retry budget is charged.
- Word 1, written by the driver: how many DROPs (messages that must not wait
  behind the worker's queued tasks) it has sent. The worker compares it with the
  DROPs it has read before each queued task, and reads its connection while they
  differ: a load from memory per task instead of a read from the socket.

The driver also rings a doorbell with each DROP (``attach_bell``: a byte on the pipe
whose end tells the worker the driver is gone), so the worker reads the DROP at once even
while a task runs: the task it takes back is wanted by an idle worker now.
"""

from __future__ import annotations

import mmap
import os
import threading


class RunningSlot:
    """The shared words; ``word[0]``: the executing task, ``word[1]``: DROPs sent."""

    __slots__ = ("_bell", "_bell_lock", "_map", "word")

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, 16)
        self.word = memoryview(self._map).cast("q")
        self._bell = -1  # the write end of the worker's watch pipe (driver side only)
        self._bell_lock = threading.Lock()  # no byte to a descriptor closed meanwhile

    @classmethod
    def create(cls) -> tuple[RunningSlot, int]:
        """A new slot and its file descriptor (for the worker; close it once passed)."""
        fd = os.memfd_create("sharedcompute-running", os.MFD_CLOEXEC)
        os.ftruncate(fd, 16)
        return cls(fd), fd

    def get(self) -> int:
        """The key of the task the worker executes (0: none)."""
        return int(self.word[0])

    def attach_bell(self, fd: int) -> None:
        """Ring ``fd`` (made non-blocking; its owner closes it) with each DROP."""
        os.set_blocking(fd, False)
        self._bell = fd

    def detach_bell(self) -> None:
        """Before its descriptor is closed."""
        with self._bell_lock:
            self._bell = -1

    def urgent_sent(self, count: int = 1) -> None:
        """``count`` DROPs have been sent: the worker reads before its next queued task,
        and at once where a bell is attached."""
        self.word[1] += count
        with self._bell_lock:
            if self._bell >= 0:
                try:
                    os.write(self._bell, b"!")
                except OSError:  # full (it reads them soon) or gone (it exits)
                    pass
