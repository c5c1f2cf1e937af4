"""The driver's worker processes and the one I/O thread that listens to them.

::

    submit() ──▶ SchedulerCore ──Dispatch──▶ conn.send(RUN) ─────────▶ worker
                      ▲                                                    │
                      └── events ◀── I/O thread: selector.select() ◀───────┘
                                      over every worker connection, every
                                      worker's stdout/stderr pipe and a wake-up pipe

The I/O thread's only blocking point is one ``select`` over everything a worker
can say, its output included, so a worker's death (its connection reaching
EOF) wakes the same call as a result does.

Leader hand-off: a thread that is about to wait for a result can take over the
reading (``lead``). The I/O thread is asked to step aside (through the wake-up
pipe, while the task runs), and the waiting thread then selects on the sockets
itself, so the answer wakes the thread that wants it directly instead of
waking the I/O thread, which would then wake it. Only one thread reads at a
time (``_token``); the I/O thread resumes when no thread leads.

Idle work: work that may wait a little (handing released Futures to the
scheduler) is queued by the runtime and done by whichever thread reads next,
when it has nothing else to do: a leading thread while its task runs, or the
I/O thread. Whichever of them sleeps in ``select`` is woken for it; an I/O
thread that is neither selecting nor leading comes round within
``_LEAD_GRACE_SECONDS``. A submit/result loop thus does that work while the
worker runs, not between a result and the next submit. Wake-ups are coalesced:
one byte in the wake-up pipe at a time (``_wake_sent``).

Processes are started here with
``subprocess`` (no fork of the driver's threads and locks); each gets its end of
a socketpair, and the read end of a pipe whose write end only the driver holds,
so workers exit as soon as the driver does.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import heapq
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import cloudpickle

from sharedcompute._env import Env, PackageCache, WorkerEnv
from sharedcompute._protocol import Connection, ConnectionClosed, Msg
from sharedcompute._sync import drain_pipe
from sharedcompute._worker._main import ENV_VAR
from sharedcompute._worker._running import RunningSlot
from sharedcompute.errors import RuntimeEnvError

# After a thread stops leading, the I/O thread waits this long before it reads again.
_LEAD_GRACE_SECONDS = 0.002
_LEAD_POLL_SECONDS = 100e-6  # how long a waiting thread polls before it sleeps
_IDLE_RECHECK_SECONDS = 0.001
# A worker whose connection closed is exiting; one still there after this is killed.
_EXIT_GRACE_SECONDS = 5.0
_TAIL_LINES = 20  # lines of a worker's stderr kept to quote if it cannot start
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Functions a worker keeps unpickled; the driver decides which (see FunctionSet).
WORKER_FUNCTIONS = 1024


class FunctionSet:
    """The functions a worker holds, least recently used first, as the driver tracks them.

    The driver sends a function's bytes only to a worker that lacks it; past
    ``capacity`` it tells the worker to forget the least recently used ones, so a
    driver submitting ever new functions (a fresh ``functools.partial`` per task)
    does not grow its workers without bound.
    """

    def __init__(self, capacity: int = WORKER_FUNCTIONS) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def use(self, key: bytes) -> tuple[bool, list[bytes]]:
        """(whether the worker has ``key`` already, the keys it must forget now)."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return True, []
        self._keys[key] = None
        evicted = []
        while len(self._keys) > self.capacity:
            evicted.append(self._keys.popitem(last=False)[0])
        return False, evicted


class Sender(Protocol):
    def send(self, message: tuple[Any, ...]) -> None: ...
    def send_many(self, messages: Iterable[tuple[Any, ...]]) -> None: ...


class Executing(Protocol):
    def get(self) -> int: ...
    def urgent_sent(self, count: int = 1) -> None: ...


