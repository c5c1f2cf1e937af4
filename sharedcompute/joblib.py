"""joblib on sharedcompute: ``Parallel`` (and scikit-learn's ``n_jobs=``) runs on the runtime.

Use::

    import joblib
    import sharedcompute.joblib                    # registers the "sharedcompute" backend

    with joblib.parallel_config(backend="sharedcompute"):
        joblib.Parallel()(joblib.delayed(f)(X, i) for i in range(n))
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

It runs on the current runtime: the default one (started if there is none), the cluster that
``sc.init(address=...)`` connected to, or, inside a task, the worker's own.
``sharedcompute.joblib.register()`` registers the backend again (after
``joblib.register_parallel_backend`` replaced it, say).

Data flow of one ``Parallel`` call::

    Parallel ── BatchedCalls (joblib batches tiny calls) ──> SharedComputeBackend.submit
                   │ each large array / pandas object among the calls' arguments:
                   │   runtime.put once per object per call, a _Stored(index) in its place
                   ▼
      runtime.submit(_run_batch, _Batch, [stored Futures]) ──> worker: the Futures come in
                   │                                           as read-only store views; the
                   │                                           calls run under joblib's nested
                   ▼                                           backend and thread limits
      sc.Future ── done-callback ──> joblib's BatchCompletionCallBack
                                     (result or error kept, next batch dispatched)

State, per backend (joblib makes one per ``Parallel`` or per ``parallel_config`` block):

- ``_runtime``: the runtime chosen at ``configure``; every batch and put of the call goes there.
- ``_stored``: ``id(obj) -> (obj, Future)`` for the large arguments of the current call.
  Holding ``obj`` keeps its id from being reused while the entry exists; the entries go at
  ``stop_call``, so an object is stored once per call (joblib's auto-memmapping is the
  yardstick, ``max_nbytes`` its threshold) and freed once the call and its tasks are done.
- ``_pending``: batches submitted and not finished: cancelled by ``abort_everything``, and
  what a worker's pump waits on (below).

Invariants: joblib gets one Future per batch, with its done-callback added; a batch's result
is the list of its calls' results in order, read-only arrays at their surface copied (loky's
results are the caller's to change); an error is the call's own exception, with its remote
traceback as ``__cause__``. A batch is one pickle: the runtime looks for Futures in lists,
tuples and dicts, so the calls travel inside a :class:`_Batch` it does not walk, and the
stored objects' Futures in a list beside it.

In the worker a call gets what a loky worker would: a stored object as a read-only view (loky:
a read-only memmap), any other array argument as its own writeable copy, BLAS and OpenMP
pools limited to ``cpu_count // n_jobs`` threads (or ``inner_max_num_threads``) unless the
worker's environment sets ``OMP_NUM_THREADS`` and the like, and joblib's nested backend.

Nesting follows joblib's rules (``ParallelBackendBase.get_nested_backend``): a ``Parallel``
inside a batch runs on threads at the first level and sequentially below, as under loky. A
``Parallel`` that names this backend inside a task (a plain sharedcompute task, or a batch
that asks for it) submits to the same runtime. Nothing reads the worker's connection while
joblib polls, so a pump thread waits on the pending batches meanwhile: its wait lends the
task's CPU to the pool and runs the task's own children, so such trees finish on any number of
workers. (While such a task consumes a ``return_as="generator"`` with batches still pending,
its CPU stays lent: the task and another may share one CPU for that while.)

Supported joblib: 1.3 and later (``apply_async`` up to 1.4, ``submit`` from 1.5;
``return_as="generator_unordered"`` from 1.4); checked with 1.3.2, 1.4.2 and 1.6.0. From joblib
it uses what ``joblib.parallel`` exports for backends (the names its Dask backend and its own
backends use) and a batch's ``items``, as the Dask backend does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    import joblib
    from joblib.parallel import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
        parallel_config,
    )
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sharedcompute.joblib needs joblib: pip install 'sharedcompute[joblib]'"
    ) from error

from sharedcompute._runtime import _context
from sharedcompute._runtime._base import RuntimeBase, TaskOptions
from sharedcompute._runtime._future import Future
from sharedcompute._runtime._shared_args import large_nbytes

__all__ = ["BACKEND_NAME", "SharedComputeBackend", "register"]

BACKEND_NAME = "sharedcompute"
# joblib's own default for auto-memmapping (Parallel(max_nbytes="1M")).
_DEFAULT_MAX_NBYTES = 1024 * 1024
_PUMP_SLICE_SECONDS = 0.05  # how long a pump waits before it looks at new batches
# Arguments of these types are never stored: the check for large ones skips them at once.
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})

Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


# -- what runs in the worker -------------------------------------------------------------


class _Stored:
    """Stands in a call's arguments for the ``index``-th stored object of its batch."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Stored, (self.index,))


