"""Tests for sharedcompute._serialization: round trips, zero-copy reads, alignment, errors.

Every round trip goes through a *region* made the way a reader would see it: a read-only
``pyarrow.Buffer`` over 64-byte-aligned memory (the store's case), plain ``bytes`` from
``to_bytes()`` (the inline-message case), a writable ``bytearray`` and a read-only memoryview.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import math
import mmap
import multiprocessing
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sharedcompute._serialization as serialization
from sharedcompute._serialization import ALIGNMENT, Serialized, deserialize, serialize
from sharedcompute.errors import SerializationError

pd = pytest.importorskip("pandas")

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- regions


@dataclasses.dataclass
class Region:
    """A serialized value as a reader receives it, with the address range it occupies."""

    buffer: Any
    address: int
    size: int
    writable: bool
    aligned: bool


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, np.uint8).ctypes.data) if len(buffer) else 0


def aligned_readonly(s: Serialized) -> Region:
    memory = pa.allocate_buffer(max(s.nbytes, 1))  # Arrow allocations are 64-byte aligned
    s.write_into(memoryview(memory))
    region = pa.foreign_buffer(memory.address, s.nbytes, base=memory)
    return Region(region, memory.address, s.nbytes, writable=False, aligned=True)


def inline_bytes(s: Serialized) -> Region:
    data = s.to_bytes()
    assert len(data) == s.nbytes
    return Region(data, _address(data), len(data), writable=False, aligned=False)


def writable_bytearray(s: Serialized) -> Region:
    # Longer than needed: readers must accept regions with slack at the end.
    data = bytearray(s.nbytes + 100)
    s.write_into(memoryview(data))
    return Region(data, _address(data), len(data), writable=True, aligned=False)


def readonly_memoryview(s: Serialized) -> Region:
    memory = pa.allocate_buffer(max(s.nbytes, 1))
    s.write_into(memoryview(memory))
    view = memoryview(memory)[: s.nbytes].toreadonly()
    return Region(view, memory.address, s.nbytes, writable=False, aligned=True)


REGIONS: list[Callable[[Serialized], Region]] = [
    aligned_readonly,
    inline_bytes,
    writable_bytearray,
    readonly_memoryview,
]
regions = st.sampled_from(REGIONS)


def roundtrip(
    value: object, make_region: Callable[[Serialized], Region] = aligned_readonly
) -> tuple[Any, Region, Serialized]:
    s = serialize(value)
    region = make_region(s)
    return deserialize(s.header, region.buffer), region, s


def assert_array_view(array: np.ndarray, region: Region) -> None:
    """``array`` is a zero-copy view into ``region``, read-only when the region is."""
    start = array.__array_interface__["data"][0]
    assert region.address <= start < region.address + region.size
    assert np.may_share_memory(array, np.frombuffer(region.buffer, np.uint8))
    if not region.writable:
        assert not array.flags.writeable


def assert_aligned(address: int, region: Region) -> None:
    assert (address - region.address) % ALIGNMENT == 0, address - region.address


# --------------------------------------------------------------------------- equality


def assert_arrays_identical(out: np.ndarray, expected: np.ndarray) -> None:
    assert type(out) is np.ndarray
    assert out.dtype == expected.dtype, (out.dtype, expected.dtype)
    assert out.shape == expected.shape
    if expected.dtype.names is not None:
        for name in expected.dtype.names:
            assert_arrays_identical(out[name], expected[name])
        return
    if expected.dtype.kind != "V":
        np.testing.assert_array_equal(out, expected, strict=True)
    # Bit-for-bit too: -0.0 vs 0.0, NaN payloads and NaT must survive.
    assert out.tobytes() == expected.tobytes()


def assert_same(out: Any, expected: object, region: Region | None = None) -> None:
    """Deep equality for nested values; contiguous nested arrays must be views into ``region``."""
    if isinstance(expected, np.ndarray):
        assert isinstance(out, np.ndarray)
        assert_arrays_identical(out, expected)
        if region is not None and expected.nbytes and not expected.dtype.hasobject:
            assert_array_view(out, region)
    elif isinstance(expected, dict):
        assert type(out) is type(expected)
        assert list(out) == list(expected)
        for key in expected:
            assert_same(out[key], expected[key], region)
    elif isinstance(expected, (list, tuple)):
        assert type(out) is type(expected)
        assert len(out) == len(expected)
        for a, b in zip(out, expected, strict=True):
            assert_same(a, b, region)
    elif isinstance(expected, float) and math.isnan(expected):
        assert type(out) is float and math.isnan(out)
    else:
        assert type(out) is type(expected)
        assert out == expected


# --------------------------------------------------------------------------- numpy


def padded_struct_dtypes(leaves: st.SearchStrategy[np.dtype]) -> st.SearchStrategy[np.dtype]:
    """Structured dtypes with explicit offsets, gaps, trailing padding and nesting."""

    @st.composite
    def build(draw: st.DrawFn, children: st.SearchStrategy[np.dtype]) -> np.dtype:
        names, formats, offsets = [], [], []
        offset = 0
        for index in range(draw(st.integers(1, 4))):
            field = draw(children)
            offset += draw(st.integers(0, 7))
            names.append(f"f{index}")
            formats.append(field)
            offsets.append(offset)
            offset += field.itemsize
        itemsize = offset + draw(st.integers(0, 9))
        spec = {"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}
        return np.dtype(spec)  # type: ignore[call-overload]

    return st.recursive(leaves, build, max_leaves=6)


scalar_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(min_len=1, max_len=6),
    hnp.unicode_string_dtypes(min_len=1, max_len=4),
)
all_dtypes = st.one_of(
    scalar_dtypes,
    hnp.array_dtypes(scalar_dtypes, max_size=3, allow_subarrays=True),
    padded_struct_dtypes(scalar_dtypes),
)
LAYOUTS = ["C", "F", "strided", "transposed", "negative"]


@st.composite
def numpy_arrays(draw: st.DrawFn, dtypes: st.SearchStrategy[np.dtype] = all_dtypes) -> np.ndarray:
    dtype = draw(dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    array = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        array = array[(slice(None, None, 2),) * array.ndim]
    elif layout == "transposed":
        array = array.T
    elif layout == "negative" and array.ndim:
        array = array[::-1]
    return array


@SETTINGS
@given(array=numpy_arrays(), make_region=regions)
def test_ndarray_roundtrip(array: np.ndarray, make_region: Callable[[Serialized], Region]) -> None:
    out, region, s = roundtrip(array, make_region)
    assert_arrays_identical(out, array)
    assert s.nbytes == array.nbytes
    if array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous:
        assert out.flags.f_contiguous and not out.flags.c_contiguous
    if array.nbytes:
        assert_array_view(out, region)
        if region.aligned:
            assert_aligned(out.__array_interface__["data"][0], region)


@pytest.mark.parametrize(
    "array",
    [
        np.array(3.5),
        np.zeros((0, 4), dtype="<M8[ns]"),
        np.arange(24, dtype=">i4").reshape(2, 3, 4, order="F"),
        np.arange(100.0)[::7],
        np.array(["a", "bcd", ""], dtype="U3"),
        np.array([b"xy", b"\x00z"], dtype="S2"),
        np.array([1 + 2j, np.nan], dtype=np.complex64),
        np.array(["2020-01-01", "NaT"], dtype="datetime64[D]"),
        np.array([5, -3], dtype="timedelta64[ms]"),
        np.zeros(3, dtype=np.dtype([("a", "u1"), ("b", "<f8", (2,)), ("c", [("d", "S3")])])),
        np.zeros(2, dtype=np.dtype([("a", "i1"), ("b", "i8")], align=True)),
    ],
    ids=lambda a: f"{a.dtype}-{a.shape}",
)
def test_ndarray_examples(array: np.ndarray) -> None:
    for make_region in REGIONS:
        out, region, _ = roundtrip(array, make_region)
        assert_arrays_identical(out, array)
        if array.nbytes:
            assert_array_view(out, region)


def test_ndarray_writable_region_gives_writable_view() -> None:
    array = np.arange(10.0)
    out, region, _ = roundtrip(array, writable_bytearray)
    assert out.flags.writeable
    out[0] = 42.0
    assert np.frombuffer(region.buffer, np.float64, count=1)[0] == 42.0


def test_object_arrays_and_subclasses_fall_back_to_pickle() -> None:
    objects = np.array([{"a": 1}, None, "x"], dtype=object)
    out, _, s = roundtrip(objects)
    assert s.header[0] != serialization.Kind.NDARRAY
    assert out.dtype == object and list(out) == list(objects)
    masked = np.ma.masked_array(np.arange(5.0), mask=[False, True, False, False, True])
    out, _, _ = roundtrip(masked)
    assert isinstance(out, np.ma.MaskedArray)
    np.testing.assert_array_equal(out.mask, masked.mask)
    assert out.compressed().tolist() == masked.compressed().tolist()


def test_numpy_scalars() -> None:
    for scalar in [np.float64(1.5), np.int8(-3), np.datetime64("2021-01-01T00:00"), np.bool_(1)]:
        out, _, _ = roundtrip(scalar)
        assert type(out) is type(scalar) and out == scalar


def test_large_array_deserializes_in_constant_time() -> None:
    # 1 GiB described by the header over an untouched anonymous mapping: reading must neither
    # copy nor fault in a single data page, so it takes microseconds, not the ~0.1 s a copy would.
    array = np.empty(2**27, dtype=np.float64)
    s = serialize(array)
    assert len(s.header) < 128
    mapping = mmap.mmap(-1, s.nbytes)
    try:
        region = pa.foreign_buffer(_address(mapping), s.nbytes, base=mapping)
        deserialize(s.header, region)  # warm the lazy imports
        start = time.perf_counter()
        out: Any = deserialize(s.header, region)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.02, elapsed  # a copy would take ~0.1-0.5 s
        assert out.shape == array.shape and not out.flags.writeable
        assert out.__array_interface__["data"][0] == region.address
        del out, region
    finally:
        mapping.close()


def test_strided_array_is_copied_once_into_the_region() -> None:
    base = np.arange(1000, dtype=np.int64).reshape(20, 50)
    view = base[::3, 1::4]
    s = serialize(view)
    assert s.nbytes == view.nbytes
    out, _, _ = roundtrip(view)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)


# --------------------------------------------------------------------------- nested values


small_arrays = numpy_arrays(
    st.one_of(
        hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.datetime64_dtypes(), hnp.boolean_dtypes()
    )
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=10),
    small_arrays,
)
nested_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=12,
)


@SETTINGS
@given(value=nested_values, make_region=regions)
def test_nested_roundtrip(value: object, make_region: Callable[[Serialized], Region]) -> None:
    out, region, _ = roundtrip(value, make_region)
    assert_same(out, value, region)


@dataclasses.dataclass
class Point:
    name: str
    coords: np.ndarray


class Slotted:
    __slots__ = ("payload", "tag")

    def __init__(self, payload: object, tag: str) -> None:
        self.payload = payload
        self.tag = tag


def test_out_of_band_buffers_are_aligned_views() -> None:
    # Odd sizes so that a packed layout would misalign every buffer after the first.
    arrays: list[np.ndarray] = [np.arange(n, dtype=np.uint8) for n in (1, 3, 63, 65, 1000)]
    arrays += [np.arange(7, dtype=np.float64), np.arange(6).astype("<M8[s]").reshape(2, 3).T]
    value = {"arrays": arrays, "point": Point("p", np.ones((3, 2), order="F"))}
    out, region, s = roundtrip(value, aligned_readonly)
    assert len(s.header) < 32  # the buffer table lives in the region, not the header
    for got, expected in zip(out["arrays"], arrays, strict=True):
        assert_arrays_identical(got, expected)
        assert_array_view(got, region)
        assert_aligned(got.__array_interface__["data"][0], region)
    coords = out["point"].coords
    assert coords.flags.f_contiguous and not coords.flags.writeable
    assert_aligned(coords.__array_interface__["data"][0], region)


@SETTINGS
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12))
def test_alignment_property(sizes: list[int]) -> None:
    arrays = [np.full(n, n % 251, dtype=np.uint8) for n in sizes]
    out, region, _ = roundtrip(arrays, aligned_readonly)
    for got, expected in zip(out, arrays, strict=True):
        assert_arrays_identical(got, expected)
        if expected.nbytes:
            assert_aligned(got.__array_interface__["data"][0], region)


def test_header_size_does_not_grow_with_data() -> None:
    assert len(serialize(list(range(1_000_000))).header) == 1
    assert len(serialize([np.zeros(3)] * 10_000).header) < 32
    assert len(serialize(np.zeros((1000, 1000))).header) < 128
    assert len(serialize(b"x" * 10_000_000).header) < 16


def test_objects_with_slots_dataclasses_and_closures() -> None:
    factor = 3

    def scale(x: int) -> int:
        return x * factor

    point, slotted = Point("a", np.arange(4.0)), Slotted({"k": np.arange(3)}, "t")
    value = [point, slotted, scale]
    out, region, _ = roundtrip(value)
    assert out[0].name == "a"
    assert_same(out[0].coords, point.coords, region)
    assert out[1].tag == "t"
    assert_same(out[1].payload, slotted.payload, region)
    assert out[2](2) == 6


# --------------------------------------------------------------------------- raw bytes


@SETTINGS
@given(data=st.binary(max_size=2000), make_region=regions)
def test_bytes_like_roundtrip(data: bytes, make_region: Callable[[Serialized], Region]) -> None:
    for value in (data, bytearray(data)):
        out, _, s = roundtrip(value, make_region)
        assert type(out) is type(value) and out == value
        assert s.nbytes == len(data)
    out, region, _ = roundtrip(memoryview(data), make_region)
    assert isinstance(out, memoryview) and out.readonly and out.tobytes() == data
    if data:
        assert region.address <= _address(out) < region.address + region.size


@pytest.mark.parametrize(
    ("view", "format", "shape"),
    [
        (np.arange(12, dtype=np.int32).reshape(3, 4).data, "i", (3, 4)),
        (np.arange(5.0).data, "d", (5,)),
        (np.array(2.5).data, "d", ()),
        (np.arange(20, dtype=np.int16).data[::3], "h", (7,)),
        (memoryview(b"abc"), "B", (3,)),
        # '<d' is not a native memoryview format: the bytes come back flat.
        (np.arange(3, dtype="<f8").view([("x", "<f8")]).data, "B", (24,)),
    ],
)
def test_memoryview_keeps_format_and_shape(view: memoryview, format: str, shape: tuple) -> None:
    expected = view.tobytes()
    for make_region in REGIONS:
        out, region, _ = roundtrip(view, make_region)
        assert out.readonly
        assert (out.format, out.shape) == (format, shape)
        assert out.tobytes() == expected
        if expected:
            assert region.address <= _address(out) < region.address + region.size


def test_tiny_values_use_one_byte_header_and_inline_region() -> None:
    for value in [None, True, 0, -(2**70), 1.5, "héllo", (1, "a", None), [1.0, [2]], {"a": (1,)}]:
        s = serialize(value)
        assert s.header == b"\x00"
        data = s.to_bytes()
        assert data is s.to_bytes() or data == s.to_bytes()
        assert deserialize(s.header, data) == value
        assert deserialize(s.header, data + b"trailing slack") == value


def test_write_into_rejects_bad_destinations() -> None:
    s = serialize(np.arange(10.0))
    with pytest.raises(ValueError, match="80"):
        s.write_into(memoryview(bytearray(79)))
    with pytest.raises(ValueError, match="writable"):
        s.write_into(memoryview(bytes(80)))


# --------------------------------------------------------------------------- Arrow


@st.composite
def arrow_columns(draw: st.DrawFn, length: int) -> pa.Array:
    kind = draw(st.sampled_from(["int", "float", "string", "list", "dictionary", "bool"]))
    nulls = draw(st.booleans())

    def maybe_null(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(st.none(), values) if nulls else values

    def items(values: st.SearchStrategy[Any]) -> list[Any]:
        return draw(st.lists(maybe_null(values), min_size=length, max_size=length))

    if kind == "int":
        return pa.array(items(st.integers(-(2**63), 2**63 - 1)), type=pa.int64())
    if kind == "float":
        return pa.array(items(st.floats(allow_nan=False)), type=pa.float64())
    if kind == "string":
        return pa.array(items(st.text(max_size=8)), type=pa.string())
    if kind == "list":
        return pa.array(items(st.lists(st.integers(-100, 100), max_size=4)), pa.list_(pa.int32()))
    if kind == "bool":
        return pa.array(items(st.booleans()), type=pa.bool_())
    return pa.array(
        items(st.sampled_from(["red", "green", "blue"])), pa.string()
    ).dictionary_encode()


@st.composite
def arrow_tables(draw: st.DrawFn) -> pa.Table:
    length = draw(st.integers(0, 30))
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    columns = [draw(arrow_columns(length)) for _ in names]
    table = pa.Table.from_arrays(columns, names=names)
    if length and draw(st.booleans()):  # several record batches
        cut = draw(st.integers(0, length))
        table = pa.concat_tables([table.slice(0, cut), table.slice(cut)])
    metadata = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
    return table.replace_schema_metadata(metadata or None)


def arrow_buffers(value: Any) -> Iterator[pa.Buffer]:
    arrays = value.chunks if isinstance(value, pa.ChunkedArray) else [value]
    if isinstance(value, (pa.Table, pa.RecordBatch)):
        arrays = [
            chunk for column in value.columns for chunk in getattr(column, "chunks", [column])
        ]
    for array in arrays:
        for buffer in array.buffers():
            if buffer is not None and buffer.size:
                yield buffer


def assert_arrow_views(value: Any, region: Region) -> None:
    for buffer in arrow_buffers(value):
        assert region.address <= buffer.address
        assert buffer.address + buffer.size <= region.address + region.size


@SETTINGS
@given(table=arrow_tables(), make_region=regions, data=st.data())
def test_arrow_roundtrip(
    table: pa.Table, make_region: Callable[[Serialized], Region], data: st.DataObject
) -> None:
    column = table.column(data.draw(st.integers(0, table.num_columns - 1)))
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
    values: list[Any] = [table, column, column.combine_chunks()]
    if batch is not None:
        values.append(batch)
    for value in values:
        out, region, s = roundtrip(value, make_region)
        assert type(out) is type(value)
        assert out.type == value.type if hasattr(value, "type") else out.schema == value.schema
        assert out.equals(value)
        assert len(s.header) < 32
        assert_arrow_views(out, region)
    out_table, _, _ = roundtrip(table, make_region)
    assert out_table.schema.equals(table.schema, check_metadata=True)
    assert out_table.equals(table, check_metadata=True)


def test_arrow_record_batch_metadata_and_empty_chunked_array() -> None:
    batch = pa.record_batch({"a": [1, None, 3]}).replace_schema_metadata({"origin": "test"})
    out, _, _ = roundtrip(batch)
    assert isinstance(out, pa.RecordBatch) and out.equals(batch)
    assert out.schema.metadata == {b"origin": b"test"}
    empty = pa.chunked_array([], type=pa.string())
    out, _, _ = roundtrip(empty)
    assert isinstance(out, pa.ChunkedArray) and out.type == pa.string() and len(out) == 0


def test_arrow_chunks_with_different_dictionaries() -> None:
    # The IPC *stream* format allows dictionary replacement between batches (the file format
    # would not), so chunk-wise dictionaries survive as they are.
    first = pa.array(["a", "b", "a"]).dictionary_encode()
    second = pa.array(["c", None, "c"]).dictionary_encode()
    column = pa.chunked_array([first, second])
    out, region, _ = roundtrip(column)
    assert isinstance(out, pa.ChunkedArray) and out.num_chunks == 2 and out.equals(column)
    assert out.chunk(1).dictionary.equals(second.dictionary)
    assert_arrow_views(out, region)


def test_arrow_large_table_reads_in_constant_time() -> None:
    rows = 12_500_000  # 200 MB over two columns
    table = pa.table({"x": np.arange(rows, dtype=np.int64), "y": np.ones(rows)})
    out, region, s = roundtrip(table)
    assert s.nbytes > 200_000_000
    start = time.perf_counter()  # roundtrip() above warmed the lazy imports
    again: Any = deserialize(s.header, region.buffer)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.02, elapsed  # a copy of 200 MB would take ~0.05-0.1 s
    assert_arrow_views(again, region)
    assert again.equals(table) and out.equals(table)


def test_arrow_inside_containers_goes_through_pickle_zero_copy() -> None:
    table = pa.table({"x": np.arange(1000.0)})
    out, region, _ = roundtrip({"t": table})
    assert out["t"].equals(table)
    assert_arrow_views(out["t"], region)


def test_import_does_not_load_pyarrow_pandas_or_numpy() -> None:
    # Import the package under a bare stand-in for ``sharedcompute`` so the check measures
    # this package alone, whatever the top-level __init__ imports.
    script = textwrap.dedent(
        f"""
        import sys, types
        package = types.ModuleType("sharedcompute")
        package.__path__ = [{str(REPO / "sharedcompute")!r}]
        sys.modules["sharedcompute"] = package
        import sharedcompute._serialization as s
        s.deserialize(s.serialize((1, "x")).header, s.serialize((1, "x")).to_bytes())
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("pyarrow", "pandas", "numpy"))
        print(heavy)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# --------------------------------------------------------------------------- pandas


