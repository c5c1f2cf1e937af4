"""sharedcompute: tasks, futures and a shared-memory object store for Python processes.

Layering (each layer only uses the ones below it)::

    sharedcompute (this file), sharedcompute.errors, sharedcompute.config   public surface
    _api          init / submit / put / get / wait / remote / Executor     thin wrappers
    _runtime      Future, driver runtime, worker pool, sync/threads       wiring and I/O
    _worker       the worker process loop and the runtime tasks see
    _scheduler    SchedulerCore: events in, instructions out             pure, no I/O
    _protocol     message kinds and framing
    _store        shared-memory object store (owner, clients, allocator)
    _serialization values <-> header + zero-copy buffers

Importing this package is cheap: the public names are loaded on first use, so
``import sharedcompute`` does not pay for numpy, pyarrow or the runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sharedcompute import _config as config
from sharedcompute import errors

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "ActorClass",
    "ActorHandle",
    "ActorPool",
    "Executor",
    "Future",
    "FutureStream",
    "Pool",
    "RemoteFunction",
    "Runtime",
    "as_completed",
    "available_resources",
    "cluster_resources",
    "config",
    "errors",
    "gather",
    "get",
    "get_actor",
    "init",
    "is_initialized",
    "kill",
    "map",
    "memory_summary",
    "nodes",
    "progress",
    "put",
    "remote",
    "shutdown",
    "submit",
    "timeline",
    "wait",
]

_LAZY = {
    "Future": "sharedcompute._runtime._future",
    "FutureStream": "sharedcompute._runtime._stream",
    "Executor": "sharedcompute._executor",
    "Pool": "sharedcompute._pool_api",
    "Runtime": "sharedcompute._runtime._driver",
    "ActorClass": "sharedcompute._runtime._actor",
    "ActorHandle": "sharedcompute._runtime._actor",
    "ActorPool": "sharedcompute._runtime._actor",
    **{
        name: "sharedcompute._api"
        for name in (
            "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "RemoteFunction",
            "as_completed", "available_resources", "cluster_resources", "gather", "get",
            "get_actor", "init", "is_initialized", "kill", "map", "memory_summary", "nodes",
            "progress", "put", "remote",
            "shutdown", "submit", "timeline", "wait",
        )
    },
}

if TYPE_CHECKING:
    from sharedcompute._api import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        RemoteFunction,
        as_completed,
        available_resources,
        cluster_resources,
        gather,
        get,
        get_actor,
        init,
        is_initialized,
        kill,
        map,
        memory_summary,
        nodes,
        progress,
        put,
        remote,
        shutdown,
        submit,
        timeline,
        wait,
    )
    from sharedcompute._executor import Executor
    from sharedcompute._pool_api import Pool
    from sharedcompute._runtime._actor import ActorClass, ActorHandle, ActorPool
    from sharedcompute._runtime._driver import Runtime
    from sharedcompute._runtime._future import Future
    from sharedcompute._runtime._stream import FutureStream


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sharedcompute' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
