"""The generic codec: pickle protocol 5 with every out-of-band buffer laid out aligned.

A value is pickled by the C pickler first (numpy arrays reduced as below, nothing else
looked at in Python), and by cloudpickle only where that fails or would be wrong: code, a
lambda or a local class (the C pickler raises), anything of ``__main__`` (named in the
stream: the worker's ``__main__`` is another module), or a module registered to be pickled
by value (``cloudpickle.register_pickle_by_value``) named in the stream. The C pickler is
1.5-2.5x faster on pandas frames and dicts of them, whose many small objects each cost
cloudpickle a Python call (``reducer_override``).

Region layout for ``Kind.PICKLE_OOB`` (``Kind.PICKLE`` is the first part alone)::

    0             pickle stream (pickle_len bytes)
    align(.., 8)  n little-endian u64 buffer lengths
    align(.., 64) buffer 0, then each next buffer at the next multiple of 64

Header: kind byte, then ``<QQ`` (pickle_len, n). The length table lives in the region, not the
header, so the header stays 17 bytes however many buffers a value holds (a list of a million
small arrays would otherwise make a multi-megabyte header).
"""

from __future__ import annotations

import copyreg
import io
import pickle
import struct
import sys
from collections.abc import Callable
from types import CodeType
from typing import Any, Literal

import cloudpickle

from ._format import Chunk, Kind, Serialized, align, byte_view
from ._source import Spans, reduce_code

__all__ = ["PICKLE_HEADER", "dumps_plain", "read_pickled", "serialize_pickled"]

PICKLE_HEADER = bytes([Kind.PICKLE])
_OOB_HEADER = struct.Struct("<QQ")
_TABLE_ALIGNMENT = 8


def dumps_plain(value: object) -> Serialized:
    """Serialize a value made only of builtin scalars and containers with the C pickler.

    Such values pickle identically with cloudpickle, but the C pickler is ~6x faster, and this
    runs for every task's arguments and result.
    """
    data = pickle.dumps(value, 5)
    return Serialized(PICKLE_HEADER, len(data), ((0, data),))


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, plus out-of-band buffers for the arrays numpy would pickle in-band.

    numpy's own reducer pickles two kinds of array in-band, i.e. copied into the stream and
    copied again on load: datetime64 / timedelta64 (they cannot export a PEP 3118 buffer) and
    non-contiguous arrays (which on top of that silently lose a non-native byte order). Both
    matter: pandas datetime columns and sliced arrays inside containers are common. We hand
    them over as a flat byte view instead (after one gather for the strided ones), so they come
    back as zero-copy, read-only views like every other array.
    """

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], None]):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        numpy = sys.modules.get("numpy")
        # Resolved once per dump: reducer_override runs for every object pickled.
        self._ndarray: Any = numpy.ndarray if numpy is not None else None
        self._spans: Spans = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is CodeType:  # a lambda in an argument, say: its source goes along
            return reduce_code(obj, self._spans)
        if type(obj) is self._ndarray and _needs_own_reducer(obj):
            return _reduce_ndarray(obj)
        return super().reducer_override(obj)


def _reduce_ndarray(array: Any) -> Any:
    """The C pickler's reduction of an ndarray: numpy's own, or ``_Pickler``'s for the arrays
    numpy would pickle in-band."""
    if _needs_own_reducer(array):
        if array.flags.c_contiguous:
            order, flat = "C", array.reshape(-1)
        elif array.flags.f_contiguous:
            order, flat = "F", array.T.reshape(-1)
        else:
            order, flat = "C", array.copy(order="C").reshape(-1)
        return rebuild_ndarray, (pickle.PickleBuffer(flat.view("u1")), array.dtype, array.shape,
                                 order)
    return array.__reduce_ex__(5)


# copyreg's table plus ndarray, for the C pickler (looked up by type, so no other object
# costs a Python call); made again when a reducer is registered with copyreg.
_table: tuple[int, dict[Any, Any]] = (-1, {})


def _dispatch_table(ndarray: Any) -> dict[Any, Any]:
    global _table
    size, table = _table
    if size != len(copyreg.dispatch_table) or ndarray not in table:
        table = copyreg.dispatch_table.copy()
        table[ndarray] = _reduce_ndarray
        _table = (len(copyreg.dispatch_table), table)
    return table


def _dumps_c(value: object) -> tuple[bytes, list[pickle.PickleBuffer]] | None:
    """The C pickler's stream and buffers, or None where cloudpickle must do it."""
    numpy = sys.modules.get("numpy")
    table = (_dispatch_table(numpy.ndarray) if numpy is not None
             else copyreg.dispatch_table)
    buffers: list[pickle.PickleBuffer] = []
    try:
        with io.BytesIO() as file:
            pickler = pickle.Pickler(file, 5, buffer_callback=buffers.append)
            pickler.dispatch_table = table
            pickler.dump(value)
            data = file.getvalue()
    except pickle.PicklingError:  # a lambda, a function or class pickled by value...
        return None
    except (AttributeError, TypeError) as error:  # a local object, code, a module...
        if "pickle" in str(error):
            return None
        raise  # raised by the value's own reduction: not run a second time
    if b"__main__" in data:  # by reference to the driver's __main__: by value instead
        return None
    for name in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES:
        if name.encode() in data:  # named in the stream: cloudpickle sends it by value
            return None
    return data, buffers