@st.composite
def data_frames(draw: st.DrawFn) -> Any:
    rows = draw(st.integers(0, 20))
    floats = draw(st.lists(st.floats(allow_nan=True), min_size=rows, max_size=rows))
    ints = draw(st.lists(st.integers(-(2**62), 2**62), min_size=rows, max_size=rows))
    texts = draw(st.lists(st.one_of(st.none(), st.text(max_size=5)), min_size=rows, max_size=rows))
    labels = draw(st.lists(st.sampled_from(["lo", "mid", "hi"]), min_size=rows, max_size=rows))
    stamps = draw(st.lists(st.integers(0, 2**40), min_size=rows, max_size=rows))
    frame = pd.DataFrame(
        {
            "f": np.array(floats, dtype=np.float64),
            "i": np.array(ints, dtype=np.int64),
            "o": pd.Series(texts, dtype=object),
            "s": pd.Series(texts, dtype="string"),
            "c": pd.Categorical(labels, categories=["lo", "mid", "hi"], ordered=True),
            "t": pd.to_datetime(stamps, unit="s", utc=True).tz_convert("Asia/Tokyo"),
        }
    )
    index = draw(st.sampled_from(["range", "strings", "multi"]))
    if index == "strings":
        frame.index = pd.Index([f"r{n}" for n in range(rows)], name="row")
    elif index == "multi":
        frame.index = pd.MultiIndex.from_arrays(
            [np.arange(rows) % 3, [f"k{n}" for n in range(rows)]], names=["a", "b"]
        )
    return frame


