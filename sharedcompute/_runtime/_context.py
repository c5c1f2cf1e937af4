"""Which runtime the public functions use in this process.

In the driver that is the default runtime (started by ``init`` or on first
use); inside a worker it is the worker's runtime, so tasks that submit tasks
reach the same scheduler without knowing where they run.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sharedcompute._runtime._base import RuntimeBase
    from sharedcompute._runtime._future import Future

_lock = threading.Lock()
_default: RuntimeBase | None = None
_worker: RuntimeBase | None = None
_exiting = False
_starter: Callable[[], RuntimeBase] | None = None


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


def set_starter(start: Callable[[], RuntimeBase]) -> None:
    """How to get the runtime to use, starting the default one if need be (``_api``)."""
    global _starter
    _starter = start


def runtime() -> RuntimeBase:
    """The runtime the public functions use now, started if there is none."""
    if _starter is not None:
        return _starter()
    # Only a process that never imported the public functions gets here (a worker that
    # unpickled an actor class, say): its own runtime, if it has one.
    running = current()
    if running is None:
        raise RuntimeError("no sharedcompute runtime here: call sharedcompute.init() first")
    return running


def wait(
    futures: Iterable[Future[Any]], timeout: float | None = None,
    return_when: str = concurrent.futures.ALL_COMPLETED,
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """``concurrent.futures.wait`` for sharedcompute Futures, also inside tasks."""
    futures = list(futures)
    runtime = current()
    if runtime is None:
        return concurrent.futures.wait(futures, timeout, return_when)
    # A task waiting gives its slot back meanwhile (and a worker pumps its messages); a
    # driver's thread reads the workers itself while it waits (no hand-off per result).
    runtime.wait_for(futures, timeout, return_when)
    done: set[concurrent.futures.Future[Any]] = {f for f in futures if f.done()}
    not_done: set[concurrent.futures.Future[Any]] = {f for f in futures if not f.done()}
    return concurrent.futures._base.DoneAndNotDoneFutures(done, not_done)
