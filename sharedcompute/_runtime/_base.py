"""What the driver's runtime and a worker's runtime have in common.

User code calls the same functions (``submit``, ``put``, ``get`` ...) in the
driver and inside tasks; each process has one current runtime that carries
them out. ``RuntimeBase`` holds the shared steps: turning arguments into a
serialized payload with dependency markers, and loading values from refs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import pickle
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sharedcompute._env import Env, EnvResolver
from sharedcompute._protocol import Msg
from sharedcompute._runtime._args import DepMarker, FunctionCache, extract_dependencies
from sharedcompute._runtime._future import Future
from sharedcompute._serialization import deserialize, serialize
from sharedcompute._serialization._pickled import PICKLE_HEADER
from sharedcompute._store import (
    INLINE_THRESHOLD,
    InlineObject,
    ObjectRef,
    ObjectStore,
    RemoteObject,
)
from sharedcompute._sync import DrainingLock
from sharedcompute.errors import ObjectLostError

if TYPE_CHECKING:
    from sharedcompute._runtime._stream import FutureStream, StreamState


@dataclass(frozen=True, slots=True)
class TaskOptions:
    num_cpus: float = 1.0
    resources: tuple[tuple[str, float], ...] = ()
    max_retries: int = 3
    retry_exceptions: bool = False
    scheduler: str | None = None
    name: str = ""
    node: int | None = None  # run only on this node
    # A dict as the user wrote it (checked), laid over the runtime's own; on the wire
    # and in the scheduler, the Env it resolves to (see RuntimeBase.task_env).
    runtime_env: Any = None
    num_returns: int = 1  # >1: the result is split into that many Futures (_returns)
    # A generator task pauses while this many of its items are unconsumed (0: never).
    generator_backpressure: int = 0
    pass_errors: bool = False  # a failed dependency fails it with its own error (_returns)


def task_name(fn: Any, options: TaskOptions | None = None) -> str:
    """What a task of ``fn`` is called (its Future's name, the timeline's, the dashboard's)."""
    return ((options.name if options is not None else "")
            or getattr(fn, "__qualname__", "") or type(fn).__name__)


def options_to_wire(options: TaskOptions, env: Env | None, name: str = "") -> tuple[Any, ...]:
    """The options as a SUBMIT carries them: ``env`` resolved, ``name`` the task's."""
    return (
        options.num_cpus, options.resources, options.max_retries, options.retry_exceptions,
        options.scheduler, name or options.name, options.node, env, options.num_returns,
        options.generator_backpressure, options.pass_errors,
    )


def options_from_wire(wire: tuple[Any, ...]) -> TaskOptions:
    return TaskOptions(*wire)


@dataclass(slots=True)
class TaskSpec:
    """What the driver keeps about a task to send it (again) to a worker."""

    fn_key: bytes
    args_ref: ObjectRef
    name: str
    parent: int | None = None
    # A generator task's backpressure (0: none); None: not a generator task.
    stream: int | None = None


class RuntimeBase:
    store: ObjectStore
    needs_pump = False
    _next_key: Callable[[], int]

    def __init__(self) -> None:
        self.functions = FunctionCache()
        # The runtime_env of what this runtime submits (a driver's from init, a worker's
        # from the env it was started in).
        self.envs = EnvResolver()
        self._released: deque[int] = deque()
        self._release_lock = DrainingLock(self._flush_releases, self._releases_pending)

    # -- keys and release --------------------------------------------------------

    def _key_counter(self, start: int) -> Callable[[], int]:
        counter = itertools.count(start)
        return counter.__next__

    def release_key(self, key: int) -> None:
        """Called from ``Future.__del__``: queue, never block."""
        self._released.append(key)
        self._release_lock.try_drain()

    def _flush_releases(self) -> None:
        """Send the queued releases on (``_release_lock`` held)."""
        raise NotImplementedError

    def _releases_pending(self) -> bool:
        return bool(self._released)

    # -- arguments and values --------------------------------------------------------

    def prepare_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[ObjectRef, dict[int, Future[Any]]]:
        if not kwargs:
            if not args:
                return _NO_ARGUMENTS, _NO_DEPS
            # The common cases (a few numbers or strings, and Futures) skip the walk and
            # the codec: plain pickle suffices, DepMarker included.
            futures = 0
            for arg in args:
                cls = type(arg)
                if cls is Future:
                    futures += 1
                elif cls not in SCALARS:
                    break
            else:
                markers: dict[int, Future[Any]] = {} if futures else _NO_DEPS
                plain = tuple(_marker(arg, markers) for arg in args) if futures else args
                data = pickle.dumps((plain, kwargs), 5)
                if len(data) < INLINE_THRESHOLD:
                    return InlineObject(PICKLE_HEADER, data), markers
        found: dict[int, Future[Any]] = {}
        packed = extract_dependencies((args, kwargs), self.as_dependency, found)
        return self.store_value(packed), found

    def as_dependency(self, value: Any) -> Future[Any] | None:
        """The Future an argument stands for, if any (the driver adds stored views)."""
        return future_or_none(value)

    def store_value(self, value: Any) -> ObjectRef:
        return self.store.put_serialized(serialize(value))

    def load(self, ref: ObjectRef, *, private: bool = False) -> Any:
        """The value ``ref`` names: read-only views of the store, or with ``private``
        copy-on-write views this process may write to (``ObjectStore.private_view``)."""
        if type(ref) is InlineObject:
            return deserialize(ref.header, bytearray(ref.payload) if private else ref.payload)
        return self.store.get(ref, private=private)

    def load_result(self, key: int, ref: ObjectRef, *, private: bool = False) -> Any:
        """The value of task ``key``; if it lived on a node that died, the value made again."""
        try:
            return self.load(ref, private=private)
        except ObjectLostError:
            if type(ref) is not RemoteObject:
                raise
            again = self._made_again(key, ref)
            if again is None or again == ref:
                raise
            return self.load(again, private=private)

    def _made_again(self, key: int, lost: ObjectRef) -> ObjectRef | None:
        """The new result of task ``key``, whose result ``lost`` is gone (None: none comes)."""
        return None

    def task_env(self, options: TaskOptions) -> Env | None:
        """The runtime_env a task submitted with ``options`` runs in."""
        return self.envs.resolve(options.runtime_env)

    # -- what each runtime provides ------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions,
    ) -> Future[Any]:
        raise NotImplementedError

    def submit_stream(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions,
    ) -> FutureStream[Any]:
        """Run the generator function ``fn`` as a streaming task (``_stream``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot run generator functions as streaming tasks yet"
        )

    def wait_until(self, satisfied: Callable[[], bool], deadline: float | None) -> None:
        """Return once ``satisfied()`` (or at the deadline), reading what this runtime must
        read meanwhile (a runtime with ``needs_pump`` reads only in the waiting thread)."""
        raise NotImplementedError

    def submit_actor_stream(self, actor_id: int, class_name: str, method: str,
                            args: tuple[Any, ...], kwargs: dict[str, Any],
                            backpressure: int) -> FutureStream[Any]:
        """Call an actor's generator method: a stream of its items (``_stream``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot call generator methods of actors as streams yet"
        )

    def stream_taken(self, state: StreamState) -> None:
        """The user took an item of a stream with backpressure (tell its generator)."""

    def stop_stream(self, state: StreamState) -> None:
        """Nobody reads this stream any more: stop its generator, free its items."""

    def new_key(self) -> int:
        """A key no task or object of this runtime has."""
        return self._next_key()

    def put(self, value: Any) -> Future[Any]:
        raise NotImplementedError

    def cancel(self, future: Future[Any]) -> bool:
        raise NotImplementedError

    def wait_for(
        self, futures: Iterable[Future[Any]], timeout: float | None, return_when: str
    ) -> None:
        with self.blocking():
            concurrent.futures.wait(list(futures), timeout, return_when)

    def watch(self, future: Future[Any]) -> None:
        """Make sure ``future`` gets settled without anyone blocking on it (for ``await``)."""

    def defer_callbacks(self) -> bool:
        """Whether done-callbacks settled in this thread must run elsewhere (``call_soon``)."""
        return False

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on a thread that does nothing else (for done-callbacks)."""
        callback()

    def is_running(self, key: int) -> bool:
        """Whether task ``key`` has started (or is queued where it will run next)."""
        return False

    def in_task_thread(self) -> bool:
        """Whether this thread runs a task of this runtime (its waits lend the task's slot)."""
        return False

    def blocking(self) -> AbstractContextManager[None]:
        """Scope around a wait on Futures (a pool thread lends its slot meanwhile)."""
        return nullcontext()


class DefaultScope:
    """``with runtime:`` makes it the runtime the public functions use, and shuts it down."""

    def shutdown(self) -> None:
        raise NotImplementedError

    def __enter__(self: Any) -> Any:
        from sharedcompute._runtime import _context

        self._previous_default = _context.default()
        _context.set_default(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        from sharedcompute._runtime import _context

        if _context.default() is self:
            _context.set_default(getattr(self, "_previous_default", None))
        self.shutdown()


class QueuedActorHolds:
    """Actor handle counts of a runtime whose head is another process (a worker's, a
    connected driver's): queued, never sent from a finalizer, flushed with the releases."""

    _control: deque[tuple[Any, ...]]
    _release_lock: DrainingLock

    def lease_actor(self, actor_id: int) -> None:
        self._queue_control((Msg.ACTOR_LEASE, actor_id))

    def adopt_actor_lease(self, actor_id: int) -> None:
        self._queue_control((Msg.ACTOR_RETAIN, actor_id))

    def release_actor(self, actor_id: int) -> None:
        self._queue_control((Msg.ACTOR_RELEASE, actor_id))

    def _queue_control(self, message: tuple[Any, ...]) -> None:
        # May run in a finalizer or mid-pickling: never send from here directly.
        self._control.append(message)
        self._release_lock.try_drain()


# Argument types that never stand for a dependency (a Future, a stored view).
SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_NO_DEPS: dict[int, Any] = {}
_NO_ARGUMENTS = InlineObject(PICKLE_HEADER, pickle.dumps(((), {}), 5))


def _marker(arg: Any, found: dict[int, Future[Any]]) -> Any:
    if type(arg) is Future:
        found[arg.key] = arg
        return DepMarker(arg.key)
    return arg


def future_or_none(value: Any) -> Future[Any] | None:
    return value if isinstance(value, Future) else None
