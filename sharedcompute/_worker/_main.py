"""A worker process: receive tasks, run them, send back where their results are.

::

    driver ──RUN──────────────▶ queue ──▶ run(fn, args) ──▶ DONE / FAILED ──▶ driver
           ◀──SUBMIT/WAIT/PUT── tasks that submit or wait on nested tasks
           ──RESOLVED─────────▶ futures the tasks wait on

The main thread owns the connection: it reads when idle, and it reads while a
task waits on a Future. While waiting it tells the driver the task is blocked
(its CPU goes back to the pool) and runs whatever the driver sends meanwhile,
nested on its stack, which is how recursive task trees finish on a small pool.
Tasks run in the order they were sent; the driver relies on that.

A separate thread blocks on a pipe whose other end only the driver holds: when
the driver dies, however it dies, the read returns and the worker exits at once.
The driver also writes a byte there with each DROP (its doorbell): that thread then
reads the connection itself (``read_rung``), even while the main thread runs a task,
so that a task queued here behind the running one goes back to the driver at once
for an idle worker; it then writes to ``_wake_w``, which the main thread's selects
watch, so that the main thread never sleeps on a socket whose messages it took.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import cloudpickle

from sharedcompute._env import Env, EnvResolver
from sharedcompute._protocol import Connection, ConnectionClosed, Msg
from sharedcompute._runtime._args import restore_dependencies
from sharedcompute._runtime._base import (
    QueuedActorHolds,
    RuntimeBase,
    TaskOptions,
    options_to_wire,
    task_name,
)
from sharedcompute._runtime._future import Future, ValueRef
from sharedcompute._runtime._stream import StreamClient, StreamState
from sharedcompute._serialization import deserialize, serialize
from sharedcompute._serialization._format import SLICED_BYTES
from sharedcompute._store import (
    ClientStore,
    ObjectRef,
    StoredObject,
    ref_from_wire,
    ref_to_wire,
)
from sharedcompute._sync import drain_pipe
from sharedcompute._worker._arena import Arena
from sharedcompute._worker._heap import IDLE_TRIM_SECONDS, Heap
from sharedcompute._worker._running import RunningSlot
from sharedcompute._worker._streaming import StreamControl, stream_out
from sharedcompute.errors import (
    DeserializationError,
    RuntimeEnvError,
    SerializationError,
    SharedComputeError,
)

if TYPE_CHECKING:
    from sharedcompute._worker._actor_host import ActorHost

ENV_VAR = "SHAREDCOMPUTE_WORKER"
# A task shorter than this is "short": its result may wait for the next short task's.
_SHORT_TASK_SECONDS = 0.001
_MAX_BATCH = 64
# Batched results go out when this many short tasks remain queued (and when none do):
# the driver then refills the queue while those run, instead of after.
_REFILL_AT = 4
# Results of this many recent tasks stay known here, for a task the driver queued right
# behind its dependency (a chain) without waiting for the result to reach it.
_RECENT_RESULTS = 64
_POLL_SECONDS = 100e-6  # how long a worker looks for its next task before sleeping
# How long a worker waits for a DROP the driver has counted as sent before it starts
# the next queued task anyway (a DROP normally arrives within microseconds).
_DROP_WAIT_SECONDS = 1.0


def _count_in_callee(value: object) -> int:
    return sys.getrefcount(value)


def _count_held_once() -> int:
    value = object()  # one local, passed on: the shape of _execute calling _report
    return _count_in_callee(value)


# What ``sys.getrefcount`` says in ``_report`` of a result that nothing but the task's
# own frames holds (measured, as interpreters count differently).
_HELD_ONCE = _count_held_once()


def _disposable(result: Any, count: int) -> bool:
    """Whether storing ``result`` may give its pages back as it copies them: a large numpy
    array that owns its memory and that nothing else (no global, no actor, no view) holds."""
    if count != _HELD_ONCE:
        return False
    np = sys.modules.get("numpy")
    return (np is not None and type(result) is np.ndarray
            and result.nbytes >= SLICED_BYTES and bool(result.flags.owndata))


def _stored(dep_refs: tuple[tuple[int, Any], ...]) -> list[StoredObject]:
    """The inputs of a task that lie in this node's store (not inline, not elsewhere)."""
    refs = (ref_from_wire(wire) for _, wire in dep_refs if wire is not None)
    return [ref for ref in refs if type(ref) is StoredObject]


