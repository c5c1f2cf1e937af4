"""The public futures API, end to end: real worker processes, real shared memory.

Each test gets a fresh two-worker runtime (``rt``): the suite's leak guard runs
after every test, so a runtime shared between tests would count as leftover
child processes. Every blocking call has a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cloudpickle
import numpy as np
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute.errors import DependencyFailedError, SerializationError
from tools.bench.memory import anonymous_memory

TIMEOUT = 60
MB = 1_000_000

# Workers get this module's functions by value, so each fresh worker need not import
# the module (and pytest with it). test_failures.py and test_schedulers.py keep the
# default, by reference, which is how functions of an installed package travel.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def rt() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=2) as runtime:
        yield runtime


# -- task functions (module level: workers import this module to find them) ---------------


def square(x: int) -> int:
    return x * x


def add(a: Any, b: Any) -> Any:
    return a + b


def sleepy(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def block(marker: str, seconds: float = 60) -> None:
    """Say that the task started (a file), then hold the worker."""
    Path(marker).touch()
    time.sleep(seconds)


def rendezvous(directory: str, parties: int) -> int:
    """Check in, then wait until ``parties`` tasks have: one per worker, all started."""
    Path(directory, str(os.getpid())).touch()
    deadline = time.monotonic() + TIMEOUT
    while len(os.listdir(directory)) < parties and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def warm_up(tmp_path: Path, workers: int = 2) -> None:
    """Have every worker run a task (and so import this module) before timing anything."""
    directory = tmp_path / "rendezvous"
    directory.mkdir()
    pids = sc.gather([sc.submit(rendezvous, str(directory), workers) for _ in range(workers)],
                     timeout=TIMEOUT)
    assert len(set(pids)) == workers


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def echo(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    return args, kwargs


def fail_with(exc: BaseException) -> None:
    raise exc


def write_and_return(path: str, value: Any) -> Any:
    Path(path).write_text("ran")
    return value


def getpid(*_: Any) -> int:
    return os.getpid()


def describe_array(a: np.ndarray) -> tuple[bool, bool, float, int]:
    return bool(a.flags.writeable), bool(a.flags.owndata), float(a[::997].sum()), a.nbytes


def make_array(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def fib(n: int) -> int:
    if n < 2:
        return n
    a = sc.submit(fib, n - 1)
    b = sc.submit(fib, n - 2)
    return a.result(timeout=120) + b.result(timeout=120)


def shout(text: str) -> str:
    print(text, flush=True)
    print(text + "-err", file=sys.stderr, flush=True)
    return text


# -- submit and result ---------------------------------------------------------------------


def test_submit_and_result(rt: sc.Runtime) -> None:
    future = sc.submit(square, 7)
    assert isinstance(future, sc.Future)
    assert future.result(timeout=TIMEOUT) == 49
    assert future.done() and not future.cancelled()
    assert future.exception(timeout=TIMEOUT) is None


def test_result_timeout_raises_timeout_error(rt: sc.Runtime) -> None:
    future = sc.submit(sleepy, 10, "late")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.2)
    with pytest.raises(TimeoutError):
        future.exception(timeout=0.1)
    assert time.monotonic() - start < 5
    assert not future.done()


def test_task_runs_in_a_worker_process(rt: sc.Runtime) -> None:
    pid = sc.submit(getpid).result(timeout=TIMEOUT)
    assert pid != os.getpid()
    assert pid in rt.worker_pids()


def test_exception_comes_back_with_its_type(rt: sc.Runtime) -> None:
    future = sc.submit(fail_with, KeyError("missing"))
    with pytest.raises(KeyError, match="missing"):
        future.result(timeout=TIMEOUT)
    assert isinstance(future.exception(timeout=TIMEOUT), KeyError)


def test_map(rt: sc.Runtime) -> None:
    futures = sc.map(square, range(20))
    assert isinstance(futures, list) and all(isinstance(f, sc.Future) for f in futures)
    assert sc.gather(futures, timeout=TIMEOUT) == [x * x for x in range(20)]
    # Several iterables are zipped, as in the builtin map.
    assert sc.gather(sc.map(add, [1, 2, 3], [10, 20, 30]), timeout=TIMEOUT) == [11, 22, 33]


def test_put_and_get(rt: sc.Runtime) -> None:
    ref = sc.put({"a": [1, 2, 3]})
    assert isinstance(ref, sc.Future) and ref.done()
    assert sc.get(ref) == {"a": [1, 2, 3]}
    assert sc.submit(len, ref).result(timeout=TIMEOUT) == 1
    futures = [sc.submit(square, i) for i in range(5)]
    assert sc.get(futures, timeout=TIMEOUT) == [0, 1, 4, 9, 16]
    assert sc.get(tuple(futures), timeout=TIMEOUT) == [0, 1, 4, 9, 16]
    assert sc.get([ref, 5], timeout=TIMEOUT) == [{"a": [1, 2, 3]}, 5]


def test_get_timeout(rt: sc.Runtime) -> None:
    with pytest.raises(TimeoutError):
        sc.get([sc.submit(square, 2), sc.submit(sleepy, 10)], timeout=0.3)


def test_gather(rt: sc.Runtime) -> None:
    futures = [sc.submit(add, i, i) for i in range(10)]
    assert sc.gather(futures, timeout=TIMEOUT) == [2 * i for i in range(10)]
    assert sc.gather(iter(futures), timeout=TIMEOUT) == [2 * i for i in range(10)]


# -- wait and as_completed -----------------------------------------------------------------


def test_wait_all_completed(rt: sc.Runtime) -> None:
    futures = [sc.submit(sleepy, 0.05 * i, i) for i in range(4)]
    done, not_done = sc.wait(futures, timeout=TIMEOUT)
    assert done == set(futures) and not not_done
    done, not_done = sc.wait(futures, timeout=TIMEOUT, return_when=sc.ALL_COMPLETED)
    assert done == set(futures)


def test_wait_first_completed(rt: sc.Runtime) -> None:
    slow = sc.submit(sleepy, 30, "slow")
    fast = sc.submit(square, 3)
    done, not_done = sc.wait([slow, fast], timeout=TIMEOUT, return_when=sc.FIRST_COMPLETED)
    assert fast in done and slow in not_done


def test_wait_first_exception(rt: sc.Runtime) -> None:
    slow = sc.submit(sleepy, 30, "slow")
    bad = sc.submit(fail_with, ValueError("x"))
    done, not_done = sc.wait([slow, bad], timeout=TIMEOUT, return_when=sc.FIRST_EXCEPTION)
    assert bad in done and slow in not_done


def test_wait_mixes_futures_of_other_executors(rt: sc.Runtime) -> None:
    slow = sc.submit(sleepy, 30, "slow")
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        local = threads.submit(square, 4)
        done, not_done = sc.wait([slow, local], timeout=TIMEOUT, return_when=sc.FIRST_COMPLETED)
        assert done == {local} and not_done == {slow}
        fast = sc.submit(square, 5)
        done, _ = sc.wait([local, fast], timeout=TIMEOUT)
        assert done == {local, fast} and fast.result(timeout=TIMEOUT) == 25


@pytest.mark.parametrize("return_when", [sc.FIRST_COMPLETED, sc.ALL_COMPLETED])
def test_wait_on_many_futures(rt: sc.Runtime, return_when: str) -> None:
    futures = [sc.submit(square, i) for i in range(200)]
    done, not_done = sc.wait(futures, timeout=TIMEOUT, return_when=return_when)
    assert done and done | not_done == set(futures)
    if return_when == sc.ALL_COMPLETED:
        assert not not_done
    assert sc.get(futures, timeout=TIMEOUT) == [i * i for i in range(200)]


def test_wait_timeout(rt: sc.Runtime) -> None:
    slow = sc.submit(sleepy, 30, "slow")
    start = time.monotonic()
    done, not_done = sc.wait([slow], timeout=0.3)
    assert not done and not_done == {slow}
    assert time.monotonic() - start < 5


def test_as_completed_yields_in_completion_order(rt: sc.Runtime, tmp_path: Path) -> None:
    warm_up(tmp_path)
    slow = sc.submit(sleepy, 1, "slow")
    fast = sc.submit(sleepy, 0, "fast")
    order = [f.result(timeout=TIMEOUT) for f in sc.as_completed([slow, fast], timeout=TIMEOUT)]
    assert order == ["fast", "slow"]


def test_as_completed_timeout(rt: sc.Runtime, tmp_path: Path) -> None:
    warm_up(tmp_path)
    slow = sc.submit(sleepy, 60)
    fast = sc.submit(square, 2)
    seen = []
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        for future in sc.as_completed([slow, fast], timeout=1):
            seen.append(future)
    assert seen == [fast]
    assert time.monotonic() - start < 5


# -- Futures are concurrent.futures Futures, and awaitable ------------------------------------


def test_future_is_a_concurrent_future(rt: sc.Runtime) -> None:
    futures = [sc.submit(square, i) for i in range(6)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    done, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT)
    assert done == set(futures) and not not_done
    completed = list(concurrent.futures.as_completed(futures, timeout=TIMEOUT))
    assert sorted(f.result() for f in completed) == [i * i for i in range(6)]


def test_await_in_asyncio(rt: sc.Runtime) -> None:
    async def main() -> tuple[int, list[int]]:
        one = await sc.submit(square, 4)
        many = await asyncio.gather(*(sc.submit(square, i) for i in range(5)))
        return one, list(many)

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == (16, [0, 1, 4, 9, 16])


def test_await_a_large_value(rt: sc.Runtime) -> None:
    async def main() -> np.ndarray:
        return await sc.submit(make_array, MB)

    value = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert isinstance(value, np.ndarray) and value[-1] == MB - 1


def test_await_an_error(rt: sc.Runtime) -> None:
    async def main() -> None:
        await sc.submit(fail_with, ValueError("async boom"))

    with pytest.raises(ValueError, match="async boom"):
        asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_add_done_callback(rt: sc.Runtime) -> None:
    called = threading.Event()
    seen: list[Any] = []

    def callback(future: sc.Future[int]) -> None:
        seen.append(future.result())
        called.set()

    future = sc.submit(sleepy, 0.2, 5)
    future.add_done_callback(callback)
    assert called.wait(TIMEOUT)
    assert seen == [5]
    # On a future that is already done, the callback runs at once.
    called.clear()
    future.add_done_callback(callback)
    assert called.is_set() and seen == [5, 5]


def test_callback_may_submit(rt: sc.Runtime) -> None:
    chained: list[sc.Future[int]] = []
    ready = threading.Event()

    def callback(future: sc.Future[int]) -> None:
        chained.append(sc.submit(square, future.result()))
        ready.set()

    sc.submit(square, 3).add_done_callback(callback)
    assert ready.wait(TIMEOUT)
    assert chained[0].result(timeout=TIMEOUT) == 81


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_queued_and_running(rt: sc.Runtime, tmp_path: Path) -> None:
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    blockers = [sc.submit(block, str(m)) for m in markers]
    wait_until(lambda: all(m.exists() for m in markers), what="both workers busy")
    # A few more, since a worker may be sent a task before it needs it (prefetch).
    queued = [sc.submit(square, i) for i in range(6)]
    target = queued[-1]
    assert target.cancel() is True
    assert target.cancelled() and target.done()
    with pytest.raises(CancelledError):
        target.result(timeout=5)
    assert target.cancel() is True  # still cancelled
    # A running task cannot be cancelled.
    assert blockers[0].cancel() is False
    assert not blockers[0].cancelled() and not blockers[0].done()


def test_cancelled_dependency_fails_dependents(rt: sc.Runtime, tmp_path: Path) -> None:
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    [sc.submit(block, str(m)) for m in markers]
    wait_until(lambda: all(m.exists() for m in markers), what="both workers busy")
    queued = [sc.submit(square, i) for i in range(6)]
    dependent = sc.submit(square, queued[-1])
    assert queued[-1].cancel()
    with pytest.raises(DependencyFailedError) as info:
        dependent.result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, CancelledError)


def test_cancel_finished_returns_false(rt: sc.Runtime) -> None:
    future = sc.submit(square, 2)
    assert future.result(timeout=TIMEOUT) == 4
    assert future.cancel() is False


def test_cancelled_future_is_done_for_concurrent_futures_wait(
    rt: sc.Runtime, tmp_path: Path
) -> None:
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    [sc.submit(block, str(m)) for m in markers]
    wait_until(lambda: all(m.exists() for m in markers), what="both workers busy")
    queued = [sc.submit(square, i) for i in range(6)]
    target = queued[-1]
    assert target.cancel()
    # The stdlib helpers see a cancelled Future as done (CANCELLED_AND_NOTIFIED).
    done, not_done = concurrent.futures.wait([target], timeout=5)
    assert done == {target} and not not_done
    assert list(concurrent.futures.as_completed([target], timeout=5)) == [target]
    done, not_done = sc.wait([target], timeout=5)
    assert done == {target}
    assert list(sc.as_completed([target], timeout=5)) == [target]


# -- arguments ------------------------------------------------------------------------------


def test_every_keyword_goes_to_the_function(rt: sc.Runtime) -> None:
    kwargs = {
        "scheduler": 1, "num_cpus": 2, "timeout": 3, "resources": 4, "max_retries": 5,
        "retry_exceptions": 6, "name": 7, "fn": 8, "key": 9,
    }
    assert sc.submit(echo_kwargs, **kwargs).result(timeout=TIMEOUT) == kwargs
    remote_echo = sc.remote(echo_kwargs)
    assert remote_echo.submit(**kwargs).result(timeout=TIMEOUT) == kwargs
    assert remote_echo.remote(scheduler="sync").result(timeout=TIMEOUT) == {"scheduler": "sync"}


def test_futures_inside_containers_are_resolved(rt: sc.Runtime) -> None:
    a = sc.put(1)
    b = sc.submit(square, 2)
    c = sc.submit(square, 3)
    result = sc.submit(echo, [a, (b, c)], {"k": c, "nested": [a, {"deep": b}]}, kw=(c,))
    assert result.result(timeout=TIMEOUT) == (
        ([1, (4, 9)], {"k": 9, "nested": [1, {"deep": 4}]}),
        {"kw": (9,)},
    )


def test_future_beside_a_large_argument(rt: sc.Runtime) -> None:
    text = "x" * 200_000  # too large to travel inline: the arguments go to the store
    nine = sc.submit(square, 3)
    assert sc.submit(echo, text, nine).result(timeout=TIMEOUT) == ((text, 9), {})


def test_future_inside_another_object_is_refused_at_submit(rt: sc.Runtime) -> None:
    future = sc.submit(square, 2)
    with pytest.raises(SerializationError, match="Future"):
        sc.submit(echo, SimpleNamespace(inner=future))


def test_dependency_failure(rt: sc.Runtime, tmp_path: Path) -> None:
    marker = tmp_path / "dependent-ran"
    bad = sc.submit(fail_with, KeyError("root cause"))
    dependent = sc.submit(write_and_return, str(marker), bad)
    second = sc.submit(write_and_return, str(marker), [dependent])
    with pytest.raises(DependencyFailedError) as info:
        dependent.result(timeout=TIMEOUT)
    original = bad.exception(timeout=TIMEOUT)
    assert isinstance(original, KeyError)
    assert info.value.__cause__ is original
    with pytest.raises(DependencyFailedError) as second_info:
        second.result(timeout=TIMEOUT)
    chain = []
    error: BaseException | None = second_info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert original in chain
    assert not marker.exists(), "a task whose dependency failed must never run"


def test_submit_after_dependency_failed(rt: sc.Runtime, tmp_path: Path) -> None:
    marker = tmp_path / "dependent-ran"
    bad = sc.submit(fail_with, ValueError("early"))
    with pytest.raises(ValueError):
        bad.result(timeout=TIMEOUT)
    dependent = sc.submit(write_and_return, str(marker), bad)
    with pytest.raises(DependencyFailedError) as info:
        dependent.result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, ValueError)
    assert not marker.exists()


def step(x: int, fail_at: int, directory: str) -> int:
    """One link of a chain: short, leaves a trace, fails at ``fail_at``."""
    if x == fail_at:
        raise ValueError(f"step {x} fails")
    Path(directory, str(x)).touch()
    return x + 1


def test_chain_of_short_tasks(rt: sc.Runtime, tmp_path: Path) -> None:
    # Once step is known to be short, each link is queued on the worker running the link
    # before it, and takes that value there.
    assert sc.submit(step, 0, -1, str(tmp_path)).result(timeout=TIMEOUT) == 1
    futures = [sc.submit(step, 0, -1, str(tmp_path))]
    for _ in range(299):
        futures.append(sc.submit(step, futures[-1], -1, str(tmp_path)))
    assert sc.gather(futures, timeout=TIMEOUT) == list(range(1, 301))


def test_chain_failure_stops_the_chain(rt: sc.Runtime, tmp_path: Path) -> None:
    assert sc.submit(step, 0, -1, str(tmp_path)).result(timeout=TIMEOUT) == 1
    (tmp_path / "0").unlink()
    futures = [sc.submit(step, 0, 20, str(tmp_path))]
    for _ in range(39):
        futures.append(sc.submit(step, futures[-1], 20, str(tmp_path)))
    assert sc.gather(futures[:20], timeout=TIMEOUT) == list(range(1, 21))
    with pytest.raises(ValueError, match="step 20 fails"):
        futures[20].result(timeout=TIMEOUT)
    for future in futures[21:]:
        with pytest.raises(DependencyFailedError):
            future.result(timeout=TIMEOUT)
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(20)), (
        "links after the failed one must never run"
    )
    # The pool goes on as before.
    assert sc.submit(step, 5, -1, str(tmp_path)).result(timeout=TIMEOUT) == 6


# -- large values and the store ---------------------------------------------------------------


def test_large_result_is_a_read_only_view(rt: sc.Runtime) -> None:
    value = sc.submit(make_array, 2 * MB).result(timeout=TIMEOUT)
    assert value.shape == (2 * MB,) and value[-1] == 2 * MB - 1
    assert value.flags.writeable is False
    with pytest.raises(ValueError):
        value[0] = 1.0
    # The same Future gives the same object, not a second copy.
    future = sc.submit(make_array, MB)
    assert future.result(timeout=TIMEOUT) is future.result(timeout=TIMEOUT)


def test_large_argument_put_once_used_by_three_tasks(rt: sc.Runtime) -> None:
    array = np.arange(100 * MB // 8, dtype=np.float64)  # 100 MB
    expected = float(array[::997].sum())
    ref = sc.put(array)
    stats = rt.store.stats()
    assert stats["num_objects"] == 1 and stats["used_bytes"] >= array.nbytes
    results = sc.gather([sc.submit(describe_array, ref) for _ in range(3)], timeout=TIMEOUT)
    for writeable, owndata, total, nbytes in results:
        assert (writeable, owndata) == (False, False)  # a view of the stored array
        assert total == expected and nbytes == array.nbytes
    # The tasks read the one stored copy: nothing else of that size entered the store.
    stats = rt.store.stats()
    assert stats["num_objects"] == 1, stats
    assert stats["used_bytes"] < 2 * array.nbytes, stats


def test_large_argument_passed_directly(rt: sc.Runtime) -> None:
    array = np.arange(20 * MB // 8, dtype=np.float64)
    writeable, _, total, nbytes = sc.submit(describe_array, array).result(timeout=TIMEOUT)
    assert total == float(array[::997].sum()) and nbytes == array.nbytes
    assert not writeable


def allocate_and_free(nbytes: int) -> tuple[int, bool]:
    from sharedcompute._runtime import _context

    block = bytearray(nbytes)  # from the heap (large numpy arrays are made in the store)
    del block
    return os.getpid(), _context.current().heap.tuned  # type: ignore[union-attr]


def test_idle_worker_gives_back_its_freed_heap(rt: sc.Runtime) -> None:
    # Workers keep freed blocks for reuse while busy (fewer page faults), and return
    # them once idle: the 400 MB a task freed must not stay with its process.
    import platform


    results = sc.gather([sc.submit(allocate_and_free, 1) for _ in range(4)], timeout=TIMEOUT)
    assert all(tuned for _, tuned in results) or platform.libc_ver()[0] != "glibc"
    pids = rt.worker_pids()
    before = [anonymous_memory(pid) for pid in pids]
    ran = sc.gather([sc.submit(allocate_and_free, 400 * MB) for _ in range(4)], timeout=TIMEOUT)
    assert {pid for pid, _ in ran} <= set(pids)
    wait_until(
        lambda: all(
            anonymous_memory(pid) < rss + 50 * MB for pid, rss in zip(pids, before, strict=True)
        ),
        timeout=TIMEOUT,
    )


def page_faults_of_second_allocation(nbytes: int) -> tuple[int, int]:
    import resource

    from sharedcompute._runtime import _context

    first = np.ones(nbytes // 8)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = np.ones(nbytes // 8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults, _context.current().heap.reuse_below  # type: ignore[union-attr]


def test_busy_worker_reuses_a_freed_gigabyte_array(rt: sc.Runtime) -> None:
    # A 1 GiB array is just over 1 GiB with its header: the heap must still keep it for
    # reuse, or every such array pays ~260,000 page faults again.
    nbytes = 1 << 30
    faults, reuse_below = sc.submit(page_faults_of_second_allocation, nbytes).result(
        timeout=TIMEOUT
    )
    if reuse_below <= nbytes:
        pytest.skip(f"this C library keeps freed blocks below {reuse_below:,} bytes only")
    assert faults < 1000, f"{faults} page faults: the freed block was not reused"


def store_offset(array: np.ndarray, delay: float = 0.0) -> tuple[int, float]:
    """Where ``array``'s data sits in this process's mapping of the store, and its sum."""
    from sharedcompute._runtime import _context

    time.sleep(delay)
    store = _context.current().store  # type: ignore[union-attr]
    return array.__array_interface__["data"][0] - store.segment.address, float(array.sum())


def test_a_stored_value_passed_on_goes_by_reference(rt: sc.Runtime) -> None:
    array = sc.submit(make_array, 2_000_000).result(timeout=TIMEOUT)  # 16 MB: a store view
    here = array.__array_interface__["data"][0] - rt.store.segment.address
    total = float(array.sum())
    assert sc.submit(store_offset, array).result(timeout=TIMEOUT) == (here, total)
    assert sc.submit(store_offset, array=sc.put(array)).result(timeout=TIMEOUT) == (here, total)
    # The task holds the object: the driver may drop its view before the task runs.
    later = sc.submit(store_offset, array, 0.5)
    del array
    gc.collect()
    assert later.result(timeout=TIMEOUT) == (here, total)
    # A slice is a new value: it is copied, as it must be.
    piece = sc.submit(make_array, 2_000_000).result(timeout=TIMEOUT)[::2]
    assert sc.submit(store_offset, piece).result(timeout=TIMEOUT)[1] == float(piece.sum())


def test_store_objects_are_freed_when_futures_are_dropped(rt: sc.Runtime) -> None:
    ref = sc.put(np.ones(MB))
    futures = [sc.submit(np.add, ref, i) for i in range(3)]
    values = sc.gather(futures, timeout=TIMEOUT)
    dropped_early = sc.submit(make_array, MB)  # never read
    assert rt.store.stats()["num_objects"] >= 4
    del ref, futures, values, dropped_early
    gc.collect()
    wait_until(lambda: rt.store.stats()["num_objects"] == 0, 30, "the store to empty")
    # Blocks the workers leased ahead for their next results go once they are idle.
    wait_until(lambda: rt.store.stats()["used_bytes"] == 0, 30, "leased blocks to go back")


def wait_for_file(path: str) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_dropped_future_is_freed_while_another_thread_waits(
    rt: sc.Runtime, tmp_path: Path
) -> None:
    # A thread blocked on a long task reads the workers meanwhile; a Future dropped by
    # another thread must still reach the scheduler then, not when that task ends (the
    # task here ends only once the store is seen empty).
    marker = str(tmp_path / "go")
    slow = sc.submit(wait_for_file, marker)
    waiter = threading.Thread(target=slow.result, kwargs={"timeout": TIMEOUT})
    waiter.start()
    try:
        time.sleep(0.2)  # the waiter is leading, asleep in select
        ref = sc.put(np.ones(MB))
        assert rt.store.stats()["num_objects"] == 1
        del ref
        gc.collect()
        wait_until(lambda: rt.store.stats()["num_objects"] == 0, TIMEOUT, "the store to empty")
    finally:
        Path(marker).touch()
        waiter.join(TIMEOUT)
    assert slow.result(timeout=TIMEOUT) is True


def test_value_outlives_its_future(rt: sc.Runtime) -> None:
    value = sc.submit(make_array, MB).result(timeout=TIMEOUT)  # the Future is dropped here
    gc.collect()
    time.sleep(0.2)  # let the release reach the scheduler
    # The view keeps the stored object alive; it must stay readable.
    assert rt.store.stats()["num_objects"] == 1
    assert value[12345] == 12345.0
    del value
    gc.collect()
    wait_until(lambda: rt.store.stats()["num_objects"] == 0, 30, "the store to empty")


# -- nested tasks ---------------------------------------------------------------------------


def test_nested_tasks_recursive_fib(rt: sc.Runtime) -> None:
    # fib(20) is 21,891 tasks, each but the leaves waiting on two nested ones, on two workers.
    assert sc.submit(fib, 20).result(timeout=120) == 6765


def test_nested_tasks_small_fib(rt: sc.Runtime) -> None:
    assert sc.submit(fib, 10).result(timeout=TIMEOUT) == 55


def submit_from_a_thread(x: int) -> int:
    """Submit a nested task from another thread of this task, then wait for it."""
    box: list[sc.Future[int]] = []
    thread = threading.Thread(target=lambda: box.append(sc.submit(square, x)))
    thread.start()
    thread.join(TIMEOUT)
    return box[0].result(timeout=20)


def test_nested_task_submitted_from_a_thread_of_a_task() -> None:
    # One worker: the nested task can only run while the outer one waits for it.
    with sc.Runtime(num_workers=1):
        assert sc.submit(submit_from_a_thread, 7).result(timeout=TIMEOUT) == 49


def wait_from_threads(count: int) -> list[int]:
    """Submit and wait on nested tasks from a thread pool of this task (the main thread
    only waits for the pool, not on a Future)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda i: sc.submit(square, i).result(timeout=20), range(count)))


