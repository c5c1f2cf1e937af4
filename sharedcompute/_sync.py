"""Synchronization shared by the layers: a lock for state that finalizers also change, and
emptying a thread's wake-up pipe (``drain_pipe``).

Finalizers (a Future or a store view being collected) may run in any thread at
any bytecode, even in a thread that already holds the lock, so they must never
block on it. They queue their work and call :meth:`DrainingLock.try_drain`: if
the lock is free the work is done at once, otherwise whoever holds the lock
does it as part of releasing it. ``release`` looks again after letting go, so
work queued by another thread in that instant is not stranded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def drain_pipe(fd: int) -> None:
    """Read a non-blocking wake-up pipe until it is empty (its bytes only say "look")."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class DrainingLock:
    def __init__(self, drain: Callable[[], None], pending: Callable[[], object]) -> None:
        self._lock = threading.Lock()
        self._drain = drain
        self._pending = pending

    def acquire(self, blocking: bool = True) -> bool:
        return self._lock.acquire(blocking)

    def release(self) -> None:
        """Do the queued work, then release; again while more work and the lock are free."""
        while True:
            try:
                self._drain()
            finally:
                self._lock.release()
            if not self._pending() or not self._lock.acquire(blocking=False):
                return

    def try_drain(self) -> None:
        """Do the queued work now if the lock is free (never blocks)."""
        if self._lock.acquire(blocking=False):
            self.release()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
