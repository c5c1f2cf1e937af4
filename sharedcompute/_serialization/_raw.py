"""bytes, bytearray and memoryview: the raw bytes at offset 0, nothing pickled.

Headers: kind byte + ``<Q`` length for bytes and bytearray. A memoryview adds its item format
and shape (``<QB`` length and ndim, ``ndim`` x ``<Q`` extents, then the format string) so the
reader can hand back a view of the same shape when ``memoryview.cast`` allows it.
"""

from __future__ import annotations

import struct

from ._format import Kind, Serialized, byte_view

__all__ = [
    "read_bytearray",
    "read_bytes",
    "read_memoryview",
    "serialize_bytes",
    "serialize_memoryview",
]

_LENGTH = struct.Struct("<Q")
_VIEW = struct.Struct("<QB")


def serialize_bytes(value: bytes | bytearray) -> Serialized:
    kind = Kind.BYTES if type(value) is bytes else Kind.BYTEARRAY
    header = bytes([kind]) + _LENGTH.pack(len(value))
    # A bytes chunk is returned as-is by to_bytes(); a bytearray is viewed, not copied.
    source = value if type(value) is bytes else memoryview(value)
    return Serialized(header, len(value), ((0, source),))


def serialize_memoryview(value: memoryview) -> Serialized:
    if not value.c_contiguous:
        # Strided views of foreign buffers are rare enough to pay one extra copy for.
        flat = memoryview(value.tobytes())
    elif value.ndim == 1 and value.format == "B":
        flat = value
    else:
        flat = value.cast("B")
    shape = value.shape or ()
    header = b"".join(
        (
            bytes([Kind.MEMORYVIEW]),
            _VIEW.pack(value.nbytes, len(shape)),
            struct.pack(f"<{len(shape)}Q", *shape),
            value.format.encode(),
        )
    )
    return Serialized(header, value.nbytes, ((0, flat),))


def read_bytes(header: bytes, region: object) -> bytes:
    (length,) = _LENGTH.unpack_from(header, 1)
    if type(region) is bytes and len(region) == length:
        return region  # an inline message already holds exactly these bytes
    return bytes(_checked(region, length))


def read_bytearray(header: bytes, region: object) -> bytearray:
    (length,) = _LENGTH.unpack_from(header, 1)
    return bytearray(_checked(region, length))


def read_memoryview(header: bytes, region: object) -> memoryview:
    length, ndim = _VIEW.unpack_from(header, 1)
    shape = struct.unpack_from(f"<{ndim}Q", header, 1 + _VIEW.size)
    fmt = header[1 + _VIEW.size + 8 * ndim :].decode()
    view = _checked(region, length).toreadonly()
    try:
        return view.cast(fmt, shape)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        # cast() only knows native single-item formats; anything else comes back as bytes.
        return view


def _checked(region: object, length: int) -> memoryview:
    view = byte_view(region)
    if len(view) < length:
        raise ValueError(f"region holds {len(view)} bytes, value needs {length}")
    return view[:length]
