"""The wire shape every codec produces: a kind tag, a small header and an aligned region.

This module owns the pieces the codecs share and nothing else: the :class:`Kind` tags, the
alignment rule, :class:`Serialized` (a recipe for filling a region) and the helper that turns
whatever buffer a reader hands us into a flat byte view. It imports no third-party package so
that the hot path (tiny pickled values) never pays for numpy or pyarrow (copies of 16 MiB and
more load numpy, to run outside the GIL).
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "ALIGNMENT",
    "Chunk",
    "Kind",
    "Serialized",
    "align",
    "byte_view",
]

ALIGNMENT = 64
"""Every out-of-line buffer starts at a multiple of this inside the region.

64 bytes is one cache line and what Arrow and AVX-512 loads want; a region whose base is
64-aligned therefore yields buffers that numpy and Arrow treat as aligned.
"""


class Kind(enum.IntEnum):
    """The first byte of every header: which codec wrote the value."""

    PICKLE = 0  # region = one pickle stream, no out-of-band buffers (the tiny-value fast path)
    PICKLE_OOB = 1  # region = pickle stream, buffer-length table, aligned out-of-band buffers
    NDARRAY = 2  # region = the array's bytes in C or Fortran order
    ARROW = 3  # region = one Arrow IPC stream
    BYTES = 4  # region = the raw bytes
    BYTEARRAY = 5
    MEMORYVIEW = 6


# A chunk is copied verbatim to ``offset`` in the region. Sources are ``bytes`` or 1-D
# unsigned-byte memoryviews, so ``len()`` is their size and slice assignment is a memmove.
Chunk = tuple[int, bytes | memoryview]
Writer = Callable[[memoryview], None]


def align(offset: int, alignment: int = ALIGNMENT) -> int:
    """Round ``offset`` up to a multiple of ``alignment`` (a power of two)."""
    return (offset + alignment - 1) & -alignment


PARALLEL_COPY_BYTES = 16 * 1024 * 1024
"""Copies at least this large run in two threads, outside the GIL.

One core does not saturate memory bandwidth: two threads copy a large buffer ~1.5x faster
(more gained nothing on the machines measured), and with the GIL released the driver's
other threads go on meanwhile.
"""


def copy_bytes(dest: memoryview, source: Any) -> None:
    """``dest[:] = source`` for a flat byte view ``dest`` and a buffer of the same size."""
    if len(dest) < PARALLEL_COPY_BYTES:
        dest[:] = source
        return
    import numpy as np

    target = np.frombuffer(dest, dtype=np.uint8)
    origin = np.frombuffer(source, dtype=np.uint8)
    half = (len(dest) // 2) & ~4095
    helper = threading.Thread(
        target=np.copyto, args=(target[half:], origin[half:]), name="sharedcompute-copy"
    )
    helper.start()
    try:
        np.copyto(target[:half], origin[:half])
    finally:
        helper.join()


SLICED_BYTES = 32 * 1024 * 1024
"""Chunks this large are written a slice at a time when the destination's pages are reserved
as they are written, or the source's pages are given back as they are copied
(``write_into``): a sixteenth of the chunk, 16 to 64 MiB, is the most a copy holds twice."""


def _slice_bytes(size: int) -> int:
    return min(64 << 20, max(16 << 20, (size // 16) & -4096))


# Where each page's bytes have been copied out, madvise(MADV_DONTNEED) returns the page.
_MADV_DONTNEED = 4


@functools.cache
def _madvise() -> Any:
    """libc's madvise, typed (None where there is none)."""
    import ctypes

    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _page_releaser(source: memoryview) -> Callable[[int, int], None] | None:
    """A function that gives the pages of ``source[lo:hi]`` back to the system, or None.

    Only for a buffer nothing will read again (a worker's result that nothing else
    holds): its pages read as zeros afterwards. Whole pages only; the first and last
    partial pages stay (the allocator's own bytes may share them).
    """
    import mmap

    import numpy as np

    madvise = _madvise()
    if madvise is None:
        return None
    advice = getattr(mmap, "MADV_DONTNEED", _MADV_DONTNEED)
    page = mmap.PAGESIZE
    address = int(np.frombuffer(source, dtype=np.uint8).ctypes.data)
    first = (address + page - 1) & -page

    def release(lo: int, hi: int) -> None:
        start = first if lo == 0 else (address + lo) & -page
        stop = (address + hi) & -page
        if stop > start:
            madvise(start, stop - start, advice)

    return release