def test_nested_tasks_waited_on_from_threads_of_a_task() -> None:
    # One worker, busy with the outer task: its waiting threads run the nested tasks.
    # Many short waits: the task blocks and unblocks often, as two threads interleave
    # (an UNBLOCKED overtaking a BLOCKED once left a child never scheduled).
    with sc.Runtime(num_workers=1):
        result = sc.submit(wait_from_threads, 40).result(timeout=TIMEOUT)
        assert result == [i * i for i in range(40)]


def function_cache_size() -> int:
    from sharedcompute._runtime import _context

    runtime = _context.current()
    return len(runtime._functions) + len(runtime._received_functions)  # type: ignore[union-attr]


def test_distinct_functions_do_not_pile_up(rt: sc.Runtime) -> None:
    # A fresh functools.partial per task is a new function each time: the driver keeps a
    # function's bytes only while a task needs them, each worker at most WORKER_FUNCTIONS.
    from sharedcompute._runtime._pool import WORKER_FUNCTIONS

    count = 3 * WORKER_FUNCTIONS
    futures = [sc.submit(functools.partial(add, i), 1) for i in range(count)]
    assert sc.gather(futures, timeout=TIMEOUT) == [i + 1 for i in range(count)]
    del futures
    gc.collect()
    wait_until(lambda: not rt._fn_bytes, timeout=TIMEOUT)
    sizes = sc.gather([sc.submit(function_cache_size) for _ in range(8)], timeout=TIMEOUT)
    assert max(sizes) <= WORKER_FUNCTIONS
    # Functions a worker forgot are sent again when needed.
    assert sc.gather([sc.submit(functools.partial(add, i), 1) for i in range(50)],
                     timeout=TIMEOUT) == [i + 1 for i in range(50)]


