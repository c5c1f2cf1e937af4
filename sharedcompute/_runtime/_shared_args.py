"""The same large argument in many calls of one ``map``: stored once, passed by reference.

``sc.map(f, [big] * 200, range(200))`` or ``pool.starmap(f, [(big, i) for i in ...])``
would serialize ``big`` into every task's arguments. :func:`store_shared` finds the large
values (numpy arrays, Arrow tables and arrays, pandas objects of ``MIN_BYTES`` or more)
that appear in two calls or more, by identity, puts each once, and hands the calls its
Future instead: the worker gets the value as a read-only view of the store, as it gets
any large argument (joblib's auto-memmapping is the yardstick). Only the calls' own
arguments are looked at, not what they contain, so the cost is one ``id`` per argument.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

MIN_BYTES = 1 << 20


def large_nbytes(value: Any) -> int:
    """The size of a numpy array, Arrow table or array, or pandas object (0: anything else)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return 0 if value.dtype.hasobject else int(value.nbytes)
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None and isinstance(
        value, (pyarrow.Table, pyarrow.RecordBatch, pyarrow.Array, pyarrow.ChunkedArray)
    ):
        return int(value.nbytes)
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series)):
        try:
            return int(value.memory_usage(index=True, deep=False).sum())
        except (AttributeError, TypeError, ValueError):
            return 0
    return 0


def store_shared(put: Callable[[Any], Any], items: list[tuple[Any, ...]],
                 min_bytes: int = MIN_BYTES) -> list[tuple[Any, ...]]:
    """``items`` with every large value that two calls or more share replaced by one
    stored Future (``put``); the same list when there is none."""
    seen: Counter[int] = Counter()
    values: dict[int, Any] = {}
    for args in items:
        for value in args:
            if type(value).__module__.startswith(("numpy", "pyarrow", "pandas")):
                key = id(value)
                if key in values or large_nbytes(value) >= min_bytes:
                    seen[key] += 1
                    values[key] = value
    shared = {key: put(values[key]) for key, count in seen.items() if count > 1}
    if not shared:
        return items
    return [tuple(shared.get(id(value), value) for value in args) for args in items]