def _copy_sliced(
    view: memoryview, offset: int, chunk: bytes | memoryview,
    prepare: Callable[[int, int], None] | None, consume: bool,
) -> None:
    source = byte_view(chunk)
    release = _page_releaser(source) if consume else None
    size = len(source)
    step = _slice_bytes(size)
    for lo in range(0, size, step):
        hi = min(lo + step, size)
        if prepare is not None:
            prepare(offset + lo, offset + hi)
        copy_bytes(view[offset + lo : offset + hi], source[lo:hi])
        if release is not None:
            release(lo, hi)


def byte_view(buffer: object) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer, without copying it.

    Readers accept ``pyarrow.Buffer``, ``bytes``, ``bytearray``, ``mmap`` or memoryviews of any
    format; everything downstream indexes bytes, so normalise once here.
    """
    view = buffer if type(buffer) is memoryview else memoryview(buffer)  # type: ignore[arg-type]
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


class Serialized:
    """A value ready to be written: ``header`` plus a recipe for an ``nbytes``-long region.

    Building one copies no data: it keeps references to the source buffers (so they must not
    be mutated until :meth:`write_into` has run) and copies them exactly once, straight into
    the destination. ``chunks`` are verbatim copies at fixed offsets; ``writer`` is for codecs
    that must produce their bytes themselves (Arrow IPC, strided numpy arrays).
    """

    __slots__ = ("_chunks", "_writer", "header", "nbytes")

    header: bytes
    nbytes: int

    def __init__(
        self,
        header: bytes,
        nbytes: int,
        chunks: tuple[Chunk, ...] | list[Chunk] = (),
        writer: Writer | None = None,
    ) -> None:
        self.header = header
        self.nbytes = nbytes
        self._chunks = chunks
        self._writer = writer

    def write_into(
        self, dest: memoryview, *, prepare: Callable[[int, int], None] | None = None,
        consume: bool = False,
    ) -> None:
        """Fill ``dest[:nbytes]``; padding between buffers is left as it was.

        ``prepare(lo, hi)`` is called before ``dest[lo:hi]`` is written (the store reserves
        fresh shared-memory pages there); with ``consume`` the source's whole pages are given
        back as they are copied: the caller promises that nothing reads the value again.
        Large chunks go a slice at a time with either (see ``SLICED_BYTES``), so the copy
        holds at most one slice twice.
        """
        view = byte_view(dest)
        if view.readonly:
            raise ValueError("write_into needs a writable destination")
        if len(view) < self.nbytes:
            raise ValueError(f"destination holds {len(view)} bytes, value needs {self.nbytes}")
        for offset, chunk in self._chunks:
            size = len(chunk)
            if size >= SLICED_BYTES and (prepare is not None or consume):
                _copy_sliced(view, offset, chunk, prepare, consume)
                continue
            if prepare is not None:
                prepare(offset, offset + size)
            copy_bytes(view[offset : offset + size], chunk)
        if self._writer is not None:
            if prepare is not None:
                prepare(0, self.nbytes)
            self._writer(view[: self.nbytes])

    def to_bytes(self) -> bytes:
        """The region as ``bytes``, for small values that travel inline in a message."""
        chunks = self._chunks
        if self._writer is None and len(chunks) == 1:
            offset, chunk = chunks[0]
            if offset == 0 and len(chunk) == self.nbytes:
                # The region is one buffer: for tiny values the pickle stream itself, returned
                # without a copy; otherwise one copy instead of two through a bytearray.
                return chunk if type(chunk) is bytes else bytes(chunk)
        out = bytearray(self.nbytes)
        self.write_into(memoryview(out))
        return bytes(out)

    def __repr__(self) -> str:
        kind = Kind(self.header[0]).name if self.header else "?"
        return f"Serialized(kind={kind}, header={len(self.header)} B, nbytes={self.nbytes})"
