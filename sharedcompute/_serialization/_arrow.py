"""Arrow Table / RecordBatch / Array / ChunkedArray as one Arrow IPC stream.

Header: kind byte, shape byte (:class:`ArrowShape`), ``<Q`` stream length. Region: the IPC
stream at offset 0. Arrays travel as a one-column batch and ChunkedArrays as a one-column table,
so every shape reuses the same reader and comes back as the type it left as.

Serializing sizes the stream with a ``MockOutputStream`` (no data is copied); ``write_into``
then writes the real stream through a ``FixedSizeBufferWriter`` straight into the destination,
so the data is copied exactly once. Reading opens the stream over a ``pyarrow.Buffer`` that
wraps the caller's region, which Arrow reads without copying (IPC body buffers are 8-byte
aligned, and the default ``ensure_alignment=Any`` never realigns).

Only imported once a pyarrow value is seen or an Arrow header is read.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.ipc

from ._format import Kind, Serialized

__all__ = ["ArrowShape", "read_arrow", "serialize_arrow"]

_HEADER = struct.Struct("<BBQ")
_COLUMN = "value"

ArrowValue: TypeAlias = pa.Table | pa.RecordBatch | pa.Array | pa.ChunkedArray


class ArrowShape(enum.IntEnum):
    TABLE = 0
    RECORD_BATCH = 1
    ARRAY = 2
    CHUNKED_ARRAY = 3


def serialize_arrow(value: object) -> Serialized | None:
    """An IPC-stream :class:`Serialized`, or None when ``value`` is another pyarrow type."""
    shape: ArrowShape
    data: pa.Table | pa.RecordBatch
    if isinstance(value, pa.Table):
        shape, data = ArrowShape.TABLE, value
    elif isinstance(value, pa.RecordBatch):
        shape, data = ArrowShape.RECORD_BATCH, value
    elif isinstance(value, pa.Array):
        shape, data = ArrowShape.ARRAY, pa.RecordBatch.from_arrays([value], names=[_COLUMN])
    elif isinstance(value, pa.ChunkedArray):
        shape, data = ArrowShape.CHUNKED_ARRAY, pa.Table.from_arrays([value], names=[_COLUMN])
    else:
        return None
    mock = pa.MockOutputStream()
    _write_stream(mock, data)
    nbytes = mock.size()
    header = _HEADER.pack(Kind.ARROW, shape, nbytes)
    return Serialized(header, nbytes, writer=_stream_writer(data, nbytes))


def _write_stream(sink: Any, data: pa.Table | pa.RecordBatch) -> None:
    with pa.ipc.new_stream(sink, data.schema) as writer:
        if isinstance(data, pa.Table):
            writer.write_table(data)
        else:
            writer.write_batch(data)


def _stream_writer(data: pa.Table | pa.RecordBatch, nbytes: int) -> Callable[[memoryview], None]:
    def write(dest: memoryview) -> None:
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(dest[:nbytes]))
        _write_stream(sink, data)
        if sink.tell() != nbytes:  # the mock and the real write must agree byte for byte
            raise RuntimeError(f"Arrow IPC stream was {sink.tell()} bytes, sized {nbytes}")

    return write


def read_arrow(header: bytes, region: object) -> ArrowValue:
    _, shape, nbytes = _HEADER.unpack_from(header)
    buffer = region if isinstance(region, pa.Buffer) else pa.py_buffer(region)
    if buffer.size < nbytes:
        raise ValueError(f"region holds {buffer.size} bytes, Arrow stream needs {nbytes}")
    reader = pa.ipc.open_stream(buffer.slice(0, nbytes))
    if shape == ArrowShape.TABLE:
        return reader.read_all()
    if shape == ArrowShape.RECORD_BATCH:
        return reader.read_next_batch()
    if shape == ArrowShape.ARRAY:
        return reader.read_next_batch().column(0)
    if shape == ArrowShape.CHUNKED_ARRAY:
        return reader.read_all().column(0)
    raise ValueError(f"unknown Arrow shape {shape}")
