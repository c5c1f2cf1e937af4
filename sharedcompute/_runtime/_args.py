"""Task arguments: finding the Futures in them, and putting values back in their place.

A Future passed as an argument, at top level or inside (nested) lists, tuples
and dicts, is a dependency. Before the arguments are serialized each such
Future is swapped for a small :class:`DepMarker`; the worker swaps each marker
for the dependency's value. Only these three container types are walked, as in
Dask and Ray: walking arbitrary objects would make every submit pay for it.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Any


class DepMarker:
    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (DepMarker, (self.key,))

    def __repr__(self) -> str:
        return f"DepMarker({self.key})"


def extract_dependencies(
    value: Any, as_dependency: Callable[[Any], Any], found: dict[int, Any]
) -> Any:
    """Return ``value`` with dependencies replaced by markers; collect them in ``found``.

    ``as_dependency(v)`` is the Future that ``v`` stands for (``v`` itself, for a
    Future), or None.
    """
    future = as_dependency(value)
    if future is not None:
        found[future.key] = future
        return DepMarker(future.key)
    cls = type(value)
    if cls is list or cls is tuple:
        items = [extract_dependencies(v, as_dependency, found) for v in value]
        if not found:
            return value
        return items if cls is list else tuple(items)
    if cls is dict:
        if not value:
            return value
        replaced = {k: extract_dependencies(v, as_dependency, found) for k, v in value.items()}
        return replaced if found else value
    return value


def restore_dependencies(value: Any, values: dict[int, Any]) -> Any:
    cls = type(value)
    if cls is DepMarker:
        return values[value.key]
    if cls is list:
        return [restore_dependencies(v, values) for v in value]
    if cls is tuple:
        return tuple(restore_dependencies(v, values) for v in value)
    if cls is dict:
        return {k: restore_dependencies(v, values) for k, v in value.items()}
    return value


class FunctionCache:
    """Pickles each function once and names it by the digest of its pickle."""

    def __init__(self) -> None:
        self._by_function: weakref.WeakKeyDictionary[Any, tuple[bytes, bytes]] = (
            weakref.WeakKeyDictionary()
        )
        self._by_id: dict[int, tuple[Any, bytes, bytes]] = {}

    def encode(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        """Return (key, pickled function)."""
        try:
            cached = self._by_function.get(fn)
        except TypeError:  # not weak-referenceable (e.g. a builtin)
            held = self._by_id.get(id(fn))
            cached = held[1:] if held is not None and held[0] is fn else None
            if cached is None:
                cached = self._pickle(fn)
                self._by_id[id(fn)] = (fn, *cached)
            return cached
        if cached is None:
            cached = self._pickle(fn)
            self._by_function[fn] = cached
        return cached

    @staticmethod
    def _pickle(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        from sharedcompute._serialization import dumps_function, serialize

        try:
            # With the source of code pickled by value, for the worker's tracebacks.
            data = dumps_function(fn)
        except Exception:
            # Let the serializer name what inside the function failed.
            serialize(fn)
            raise
        return hashlib.blake2b(data, digest_size=12).digest(), data