@SETTINGS
@given(frame=data_frames(), make_region=regions)
def test_pandas_roundtrip(frame: Any, make_region: Callable[[Serialized], Region]) -> None:
    out, _, _ = roundtrip(frame, make_region)
    pd.testing.assert_frame_equal(out, frame, check_exact=True)
    series_out, _, _ = roundtrip(frame["t"], make_region)
    pd.testing.assert_series_equal(series_out, frame["t"], check_exact=True)


def test_pandas_numeric_columns_are_views_into_region() -> None:
    rows = 1_000_000
    frame = pd.DataFrame(
        {
            "x": np.random.default_rng(0).random(rows),
            "t": pd.date_range("2024-01-01", periods=rows, freq="s", tz="UTC"),
        }
    )
    out, region, _ = roundtrip(frame)
    pd.testing.assert_frame_equal(out, frame)
    x = out["x"].to_numpy()
    assert_array_view(x, region)
    assert_aligned(x.__array_interface__["data"][0], region)
    stamps = out["t"].array._ndarray  # datetime columns too, via the int64-view reducer
    assert_array_view(stamps, region)


# --------------------------------------------------------------------------- errors


@dataclasses.dataclass
class Config:
    name: str
    lock: Any


class Holder:
    def __init__(self, inner: object) -> None:
        self.inner = inner