def pack_error(exc: BaseException, where: str) -> bytes:
    """Pickle an exception with its formatted traceback; never fails.

    The traceback text and the exception travel separately, so the reader keeps
    the traceback even when it cannot load the exception itself.
    """
    text = _safe_str(exc)
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # a broken __str__ or __repr__ must not lose the error
        tb = "".join(traceback.format_tb(exc.__traceback__)) + f"{type(exc).__qualname__}: {text}"
    tb = f"{where}\n{tb}"
    try:
        exc_bytes = cloudpickle.dumps(exc, protocol=5)
    except Exception as pickling_error:
        substitute = SerializationError(
            f"the task raised {type(exc).__qualname__}: {text}, and that exception could not be "
            f"pickled to send it back ({type(pickling_error).__name__}: "
            f"{_safe_str(pickling_error)})"
        )
        exc_bytes = cloudpickle.dumps(substitute, protocol=5)
    return pickle.dumps((tb, type(exc).__qualname__, text, exc_bytes), protocol=5)


def callable_name(fn: Any) -> str:
    """``module.QualName`` of a task's function (of the function a partial wraps)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


def _result_error(exc: BaseException, function: str) -> BaseException:
    """The error for a result that could not be stored, naming whose result it was.

    serialize() already named the type that failed and where it sat in the result.
    """
    if not isinstance(exc, SerializationError):
        return exc  # the store's own errors say what they are
    named = SerializationError(f"the result of {function} cannot be sent back: {exc}")
    named.__cause__ = exc.__cause__  # the remote traceback keeps the pickler's own error
    return named.with_traceback(exc.__traceback__)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__} whose str() failed>"


class WorkerRuntime(StreamClient, QueuedActorHolds, RuntimeBase):
    """The runtime that code running inside a task sees."""

    needs_pump = True

    def __init__(
        self, worker_id: int, conn: Connection, store: ClientStore,
        running: RunningSlot | None = None,
    ) -> None:
        super().__init__()
        if running is None:
            running, fd = RunningSlot.create()
            os.close(fd)
        self._running = running.word  # [the task executing on the main thread, DROPs sent]
        self._drops_read = 0  # DROP messages read so far (word 1 counts those sent)
        self.worker_id = worker_id
        self.conn = conn
        self.store = store
        self._store_client = store.client_id
        self._next_key = self._key_counter((worker_id + 1) << 40)
        self.node = 0  # the node it runs on (for errors that name it)
        self.env_error: str | None = None  # why its runtime_env could not be set up
        self._futures: dict[int, Future[Any]] = {}
        self._waited: set[int] = set()
        self._queue: deque[tuple[Any, ...]] = deque()
        self._functions: dict[bytes, Callable[..., Any]] = {}
        self._received_functions: dict[bytes, bytes] = {}  # sent, not unpickled yet
        self._stack: list[int] = []
        self._reader = threading.Lock()
        # Written by a thread that read the connection while the main thread ran a task,
        # so that the main thread never sleeps on a socket whose messages were taken.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._progress = threading.Condition()
        self._main = threading.main_thread()
        self.shutting_down = False
        # Results of short tasks wait here while more short tasks are queued, so a burst
        # of tiny tasks costs one send (and one wake-up of the driver) per batch.
        self._outbox: list[tuple[Any, ...]] = []
        self._short: set[bytes | str] = set()
        self._actor: ActorHost | None = None
        self._control: deque[tuple[Any, ...]] = deque()
        self._unsent: list[tuple[Any, ...]] = []  # releases a finalizer could not send
        self._recent: dict[int, tuple[Any, ...]] = {}
        # _queue is read by the main thread, and rebuilt by whichever thread waits (see
        # _take_child); threads of a task that wait on Futures count here, by task.
        self._queue_lock = threading.Lock()
        self._waiting_threads: dict[int, int] = {}
        self._waiting_lock = threading.Lock()  # counts and sends BLOCKED/UNBLOCKED, in order
        self.heap = Heap()
        # numpy's large arrays are made in the store once numpy is imported (see _arena).
        self.arena: Arena | None = None
        self._arena_wanted = True
        self.streams = StreamControl()  # what the driver said of the streams running here
        self._client_streams: dict[int, StreamState] = {}  # streams this worker's tasks read

    # -- the loop -------------------------------------------------------------------

    def serve(self) -> None:
        self.conn.send((Msg.READY, os.getpid(), self._store_client))
        while not self.shutting_down:
            if self._queue:
                if self._running[1] != self._drops_read:
                    self._read_urgent()
                with self._queue_lock:  # a thread of a finished task may still take from it
                    message = self._queue.popleft() if self._queue else None
                if message is not None:
                    self._next(message)
            elif self.heap.dirty:
                if self._poll_briefly():
                    continue
                self._read(IDLE_TRIM_SECONDS)
                if not self._queue:
                    self.heap.trim()
                    self.store.release_spares()  # an idle worker pins no store memory
            else:
                self._read(None)
        self._flush()

    def _next(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == Msg.RUN:
            self._run(message)
        elif kind == Msg.CALL:
            assert self._actor is not None
            self._actor.call_here(message)
        elif kind == Msg.CREATE:
            from sharedcompute._worker._actor_host import ActorHost  # only actors pay for it

            self._arena_wanted = False  # an actor's arrays would pin the store
            if self.arena is not None:
                self.arena.stop()
            self._actor = ActorHost(self, message)

    def _send(self, message: tuple[Any, ...]) -> None:
        """Send now, after whatever results are batched (order matters to the driver)."""
        if threading.current_thread() is not self._main:
            self.conn.send(message)  # the batch belongs to the main thread
        elif self._outbox:
            self._outbox.append(message)
            self._flush()
        else:
            self.conn.send(message)

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self.conn.send_many(outbox)
        if self._unsent:
            self._send_unsent()

    def _emit(self, message: tuple[Any, ...], fn_key: bytes | str, duration: float) -> None:
        if duration < _SHORT_TASK_SECONDS:
            self._short.add(fn_key)
        else:
            self._short.discard(fn_key)
        self._outbox.append(message)
        try:
            upcoming = self._queue[0]
        except IndexError:
            upcoming = None
        if (
            upcoming is None
            or upcoming[2] not in self._short
            or fn_key not in self._short
            or len(self._queue) == _REFILL_AT or len(self._outbox) >= _MAX_BATCH
        ):
            self._flush()

    def _poll_briefly(self) -> bool:
        """Look for the next message for a moment before sleeping; whether any came.

        Right after a task the next one often follows within tens of microseconds,
        and waking a sleeping process costs about as much again (more on a VM).
        """
        self._flush()
        deadline = time.perf_counter() + _POLL_SECONDS
        with self._reader:
            while True:
                messages = self._receive(block=False)
                if messages or time.perf_counter() > deadline:
                    break
        for message in messages:
            self._dispatch(message)
        return bool(messages)

    def _read_urgent(self) -> None:
        """The driver sent DROPs this worker has not read: read what has arrived, now.

        Called before each queued task while the counts differ, so a withdrawn task is
        dropped before it can start. The count goes up once a DROP is sent, so one that has
        not arrived is on its way (behind RUNs that filled the socket, say): wait for it,
        briefly, rather than start the task it withdraws.
        """
        deadline = time.monotonic() + _DROP_WAIT_SECONDS
        while True:  # all that has arrived: a DROP comes after the RUNs sent before it
            if self._running[1] == self._drops_read:
                return  # read by the doorbell's thread meanwhile (read_rung)
            with self._reader:
                messages = self._receive(block=False)
                if not messages:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._wait_readable(remaining):
                        return
                    continue
            for message in messages:
                self._dispatch(message)
            if self._running[1] == self._drops_read:
                return

    def _wait_readable(self, timeout: float) -> bool:
        """Whether the connection has something to read within ``timeout``, or read_rung
        woke this thread (``_reader`` held)."""
        if self.conn.pending():
            return True
        return self._select(timeout) is not None

    def _select(self, timeout: float | None) -> bool | None:
        """Wait for the connection (True), or for read_rung to wake this thread (False);
        None at the timeout."""
        sock = self.conn.sock.fileno()
        ready, _, _ = select.select([sock, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            drain_pipe(self._wake_r)
        return (sock in ready) if ready else None

    def read_rung(self) -> None:
        """The driver rang (it sent DROPs; see ``RunningSlot``): read them now, even while
        a task runs, so that a task it takes back from this worker's queue goes back at once
        (an idle worker waits for it). Then wake the main thread, which may be about to
        sleep on the connection these messages came from."""
        self.read_arrived()
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # awake already

    def read_arrived(self) -> None:
        """Dispatch what the driver has sent, without waiting (a streaming task looks for
        its STREAM_ACK / STREAM_STOP between items)."""
        if not self._reader.acquire(blocking=False):
            return  # another thread of this task reads: it dispatches them
        try:
            messages = self._receive(block=False)
        finally:
            self._reader.release()
        for message in messages:
            self._dispatch(message)

    def _read(self, timeout: float | None) -> None:
        self._flush()
        with self._reader:
            if not self.conn.pending() and not self._select(timeout):
                return  # the time is up, or read_rung took the messages: look again
            messages = self._receive(block=True)
        for message in messages:
            self._dispatch(message)

    def _receive(self, *, block: bool) -> list[tuple[Any, ...]]:
        """Whole messages already buffered, else what the socket has (``_reader`` held)."""
        try:
            if self.conn.pending():
                return self.conn.recv_buffered()
            return self.conn.recv_available(block=block)
        except ConnectionClosed:
            os._exit(0)  # the driver is gone; nobody wants our results

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == Msg.RUN:
            if message[3] is not None:
                # Ours from now on, as the driver counts it, even if the task is handed back.
                self._received_functions[message[2]] = message[3]
            with self._queue_lock:
                self._queue.append(message)
        elif kind == Msg.CALL:
            if self._actor is None or not self._actor.take(message):
                with self._queue_lock:
                    self._queue.append(message)
        elif kind == Msg.CREATE:
            with self._queue_lock:
                self._queue.append(message)
        elif kind == Msg.RESOLVED:
            _, key, ok, payload = message
            future = self._futures.pop(key, None)
            if future is not None and not future.done():
                if ok:
                    future.set_result(ValueRef(ref_from_wire(payload)))
                else:
                    future.set_exception(payload)
            with self._progress:
                self._progress.notify_all()
        elif kind == Msg.STREAM_ITEM:
            self.stream_item(message)
        elif kind == Msg.STREAM_ACK or kind == Msg.STREAM_STOP:
            if kind == Msg.STREAM_ACK:
                self.streams.ack(message[1], message[2])
            else:
                self.streams.stop(message[1])
            with self._progress:
                self._progress.notify_all()
        elif kind == Msg.DROP:
            with self._queue_lock:  # the doorbell's thread dispatches too
                self._drops_read += 1
            self._drop(message[1])
        elif kind == Msg.FORGET:
            for fn_key in message[1]:
                self._functions.pop(fn_key, None)
                self._received_functions.pop(fn_key, None)
                self._short.discard(fn_key)
        elif kind == Msg.SHUTDOWN:
            self.shutting_down = True

    def _drop(self, key: int) -> None:
        """Drop task ``key`` if it is still queued, and say so (the driver cancels it)."""
        with self._queue_lock:
            for index, queued in enumerate(self._queue):
                if queued[0] == Msg.RUN and queued[1] == key:
                    del self._queue[index]
                    break
            else:
                return  # started already (or finished): its answer says so
        self._send((Msg.RETURN, key))

    def run_initializer(self) -> bool:
        """Run the initializer the driver sends first; False if it raised (then exit)."""
        message = self.conn.recv_one()
        assert message[0] == Msg.INIT, message
        try:
            initializer, initargs = cloudpickle.loads(message[1])
            initializer(*initargs)
        except BaseException as exc:
            # As concurrent.futures.process does, so handlers set up for it see it.
            import logging

            logging.getLogger("concurrent.futures").critical(
                "Exception in initializer:", exc_info=True
            )
            where = f"The initializer failed in worker {self.worker_id} (pid {os.getpid()})"
            self._send((Msg.INIT_FAILED, pack_error(exc, where)))
            return False
        return True

    # -- running a task --------------------------------------------------------------

    def _run(self, message: tuple[Any, ...], *, on_main: bool = True) -> None:
        _, key, fn_key, fn_bytes, args_wire, dep_refs, name, _parent, stream, granted = message
        # The driver's store holds these inputs for this task: read without a round trip.
        grants = _stored(dep_refs) if granted else None
        if dep_refs and any(wire is None for _, wire in dep_refs):
            local = tuple((k, self._recent.get(k) if w is None else w) for k, w in dep_refs)
            if any(wire is None for _, wire in local):
                # The dependency failed here (or is long forgotten): the driver decides.
                (self._send if on_main else self.conn.send)((Msg.RETURN, key))
                return
            dep_refs = local
        if grants:
            self.store.take_grants(grants)
        self._execute(key, lambda: self._function(fn_key, fn_bytes), args_wire, dep_refs, name,
                      fn_key, on_main=on_main, stream=stream, grants=grants)

    def _execute(
        self, key: int, target: Callable[[], Callable[..., Any]], args_wire: tuple[Any, ...],
        dep_refs: tuple[tuple[int, Any], ...], name: str, batch_key: bytes | str,
        *, on_main: bool = True, stream: int | None = None,
        grants: list[StoredObject] | None = None,
    ) -> None:
        """Run one task or actor call and report it (``on_main``: this is the main thread);
        ``grants``: inputs the store holds for it, until just before its answer goes."""
        send = self._send if on_main else self.conn.send
        self.heap.dirty = True
        if on_main:
            self._stack.append(key)
            self._running[0] = key
        started = time.perf_counter()
        try:
            try:
                if self.env_error is not None:
                    raise RuntimeEnvError(self.env_error)
                fn = target()
                args, kwargs = self._arguments(args_wire, dep_refs)
                if self._arena_wanted and on_main and "numpy" in sys.modules:
                    self._arena_wanted = False
                    self.arena = Arena.install(self.store)
                result = fn(*args, **kwargs)
                del args, kwargs  # views of inputs the result does not hold go now
            except BaseException as exc:
                where = f"Task {name or key} failed in worker {self.worker_id} (pid {os.getpid()})"
                error = pack_error(self._named_missing_module(exc), where)
                del exc
                if grants:
                    self.store.end_grants(grants)
                send((Msg.FAILED, key, error))
                return
            if grants:  # before the answer: the driver lets go once it reads that
                self.store.end_grants(grants)
            if stream is not None and inspect.isgenerator(result):
                result = stream_out(self, key, result, stream, name, send)
                if result is None:
                    return  # it failed, and said so
            self._report(key, result, name, started, batch_key, send, on_main, fn)
            # A frame can outlive its call (an exception some library keeps holds the
            # frames it passed through, and theirs hold their callers'): let go of the result.
            del result
        finally:
            if on_main:
                self._stack.pop()
                self._running[0] = self._stack[-1] if self._stack else 0

    def _named_missing_module(self, exc: BaseException) -> BaseException:
        """A module this node cannot import: say which, where, and that runtime_env ships it."""
        missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
        if not isinstance(missing, ModuleNotFoundError) or missing.name is None:
            return exc
        shipped = self.envs.base
        hint = (
            f"this worker's runtime_env ships {shipped.describe()}, which lacks it"
            if shipped is not None and shipped.packages else
            "ship it with runtime_env={'working_dir': ...} or {'py_modules': [...]} "
            "(in sc.init or .options)"
        )
        named = ModuleNotFoundError(
            f"No module named {missing.name!r} on node {self.node} (worker "
            f"{self.worker_id}, pid {os.getpid()}): {hint}", name=missing.name,
        )
        return named.with_traceback(exc.__traceback__)

    def _arguments(
        self, args_wire: tuple[Any, ...], dep_refs: tuple[tuple[int, Any], ...]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = self._load_wire(args_wire)
        if dep_refs:
            values = {dep_key: self._load_wire(w) for dep_key, w in dep_refs}
            args, kwargs = restore_dependencies((args, kwargs), values)
        return args, kwargs

    def _load_wire(self, wire: tuple[Any, ...]) -> Any:
        if len(wire) == 2:  # inline (header, payload), as most values are: no ref object
            return deserialize(*wire)
        return self.load(ref_from_wire(wire))

    def _report(
        self, key: int, result: Any, name: str, started: float, batch_key: bytes | str,
        send: Callable[[tuple[Any, ...]], None], on_main: bool, fn: Any = None,
    ) -> None:
        count = sys.getrefcount(result)  # first: before anything else holds it
        try:
            ref: ObjectRef | None = None
            if count == _HELD_ONCE and self.arena is not None:
                ref = self.arena.seal(result)  # made in the store: sealed where it is
            if ref is None:
                ref = self.store.put_serialized(serialize(result, "result"), for_owner=True,
                                                consume=_disposable(result, count))
        except BaseException as exc:
            where = f"Task {name or key} returned a value that could not be stored"
            function = callable_name(fn) if fn is not None else name or str(key)
            send((Msg.FAILED, key, pack_error(_result_error(exc, function), where)))
            return
        del result
        duration = time.perf_counter() - started
        wire = ref_to_wire(ref)
        message = (Msg.DONE, key, wire, duration)
        if on_main:
            recent = self._recent
            recent[key] = wire
            if len(recent) > _RECENT_RESULTS:
                del recent[next(iter(recent))]
            self._emit(message, batch_key, duration)
        else:
            send(message)

    def _function(self, fn_key: bytes, fn_bytes: bytes | None) -> Callable[..., Any]:
        fn = self._functions.get(fn_key)
        if fn is None:
            received = self._received_functions.pop(fn_key, None)
            fn_bytes = fn_bytes or received
            if fn_bytes is None:
                raise SharedComputeError("the driver sent a task for a function this worker lacks")
            try:
                fn = cloudpickle.loads(fn_bytes)
            except (Exception, SystemExit) as exc:
                raise DeserializationError(
                    f"cannot load the task's function in the worker: {type(exc).__name__}: {exc}"
                ) from exc
            self._functions[fn_key] = fn
        return fn

    # -- the API seen by tasks ----------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        options: TaskOptions, stream: StreamState | None = None,
    ) -> Future[Any]:
        env = self.task_env(options)  # before anything is stored: it may raise
        args_ref, deps = self.prepare_args(args, kwargs)
        fn_key, fn_bytes = self.functions.encode(fn)
        key = self._next_key()
        name = task_name(fn, options)
        future: Future[Any] = Future(self, key, name)
        self._futures[key] = future
        if stream is not None:  # a generator: the head forwards its items (STREAM_ITEM)
            stream.key = key
            self._client_streams[key] = stream
        # From any thread of the task: its children are what it may wait for.
        parent = self._stack[-1] if self._stack else None
        self._send((
            Msg.SUBMIT, key, fn_key, fn_bytes, ref_to_wire(args_ref),
            tuple(deps), options_to_wire(options, env, name), parent,
            None if stream is None else stream.backpressure,
        ))
        return future

    def put(self, value: Any) -> Future[Any]:
        ref = self.store.put_serialized(serialize(value), for_owner=True)
        key = self._next_key()
        future: Future[Any] = Future(self, key)
        future.set_result(ValueRef(ref))
        self._send((Msg.PUT, key, ref_to_wire(ref)))
        return future

    def submit_actor_call(
        self, actor_id: int, class_name: str, method: str, args: tuple[Any, ...],
        kwargs: dict[str, Any], stream: StreamState | None = None,
    ) -> Future[Any]:
        args_ref, deps = self.prepare_args(args, kwargs)
        key = self._next_key()
        future: Future[Any] = Future(self, key, f"{class_name}.{method}")
        self._futures[key] = future
        if stream is not None:  # a generator method: the head forwards its items
            stream.key = key
            self._client_streams[key] = stream
        self._send((
            Msg.SUBMIT_CALL, key, actor_id, class_name, method, ref_to_wire(args_ref), tuple(deps),
            None if stream is None else stream.backpressure,
        ))
        return future

    def create_actor(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "actors are created from the driver; pass a handle to the task instead"
        )

    def watch(self, future: Future[Any]) -> None:
        if not future.done() and future.key not in self._waited:
            self._waited.add(future.key)
            self._futures.setdefault(future.key, future)
            self._send((Msg.WAIT, [future.key]))

    def cancel(self, future: Future[Any]) -> bool:
        self._send((Msg.CANCEL, future.key))
        return False

    def _releases_pending(self) -> bool:
        return bool(self._released or self._control)

    def _flush_releases(self) -> None:
        keys = []
        while self._released:
            keys.append(self._released.popleft())
        messages: list[tuple[Any, ...]] = [(Msg.RELEASE, keys)] if keys else []
        while self._control:
            messages.append(self._control.popleft())
        if not messages:
            return
        if self._unsent:
            messages[:0] = self._unsent
            self._unsent = []
        try:
            # Never wait for the connection here: this may run in a finalizer that
            # interrupted a send of this very thread. Such messages go at the next read.
            if not self.conn.try_send_many(messages):
                self._unsent = messages
        except ConnectionClosed:
            pass

    def _send_unsent(self) -> None:
        """Send the releases a finalizer could not send (main thread, before reading)."""
        with self._release_lock:
            messages, self._unsent = self._unsent, []
            if messages:
                try:
                    self.conn.send_many(messages)
                except ConnectionClosed:
                    pass

    def wait_for(
        self, futures: Iterable[Future[Any]], timeout: float | None, return_when: str
    ) -> None:
        futures = list(futures)
        wanted = [f.key for f in futures if not f.done() and f.key not in self._waited]
        if wanted:
            self._waited.update(wanted)
            for key in wanted:
                self._futures.setdefault(key, next(f for f in futures if f.key == key))
            self._send((Msg.WAIT, wanted))
        deadline = None if timeout is None else time.monotonic() + timeout

        def satisfied() -> bool:
            done = sum(f.done() for f in futures)
            if return_when == "FIRST_COMPLETED":
                return done > 0 or not futures
            if return_when == "FIRST_EXCEPTION" and any(
                f.done() and not f.cancelled() and f.exception(0) is not None for f in futures
            ):
                return True
            return done == len(futures)

        self.wait_until(satisfied, deadline)

    def wait_until(self, satisfied: Callable[[], bool], deadline: float | None) -> None:
        """Read and run what the driver sends until ``satisfied()`` (or the deadline), the
        waiting task counted as blocked meanwhile."""
        # Any thread of a task that waits blocks the task (its CPU goes back, as in Ray),
        # and runs the task's children meanwhile: a task waiting from its own threads on a
        # one-worker pool must finish too. Actor calls off the main thread are not tasks.
        on_main = threading.current_thread() is self._main
        blocked_key = self._stack[-1] if self._stack and (on_main or self._actor is None) else None
        blocking = blocked_key is not None and not satisfied()
        if blocking:
            self._count_waiting(blocked_key, +1)  # type: ignore[arg-type]
        try:
            while not satisfied():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                if on_main:
                    child = self._take_child(blocked_key)
                    if child is not None:
                        self._next(child)
                    else:
                        self._read(remaining)
                elif self._reader.acquire(blocking=False):
                    self._reader.release()
                    child = self._take_child(blocked_key) if blocking else None
                    if child is not None and child[0] == Msg.RUN:
                        self._run(child, on_main=False)
                    else:
                        self._read(min(0.05, remaining) if remaining is not None else 0.05)
                else:
                    with self._progress:
                        self._progress.wait(0.05)
        finally:
            if blocking:
                self._count_waiting(blocked_key, -1)  # type: ignore[arg-type]

    def _count_waiting(self, key: int, delta: int) -> None:
        """Tell the driver when the first thread of task ``key`` waits and the last is done.

        The message goes out under the same lock as the count: otherwise a thread's
        UNBLOCKED could overtake the next thread's BLOCKED, and the driver would take
        the task for running while a thread of it waits for a child that then never runs.
        """
        with self._waiting_lock:
            count = self._waiting_threads.get(key, 0) + delta
            if count:
                self._waiting_threads[key] = count
            else:
                self._waiting_threads.pop(key, None)
            if delta > 0 and count == 1:
                self._send((Msg.BLOCKED, key))
            elif not count:
                self._send((Msg.UNBLOCKED, key))

    def _take_child(self, parent: int | None) -> tuple[Any, ...] | None:
        """The next queued task submitted by ``parent``; other queued tasks go back.

        A waiting task may only have its own children run nested above it: anything
        else could block in turn and pile up without bound. Tasks the driver sent
        before this one blocked are handed back for other workers to take; actor
        calls stay queued, to run in order once the waiting call has finished.
        """
        if not self._queue:
            return None
        kept: deque[tuple[Any, ...]] = deque()
        child = None
        returned = []
        with self._queue_lock:
            while self._queue:
                message = self._queue.popleft()
                if message[0] != Msg.RUN:
                    kept.append(message)
                elif child is None and parent is not None and message[7] == parent:
                    child = message
                else:
                    returned.append((Msg.RETURN, message[1]))
            self._queue = kept
        if returned:
            if threading.current_thread() is self._main:
                self._flush()
            self.conn.send_many(returned)
        return child


# What a byte on the watch pipe calls: the driver's doorbell (main() sets it).
_RUNG: list[Callable[[], None]] = []


def _watch_driver(fd: int) -> None:
    """Exit once the driver is gone (its end of the pipe closes); a byte on the pipe is
    its doorbell (``WorkerRuntime.read_rung``)."""
    try:
        while os.read(fd, 256):
            for ring in _RUNG:
                try:
                    ring()
                except Exception:
                    traceback.print_exc()
    finally:
        os._exit(0)


def main() -> None:
    config = json.loads(os.environ.pop(ENV_VAR))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = config["path"]
    if config.get("authkey"):
        # The driver's, so multiprocessing.Manager() proxies passed to tasks can connect.
        from multiprocessing import process

        process.current_process().authkey = bytes.fromhex(config["authkey"])
    threading.Thread(
        target=_watch_driver, args=(int(sys.argv[2]),), name="driver-watch", daemon=True
    ).start()
    conn = Connection(socket.socket(fileno=int(sys.argv[1])))
    running = RunningSlot(int(sys.argv[3]))
    os.close(int(sys.argv[3]))
    store = ClientStore(config["store"])
    runtime = WorkerRuntime(config["id"], conn, store, running)
    runtime.node = config.get("node", 0)
    runtime.env_error = config.get("env_error")
    if config.get("env") is not None:
        runtime.envs = EnvResolver(inherited=Env.from_json(config["env"]))
    from sharedcompute._runtime import _context

    _context.set_worker_runtime(runtime)
    if config["init"] and not runtime.run_initializer():
        conn.close()
        sys.exit(1)  # through atexit: what the initializer queued (logging) goes out
    # Only now (run_initializer reads its message without the reader lock): a DROP rung
    # before is read by serve() before the next queued task, as without a bell.
    _RUNG.append(runtime.read_rung)
    runtime.serve()
    conn.close()
    os._exit(0)
