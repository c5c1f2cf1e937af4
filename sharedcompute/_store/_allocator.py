"""First-fit allocator over one contiguous arena; pure bookkeeping, no I/O.

It owns the map of free extents of an arena of ``capacity`` bytes and hands out
64-byte aligned blocks. First fit by address keeps live data packed towards the
start of the arena, so the memory that has been touched before (warm, already
mapped in every process) is reused first and the untouched tail stays untouched.

State and invariants:
- ``_free`` maps start offset -> length of every free extent; extents never
  overlap and never touch (adjacent extents are merged on release).
- ``_starts`` is the sorted list of the keys of ``_free``.
- ``_used`` maps start offset -> length of every allocated block.
- every offset and length is a multiple of ``ALIGNMENT``.
- ``high_water`` is the end of the highest block ever allocated: bytes below it
  have been reserved in the backing file, bytes above it never were.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 64


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class Allocator:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGNMENT
        self._free: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self._starts: list[int] = [0] if self.capacity else []
        self._used: dict[int, int] = {}
        self.high_water = 0
        self.used_bytes = 0

    def allocate(self, size: int) -> int | None:
        """Return the offset of a block of at least ``size`` bytes, or None if none fits."""
        length = align_up(max(size, 1))
        for start in self._starts:
            extent = self._free[start]
            if extent >= length:
                self._take(start, extent, length)
                return start
        return None

    def _take(self, start: int, extent: int, length: int) -> None:
        del self._free[start]
        index = bisect.bisect_left(self._starts, start)
        if extent == length:
            del self._starts[index]
        else:
            self._starts[index] = start + length
            self._free[start + length] = extent - length
        self._used[start] = length
        self.used_bytes += length
        self.high_water = max(self.high_water, start + length)

    def release(self, offset: int) -> None:
        length = self._used.pop(offset)
        self.used_bytes -= length
        index = bisect.bisect_left(self._starts, offset)
        end = offset + length
        # Merge with the following extent, then with the preceding one.
        if index < len(self._starts) and self._starts[index] == end:
            length += self._free.pop(end)
            del self._starts[index]
        if index > 0:
            before = self._starts[index - 1]
            if before + self._free[before] == offset:
                self._free[before] += length
                return
        self._free[offset] = length
        self._starts.insert(index, offset)

    def block_size(self, offset: int) -> int:
        return self._used[offset]

    def largest_free(self) -> int:
        return max(self._free.values(), default=0)