def _closure_over_lock() -> Callable[[], object]:
    lock = threading.Lock()
    return lambda: lock


WRITE_FAILURES = [
    # (value, path the message must name)
    pytest.param(
        [{"ok": 1, "cfg": {"lock": threading.Lock()}}], "value[0]['cfg']['lock']", id="nested"
    ),
    pytest.param(threading.Lock(), "at value:", id="top-level"),
    pytest.param({"cfg": Config("c", threading.Lock())}, "value['cfg'].lock", id="dataclass"),
    pytest.param((1, Holder([2, threading.Lock()])), "value[1].inner[1]", id="attribute"),
    pytest.param(Slotted(threading.Lock(), "t"), "value.payload", id="slots"),
    pytest.param({"f": _closure_over_lock()}, "value['f'].<closure lock>", id="closure"),
]


@pytest.mark.parametrize(("value", "path"), WRITE_FAILURES)
def test_serialization_error_names_type_and_path(value: object, path: str) -> None:
    with pytest.raises(SerializationError) as caught:
        serialize(value)
    message = str(caught.value)
    assert "'_thread.lock'" in message
    assert path in message
    assert "cannot pickle" in message
    assert isinstance(caught.value, TypeError)
    assert caught.value.__cause__ is not None


def test_deserialization_error_names_missing_module() -> None:
    module = types.ModuleType("sc_vanishing_module")

    class Gone:
        pass

    # Importable-looking (a spec, a module-level qualname) so cloudpickle pickles it by
    # reference, as it would a class from an installed package the reader lacks.
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    Gone.__module__ = module.__name__
    Gone.__qualname__ = "Gone"
    module.Gone = Gone  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        s = serialize({"obj": Gone()})
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(SerializationError, match="sc_vanishing_module") as caught:
        deserialize(s.header, s.to_bytes())
    assert isinstance(caught.value.__cause__, ImportError)


