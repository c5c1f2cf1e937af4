"""``sharedcompute.config``: settings read at submit time, set globally or for a block.

``config.set(scheduler="threads")`` changes the setting at once and returns an
object that, used as a context manager, puts the old values back on exit, as
``dask.config.set`` does.
"""

from __future__ import annotations

import threading
from typing import Any

_KNOWN = {
    "scheduler": None,  # "sync" | "threads" | "processes"; None: the runtime's own
    "num_workers": None,  # workers for a runtime started on first use
    "runtime_env_max_bytes": None,  # the largest package a runtime_env may ship (512 MiB)
    "spill_threshold": None,  # past this fraction of the store, objects spill (0.8)
    "object_store_wait_s": None,  # how long a put or result waits for room (30 s)
}
_values: dict[str, Any] = dict(_KNOWN)
_lock = threading.Lock()


class set:
    """Set configuration values; restore the previous ones when used in ``with``."""

    def __init__(self, **values: Any) -> None:
        unknown = sorted(k for k in values if k not in _KNOWN)
        if unknown:
            raise TypeError(f"unknown sharedcompute setting(s) {unknown}; known: {sorted(_KNOWN)}")
        if values.get("scheduler") not in (None, "sync", "threads", "processes"):
            raise ValueError(
                f"scheduler must be 'sync', 'threads' or 'processes', got {values['scheduler']!r}"
            )
        with _lock:
            self._previous = {k: _values[k] for k in values}
            _values.update(values)

    def __enter__(self) -> set:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _lock:
            _values.update(self._previous)


def get(key: str, default: Any = None) -> Any:
    value = _values.get(key)
    return default if value is None else value


def reset() -> None:
    with _lock:
        _values.clear()
        _values.update(_KNOWN)