@dataclass(slots=True)
class _Batch:
    """One task's worth of calls and how to run them."""

    calls: list[Call]
    nested_backend: Any  # joblib's backend for Parallel calls inside these calls
    nested_n_jobs: int | None
    n_jobs: int  # of the Parallel call: the default thread limit is cpu_count // n_jobs
    inner_threads: int | None  # inner_max_num_threads, if given


def _run_batch(batch: _Batch, stored: list[Any]) -> list[Any]:
    """Run one batch in a worker; ``stored`` holds the values of its stored objects."""
    calls = [(fn, _own(args, stored), _own(kw, stored)) for fn, args, kw in batch.calls]
    with (
        _thread_limits(batch.n_jobs, batch.inner_threads),
        parallel_config(backend=batch.nested_backend, n_jobs=batch.nested_n_jobs),
    ):
        return [func(*args, **kwargs) for func, args, kwargs in calls]


def _own(values: Any, stored: list[Any]) -> Any:
    """Arguments with the stored objects in place and other read-only arrays copied."""
    if not values:
        return values
    if isinstance(values, dict):
        return {k: _own_one(v, stored) for k, v in values.items()}
    return tuple(_own_one(v, stored) for v in values)


def _own_one(value: Any, stored: list[Any]) -> Any:
    if type(value) is _Stored:
        return stored[value.index]
    return _writeable_leaf(value)


_THREAD_VARS = ParallelBackendBase.MAX_NUM_THREADS_VARS
_controller: tuple[int, Any] | None = None  # (len(sys.modules) then, ThreadpoolController)