@pytest.mark.parametrize("header", [b"", b"\xff", bytes([serialization.Kind.NDARRAY]) + b"junk"])
def test_bad_headers_raise_serialization_error(header: bytes) -> None:
    with pytest.raises(SerializationError):
        deserialize(header, b"")


def test_short_region_raises_serialization_error() -> None:
    s = serialize([np.arange(100.0)])
    with pytest.raises(SerializationError, match="region"):
        deserialize(s.header, s.to_bytes()[: s.nbytes - 8])


# --------------------------------------------------------------------------- cross-process


def _child_reader(mapping: mmap.mmap, conn: Any) -> None:
    try:
        if not conn.poll(30):
            return
        header, nbytes = conn.recv()
        region = pa.foreign_buffer(_address(mapping), nbytes, base=mapping)
        value: Any = deserialize(header, region)
        array = value["array"]
        start = array.__array_interface__["data"][0]
        conn.send(
            {
                "sha": hashlib.sha256(array.tobytes()).hexdigest(),
                "view": region.address <= start < region.address + nbytes,
                "writeable": bool(array.flags.writeable),
                "meta": value["meta"],
            }
        )
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


def test_cross_process_reader_sees_zero_copy_views() -> None:
    array = np.random.default_rng(1).random((512, 300))
    value = {"array": array, "meta": ("run", 7)}
    s = serialize(value)
    # Anonymous MAP_SHARED memory created before the fork: both processes map the same pages,
    # and nothing is ever named in /dev/shm.
    mapping = mmap.mmap(-1, s.nbytes)
    parent_conn, child_conn = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_child_reader, args=(mapping, child_conn), daemon=True
    )
    child.start()
    try:
        child_conn.close()
        s.write_into(memoryview(mapping))  # written after the fork: the child must see it
        parent_conn.send((s.header, s.nbytes))
        assert parent_conn.poll(30), "child did not answer"
        verdict = parent_conn.recv()
        assert "error" not in verdict, verdict
        assert verdict["sha"] == hashlib.sha256(array.tobytes()).hexdigest()
        assert verdict["view"] and not verdict["writeable"]
        assert verdict["meta"] == ("run", 7)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join(timeout=10)
        parent_conn.close()
        mapping.close()
    assert child.exitcode == 0


