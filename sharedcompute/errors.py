"""Errors raised by sharedcompute.

User exceptions raised inside a task come back as their own type, with the
remote traceback attached as ``__cause__`` (a :class:`RemoteTraceback`).
Everything the runtime itself raises derives from :class:`SharedComputeError`::

    Exception
     └── SharedComputeError
          ├── WorkerCrashedError      (also concurrent.futures.process.BrokenProcessPool,
          │                            hence concurrent.futures.BrokenExecutor)
          ├── ActorDiedError
          ├── DependencyFailedError   (cause: the dependency's error)
          ├── ObjectLostError
          ├── ObjectStoreFullError
          ├── SerializationError      (also TypeError and pickle.PicklingError)
          │    └── DeserializationError  (also pickle.UnpicklingError and BrokenProcessPool)
          ├── AuthenticationError     (also PermissionError)
          └── RuntimeEnvError         (a runtime_env that cannot be packed, shipped or set up)

The stdlib bases let code written for ``ProcessPoolExecutor`` and ``pickle`` catch
these unchanged (loky does the same with its ``TerminatedWorkerError``).

Cancellation and timeouts use the standard ``concurrent.futures.CancelledError``
and the built-in ``TimeoutError``, so code written for ``concurrent.futures``
catches them unchanged.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "ActorDiedError",
    "AuthenticationError",
    "DependencyFailedError",
    "DeserializationError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "RemoteTraceback",
    "RuntimeEnvError",
    "SerializationError",
    "SharedComputeError",
    "WorkerCrashedError",
]


class SharedComputeError(Exception):
    """Root of every error the runtime raises on its own behalf."""


class WorkerCrashedError(SharedComputeError, BrokenProcessPool):
    """A worker process died while running a task (signal or exit code in the message).

    ``BrokenProcessPool`` is a ``concurrent.futures.BrokenExecutor``, so both catch it.
    """


class ActorDiedError(SharedComputeError):
    """The actor's process died or its constructor raised; calls on it cannot run."""


class ObjectLostError(SharedComputeError):
    """An object's only copy is gone and it cannot be recomputed."""


class ObjectStoreFullError(SharedComputeError):
    """The shared-memory store cannot hold a value: it names the size asked for and the capacity.

    Not a MemoryError: the process has memory, the store is full; and MemoryError
    subclasses cannot be rebuilt by tblib, which Dask's distributed installs globally.
    """


class SerializationError(SharedComputeError, TypeError, pickle.PicklingError):
    """A value could not be serialized or deserialized; the message names its type and place."""


class DeserializationError(SerializationError, pickle.UnpicklingError, BrokenProcessPool):
    """A value could not be rebuilt where it was needed: a task's arguments in its worker,
    or a result where it is read. Also a ``BrokenProcessPool``, which is what code written
    for ``ProcessPoolExecutor`` catches for these failures (there the pool breaks)."""


class RuntimeEnvError(SharedComputeError):
    """A runtime_env cannot be used: too large, a path that cannot be read, a package that
    a node cannot fetch or unpack. It names what was wrong and where."""


class AuthenticationError(SharedComputeError, PermissionError):
    """A peer failed the cluster's token challenge or spoke another protocol version."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in another process.

    Attached as ``__cause__`` of the re-raised user exception so the remote
    frames print under "The above exception was the direct cause of ...".
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class DependencyFailedError(SharedComputeError):
    """A task never ran because a Future it depends on failed or was cancelled.

    The dependency's own error is this error's ``__cause__``; ``reason`` names the
    failure at the root of the chain.
    """

    reason: str = ""