# -- remote functions -----------------------------------------------------------------------


@sc.remote
def remote_add(a: int, b: int) -> int:
    return a + b


@sc.remote(num_cpus=1, max_retries=1)
def remote_pid() -> int:
    return os.getpid()


def test_remote_function(rt: sc.Runtime) -> None:
    assert isinstance(remote_add, sc.RemoteFunction)
    assert remote_add.submit(1, 2).result(timeout=TIMEOUT) == 3
    assert remote_add.remote(3, 4).result(timeout=TIMEOUT) == 7
    assert remote_add(5, 6) == 11  # a plain call runs here
    assert remote_add.__name__ == "remote_add"
    x = remote_add.submit(1, 1)
    assert remote_add.submit(x, x).result(timeout=TIMEOUT) == 4


def test_remote_with_options(rt: sc.Runtime) -> None:
    assert remote_pid() == os.getpid()
    assert remote_pid.submit().result(timeout=TIMEOUT) in rt.worker_pids()
    two = remote_pid.options(num_cpus=2, max_retries=0)
    assert isinstance(two, sc.RemoteFunction)
    assert two.submit().result(timeout=TIMEOUT) in rt.worker_pids()
    with pytest.raises(ValueError, match="CPU"):
        remote_pid.options(num_cpus=3).submit().result(timeout=TIMEOUT)
    with pytest.raises(TypeError):
        remote_pid.options(not_an_option=1)


