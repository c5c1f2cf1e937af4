"""``sharedcompute.Pool`` against ``multiprocessing.Pool``: the same results and exception
types on the same inputs, and the same behaviour once closed or terminated."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import sharedcompute as sc

TIMEOUT = 60


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"three: {x}")
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def total(a: np.ndarray) -> float:
    return float(a.sum())


_STATE: dict[str, Any] = {}


def remember(value: str) -> None:
    _STATE["init"] = value


def recall(_: int) -> str:
    return str(_STATE.get("init"))


@pytest.fixture(params=["sharedcompute", "multiprocessing"])
def make_pool(request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        if request.param == "sharedcompute":
            pool = sc.Pool(**kwargs)
        else:
            pool = multiprocessing.get_context("fork").Pool(**kwargs)  # no resource tracker
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.terminate()
        pool.join()


def test_map_starmap_imap_and_apply_give_the_same_results(make_pool: Any) -> None:
    with make_pool(processes=2) as pool:
        assert pool.map(square, range(10)) == [i * i for i in range(10)]
        assert pool.map(square, range(10), chunksize=3) == [i * i for i in range(10)]
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert list(pool.imap(square, range(6))) == [i * i for i in range(6)]
        assert list(pool.imap(square, range(6), chunksize=4)) == [i * i for i in range(6)]
        assert sorted(pool.imap_unordered(square, range(6))) == [i * i for i in range(6)]
        assert pool.apply(add, (2, 3)) == 5
        assert pool.apply(add, (), {"a": 1, "b": 1}) == 2


def test_async_results_callbacks_errors_and_timeouts(make_pool: Any) -> None:
    with make_pool(processes=2) as pool:
        seen: list[Any] = []
        result = pool.map_async(square, range(4), callback=seen.append)
        assert result.get(TIMEOUT) == [0, 1, 4, 9]
        result.wait(TIMEOUT)
        assert result.ready() and result.successful()
        deadline = time.monotonic() + TIMEOUT
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [[0, 1, 4, 9]]
        errors: list[BaseException] = []
        failing = pool.map_async(fail_on_three, range(5), error_callback=errors.append)
        with pytest.raises(KeyError, match="three: 3"):
            failing.get(TIMEOUT)
        assert not failing.successful()
        with pytest.raises(KeyError):
            pool.apply(fail_on_three, (3,))
        slow = pool.apply_async(nap, (2.0,))
        with pytest.raises(ValueError):
            slow.successful()  # not ready yet
        with pytest.raises(multiprocessing.TimeoutError):
            slow.get(timeout=0.05)
        assert slow.get(TIMEOUT) == 2.0


def test_initializer_runs_in_every_worker(make_pool: Any) -> None:
    with make_pool(processes=2, initializer=remember, initargs=("ready",)) as pool:
        assert set(pool.map(recall, range(6))) == {"ready"}


def test_close_join_and_terminate_behave_as_the_stdlibs(make_pool: Any) -> None:
    pool = make_pool(processes=2)
    pending = pool.map_async(nap, [0.2, 0.2])
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply(square, (2,))
    pool.join()  # waits for what was submitted
    assert pending.get(TIMEOUT) == [0.2, 0.2]
    other = make_pool(processes=1)
    other.terminate()
    with pytest.raises(ValueError, match="Pool not running"):
        other.map(square, [1])


def test_a_large_array_goes_through_the_store() -> None:
    data = np.arange(4_000_000, dtype=np.float64)  # 32 MB
    with sc.Pool(processes=2) as pool:
        assert pool.map(total, [data] * 4) == [float(data.sum())] * 4


def test_map_chunks_tiny_calls_as_multiprocessing_does() -> None:
    with sc.Pool(2) as pool:
        assert pool.map(square, range(2000)) == [x * x for x in range(2000)]
        ran = [e for e in pool._runtime.timeline_trace()["traceEvents"] if e["ph"] == "X"]
        assert len(ran) == 8  # 2000 items, 4 chunks a worker (multiprocessing's default)
        assert pool.starmap(pow, [(2, i) for i in range(10)], chunksize=3) == [
            2 ** i for i in range(10)]
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            pool.map(square, range(3), chunksize=0)
