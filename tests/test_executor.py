"""``sharedcompute.Executor`` as a ProcessPoolExecutor drop-in: what CPython's own suite
(tests/test_cpython_futures_suite.py) leaves out because it reads private attributes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import wait_until

import sharedcompute as sc

TIMEOUT = 60


def quick(how: str = "") -> int:
    if how == "hold":
        time.sleep(0.5)
    return os.getpid()


def test_max_tasks_per_child_recycles_the_worker() -> None:
    with sc.Executor(1, max_tasks_per_child=2) as executor:
        pids = [executor.submit(os.getpid).result(timeout=TIMEOUT) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_max_tasks_per_child_is_validated() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        sc.Executor(1, max_tasks_per_child=0)


def test_a_fork_context_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="fresh interpreter"):
        sc.Executor(1, mp_context=multiprocessing.get_context("fork"))


def test_a_future_is_running_while_its_worker_runs_it() -> None:
    with sc.Executor(1) as executor:
        future = executor.submit(time.sleep, 0.5)
        wait_until(future.running, what="the Future to run")
        assert not future.cancel()  # running: too late, as with the stdlib
        assert future.result(timeout=TIMEOUT) is None
        assert not future.running() and future.done()


def test_shutdown_cancels_tasks_queued_on_a_worker_behind_the_running_one() -> None:
    executor = sc.Executor(1)
    try:
        for _ in range(5):  # the runtime learns that `quick` is short: it queues several
            executor.submit(quick).result(timeout=TIMEOUT)
        # While the first holds the worker, the rest reach its connection; it then reads
        # them all and starts `head`: the others wait in its own queue, not the socket.
        first = executor.submit(quick, "hold")
        head = executor.submit(quick, "hold")
        queued = [executor.submit(quick) for _ in range(8)]
        first.result(timeout=TIMEOUT)
        time.sleep(0.2)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    assert head.result(timeout=0) > 0
    assert all(f.cancelled() for f in queued), [f for f in queued if not f.cancelled()]


def failing_initializer() -> None:
    raise ValueError("no licence")


def test_a_failing_initializer_breaks_the_executor() -> None:
    with sc.Executor(2, initializer=failing_initializer) as executor:
        future = executor.submit(abs, -1)
        with pytest.raises(sc.errors.WorkerCrashedError, match="initializer failed") as caught:
            future.result(timeout=TIMEOUT)
        assert isinstance(caught.value.__cause__, ValueError)
        with pytest.raises(sc.errors.WorkerCrashedError):
            executor.submit(abs, -1)


def remember(value: Any) -> None:
    global REMEMBERED
    REMEMBERED = value


def remembered() -> Any:
    return REMEMBERED


def test_the_initializer_runs_in_replacement_workers_too() -> None:
    with sc.Executor(1, initializer=remember, initargs=("set up",), max_tasks_per_child=1) as ex:
        assert [ex.submit(remembered).result(timeout=TIMEOUT) for _ in range(3)] == ["set up"] * 3


def test_an_unpicklable_argument_fails_the_future_not_submit() -> None:
    import threading

    with sc.Executor(1) as executor:
        future = executor.submit(id, threading.Lock())
        with pytest.raises(sc.errors.SerializationError, match="lock"):
            future.result(timeout=TIMEOUT)


def test_map_in_chunks_keeps_order_and_validates_chunksize() -> None:
    with sc.Executor(2) as executor:
        assert list(executor.map(abs, range(-10, 0), chunksize=3)) == list(range(10, 0, -1))
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            executor.map(abs, [1], chunksize=0)


def payload_length(data: bytes) -> int:
    return len(data)


def test_a_large_initializer_argument_reaches_every_worker() -> None:
    # More than the socket takes at once: the rest waits in a backlog, which must be sent
    # even when it fills before the I/O thread has registered the new worker.
    for _ in range(4):
        with sc.Executor(2, initializer=remember, initargs=(b"x" * 2_000_000,)) as executor:
            assert executor.submit(remembered).result(timeout=TIMEOUT) == b"x" * 2_000_000


def test_an_initializer_that_cannot_be_sent_fails_at_once_leaving_nothing() -> None:
    fork_queue = multiprocessing.get_context("fork").Queue()
    with pytest.raises(RuntimeError, match="SemLock"):
        sc.Executor(1, initializer=remember, initargs=(fork_queue,))
    fork_queue.close()


def slow_square(data: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(data)


def test_tasks_queued_behind_large_ones_are_still_withdrawn() -> None:
    executor = sc.Executor(1)
    try:
        for _ in range(5):
            executor.submit(slow_square, b"", 0).result(timeout=TIMEOUT)
        head = executor.submit(slow_square, b"", 0.5)  # known short: the rest queue behind
        queued = [executor.submit(slow_square, b"y" * 60_000, 0.05) for _ in range(15)]
        time.sleep(0.1)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    assert head.result(timeout=0) == 0
    ran = [f for f in queued if not f.cancelled()]
    assert len(ran) <= 2, f"{len(ran)} of 15 queued tasks ran after their withdrawal"


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def hold(path: str, pause: float = 0.0) -> int:
    time.sleep(pause)
    while not os.path.exists(path):
        time.sleep(0.005)
    return os.getpid()


def test_brief_tasks_queue_behind_busy_workers_and_idle_ones_take_them_back(
    tmp_path: Path,
) -> None:
    # Pipelining: with every worker busy, a task whose function ran for under 100 ms is
    # sent at once, queued behind a worker's one running task; a worker left idle with
    # nothing ready takes it back. One lands behind a long `hold` and must run elsewhere.
    # (10 ms each at first: brief, not short; short tasks are prefetched deeper.)
    release = tmp_path / "release"
    release.touch()
    with sc.Executor(2) as executor:
        try:
            for _ in range(2):  # (the first call of each loads it, and may take longer)
                executor.submit(hold, str(release), 0.01).result(timeout=TIMEOUT)
                executor.submit(nap, 0.01).result(timeout=TIMEOUT)
            release.unlink()
            long_one = executor.submit(hold, str(release))
            wait_until(long_one.running, what="the long task to run")
            other = executor.submit(nap, 0.3)
            wait_until(other.running, what="the second task to run")
            queued = [executor.submit(nap, 0.01) for _ in range(2)]
            assert all(f.running() for f in queued), "sent to the busy workers at once"
            last = executor.submit(nap, 0.01)
            assert not last.running(), "one deep behind each worker, no more"
            pids = {f.result(timeout=TIMEOUT) for f in [*queued, last]}
            assert pids == {other.result(timeout=0)}  # none waited behind the long one
            assert not long_one.done()
        finally:
            release.touch()
        assert long_one.result(timeout=TIMEOUT) != other.result(timeout=0)


def test_a_task_not_known_to_be_brief_waits_for_an_idle_worker() -> None:
    with sc.Executor(1) as executor:
        head = executor.submit(nap, 0.5)  # never ran: not known to be brief
        wait_until(head.running, what="the first task to run")
        waiting = executor.submit(nap, 0)
        assert not waiting.running()
        assert waiting.cancel() is True  # still the driver's: cancelled at once
        assert head.result(timeout=TIMEOUT) > 0


def inc(x: int) -> int:
    return x + 1


def picky(x: int) -> int:
    if x == 1234:
        raise KeyError(x)
    return x


def test_map_batches_tiny_calls_yet_keeps_each_result_and_error() -> None:
    with sc.Executor(2) as executor:
        runtime = executor.runtime
        submitted: list[Any] = []
        submit = runtime.submit

        def counted(fn: Any, *rest: Any) -> Any:
            submitted.append(fn)
            return submit(fn, *rest)

        runtime.submit = counted  # type: ignore[method-assign]
        assert list(executor.map(inc, range(2000), timeout=TIMEOUT)) == list(range(1, 2001))
        assert len(submitted) < 100  # batches, not a task an item
        # Known fast now: batched from the first item (no calls sent alone first).
        assert list(executor.map(inc, range(2000), timeout=TIMEOUT)) == list(range(1, 2001))
        results = executor.map(picky, range(2000), timeout=TIMEOUT)
        assert [next(results) for _ in range(1234)] == list(range(1234))
        with pytest.raises(KeyError):  # as the stdlib's: the failing item raises, in order
            next(results)
        # An explicit chunksize is honoured as before.
        assert list(executor.map(inc, range(100), chunksize=7)) == list(range(1, 101))


def test_shutdown_right_after_a_batched_map_finishes_every_item() -> None:
    executor = sc.Executor(2)
    executor.map(inc, range(300))  # warm: the function's speed is known
    results = executor.map(slow_square, [b"ab"] * 40, [0.01] * 40)  # 0.4 s of work
    executor.shutdown(wait=True)
    assert list(results) == [2] * 40


def test_shutdown_with_cancel_futures_cancels_the_items_not_sent() -> None:
    executor = sc.Executor(1)
    assert list(executor.map(slow_square, [b"a"] * 3, [0.0] * 3)) == [1] * 3
    futures_seen: list[Any] = []
    batched = executor.runtime.batched_map

    def keep(*args: Any) -> Any:
        futures = batched(*args)
        futures_seen.extend(futures)
        return futures

    executor.runtime.batched_map = keep  # type: ignore[method-assign]
    executor.map(slow_square, [b"a"] * 200, [0.01] * 200)
    time.sleep(0.1)
    executor.shutdown(wait=True, cancel_futures=True)
    assert len(futures_seen) == 200 and all(f.done() for f in futures_seen)
    assert sum(f.cancelled() for f in futures_seen) > 100  # most never ran


def test_map_with_max_tasks_per_child_runs_a_task_an_item() -> None:
    with sc.Executor(1, max_tasks_per_child=2) as executor:
        pids = list(executor.map(getpid_of, range(6), timeout=TIMEOUT))
    assert len(set(pids)) == 3  # a worker per 2 tasks: each item was a task


def getpid_of(_: int) -> int:
    return os.getpid()