# -- Executor -------------------------------------------------------------------------------


def test_executor_submit_map_context_manager() -> None:
    with sc.Executor(max_workers=2) as executor:
        assert isinstance(executor, concurrent.futures.Executor)
        assert executor.submit(square, 9).result(timeout=TIMEOUT) == 81
        assert executor.submit(echo_kwargs, timeout=1).result(timeout=TIMEOUT) == {"timeout": 1}
        assert list(executor.map(square, range(8), timeout=TIMEOUT)) == [i * i for i in range(8)]
        big = executor.submit(make_array, MB)
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)
    # As with concurrent.futures executors, results stay readable after shutdown.
    assert big.result(timeout=TIMEOUT)[-1] == MB - 1


def test_executor_shutdown_waits() -> None:
    executor = sc.Executor(max_workers=2)
    futures = [executor.submit(sleepy, 0.2, i) for i in range(4)]
    shutdown_within(executor, TIMEOUT, wait=True)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


def shutdown_within(executor: sc.Executor, timeout: float, **options: Any) -> None:
    """``executor.shutdown(**options)``, failing (not hanging) if it takes too long."""
    thread = threading.Thread(target=executor.shutdown, kwargs=options, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        executor.runtime.shutdown()  # stop its processes, so later tests are not blamed
        pytest.fail(f"Executor.shutdown({options}) did not return within {timeout} s")


def test_executor_shutdown_cancel_futures(tmp_path: Path) -> None:
    executor = sc.Executor(max_workers=2)
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    running = [executor.submit(block, str(m), 1.0) for m in markers]
    wait_until(lambda: all(m.exists() for m in markers), what="both workers busy")
    queued = [executor.submit(square, i) for i in range(10)]
    shutdown_within(executor, 20, wait=True, cancel_futures=True)
    assert all(f.done() for f in running + queued)
    assert all(not f.cancelled() for f in running)
    assert queued[-1].cancelled()
    for future in queued:
        assert future.cancelled() or future.result(timeout=0) is not None


# -- worker output ----------------------------------------------------------------------------


def test_worker_output_is_forwarded_with_a_prefix(
    rt: sc.Runtime, capfd: pytest.CaptureFixture[str]
) -> None:
    sc.submit(shout, "hello-from-task").result(timeout=TIMEOUT)
    out = err = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        captured = capfd.readouterr()
        out, err = out + captured.out, err + captured.err
        if "hello-from-task-err" in err and "hello-from-task" in out:
            break
        time.sleep(0.05)
    match = re.search(r"^\(worker (\d+), pid (\d+)\) hello-from-task$", out, re.MULTILINE)
    assert match, out
    assert int(match.group(2)) in rt.worker_pids()
    assert re.search(r"^\(worker \d+, pid \d+\) hello-from-task-err$", err, re.MULTILINE), err


# -- lifecycle ------------------------------------------------------------------------------


def test_init_twice_raises_and_shutdown_allows_init_again() -> None:
    assert not sc.is_initialized()
    runtime = sc.init(num_workers=1)
    try:
        assert sc.is_initialized()
        with pytest.raises(RuntimeError, match="already"):
            sc.init(num_workers=1)
        assert sc.submit(square, 3).result(timeout=TIMEOUT) == 9
    finally:
        sc.shutdown()
    assert not sc.is_initialized() and runtime.closed
    again = sc.init(num_workers=1)
    try:
        assert again is not runtime
        assert sc.submit(square, 4).result(timeout=TIMEOUT) == 16
    finally:
        sc.shutdown()
    sc.shutdown()  # a second shutdown is harmless


def test_auto_init_on_first_use() -> None:
    assert not sc.is_initialized()
    try:
        assert sc.submit(square, 5).result(timeout=TIMEOUT) == 25
        assert sc.is_initialized()
    finally:
        sc.shutdown()
    assert not sc.is_initialized()


def test_runtime_context_manager_sets_and_restores_the_default() -> None:
    assert not sc.is_initialized()
    with sc.Runtime(num_workers=1) as runtime:
        assert sc.submit(getpid).result(timeout=TIMEOUT) in runtime.worker_pids()
    assert runtime.closed
    assert not sc.is_initialized()


def test_import_is_cheap() -> None:
    code = (
        "import sys, sharedcompute\n"
        "sharedcompute.errors, sharedcompute.config\n"
        "heavy = ('numpy', 'pyarrow', 'cloudpickle', 'pandas')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
