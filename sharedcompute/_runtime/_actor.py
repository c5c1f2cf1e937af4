"""Actors: a class instance living in a process of its own, called through a handle.

``@sc.remote`` on a class gives an :class:`ActorClass`; ``Cls.remote(*args)``
starts the actor and returns an :class:`ActorHandle`, and
``handle.method.remote(*args)`` returns a Future. Calls from one caller run in
the order they were made (the scheduler sends an actor its calls in submission
order, as their dependencies resolve, and the actor runs them in arrival
order unless ``max_concurrency`` > 1).

Handles are picklable: a task or another actor that receives one can call the
actor. An unnamed actor ends when no handle to it is left anywhere (the driver
counts its own handles, handles in flight and handles held by workers); a
named one lives until ``kill`` or shutdown.
"""

from __future__ import annotations

import concurrent.futures
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from sharedcompute._env import check_option as check_runtime_env
from sharedcompute._runtime import _context
from sharedcompute._runtime._future import Future

T = TypeVar("T")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class ActorOptions:
    name: str | None = None
    max_restarts: int = 0
    max_task_retries: int = 0
    # None: 1 for plain methods (calls run one at a time, in order); 1000 for coroutine
    # methods, as in Ray, since an async actor exists to interleave its calls.
    max_concurrency: int | None = None
    num_cpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()
    node: int | None = None  # start it on this node (and restart it there)
    # A dict as the user wrote it (checked), laid over the driver's; the Env it resolves to
    # once the driver has taken it (``resolved_env``).
    runtime_env: Any = None


_ACTOR_OPTION_NAMES = frozenset(ActorOptions.__dataclass_fields__)


def make_actor_options(base: ActorOptions, **changes: Any) -> ActorOptions:
    unknown = sorted(set(changes) - _ACTOR_OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"unknown actor option(s) {unknown}; known: {sorted(_ACTOR_OPTION_NAMES)}"
        )
    if "resources" in changes and isinstance(changes["resources"], dict):
        changes["resources"] = tuple(sorted(changes["resources"].items()))
    options = replace(base, **changes)
    if options.max_concurrency is not None and options.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {options.max_concurrency}")
    if options.max_restarts < -1 or options.max_task_retries < -1:
        raise ValueError("max_restarts and max_task_retries must be >= 0 (or -1: unlimited)")
    if options.node is not None and (type(options.node) is not int):
        raise TypeError(f"node must be a node id (an int, see sharedcompute.nodes()), "
                        f"got {options.node!r}")
    if changes.get("runtime_env") is not None:
        options = replace(options, runtime_env=check_runtime_env(changes["runtime_env"]))
    if options.name is not None and not isinstance(options.name, str):
        raise TypeError(f"an actor name must be a string, got {type(options.name).__name__}")
    return options


def _runtime() -> Any:
    return _context.runtime()


class ActorClass(Generic[T]):
    """What ``@remote`` makes of a class: ``.remote(...)`` starts an actor."""

    def __init__(self, cls: type[T], options: ActorOptions = ActorOptions()) -> None:
        self._cls = cls
        self._options = options
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        return _runtime().create_actor(self._cls, args, kwargs, self._options)

    def options(self, **options: Any) -> ActorClass[T]:
        return ActorClass(self._cls, make_actor_options(self._options, **options))

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        raise TypeError(
            f"{self.__name__} is an actor class: start one with {self.__name__}.remote(...)"
        )

    def __repr__(self) -> str:
        return f"<sharedcompute actor class {self.__qualname__}>"


def public_methods(cls: type) -> dict[str, str]:
    """Callable public attributes of ``cls``, each mapped to its kind: "coroutine",
    "generator" (its calls stream their items) or "function"."""
    methods = {}
    for name, value in inspect.getmembers(cls):
        if name.startswith("__") or not callable(value):
            continue
        methods[name] = (
            "coroutine" if inspect.iscoroutinefunction(value)
            else "generator" if inspect.isgeneratorfunction(value) else "function"
        )
    return methods