def test_public_names() -> None:
    assert set(serialization.__all__) == {
        "ALIGNMENT",
        "Kind",
        "Serialized",
        "deserialize",
        "dumps_function",
        "serialize",
    }
    assert ALIGNMENT == 64
    assert pickle.loads(pickle.dumps(serialization.Kind.ARROW)) is serialization.Kind.ARROW


@pytest.mark.parametrize("extra", [0, 12_345, 2 * 1024 * 1024 + 1])
def test_large_copies_split_between_two_threads_copy_every_byte(extra: int) -> None:
    from sharedcompute._serialization._format import PARALLEL_COPY_BYTES, copy_bytes

    size = PARALLEL_COPY_BYTES + extra
    source = np.random.default_rng(extra).integers(0, 256, size, dtype=np.uint8)
    dest = bytearray(size)
    copy_bytes(memoryview(dest), memoryview(source))
    assert dest == source.tobytes()
    value = np.random.default_rng(extra + 1).random(size // 8 + 3)
    serialized = serialize(value)
    region = bytearray(serialized.nbytes)
    serialized.write_into(memoryview(region))
    assert np.array_equal(deserialize(serialized.header, region), value)


# -- the C pickler first, cloudpickle where it must ------------------------------------------


class _ReduceCounter:
    calls = 0

    def __reduce__(self) -> Any:
        type(self).calls += 1
        raise ValueError("this value refuses to be stored")


def test_plain_values_take_the_c_pickler_and_round_trip() -> None:
    from sharedcompute._serialization._pickled import _dumps_c

    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": np.arange(1000), "b": np.linspace(0, 1, 1000),
                          "when": pd.date_range("2026-01-01", periods=1000, freq="s")})
    value = {"frame": frame, "strided": np.arange(100.0)[::3], "n": 3}
    assert _dumps_c(value) is not None
    back = roundtrip(value)[0]
    pd.testing.assert_frame_equal(back["frame"], frame)
    np.testing.assert_array_equal(back["strided"], np.arange(100.0)[::3])


