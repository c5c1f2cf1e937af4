"""``sc.map`` batches tiny calls on a local runtime; every item keeps its Future, error, order."""

from __future__ import annotations

import time
from typing import Any

import pytest

import sharedcompute as sc

TIMEOUT = 60


def _inc(x: int) -> int:
    return x + 1


def _picky(x: int) -> int:
    if x % 250 == 7:
        raise KeyError(x)
    return x


def _nap(x: int) -> int:
    time.sleep(0.1)
    return x


def _add(a: int, b: int) -> int:
    return a + b


def _tasks_run(rt: sc.Runtime) -> list[dict[str, object]]:
    return [e for e in rt.timeline_trace()["traceEvents"] if e["ph"] == "X"]


def _count_submits(rt: sc.Runtime) -> list[str]:
    """The tasks the runtime is asked to run from here on (by function name)."""
    submitted: list[str] = []
    submit = rt.submit

    def counted(fn: Any, *rest: Any) -> Any:
        submitted.append(getattr(fn, "__name__", ""))
        return submit(fn, *rest)

    rt.submit = counted  # type: ignore[method-assign]
    return submitted


def test_tiny_calls_run_in_batches_and_keep_their_order() -> None:
    with sc.Runtime(num_workers=2) as rt:
        submitted = _count_submits(rt)
        futures = sc.map(_inc, range(2000))
        assert len(futures) == 2000 and len({f.key for f in futures}) == 2000
        assert sc.gather(futures, timeout=TIMEOUT) == [x + 1 for x in range(2000)]
        first = len(submitted)
        assert first < 100, first  # 2 probes, then batches: not a task an item
        # The timeline still shows a call per item (each with its own key), not batches.
        # (recorded before each item's Future is settled)
        records = _tasks_run(rt)
        assert len(records) == 2000 and {e["name"] for e in records} == {"_inc"}
        assert {e["args"]["key"] for e in records} == {f.key for f in futures}
        # Known fast now: a second map batches from the start.
        assert sc.gather(sc.map(_add, range(500), range(500)), timeout=TIMEOUT) == [
            2 * x for x in range(500)]
        assert len(submitted) - first < 50


def test_each_item_fails_on_its_own_with_its_type_and_traceback() -> None:
    with sc.Runtime(num_workers=2) as rt:
        futures = sc.map(_picky, range(1000))
        failed = [i for i, f in enumerate(futures) if f.exception(timeout=TIMEOUT) is not None]
        assert failed == [7, 257, 507, 757]
        # The dashboard's recent errors name each failed item, with its traceback.
        errors = rt.timeline.errors()
        assert {e.key for e in errors} == {futures[i].key for i in failed}
        assert all(e.name == "_picky" and e.type_name == "KeyError" and "_picky" in e.traceback
                   for e in errors)
        with pytest.raises(KeyError) as raised:
            futures[257].result(timeout=0)
        assert "_picky" in str(raised.value.__cause__)  # the remote traceback
        assert futures[258].result(timeout=0) == 258


def test_an_item_is_a_dependency_like_any_future() -> None:
    with sc.Runtime(num_workers=2):
        futures = sc.map(_inc, range(100))
        assert sc.submit(_add, futures[10], futures[20]).result(timeout=TIMEOUT) == 32


def test_items_leave_nothing_behind_in_the_scheduler() -> None:
    """A map's items cost the scheduler nothing unless passed to a task, and then are
    released like any Future once dropped."""
    import gc

    with sc.Runtime(num_workers=2) as rt:
        futures = sc.map(_inc, range(1000))
        passed = [sc.submit(_add, futures[i], 1) for i in range(0, 1000, 100)]
        assert sc.gather(passed, timeout=TIMEOUT) == [i + 2 for i in range(0, 1000, 100)]
        assert sc.gather(futures, timeout=TIMEOUT)[-1] == 1000
        del futures, passed
        gc.collect()

        def empty() -> bool:
            with rt._lock:
                return not rt.core._tasks and not rt._registered_local

        deadline = time.monotonic() + TIMEOUT
        while not empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert empty(), (rt.core.counts(), len(rt._registered_local))


def test_long_calls_still_run_one_a_task_on_every_worker() -> None:
    with sc.Runtime(num_workers=2) as rt:
        assert sc.gather(sc.map(_nap, range(12)), timeout=TIMEOUT) == list(range(12))
        ran = _tasks_run(rt)
        assert len(ran) == 12 and len({e["tid"] for e in ran}) == 2


def test_items_left_when_the_runtime_shuts_down_end_without_a_hang() -> None:
    rt = sc.Runtime(num_workers=1)
    with rt:
        futures = sc.map(_nap, range(40))
    done = [f for f in futures if f.done()]
    assert len(done) == 40  # each finished, failed or was cancelled: none hangs


def _first(a: object, i: int) -> float:
    return float(a[0]) + i  # type: ignore[index]


def test_a_large_argument_in_every_call_is_stored_once() -> None:
    import numpy as np

    big = np.ones(1 << 20)  # 8 MiB
    with sc.Runtime(num_workers=2) as rt:
        made = rt.store._table._next_id
        assert sc.gather(sc.map(_first, [big] * 50, range(50)), timeout=TIMEOUT) == [
            1.0 + i for i in range(50)]
        created = rt.store._table._next_id - made
        assert created < 5, created  # once, not 50 times (8 MiB each)
    with sc.Pool(2) as pool:
        made = pool._runtime.store._table._next_id
        assert pool.starmap(_first, [(big, i) for i in range(50)], chunksize=1) == [
            1.0 + i for i in range(50)]
        assert pool._runtime.store._table._next_id - made < 5
    with sc.Executor(2) as executor:
        store = executor.runtime.store
        for chunksize in (1, 10):
            made = store._table._next_id
            assert list(executor.map(_first, [big] * 50, range(50), chunksize=chunksize)) == [
                1.0 + i for i in range(50)]
            assert store._table._next_id - made < 8, (chunksize, store._table._next_id - made)