class ActorMethod:
    __slots__ = ("_backpressure", "_handle", "_name", "_num_returns")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int = 1,
                 generator_backpressure: int = 0) -> None:
        self._handle = handle
        self._name = name
        self._num_returns = num_returns
        self._backpressure = generator_backpressure

    def options(self, *, num_returns: int = 1, generator_backpressure: int = 0) -> ActorMethod:
        """This method with ``num_returns=N`` (its calls give N Futures), or, for a
        generator method, ``generator_backpressure=N`` (it pauses while N items of a
        call are unconsumed)."""
        from sharedcompute._runtime._returns import check_num_returns
        from sharedcompute._runtime._stream import check_backpressure

        return ActorMethod(self._handle, self._name, check_num_returns(num_returns),
                           check_backpressure(generator_backpressure))

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call it in the actor: a Future (N of them with ``num_returns=N``); a generator
        method streams (a ``FutureStream`` of its items' Futures)."""
        handle = self._handle
        runtime = handle._runtime()
        if handle._methods.get(self._name) == "generator":
            if self._num_returns != 1:
                raise ValueError(f"{handle._class_name}.{self._name} is a generator method: it "
                                 "streams its items (a FutureStream), so num_returns does not "
                                 "apply")
            return runtime.submit_actor_stream(handle._actor_id, handle._class_name,
                                               self._name, args, kwargs, self._backpressure)
        future: Future[Any] = runtime.submit_actor_call(
            handle._actor_id, handle._class_name, self._name, args, kwargs
        )
        if self._num_returns == 1:
            return future
        from sharedcompute._runtime._returns import split

        return split(runtime, future, self._num_returns,
                     f"{handle._class_name}.{self._name}")

    submit = remote

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"actor methods run in the actor: use .{self._name}.remote(...) and get the Future"
        )


class ActorHandle:
    """A reference to a running actor; attribute access gives its methods."""

    def __init__(
        self, runtime: Any, actor_id: int, class_name: str, methods: dict[str, str]
    ) -> None:
        self._runtime_ref = runtime
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods

    def _runtime(self) -> Any:
        return self._runtime_ref

    @property
    def actor_id(self) -> int:
        return self._actor_id

    def __getattr__(self, name: str) -> ActorMethod:
        methods = self.__dict__.get("_methods", {})
        if name in methods:
            return ActorMethod(self, name)
        raise AttributeError(f"actor {self.__dict__.get('_class_name')} has no method {name!r}")

    def __reduce__(self) -> Any:
        self._runtime_ref.lease_actor(self._actor_id)
        return (_rebuild_handle, (self._actor_id, self._class_name, self._methods))

    def __del__(self) -> None:
        runtime = self.__dict__.get("_runtime_ref")
        if runtime is not None:
            try:
                runtime.release_actor(self._actor_id)
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<sharedcompute.ActorHandle {self._class_name} id={self._actor_id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


def _rebuild_handle(actor_id: int, class_name: str, methods: dict[str, str]) -> ActorHandle:
    runtime: Any = _context.current()
    if runtime is None:
        raise RuntimeError("an actor handle can only be unpickled in a sharedcompute process")
    runtime.adopt_actor_lease(actor_id)
    return ActorHandle(runtime, actor_id, class_name, methods)


class ActorPool:
    """Spread work over a fixed set of actors (as ``ray.util.ActorPool``).

    ``fn(actor, value)`` must return the Future of a call on ``actor``.
    """

    def __init__(self, actors: Iterable[ActorHandle]) -> None:
        self._idle = list(actors)
        if not self._idle:
            raise ValueError("an ActorPool needs at least one actor")
        self._running: dict[Future[Any], ActorHandle] = {}
        self._order: list[Future[Any]] = []
        self._backlog: list[tuple[Callable[[ActorHandle, Any], Future[Any]], Any]] = []

    def submit(self, fn: Callable[[ActorHandle, V], Future[Any]], value: V) -> None:
        if self._idle:
            actor = self._idle.pop()
            future = fn(actor, value)
            self._running[future] = actor
            self._order.append(future)
        else:
            self._backlog.append((fn, value))

    def has_next(self) -> bool:
        return bool(self._order)

    def has_free(self) -> bool:
        return bool(self._idle) and not self._backlog

    def _done(self, future: Future[Any]) -> None:
        self._idle.append(self._running.pop(future))
        if self._backlog:
            fn, value = self._backlog.pop(0)
            self.submit(fn, value)

    def get_next(self, timeout: float | None = None) -> Any:
        """The next result in submission order."""
        if not self._order:
            raise StopIteration("no more results to get")
        future = self._order[0]
        if not _context.wait([future], timeout=timeout).done:
            raise TimeoutError("the next result was not ready in time")
        # Off the queue and its actor free before the result, which may raise.
        self._order.pop(0)
        self._done(future)
        return future.result()

    def get_next_unordered(self, timeout: float | None = None) -> Any:
        """Whichever result finishes first."""
        if not self._order:
            raise StopIteration("no more results to get")
        done, _ = _context.wait(
            self._order, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if not done:
            raise TimeoutError("no result was ready in time")
        future = next(f for f in self._order if f in done)
        self._order.remove(future)
        self._done(future)
        return future.result()

    def map(
        self, fn: Callable[[ActorHandle, V], Future[Any]], values: Iterable[V]
    ) -> Iterator[Any]:
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next()

    def map_unordered(
        self, fn: Callable[[ActorHandle, V], Future[Any]], values: Iterable[V]
    ) -> Iterator[Any]:
        for value in values:
            self.submit(fn, value)
        while self.has_next():
            yield self.get_next_unordered()
