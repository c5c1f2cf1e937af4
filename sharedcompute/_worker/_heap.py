"""A worker's heap: reuse freed memory while busy, give it back when idle.

glibc's malloc serves each large block (above an adaptive threshold that stops
at 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so every new large
numpy array pays its page faults again: about 10 ms per 100 MB, as much as a
simple array operation on it. Workers raise the mmap and trim thresholds at
start, so freed blocks stay in the heap and the next array of that size reuses
warm pages; after a short idle spell the worker calls ``malloc_trim(0)``, which
returns the free pages to the system, so an idle worker holds only what it
uses. With another C library nothing changes.

State: ``dirty`` is set when a task ran since the last trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this size come from the heap and are reused: the largest int mallopt takes
# (a threshold of exactly 1 GiB missed 1 GiB arrays, which are a few bytes larger).
_THRESHOLD = (1 << 31) - 1
_OLD_GLIBC_MAX = 32 << 20
# A worker idle this long gives its free heap pages back.
IDLE_TRIM_SECONDS = 0.25


class Heap:
    def __init__(self) -> None:
        self.dirty = False
        self.reuse_below = 0  # freed blocks smaller than this are kept (0: C library default)
        self._libc: Any = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt, trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):
            return  # not glibc: its own policy stands
        # Older glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2): take that.
        for threshold in (_THRESHOLD, _OLD_GLIBC_MAX):
            if mallopt(_M_MMAP_THRESHOLD, threshold):
                if mallopt(_M_TRIM_THRESHOLD, _THRESHOLD):
                    self._libc = libc
                    self._trim = trim
                    self.reuse_below = threshold
                return

    @property
    def tuned(self) -> bool:
        return self._libc is not None

    def trim(self) -> None:
        """Return free heap pages to the system."""
        self.dirty = False
        if self._libc is not None:
            self._trim(0)
