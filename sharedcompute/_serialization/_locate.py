"""Find *where* inside a value pickling fails, for a SerializationError that says so.

Runs only after serialization has already failed, so it may be slow-ish: it walks the value's
children (dict values, sequence and set items, dataclass fields, ``__dict__`` and ``__slots__``
attributes, closure cells), tries to pickle each, and descends into the first child that fails,
until it reaches an object whose children all pickle. Depth and fan-out are bounded so a huge or
cyclic value cannot make error reporting itself hang.
"""

from __future__ import annotations

import dataclasses
import itertools
import reprlib
import types
from collections.abc import Iterator

import cloudpickle

from ..errors import DeserializationError, SerializationError

__all__ = ["describe_read_failure", "describe_write_failure", "type_name"]

_MAX_DEPTH = 32
_MAX_CHILDREN = 256
_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def describe_write_failure(
    value: object, error: BaseException, root: str = "value"
) -> SerializationError:
    """A SerializationError naming the innermost unpicklable object and its path in ``value``
    (a path that starts at ``root``)."""
    path, leaf, leaf_error = _innermost_failure(value, root, error)
    return SerializationError(
        f"cannot serialize object of type {type_name(leaf)!r} at {path}: "
        f"{type(leaf_error).__name__}: {leaf_error}"
    )


def describe_read_failure(what: str, error: BaseException) -> DeserializationError:
    return DeserializationError(f"cannot deserialize {what}: {type(error).__name__}: {error}")


def type_name(obj: object) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _innermost_failure(
    obj: object, path: str, error: BaseException
) -> tuple[str, object, BaseException]:
    for _ in range(_MAX_DEPTH):
        for child_path, child in itertools.islice(_children(obj, path), _MAX_CHILDREN):
            child_error = _pickle_error(child)
            if child_error is not None:
                obj, path, error = child, child_path, child_error
                break
        else:
            break  # every child pickles: ``obj`` itself is the culprit
    return path, obj, error


def _pickle_error(obj: object) -> BaseException | None:
    try:
        # Out-of-band buffers are dropped, not copied, so probing big arrays is cheap.
        cloudpickle.dumps(obj, protocol=5, buffer_callback=_discard)
    except Exception as exc:
        return exc
    return None


def _discard(_buffer: object) -> None:
    return None


def _children(obj: object, path: str) -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for key, item in obj.items():
            yield f"{path}[{_repr.repr(key)}]", item
    elif isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield f"{path}[{index}]", item
    elif isinstance(obj, (set, frozenset)):
        for item in obj:
            yield f"{path}{{{_repr.repr(item)}}}", item
    elif isinstance(obj, types.FunctionType):
        cells = obj.__closure__ or ()
        for name, cell in zip(obj.__code__.co_freevars, cells, strict=False):
            try:
                yield f"{path}.<closure {name}>", cell.cell_contents
            except ValueError:  # an empty cell
                continue
    elif not isinstance(obj, (type, types.ModuleType)):
        yield from _attributes(obj, path)


def _attributes(obj: object, path: str) -> Iterator[tuple[str, object]]:
    seen: set[str] = set()
    if dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            seen.add(field.name)
            if hasattr(obj, field.name):
                yield f"{path}.{field.name}", getattr(obj, field.name)
    for name, item in getattr(obj, "__dict__", {}).items():
        if name not in seen:
            seen.add(name)
            yield f"{path}.{name}", item
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in seen and name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                seen.add(name)
                yield f"{path}.{name}", getattr(obj, name)