@dataclass(eq=False)
class WorkerSlot:
    """What the driver knows of a worker, wherever it runs: a process here
    (:class:`WorkerHandle`) or one on another node (``_cluster``)."""

    id: int
    conn: Sender
    # The key of the task it is executing (0: none): read after it dies, to charge the
    # crash to that task alone (see RunningSlot).
    running: Executing
    functions: FunctionSet = field(default_factory=FunctionSet)
    held_keys: set[int] = field(default_factory=set)
    store_client: int | None = None  # its id at the store, from READY
    ready: bool = False
    actor_id: int | None = None  # set when this process hosts an actor
    # An actor that runs one call at a time: calls sent while one is in flight would only
    # wait in its queue, so they wait here instead and go out together when an answer
    # comes back (fewer, larger messages both ways, and the order is the same).
    serial_calls: bool = False
    calls_in_flight: int = 0
    held_calls: list[tuple[Any, ...]] = field(default_factory=list)
    node: int = 0
    env: Env | None = None  # the runtime_env it was started in

    def hold_calls(self, messages: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The messages to send now; the other calls are held (see ``serial_calls``)."""
        now = []
        for message in messages:
            if message[0] == Msg.CALL:
                if self.calls_in_flight or self.held_calls:
                    self.held_calls.append(message)
                    continue
                self.calls_in_flight += 1
            now.append(message)
        return now

    def release_calls(self, answered: int) -> list[tuple[Any, ...]]:
        """Calls to send now that ``answered`` calls came back."""
        self.calls_in_flight = max(0, self.calls_in_flight - answered)
        held, self.held_calls = self.held_calls, []
        self.calls_in_flight += len(held)
        return held



@dataclass(eq=False, kw_only=True)
class WorkerHandle(WorkerSlot):
    """A worker process of this process's pool."""

    conn: Connection
    running: RunningSlot  # 8 bytes shared with the worker
    proc: subprocess.Popen[bytes]
    watch_fd: int
    exited: bool = False
    pidfd: int = -1  # while its connection is closed and its exit not yet seen
    stderr: _OutputForwarder | None = None
    prepared: WorkerEnv | None = None  # its env as set up on this host (released at exit)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self) -> list[str]:
        """The last lines the worker wrote to stderr (complete ones, then any partial)."""
        if self.stderr is None:
            return []
        partial = self.stderr.partial.decode(errors="replace")
        return [*self.stderr.tail, *([partial] if partial else [])]


def pickle_for_workers(value: Any) -> tuple[bytes, tuple[int, ...]]:
    """Pickle ``value`` as multiprocessing pickles a Process's arguments at spawn.

    Objects such as ``multiprocessing.Queue`` pickle only while a process is being
    spawned, and then by the numbers of file descriptors the child inherits: this
    collects those numbers, for the worker's ``pass_fds``.
    """
    import multiprocessing.connection  # noqa: F401 (registers the reducers of connections)
    from multiprocessing import context
    from multiprocessing.popen_spawn_posix import _DupFd
    from multiprocessing.reduction import ForkingPickler

    class Spawning:
        def __init__(self) -> None:
            self.fds: list[int] = []

        def duplicate_for_child(self, fd: int) -> int:
            self.fds.append(fd)
            return fd

        def DupFd(self, fd: int) -> Any:
            return _DupFd(fd)

    spawning = Spawning()
    buffer = io.BytesIO()

    class SpawnPickler(cloudpickle.Pickler):
        # multiprocessing's own reducers (connections, sockets...), which it gives only to
        # its own pickler: without them a Queue's pipe travels as a bare descriptor number.
        dispatch_table = collections.ChainMap(
            ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
            cloudpickle.Pickler.dispatch_table,
        )

    pickler = SpawnPickler(buffer, protocol=5)
    context.set_spawning_popen(spawning)  # type: ignore[arg-type]
    try:
        pickler.dump(value)
    finally:
        context.set_spawning_popen(None)
    return buffer.getvalue(), tuple(dict.fromkeys(spawning.fds))


def _multiprocessing_authkey() -> bytes:
    """The driver's ``multiprocessing`` authkey, which its workers take as their own.

    ``multiprocessing.Manager()`` proxies, which authenticate with it, then work when
    passed to a task, as they do with a ``multiprocessing.Pool``. Imported here, not at
    start-up: only spawning pays for it.
    """
    from multiprocessing import process

    return bytes(process.current_process().authkey)


def describe_exit(pid: int, returncode: int | None) -> str:
    if returncode is None:
        return f"pid {pid} closed its connection"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if returncode == -signal.SIGKILL:
            # What loky calls "excessive memory usage": the kernel's OOM killer sends SIGKILL.
            return (
                f"pid {pid} was killed by {name} (often the kernel's out-of-memory killer, "
                "when memory runs short; check with `dmesg | grep -i oom` or "
                "`journalctl -k | grep -i oom`)"
            )
        return f"pid {pid} was killed by {name}"
    return f"pid {pid} exited with code {returncode}"


class _OutputForwarder:
    """Copies a worker's stdout or stderr into the driver's, each line prefixed.

    Without a prefix (``prefix=None``) the bytes pass through as the task wrote them,
    as a ``ProcessPoolExecutor``'s workers, which share the parent's streams, would
    print them: a partial line goes out at once, and no newline is added at the end.
    Either way the last lines stay in ``tail``, to quote when a worker cannot start.
    """

    def __init__(self, prefix: str | None, target: Callable[[], TextIO]) -> None:
        self.prefix = prefix
        self.target = target
        self.partial = b""
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        # Used without a prefix: there a read may end inside a multi-byte character.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        decoded = [line.decode(errors="replace") for line in lines]
        self.tail.extend(decoded)
        if self.prefix is None:
            self._write_text(self._decoder.decode(data))
        elif decoded:
            self._write_text("".join(f"{self.prefix}{line}\n" for line in decoded))

    def close(self) -> None:
        partial = self.partial.decode(errors="replace")
        self.partial = b""
        if partial:
            self.tail.append(partial)
        if self.prefix is None:
            self._write_text(self._decoder.decode(b"", final=True))
        elif partial:
            self._write_text(f"{self.prefix}{partial}\n")

    def _write_text(self, text: str) -> None:
        if not text:
            return
        try:
            stream = self.target()
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass


class ProcessPool:
    """Starts worker processes and runs the I/O thread; the runtime handles what they say."""

    def __init__(
        self,
        store_address: str,
        on_messages: Callable[[WorkerHandle, list[tuple[Any, ...]]], None],
        on_exit: Callable[[WorkerHandle, str], None],
        on_idle: Callable[[], None] = lambda: None,
        idle_pending: Callable[[], bool] = lambda: False,
        initializer: tuple[bytes, tuple[int, ...]] | None = None,
        output_prefix: bool = True,
        packages: Callable[[], PackageCache] | None = None,
        node: int = 0,
    ) -> None:
        self._store_address = store_address
        # This host's runtime_env packages (made on first use), and the node we are, for
        # the errors of workers that cannot import what a task needs.
        self._packages = packages
        self._node = node
        self._output_prefix = output_prefix  # "(worker N, pid P) " before each output line
        # Sent first to every worker (from pickle_for_workers), with the descriptors it names.
        self._init_message: tuple[Any, ...] | None = None
        self._init_fds: tuple[int, ...] = ()
        if initializer is not None:
            self._init_message = (Msg.INIT, initializer[0])
            self._init_fds = initializer[1]
        self._on_messages = on_messages
        self._on_exit = on_exit
        self._on_idle = on_idle  # must not block (see "Idle work")
        self._idle_pending = idle_pending
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._wake_sent = False  # a byte is in the pipe, not read yet
        self._wake_lock = threading.Lock()  # against close() closing the pipe mid-write
        self._new: list[WorkerHandle] = []
        self._backlogged: list[Connection] = []  # need EVENT_WRITE until their backlog is out
        # (when, sequence, callback): run by whichever thread polls (see call_later).
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_sequence = 0
        self._new_lock = threading.Lock()
        self.workers: dict[int, WorkerHandle] = {}
        self._stopping = False
        self._token = threading.Lock()
        # A plain lock (its ``with`` costs less than a Condition's) guards the leader
        # counts; the I/O thread waits on the Condition built on it.
        self._handoff_lock = threading.Lock()
        self._handoff = threading.Condition(self._handoff_lock)
        self._leaders_wanted = 0
        self._leader: int | None = None
        self._io_selecting = False
        self._last_lead = 0.0
        self._thread = threading.Thread(target=self._loop, name="sharedcompute-io", daemon=True)
        self._thread.start()

    # -- processes ---------------------------------------------------------------

    def spawn(self, worker_id: int, runtime_env: Env | None = None) -> WorkerHandle:
        """Start a worker; in ``runtime_env``, set up here first (a worker that cannot have
        its env set up still starts, and fails each task it is given with the reason)."""
        prepared, env_error = self._prepare(runtime_env)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        watch_r, watch_w = os.pipe2(os.O_CLOEXEC)
        running, running_fd = RunningSlot.create()
        config = {
            "path": [*(prepared.paths if prepared else ()), *sys.path],
            "store": self._store_address, "id": worker_id,
            "init": self._init_message is not None,
            "authkey": _multiprocessing_authkey().hex(),
            "node": self._node,
            "env": runtime_env.to_json() if runtime_env is not None else None,
            "env_error": env_error,
        }
        env = dict(os.environ)
        if prepared is not None:
            env.update(prepared.env_vars)
        env[ENV_VAR] = json.dumps(config)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sharedcompute._worker",
                 str(child_sock.fileno()), str(watch_r), str(running_fd)],
                pass_fds=(child_sock.fileno(), watch_r, running_fd, *self._init_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=prepared.cwd if prepared is not None else None,
            )
        except BaseException:
            if prepared is not None and self._packages is not None:
                self._packages().release(prepared.env)
            raise
        finally:
            child_sock.close()
            os.close(watch_r)
            os.close(running_fd)
        running.attach_bell(watch_w)
        conn = Connection(parent_sock, on_backlog=self._on_backlog)
        worker = WorkerHandle(
            id=worker_id, conn=conn, running=running, proc=proc, watch_fd=watch_w,
            env=runtime_env, prepared=prepared,
        )
        # Known at once (the runtime may send it tasks now); read, and written when its
        # socket is full, once the polling thread has registered its connection.
        self.workers[worker_id] = worker
        with self._new_lock:
            self._new.append(worker)
        if self._init_message is not None:
            conn.send(self._init_message)  # never blocks: what does not fit waits in a backlog
        self._wake()
        return worker

    def _prepare(self, runtime_env: Env | None) -> tuple[WorkerEnv | None, str | None]:
        if runtime_env is None:
            return None, None
        if self._packages is None:
            return None, "runtime_env: this pool has no package cache"
        try:
            return self._packages().prepare(runtime_env), None
        except RuntimeEnvError as error:
            return None, f"{error} (on node {self._node})"

    def _on_backlog(self, conn: Connection) -> None:
        """A send did not fit in the socket: whoever polls next watches it for writing."""
        with self._new_lock:
            self._backlogged.append(conn)
        self._wake()

    def _wake(self, *, stopping: bool = False) -> None:
        """Make the polling thread run ``_drain_wake`` (never blocks: finalizers call it).

        Whoever queued work did so before calling; a byte already in the pipe is
        read by a ``_drain_wake`` that then clears the flag and only then looks at
        the queues, so it sees that work too. If another thread holds the lock, it
        is writing a byte now, or closing the pool.

        ``stopping`` (``close``, never a finalizer): always write, waiting for the lock.
        A writer that holds it may have had its byte read already, before the polling
        thread could see ``_stopping``; skipped, this wake-up would be lost and the
        polling thread would sleep on.
        """
        if stopping:
            with self._wake_lock:
                if self._wake_w >= 0:
                    self._wake_sent = True
                    with contextlib.suppress(BlockingIOError):
                        os.write(self._wake_w, b"x")
            return
        if self._wake_sent or not self._wake_lock.acquire(blocking=False):
            return
        try:
            if self._wake_w >= 0:
                self._wake_sent = True
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass
        finally:
            self._wake_lock.release()

    def is_reading_thread(self) -> bool:
        """Whether this thread reads the workers now (the I/O thread or a leading thread)."""
        me = threading.get_ident()
        return me == self._leader or me == self._thread.ident

    def wake(self) -> None:
        """Wake the thread that sleeps in ``select``, if one does (never blocks): idle work
        was queued, or a Future it may wait for was settled by another thread.

        The caller queues (or settles) first, then looks at the flags; a polling thread
        sets its flag, then looks at the queue (or its condition) before each
        ``select``: one of the two always sees the other.
        """
        if (self._io_selecting or self._leader is not None) and not self._stopping:
            self._wake()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay`` seconds, in whichever thread polls then."""
        with self._new_lock:
            self._timer_sequence += 1
            heapq.heappush(
                self._timers, (time.monotonic() + delay, self._timer_sequence, callback)
            )
        self._wake()

    def _run_timers(self) -> float | None:
        """Run the callbacks that are due; seconds until the next one (None: none)."""
        while True:
            with self._new_lock:
                if not self._timers:
                    return None
                when = self._timers[0][0]
                wait = when - time.monotonic()
                if wait > 0:
                    return wait
                callback = heapq.heappop(self._timers)[2]
            if self._stopping:
                continue
            try:
                callback()
            except Exception:
                traceback.print_exc()

    def _idle_work(self) -> None:
        try:
            self._on_idle()
        except Exception:
            # Like a message's handling: a bug here must not end a reading thread,
            # nor surface in the result() of whichever caller happened to lead.
            traceback.print_exc()

    # -- the I/O thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            if self._idle_pending():
                self._idle_work()
            with self._handoff:
                # While threads lead, and briefly after (in a submit/result loop the
                # next one comes at once, and finding us parked saves it the hand-off),
                # stay off the sockets. Timed waits: leaving threads need not notify us.
                if self._leaders_wanted or (
                    time.monotonic() - self._last_lead < _LEAD_GRACE_SECONDS
                ):
                    if not self._stopping:
                        self._handoff.wait(_LEAD_GRACE_SECONDS)
                    continue
            with self._token:
                with self._handoff:
                    if self._leaders_wanted:
                        continue
                    self._io_selecting = True
                try:
                    # Idle work queued meanwhile: look again soon (if another thread held
                    # the runtime's lock just now, it does the work as it lets go).
                    self._poll(_IDLE_RECHECK_SECONDS if self._idle_pending() else None)
                except Exception:
                    # A bug in handling one message must not end the only thread that
                    # reads the workers: every caller would then wait forever.
                    traceback.print_exc()
                finally:
                    with self._handoff:
                        self._io_selecting = False

    def _poll(self, timeout: float | None) -> None:
        """One select over every source, and the handling of what it reports (token held)."""
        if self._timers:
            due_in = self._run_timers()
            if due_in is not None and (timeout is None or due_in < timeout):
                timeout = due_in
        ready = self._selector.select(timeout)
        registered = self._selector.get_map()
        for key, mask in ready:
            if key.data is None:
                self._drain_wake()
                continue
            current = registered.get(key.fd)
            if current is None or current.fileobj is not key.fileobj:
                continue  # unregistered since this select (a nested poll, an exit)
            kind, worker, extra = key.data
            if kind == "conn":
                if mask & selectors.EVENT_WRITE:
                    self._write_conn(worker, key)
                if mask & selectors.EVENT_READ:
                    self._read_conn(worker)
            elif kind == "exit":
                self._exited(worker)
            else:
                self._read_output(key.fileobj, extra)

    def lead(
        self, done: Callable[[], bool], timeout: float | None, *, poll_first: bool = True
    ) -> None:
        """Read the workers from this thread until ``done()`` or the timeout; without
        ``poll_first``, sleep in select at once (no answer is expected within microseconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        if self._leader == me:  # a callback of ours waits on another Future
            self._read_until(done, deadline, poll_first)
            return
        with self._handoff_lock:
            self._leaders_wanted += 1
            io_selecting = self._io_selecting
        try:
            if io_selecting:
                self._wake()
            while not done() and not self._stopping:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                if not self._token.acquire(timeout=-1 if remaining is None else remaining):
                    return
                try:
                    self._leader = me
                    self._read_until(done, deadline, poll_first)
                finally:
                    self._leader = None
                    self._token.release()
        finally:
            with self._handoff_lock:
                self._leaders_wanted -= 1
                if not self._leaders_wanted:
                    self._last_lead = time.monotonic()

    def _read_until(
        self, done: Callable[[], bool], deadline: float | None, poll_first: bool
    ) -> None:
        # Poll without sleeping for a moment first: a short task's answer often comes
        # sooner than this thread could go to sleep and be woken again.
        poll_until = time.monotonic() + (_LEAD_POLL_SECONDS if poll_first else 0.0)
        while not done() and not self._stopping:
            now = time.monotonic()
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                return
            if self._idle_pending():
                self._idle_work()  # does nothing if another thread holds the runtime's lock
            self._poll(0 if now < poll_until else remaining)

    def _drain_wake(self) -> None:
        drain_pipe(self._wake_r)
        # Only now (cleared before the read, a byte written in between would be eaten
        # with the flag still set, and every later wake-up skipped); the queues are
        # read after this, so work queued by a writer that saw the flag set is seen.
        self._wake_sent = False
        with self._new_lock:
            new, self._new = self._new, []
            backlogged, self._backlogged = self._backlogged, []
        for worker in new:
            self.workers[worker.id] = worker
            self._selector.register(worker.conn.sock, selectors.EVENT_READ, ("conn", worker, None))
            prefix = f"(worker {worker.id}, pid {worker.pid}) " if self._output_prefix else None
            for pipe, target in (
                (worker.proc.stdout, lambda: sys.stdout),
                (worker.proc.stderr, lambda: sys.stderr),
            ):
                assert pipe is not None
                os.set_blocking(pipe.fileno(), False)
                forwarder = _OutputForwarder(prefix, target)
                if pipe is worker.proc.stderr:
                    worker.stderr = forwarder
                self._selector.register(pipe, selectors.EVENT_READ, ("out", worker, forwarder))
        registered = self._selector.get_map()
        for worker in new:
            if worker.conn.backlogged:  # filled before it was registered: watch for writing
                backlogged.append(worker.conn)
        for conn in backlogged:
            if conn.sock.fileno() < 0:
                continue  # closed since
            if conn.sock in registered:
                key = self._selector.get_key(conn.sock)
                self._selector.modify(
                    conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, key.data
                )
            else:  # its worker is not registered yet: look again at the next drain
                with self._new_lock:
                    self._backlogged.append(conn)

    def _write_conn(self, worker: WorkerHandle, key: selectors.SelectorKey) -> None:
        try:
            flushed = worker.conn.flush_backlog()
        except ConnectionClosed:
            flushed = True  # the read side sees the end and reports the worker gone
        if flushed:
            self._selector.modify(worker.conn.sock, selectors.EVENT_READ, key.data)

    def _read_conn(self, worker: WorkerHandle) -> None:
        try:
            messages = worker.conn.recv_available(block=False)
        except ConnectionClosed:
            self._worker_gone(worker)
            return
        if messages:
            self._on_messages(worker, messages)

    def _read_output(
        self, pipe: Any, forwarder: _OutputForwarder, *, until_empty: bool = False
    ) -> None:
        while True:
            try:
                data = os.read(pipe.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                forwarder.close()
                self._selector.unregister(pipe)
                pipe.close()
                return
            forwarder.feed(data)
            if not until_empty:
                return

    def _worker_gone(self, worker: WorkerHandle) -> None:
        """Its connection ended: the process is exiting. Report it once it has exited.

        Never waits here (this thread reads every worker): the exit is watched
        through a pidfd in the same select, and a process that lingers past
        ``_EXIT_GRACE_SECONDS`` is killed.
        """
        if worker.exited or worker.pidfd >= 0:
            return
        self._selector.unregister(worker.conn.sock)
        worker.conn.close()
        if worker.proc.poll() is None:
            try:
                worker.pidfd = os.pidfd_open(worker.pid)
            except OSError:  # no pidfd here (old kernel): wait, briefly
                try:
                    worker.proc.wait(timeout=_EXIT_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    worker.proc.kill()
            else:
                self._selector.register(worker.pidfd, selectors.EVENT_READ, ("exit", worker, None))
                self.call_later(_EXIT_GRACE_SECONDS, lambda: self._kill_lingering(worker))
                return
        self._exited(worker)

    def _kill_lingering(self, worker: WorkerHandle) -> None:
        if not worker.exited and worker.proc.poll() is None:
            worker.proc.kill()

    def _exited(self, worker: WorkerHandle) -> None:
        if worker.exited:
            return
        if worker.pidfd >= 0:
            self._selector.unregister(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = -1
        returncode = worker.proc.poll()
        self._drain_output(worker)
        worker.exited = True
        self._close_watch(worker)
        self._release_env(worker)
        self.workers.pop(worker.id, None)
        if not self._stopping:
            self._on_exit(worker, describe_exit(worker.pid, returncode))

    def _drain_output(self, worker: WorkerHandle) -> None:
        """Read what the worker wrote before it exited, so its last words come first."""
        for pipe in (worker.proc.stdout, worker.proc.stderr):
            if pipe is None or pipe.closed:
                continue
            key = self._selector.get_map().get(pipe)
            if key is not None:
                self._read_output(pipe, key.data[2], until_empty=True)

    def _release_env(self, worker: WorkerHandle) -> None:
        if worker.prepared is not None and self._packages is not None:
            prepared, worker.prepared = worker.prepared, None
            self._packages().release(prepared.env)

    @staticmethod
    def _close_watch(worker: WorkerHandle) -> None:
        if worker.watch_fd >= 0:
            worker.running.detach_bell()
            os.close(worker.watch_fd)
            worker.watch_fd = -1

    # -- shutdown --------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (politely, then by force) and the I/O thread."""
        self._stopping = True
        with self._handoff:
            self._handoff.notify_all()
        self._wake(stopping=True)
        self._thread.join(timeout)
        with self._token:  # a leading thread has noticed, and stopped reading
            pass
        with self._new_lock:
            workers = list({*self.workers.values(), *self._new})
            self._new = []
        for worker in workers:
            # Closing the watch pipe makes the worker exit even mid-task.
            self._close_watch(worker)
        for worker in workers:
            try:
                worker.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait(timeout=timeout)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                kind, worker, forwarder = key.data
                if kind == "exit":
                    os.close(worker.pidfd)
                    worker.pidfd = -1
                    continue
                if kind == "out":
                    try:
                        while data := os.read(key.fileobj.fileno(), 65536):  # type: ignore[union-attr]
                            forwarder.feed(data)
                    except OSError:
                        pass
                    forwarder.close()
                key.fileobj.close()  # type: ignore[union-attr]
        for worker in workers:
            worker.conn.close()
            self._release_env(worker)
        self._selector.close()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        self.workers.clear()