def test_what_the_c_pickler_cannot_do_goes_to_cloudpickle() -> None:
    import __main__
    from sharedcompute._serialization._pickled import _dumps_c

    def local() -> int:
        return 7

    class InMain:
        pass

    InMain.__module__, InMain.__qualname__ = "__main__", "_SerializationTestInMain"
    __main__._SerializationTestInMain = InMain  # type: ignore[attr-defined]
    try:
        for value in ({"f": lambda: 7}, [local], local.__code__, InMain()):
            assert _dumps_c(value) is None
        back = roundtrip({"f": lambda: 7, "g": local})[0]
        assert back["f"]() == 7 and back["g"]() == 7
    finally:
        del __main__._SerializationTestInMain  # type: ignore[attr-defined]


def test_a_failing_reduction_is_not_tried_again_by_cloudpickle() -> None:
    from sharedcompute._serialization._pickled import _dumps_c

    _ReduceCounter.calls = 0
    with pytest.raises(ValueError, match="refuses to be stored"):
        _dumps_c({"x": _ReduceCounter()})
    assert _ReduceCounter.calls == 1
    with pytest.raises(SerializationError, match="refuses to be stored"):
        serialize({"x": _ReduceCounter()})


class _Registered:
    def __init__(self, value: int) -> None:
        self.value = value


