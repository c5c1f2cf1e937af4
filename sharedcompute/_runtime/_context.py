"""Which runtime the public functions use in this process.

In the driver that is the default runtime (started by ``init`` or on first
use); inside a worker it is the worker's runtime, so tasks that submit tasks
reach the same scheduler without knowing where they run.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sharedcompute._runtime._base import RuntimeBase

_lock = threading.Lock()
_default: RuntimeBase | None = None
_worker: RuntimeBase | None = None
_exiting = False


def mark_exiting() -> None:
    """The interpreter is shutting down: public functions refuse new work from now on."""
    global _exiting
    _exiting = True


def exiting() -> bool:
    return _exiting


def set_worker_runtime(runtime: RuntimeBase) -> None:
    global _worker
    _worker = runtime


def in_worker() -> bool:
    return _worker is not None


def current() -> RuntimeBase | None:
    return _worker if _worker is not None else _default


def set_default(runtime: RuntimeBase | None) -> None:
    global _default
    _default = runtime


def default() -> RuntimeBase | None:
    return _default