def _thread_limits(
    n_jobs: int, inner_threads: int | None
) -> contextlib.AbstractContextManager[Any]:
    """loky's thread limits for a batch: threadpoolctl's, on the libraries loaded now."""
    global _controller
    if inner_threads is None:
        if any(var in os.environ for var in _THREAD_VARS):
            return contextlib.nullcontext()  # the worker's environment says: as loky does
        inner_threads = max((os.cpu_count() or 1) // max(n_jobs, 1), 1)
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # scikit-learn depends on it; plain joblib users may lack it
        return contextlib.nullcontext()
    # Looking for the loaded libraries costs 0.3 ms: again only once more modules are loaded.
    if _controller is None or _controller[0] != len(sys.modules):
        _controller = (len(sys.modules), ThreadpoolController())
    return _controller[1].limit(limits=inner_threads)


# -- the backend --------------------------------------------------------------------------


class SharedComputeBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` for the current sharedcompute runtime."""

    # n_jobs unset means the whole runtime, as for Dask's backend: Parallel() spreads.
    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_return_generator = True
    supports_timeout = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
            **backend_kwargs,
        )
        self._runtime: RuntimeBase | None = None
        self._n_jobs = 1
        self._nested: tuple[Any, int | None] = (None, None)
        self._max_nbytes: int | None = _DEFAULT_MAX_NBYTES
        self._lock = threading.Lock()  # _pending and _progress
        self._progress = threading.Condition(self._lock)  # a batch submitted or finished
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._store_lock = threading.Lock()  # _stored
        self._stored: dict[int, tuple[Any, Future[Any]]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Locks and Futures stay here: a copy elsewhere starts afresh, as Dask's backend does.
        return (SharedComputeBackend, (self.nesting_level, self.inner_max_num_threads))

    # -- what joblib asks -------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(_runtime_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None,
        require: str | None = None, max_nbytes: int | str | None = _DEFAULT_MAX_NBYTES,
        **backend_kwargs: Any,
    ) -> int:
        """Pick the runtime; ``n_jobs=1`` runs in this process, as with joblib's own."""
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._runtime = _context.runtime()
        self._max_nbytes = _as_nbytes(max_nbytes)
        self._nested = self.get_nested_backend()
        self._n_jobs = self.effective_n_jobs(n_jobs)
        return self._n_jobs

    def start_call(self) -> None:
        with self._store_lock:
            self._stored = {}

    def stop_call(self) -> None:
        with self._store_lock:
            self._stored = {}

    def terminate(self) -> None:
        self.stop_call()
        with self._lock:
            self._pending = set()
        self.reset_batch_stats()

    def submit(self, func: Any, callback: Callable[[Any], object] | None = None) -> Future[Any]:
        """Send one joblib batch (a ``BatchedCalls``: its ``items``) as one task."""
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("SharedComputeBackend.submit() before configure()")
        calls: list[Call] = func.items
        stored: list[Future[Any]] = []
        if self._max_nbytes is not None and _any_large(calls, self._max_nbytes):
            calls = self._with_stored(runtime, calls, stored, self._max_nbytes)
        batch = _Batch(calls, *self._nested, self._n_jobs, self.inner_max_num_threads)
        options = TaskOptions(name=f"joblib {_call_name(calls)}")
        future = runtime.submit(_run_batch, (batch, stored), {}, options)
        with self._lock:
            self._pending.add(future)
            self._progress.notify_all()
        future.add_done_callback(self._finished)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def apply_async(self, func: Any, callback: Callable[[Any], object] | None = None) -> Any:
        """joblib before 1.5 calls this; it returns what ``submit`` does."""
        future = self.submit(func, callback)
        future.get = future.result  # type: ignore[attr-defined]  # AsyncResult's name for it
        return future

    def retrieve_result_callback(self, out: Future[Any]) -> list[Any]:
        return [_writeable(value) for value in out.result()]

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not started; joblib discards what still comes back."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for future in pending:
            future.cancel()

    @contextlib.contextmanager
    def retrieval_context(self) -> Iterator[None]:
        """While joblib polls for results: keep them coming, and hold no task's CPU."""
        runtime = self._runtime
        if runtime is None:
            yield
        elif runtime.needs_pump:  # inside a worker: only a thread that waits reads messages
            with _Pump(runtime, self):
                yield
        else:
            with runtime.blocking():  # a "threads" task lends its slot meanwhile
                yield

    # -- for the pump ----------------------------------------------------------------

    def pending(self) -> list[concurrent.futures.Future[Any]]:
        """The batches submitted and not finished (a snapshot)."""
        with self._lock:
            return [f for f in self._pending if not f.done()]

    def wait_for_batches(self, timeout: float) -> None:
        """Wait up to ``timeout`` while no batch is pending."""
        with self._lock:
            if not self._pending:
                self._progress.wait(timeout)

    def wake(self) -> None:
        with self._lock:
            self._progress.notify_all()

    # -- inside ----------------------------------------------------------------------

    def _finished(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
            self._progress.notify_all()

    def _with_stored(
        self, runtime: RuntimeBase, calls: list[Call], stored: list[Future[Any]], limit: int
    ) -> list[Call]:
        """``calls`` with each large argument replaced by a :class:`_Stored` index into
        ``stored`` (filled here); its object is put in the store once per Parallel call."""
        slots: dict[int, _Stored] = {}

        def slot(value: Any) -> Any:
            if type(value) in _PLAIN or large_nbytes(value) < limit:
                return value
            placeholder = slots.get(id(value))
            if placeholder is None:
                placeholder = slots[id(value)] = _Stored(len(stored))
                stored.append(self._stored_future(runtime, value))
            return placeholder

        return [
            (fn, tuple(slot(v) for v in args), {k: slot(v) for k, v in kwargs.items()})
            for fn, args, kwargs in calls
        ]

    def _stored_future(self, runtime: RuntimeBase, value: Any) -> Future[Any]:
        with self._store_lock:  # one put per object, also when two threads dispatch at once
            held = self._stored.get(id(value))
            if held is None or held[0] is not value:
                held = (value, runtime.put(value))
                self._stored[id(value)] = held
            return held[1]


class _Pump:
    """A thread that waits on a worker's pending batches while joblib polls their status.

    Inside a task nothing reads the worker's connection unless a thread waits on a Future;
    joblib's retrieval loop only sleeps. The pump's wait settles the batches (their
    callbacks then dispatch the next ones), tells the driver the task is blocked so its CPU
    goes to other work, and runs the task's own children if they are queued here.
    """

    def __init__(self, runtime: RuntimeBase, backend: SharedComputeBackend) -> None:
        self._runtime = runtime
        self._backend = backend
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="joblib-pump", daemon=True)

    def __enter__(self) -> _Pump:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._backend.wake()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pending = self._backend.pending()
            if pending:
                self._runtime.wait_for(
                    pending,  # type: ignore[arg-type]  # the backend's: sharedcompute Futures
                    _PUMP_SLICE_SECONDS, concurrent.futures.FIRST_COMPLETED,
                )
            else:
                self._backend.wait_for_batches(_PUMP_SLICE_SECONDS)


# -- helpers ---------------------------------------------------------------------------


def _runtime_cpus() -> int:
    """The CPUs of the runtime work goes to (every node's, on a cluster)."""
    runtime = _context.runtime()
    if runtime.needs_pump:  # a worker does not know the pool's size: its host's CPUs
        return int(joblib.cpu_count())
    import sharedcompute as sc

    return int(sc.cluster_resources().get("CPU", 1)) or 1


def _as_nbytes(max_nbytes: int | str | None) -> int | None:
    if max_nbytes is None or isinstance(max_nbytes, int):
        return max_nbytes
    from joblib.disk import memstr_to_bytes

    return int(memstr_to_bytes(max_nbytes))


def _any_large(calls: list[Call], limit: int) -> bool:
    """Whether an argument of ``calls`` is an array or frame of ``limit`` bytes or more."""
    plain = _PLAIN
    for _, args, kwargs in calls:  # plain loops: this runs over every call of every batch
        for value in args:
            if type(value) not in plain and large_nbytes(value) >= limit:
                return True
        if kwargs:
            for value in kwargs.values():
                if type(value) not in plain and large_nbytes(value) >= limit:
                    return True
    return False


def _is_pandas(value: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series))


def _writeable(value: Any) -> Any:
    """A call's result with read-only numpy arrays and pandas objects at its surface copied.

    Results read from the store (or from a message) are read-only; loky's are the caller's to
    change. Lists, tuples and dicts are looked into, one level; other objects are kept as
    they are.
    """
    cls = type(value)
    if cls is list or cls is tuple:
        copied = [_writeable_leaf(item) for item in value]
        if all(new is old for new, old in zip(copied, value, strict=True)):
            return value
        return copied if cls is list else tuple(copied)
    if cls is dict:
        changed = {k: _writeable_leaf(v) for k, v in value.items()}
        return changed if any(changed[k] is not v for k, v in value.items()) else value
    return _writeable_leaf(value)


def _writeable_leaf(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return value if value.flags.writeable else value.copy()
    if _is_pandas(value):
        return value.copy(deep=True)  # copy-on-write hides which columns are read-only
    return value


def _call_name(calls: list[Call]) -> str:
    """``name xN``: the function of a batch's first call (through partials and wrappers)."""
    fn: Any = calls[0][0] if calls else None
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif callable(getattr(fn, "function", None)):  # scikit-learn's _FuncWrapper
            fn = fn.function
        else:
            break
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} x{len(calls)}"


def register() -> None:
    """Register joblib's backend named ``"sharedcompute"`` (done when this module is imported)."""
    joblib.register_parallel_backend(BACKEND_NAME, SharedComputeBackend)


register()
