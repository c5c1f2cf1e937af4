"""numpy arrays with a fixed-size dtype: the data bytes alone, in C or Fortran order.

Header: kind byte, then a pickle of ``(dtype, shape, fortran)`` where ``dtype`` is the dtype's
``str`` for the builtin scalar kinds (``'<f8'``, ``'<M8[ns]'``, ``'|S5'`` round-trip exactly and
pickle ~5x faster) and the dtype object itself for anything richer (structured, subarray,
metadata, user dtypes). Region: the array's ``nbytes`` at offset 0.

Reading builds one ``np.ndarray`` over the caller's buffer: no copy, no page touched, and the
result is read-only exactly when the region is.
"""

from __future__ import annotations

import pickle

import numpy as np

from ._format import Kind, Serialized, Writer, byte_view

__all__ = ["read_ndarray", "serialize_ndarray", "supports"]

_HEADER_TAG = bytes([Kind.NDARRAY])
# Kinds whose dtype is fully described by ``dtype.str``; "V" is excluded because structured
# and user-defined dtypes (e.g. bfloat16) collapse to an anonymous '|V<n>' there.
_STR_KINDS = frozenset("biufcmMSU")


def supports(array: np.ndarray) -> bool:
    """Whether the raw-bytes codec applies: fixed-size items holding no Python references."""
    dtype = array.dtype
    return not dtype.hasobject and dtype.kind not in "OT" and dtype.itemsize > 0


def serialize_ndarray(array: np.ndarray) -> Serialized:
    dtype = array.dtype
    simple = dtype.kind in _STR_KINDS and dtype.fields is None and dtype.metadata is None
    dtype_key: str | np.dtype = dtype.str if simple else dtype
    if array.flags.c_contiguous:
        fortran = False
        flat: np.ndarray | None = array.reshape(-1)
    elif array.flags.f_contiguous:
        # Kept in Fortran order so a column-major producer hands a column-major array on.
        fortran = True
        flat = array.T.reshape(-1)
    else:
        fortran = False
        flat = None
    header = _HEADER_TAG + pickle.dumps((dtype_key, array.shape, fortran), 5)
    nbytes = array.nbytes
    if nbytes == 0:
        return Serialized(header, 0)
    if flat is not None:
        return Serialized(header, nbytes, ((0, flat.view(np.uint8).data),))
    return Serialized(header, nbytes, writer=_strided_writer(array))


def _strided_writer(array: np.ndarray) -> Writer:
    def write(dest: memoryview) -> None:
        # One dtype-aware gather straight into the region: no ascontiguousarray temporary.
        target = np.ndarray(array.shape, array.dtype, buffer=dest, order="C")
        np.copyto(target, array, casting="no")

    return write


def read_ndarray(header: bytes, region: object) -> np.ndarray:
    dtype_key, shape, fortran = pickle.loads(header[1:])
    dtype = np.dtype(dtype_key)
    view = byte_view(region)
    return np.ndarray(shape, dtype, buffer=view, order="F" if fortran else "C")