def _rebuild_registered(value: int) -> _Registered:
    return _Registered(value * 10)


def test_a_reducer_registered_with_copyreg_later_is_used() -> None:
    import copyreg

    serialize({"warm": np.arange(3)})  # the C pickler's table made before the registration
    copyreg.pickle(_Registered, lambda obj: (_rebuild_registered, (obj.value,)))
    try:
        assert roundtrip({"x": _Registered(4)})[0]["x"].value == 40
    finally:
        del copyreg.dispatch_table[_Registered]


def test_a_module_registered_by_value_goes_through_cloudpickle(tmp_path: Path,
                                                               monkeypatch) -> None:
    import cloudpickle

    from sharedcompute._serialization._pickled import _dumps_c

    (tmp_path / "sc_by_value_module.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sc_by_value_module  # type: ignore[import-not-found]

    cloudpickle.register_pickle_by_value(sc_by_value_module)
    try:
        assert _dumps_c({"f": sc_by_value_module.triple}) is None
        assert _dumps_c({"a": np.arange(10)}) is not None  # the rest still takes the C pickler
        serialized = serialize({"f": sc_by_value_module.triple})
        sys.path.remove(str(tmp_path))  # a process that cannot import it still runs it
        del sys.modules["sc_by_value_module"]
        assert deserialize(serialized.header, serialized.to_bytes())["f"](2) == 6
    finally:
        cloudpickle.unregister_pickle_by_value(sc_by_value_module)
        sys.modules.pop("sc_by_value_module", None)
