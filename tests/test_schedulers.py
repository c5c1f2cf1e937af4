"""The three schedulers ("sync", "threads", "processes"), how each is chosen, and mixing them."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import sharedcompute as sc
from sharedcompute.errors import DependencyFailedError, RemoteTraceback

TIMEOUT = 60


@pytest.fixture(autouse=True)
def clean_config() -> Iterator[None]:
    sc.config.reset()
    yield
    sc.config.reset()


@pytest.fixture
def rt() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=2) as runtime:
        yield runtime


# -- task functions ------------------------------------------------------------------------


def where() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def identity(value: Any) -> Any:
    return value


def square(x: int) -> int:
    return x * x


def add(a: Any, b: Any) -> Any:
    return a + b


def raiser() -> None:
    raise ValueError("raised right here")


def fib(n: int) -> int:
    if n < 2:
        return n
    a = sc.submit(fib, n - 1)
    b = sc.submit(fib, n - 2)
    return a.result(timeout=TIMEOUT) + b.result(timeout=TIMEOUT)


def outer_waits_on_inner() -> str:
    inner = sc.submit(identity, "inner done")
    return "outer saw " + inner.result(timeout=TIMEOUT)



def run_with(scheduler: str | None) -> tuple[int, int]:
    task = sc.remote(where)
    if scheduler is not None:
        task = task.options(scheduler=scheduler)
    return task.submit().result(timeout=TIMEOUT)


def here() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


# -- where each scheduler runs ------------------------------------------------------------------


def test_sync_runs_in_the_calling_thread_at_submit(rt: sc.Runtime) -> None:
    future = sc.remote(where).options(scheduler="sync").submit()
    assert future.done()  # it already ran
    assert future.result(timeout=0) == here()


def test_sync_exception_keeps_the_original_traceback(rt: sc.Runtime) -> None:
    future = sc.remote(raiser).options(scheduler="sync").submit()
    with pytest.raises(ValueError, match="raised right here") as info:
        future.result(timeout=0)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert "raiser" in [frame.name for frame in frames]
    assert not isinstance(info.value.__cause__, RemoteTraceback)


def test_threads_run_in_another_thread_of_this_process(rt: sc.Runtime) -> None:
    pid, ident = run_with("threads")
    assert pid == os.getpid()
    assert ident != threading.get_ident()


def test_threads_pass_values_by_reference(rt: sc.Runtime) -> None:
    big = np.zeros(10_000_000)  # 80 MB: a copy would be noticed
    items = [object(), big]
    future = sc.remote(identity).options(scheduler="threads").submit(items)
    result = future.result(timeout=TIMEOUT)
    assert result is items
    assert result[1] is big
    assert sc.remote(identity).options(scheduler="sync").submit(big).result(timeout=0) is big


def test_processes_run_in_a_worker(rt: sc.Runtime) -> None:
    pid, _ = run_with("processes")
    assert pid != os.getpid() and pid in rt.worker_pids()
    pid, _ = run_with(None)  # the default
    assert pid != os.getpid()


def test_runtime_started_with_the_threads_scheduler() -> None:
    with sc.Runtime(num_workers=2, scheduler="threads") as runtime:
        assert runtime.worker_pids() == []
        pid, ident = sc.submit(where).result(timeout=TIMEOUT)
        assert pid == os.getpid() and ident != threading.get_ident()
        # A per-call choice still reaches worker processes, started on demand.
        pid, _ = run_with("processes")
        assert pid != os.getpid()


# -- choosing: global, block, per call ---------------------------------------------------------


def test_global_config(rt: sc.Runtime) -> None:
    sc.config.set(scheduler="threads")
    try:
        assert sc.config.get("scheduler") == "threads"
        pid, ident = sc.submit(where).result(timeout=TIMEOUT)
        assert pid == os.getpid() and ident != threading.get_ident()
    finally:
        sc.config.reset()
    assert sc.config.get("scheduler") is None
    pid, _ = sc.submit(where).result(timeout=TIMEOUT)
    assert pid != os.getpid()


def test_config_as_a_context_manager_restores_on_exit(rt: sc.Runtime) -> None:
    with sc.config.set(scheduler="sync"):
        assert sc.submit(where).result(timeout=TIMEOUT) == here()
        with sc.config.set(scheduler="threads"):
            pid, ident = sc.submit(where).result(timeout=TIMEOUT)
            assert pid == os.getpid() and ident != threading.get_ident()
        assert sc.submit(where).result(timeout=TIMEOUT) == here()
    assert sc.config.get("scheduler") is None
    pid, _ = sc.submit(where).result(timeout=TIMEOUT)
    assert pid != os.getpid()


def test_config_restores_after_an_exception(rt: sc.Runtime) -> None:
    with pytest.raises(KeyError), sc.config.set(scheduler="sync"):
        raise KeyError("inside")
    assert sc.config.get("scheduler") is None


def test_per_call_option_beats_the_global_setting(rt: sc.Runtime) -> None:
    with sc.config.set(scheduler="threads"):
        assert run_with("sync") == here()
        pid, _ = run_with("processes")
        assert pid != os.getpid()


def test_unknown_scheduler_is_refused(rt: sc.Runtime) -> None:
    with pytest.raises(ValueError):
        sc.config.set(scheduler="gpu")
    with pytest.raises(ValueError):
        sc.remote(where).options(scheduler="gpu")
    with pytest.raises(TypeError):
        sc.config.set(no_such_setting=1)


# -- mixing schedulers ---------------------------------------------------------------------------


def test_process_task_depends_on_a_thread_future(rt: sc.Runtime) -> None:
    threaded = sc.remote(identity).options(scheduler="threads").submit([1, 2, 3])
    in_process = sc.submit(add, threaded, [4])
    assert in_process.result(timeout=TIMEOUT) == [1, 2, 3, 4]


def test_thread_task_depends_on_a_process_future(rt: sc.Runtime) -> None:
    in_process = sc.submit(square, 7)
    threaded = sc.remote(add).options(scheduler="threads").submit(in_process, 1)
    assert threaded.result(timeout=TIMEOUT) == 50
    synced = sc.remote(add).options(scheduler="sync").submit(in_process, 2)
    assert synced.result(timeout=TIMEOUT) == 51


def test_large_value_from_threads_to_processes(rt: sc.Runtime) -> None:
    array = np.arange(2_000_000, dtype=np.float64)
    threaded = sc.remote(identity).options(scheduler="threads").submit(array)
    total = sc.submit(np.sum, threaded).result(timeout=TIMEOUT)
    assert total == array.sum()


def test_failed_thread_future_fails_process_dependents(rt: sc.Runtime) -> None:
    threaded = sc.remote(raiser).options(scheduler="threads").submit()
    dependent = sc.submit(identity, threaded)
    with pytest.raises(DependencyFailedError) as info:
        dependent.result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, ValueError)


def test_failed_process_future_fails_thread_dependents(rt: sc.Runtime) -> None:
    in_process = sc.submit(raiser)
    dependent = sc.remote(identity).options(scheduler="threads").submit(in_process)
    with pytest.raises(DependencyFailedError) as info:
        dependent.result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, ValueError)


def test_put_value_used_by_every_scheduler(rt: sc.Runtime) -> None:
    ref = sc.put(np.arange(1_000_000))
    expected = int(np.arange(1_000_000).sum())
    for scheduler in ("sync", "threads", "processes"):
        task = sc.remote(np.sum).options(scheduler=scheduler)
        assert int(task.submit(ref).result(timeout=TIMEOUT)) == expected, scheduler


# -- nested waits in the threads scheduler ---------------------------------------------------------


def test_nested_waits_with_a_pool_of_one_thread_do_not_deadlock() -> None:
    with sc.Runtime(num_workers=1, scheduler="threads"):
        assert sc.submit(outer_waits_on_inner).result(timeout=TIMEOUT) == "outer saw inner done"
        start = time.monotonic()
        assert sc.submit(fib, 10).result(timeout=TIMEOUT) == 55
        assert time.monotonic() - start < TIMEOUT


def test_threads_run_in_parallel_up_to_the_pool_size() -> None:
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    with sc.Runtime(num_workers=2, scheduler="threads"):
        futures = [sc.submit(barrier.wait) for _ in range(2)]
        assert sorted(sc.gather(futures, timeout=TIMEOUT)) == [0, 1]


def waits_with_wait(n: int) -> list[int]:
    futures = [sc.submit(square, i) for i in range(n)]
    done, _ = sc.wait(futures, timeout=5)
    return sorted(f.result() for f in done)


def waits_with_as_completed(n: int) -> list[int]:
    futures = [sc.submit(square, i) for i in range(n)]
    try:
        return sorted(f.result() for f in sc.as_completed(futures, timeout=5))
    except TimeoutError:
        return []


@pytest.mark.parametrize("waiter", [waits_with_wait, waits_with_as_completed])
def test_a_threads_task_waiting_with_wait_or_as_completed_lends_its_slot(waiter: Any) -> None:
    # On a pool of one thread, the children only run if the waiting task gives its slot back.
    with sc.Runtime(num_workers=1, scheduler="threads"):
        assert sc.submit(waiter, 3).result(timeout=TIMEOUT) == [0, 1, 4]


@pytest.mark.parametrize("fn", [raiser, where])
def test_a_finished_thread_future_as_a_dependency(rt: sc.Runtime, fn: Any) -> None:
    # Its done-callback runs at once when registered: never under the runtime's lock.
    threaded = sc.remote(fn).options(scheduler="threads").submit()
    sc.wait([threaded], timeout=TIMEOUT)
    dependent = sc.submit(identity, threaded)
    sc.wait([dependent], timeout=TIMEOUT)
    assert dependent.done()
