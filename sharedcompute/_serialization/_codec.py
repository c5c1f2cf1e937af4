"""Value <-> (header, region): the one place that decides how a Python value is laid out.

What it owns
    ``serialize(value) -> Serialized`` picks a codec by the value's exact type;
    ``deserialize(header, region)`` dispatches on the header's first byte. Codecs live in
    private modules (``_pickled``, ``_ndarray``, ``_arrow``, ``_raw``); numpy and pyarrow codecs
    are imported only when such a value or header is met, so importing this package costs
    neither.

Layout
    ``header`` is small bytes that travel in the control message: ``header[0]`` is a
    :class:`Kind`, the rest is codec-specific and never grows with the data (at most with the
    number of dimensions; the pickle codec keeps its buffer table in the region). The
    *region* is ``nbytes`` bytes that the store (or an inline message) holds::

        Kind        header after the kind byte       region
        PICKLE      -                                pickle stream
        PICKLE_OOB  <QQ pickle_len, n_buffers        stream | u64 lengths @8 | buffers @64 each
        NDARRAY     pickle (dtype, shape, fortran)   array bytes in C or Fortran order
        ARROW       <BQ shape, stream_len            Arrow IPC stream
        BYTES       <Q length                        raw bytes (BYTEARRAY likewise)
        MEMORYVIEW  <QB length, ndim; shape; format  raw bytes

Invariants
    * Every out-of-line buffer starts at a multiple of ``ALIGNMENT`` (64) from the region start
      (Arrow IPC body buffers inside the stream are 8-aligned, which is what Arrow requires).
    * ``Serialized`` holds references to the value's buffers and ``write_into`` copies each
      exactly once, straight into the destination. The exceptions are strided data that must
      be gathered first: a non-contiguous array nested inside a container and a non-contiguous
      memoryview (a top-level strided array is gathered straight into the destination).
    * Reading never copies or touches array data: numpy and Arrow results are views onto the
      region, read-only when the region is. Only ``bytes`` and ``bytearray`` values are copied
      out (their types promise immutability or ownership); ``memoryview`` comes back as a
      read-only view.
    * Every failure surfaces as :class:`~sharedcompute.errors.SerializationError`; on write it
      names the innermost unpicklable object's type and its path inside the value.

Fast path
    Values made only of builtin scalars (and small tuples/lists/dicts of them) skip cloudpickle
    and use the C pickler, with a constant one-byte header; reading them is one
    ``pickle.loads``. This runs for every task's arguments and result.
"""

from __future__ import annotations

import pickle
import sys

from ..errors import DeserializationError, SerializationError
from ._format import Kind, Serialized
from ._locate import describe_read_failure, describe_write_failure
from ._pickled import PICKLE_HEADER, dumps_plain, read_pickled, serialize_pickled
from ._raw import (
    read_bytearray,
    read_bytes,
    read_memoryview,
    serialize_bytes,
    serialize_memoryview,
)

__all__ = ["deserialize", "serialize"]

_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
# bytes and bytearray at top level take the raw codec instead (no pickling of the data).
_TOP_SCALARS = _SCALARS - {bytes}
# Containers larger or deeper than this go through cloudpickle: checking them would cost more
# than the C pickler saves, and they are no longer "tiny" anyway.
_PLAIN_MAX_ITEMS = 16
_PLAIN_MAX_DEPTH = 2

_PICKLE = int(Kind.PICKLE)


def serialize(value: object, root: str = "value") -> Serialized:
    """Lay ``value`` out as a header plus a region recipe; see the module docstring.

    ``root`` names ``value`` in a failure's path (``result[2]['key']``).
    """
    if type(value) in _TOP_SCALARS:
        # Inlined hot path (None, ints, floats, short strings): no try, no further dispatch.
        data = pickle.dumps(value, 5)
        return Serialized(PICKLE_HEADER, len(data), ((0, data),))
    try:
        return _serialize(value)
    except (SerializationError, MemoryError):
        raise
    except Exception as exc:
        raise describe_write_failure(value, exc, root) from exc


def _serialize(value: object) -> Serialized:
    cls = type(value)
    if cls is bytes or cls is bytearray:
        return serialize_bytes(value)  # type: ignore[arg-type]
    if _is_plain(value, 0):
        return dumps_plain(value)
    if cls is memoryview:
        return serialize_memoryview(value)  # type: ignore[arg-type]
    numpy = sys.modules.get("numpy")
    # ``value`` can only be an ndarray if numpy is already imported; checking the module table
    # first keeps numpy out of processes that never use it.
    if numpy is not None and cls is numpy.ndarray:
        from . import _ndarray

        if _ndarray.supports(value):  # type: ignore[arg-type]
            return _ndarray.serialize_ndarray(value)  # type: ignore[arg-type]
    elif cls.__module__.startswith("pyarrow"):
        from ._arrow import serialize_arrow

        serialized = serialize_arrow(value)
        if serialized is not None:
            return serialized
    return serialize_pickled(value)


def _is_plain(value: object, depth: int) -> bool:
    """Whether the C pickler writes exactly what cloudpickle would (no code, no classes)."""
    cls = type(value)
    if cls in _SCALARS:
        return True
    if depth >= _PLAIN_MAX_DEPTH:
        return False
    if cls is tuple or cls is list:
        if len(value) > _PLAIN_MAX_ITEMS:  # type: ignore[arg-type]
            return False
        # An explicit loop: all() over a generator costs more than the check itself here.
        for item in value:  # type: ignore[attr-defined]  # noqa: SIM110
            if not _is_plain(item, depth + 1):
                return False
        return True
    if cls is dict:
        if len(value) > _PLAIN_MAX_ITEMS:  # type: ignore[arg-type]
            return False
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) not in _SCALARS or not _is_plain(item, depth + 1):
                return False
        return True
    return False


def deserialize(header: bytes, region: object) -> object:
    """Rebuild a value from ``header`` and a buffer holding at least ``nbytes`` of region.

    ``region`` may be a ``pyarrow.Buffer``, ``bytes``, ``bytearray``, ``mmap`` or memoryview;
    numpy and Arrow results are views onto it and keep it alive.
    """
    if not header:
        raise DeserializationError("cannot deserialize: empty header")
    kind = header[0]
    if kind == _PICKLE:
        try:
            # pickle.loads stops at the STOP opcode, so a region longer than the stream is fine.
            return pickle.loads(region)  # type: ignore[arg-type]
        except (Exception, SystemExit) as exc:  # sys.exit() in a __setstate__ is no exit here
            raise describe_read_failure("pickled value", exc) from exc
    try:
        return _read(kind, header, region)
    except SerializationError:
        raise
    except (Exception, SystemExit) as exc:
        raise describe_read_failure(f"{_kind_name(kind)} value", exc) from exc


def _read(kind: int, header: bytes, region: object) -> object:
    if kind == Kind.PICKLE_OOB:
        return read_pickled(header, region)
    if kind == Kind.NDARRAY:
        from ._ndarray import read_ndarray

        return read_ndarray(header, region)
    if kind == Kind.ARROW:
        from ._arrow import read_arrow

        return read_arrow(header, region)
    if kind == Kind.BYTES:
        return read_bytes(header, region)
    if kind == Kind.BYTEARRAY:
        return read_bytearray(header, region)
    if kind == Kind.MEMORYVIEW:
        return read_memoryview(header, region)
    raise DeserializationError(f"cannot deserialize: unknown kind byte {kind}")


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"