def _needs_own_reducer(array: Any) -> bool:
    dtype = array.dtype
    if dtype.hasobject or dtype.kind in "OT" or dtype.itemsize == 0:
        return False  # references, not bytes: only numpy's reducer can handle these
    contiguous = array.flags.c_contiguous or array.flags.f_contiguous
    return dtype.kind in "mM" or not contiguous


def rebuild_ndarray(
    buffer: Any, dtype: Any, shape: tuple[int, ...], order: Literal["C", "F"]
) -> Any:
    """Unpickle helper (referenced by name in pickle streams): an array viewing ``buffer``."""
    import numpy

    return numpy.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def serialize_pickled(value: object) -> Serialized:
    pickled = _dumps_c(value)
    if pickled is not None:
        data, buffers = pickled
    else:
        buffers = []
        with io.BytesIO() as file:
            _Pickler(file, buffers.append).dump(value)
            data = file.getvalue()
    if not buffers:
        return Serialized(PICKLE_HEADER, len(data), ((0, data),))
    # raw() is a zero-copy byte view; it refuses non-contiguous buffers, which numpy never
    # hands out (it pickles those in-band) and which we report as a serialization error.
    raws = [buffer.raw() for buffer in buffers]
    lengths = [raw.nbytes for raw in raws]
    table_offset = align(len(data), _TABLE_ALIGNMENT)
    table = struct.pack(f"<{len(raws)}Q", *lengths)
    chunks: list[Chunk] = [(0, data), (table_offset, table)]
    offset = align(table_offset + len(table))
    end = offset
    for raw in raws:
        chunks.append((offset, raw))
        end = offset + raw.nbytes
        offset = align(end)
    header = bytes([Kind.PICKLE_OOB]) + _OOB_HEADER.pack(len(data), len(raws))
    return Serialized(header, end, chunks)


def read_pickled(header: bytes, region: object) -> object:
    pickle_len, count = _OOB_HEADER.unpack_from(header, 1)
    view = byte_view(region)
    table_offset = align(pickle_len, _TABLE_ALIGNMENT)
    lengths = struct.unpack_from(f"<{count}Q", view, table_offset)
    buffers: list[memoryview] = []
    offset = end = align(table_offset + 8 * count)
    for length in lengths:
        # Views, not copies: numpy (and pyarrow) rebuild their arrays on these directly, and
        # inherit the region's read-only flag.
        end = offset + length
        buffers.append(view[offset:end])
        offset = align(end)
    if end > len(view):
        # Slicing a memoryview past its end truncates silently; fail loudly instead.
        raise ValueError(f"region holds {len(view)} bytes, header needs {end}")
    return pickle.loads(view[:pickle_len], buffers=buffers)
