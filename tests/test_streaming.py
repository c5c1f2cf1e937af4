"""Streaming generator tasks: a generator function's ``submit()`` returns a ``FutureStream``
whose Futures are ready as each item is yielded (Ray's generator tasks are the anchor)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sharedcompute as sc
from sharedcompute.errors import RemoteTraceback, WorkerCrashedError
from tests._helpers import TIMEOUT, wait_until


def squares(n: int) -> Any:
    for i in range(n):
        yield i * i


def first_then_slow(gate: str) -> Any:
    yield "first"
    # The second item waits for the test to say so: the first must be out by then.
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield "second"


def fails_after_two() -> Any:
    yield 1
    yield 2
    raise KeyError("the third")


def counted(log: str, n: int | None = None) -> Any:
    """Yields 0, 1, ... (forever with n None), writing how many it yielded to ``log``,
    and "closed" when the generator is closed."""
    i = 0
    try:
        while n is None or i < n:
            with open(log, "w") as file:
                file.write(str(i + 1))
            yield np.full(250_000, i)  # 2 MB: through the store
            i += 1
    finally:
        with open(log + ".end", "w") as file:
            file.write("closed" if n is None or i < n else "done")


def crashes_once(marker: str, n: int) -> Any:
    for i in range(n):
        if i == 3 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(7)
        yield i


def crashes(n: int) -> Any:
    for i in range(n):
        if i == 2:
            os._exit(9)
        yield i


def total(values: Any) -> int:
    return int(np.sum(values))


def read_count(log: str) -> int:
    try:
        return int(Path(log).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture
def runtime() -> Any:
    with sc.Runtime(num_workers=2) as rt:
        yield rt


def test_items_come_in_order_and_the_task_counts_them(runtime: sc.Runtime) -> None:
    stream = sc.submit(squares, 6)
    assert isinstance(stream, sc.FutureStream)
    futures = list(stream)
    assert all(isinstance(f, sc.Future) for f in futures)
    assert [f.result(timeout=TIMEOUT) for f in futures] == [0, 1, 4, 9, 16, 25]
    assert stream.task.result(timeout=TIMEOUT) == 6
    remote = sc.remote(squares)
    assert [f.result(timeout=TIMEOUT) for f in remote.submit(3)] == [0, 1, 4]


def test_an_item_is_ready_while_the_generator_still_runs(runtime: sc.Runtime,
                                                         tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    stream = sc.submit(first_then_slow, gate)
    first = stream.next(timeout=TIMEOUT)
    assert first.result(timeout=TIMEOUT) == "first"
    assert not stream.task.done()  # the generator waits on the gate
    with pytest.raises(TimeoutError):
        stream.next(timeout=0.2)
    Path(gate).touch()
    assert [f.result(timeout=TIMEOUT) for f in stream] == ["second"]


def test_an_exception_fails_the_future_after_the_last_good_item(runtime: sc.Runtime) -> None:
    futures = list(sc.submit(fails_after_two))
    assert len(futures) == 3
    assert [f.result(timeout=TIMEOUT) for f in futures[:2]] == [1, 2]
    with pytest.raises(KeyError, match="the third") as raised:
        futures[2].result(timeout=TIMEOUT)
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "fails_after_two" in str(cause)
    assert "after 2 item(s)" in str(cause)


def test_items_are_stored_values_and_dependencies(runtime: sc.Runtime, tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    futures = list(sc.submit(counted, log, 4))
    arrays = [f.result(timeout=TIMEOUT) for f in futures]
    assert [int(a[0]) for a in arrays] == [0, 1, 2, 3] and not arrays[0].flags.writeable
    # An item's Future is a dependency like any other: the value is not copied to pass it.
    assert sc.submit(total, futures[3]).result(timeout=TIMEOUT) == 3 * 250_000
    assert sc.get(sc.wait(futures, timeout=TIMEOUT).done.pop()) is not None


def test_async_for(runtime: sc.Runtime) -> None:
    async def collect() -> list[int]:
        return [await future async for future in sc.submit(squares, 5)]

    assert asyncio.run(asyncio.wait_for(collect(), TIMEOUT)) == [0, 1, 4, 9, 16]


def test_backpressure_pauses_the_generator(runtime: sc.Runtime, tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    stream = sc.remote(counted).options(generator_backpressure=2).submit(log, 10)
    wait_until(lambda: read_count(log) >= 2, what="two items yielded")
    time.sleep(0.3)  # (were it not paused, it would be far past 3 by now)
    assert read_count(log) <= 3  # 2 unconsumed sent, the third made and waiting to go
    values = []
    for future in stream:
        values.append(int(future.result(timeout=TIMEOUT)[0]))
        assert read_count(log) <= len(values) + 3
    assert values == list(range(10))
    assert stream.task.result(timeout=TIMEOUT) == 10


def test_dropping_the_stream_stops_the_generator_and_frees_its_items(
    runtime: sc.Runtime, tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    stream = sc.remote(counted).options(generator_backpressure=4).submit(log)  # endless
    taken = [stream.next(timeout=TIMEOUT) for _ in range(3)]
    assert [int(f.result(timeout=TIMEOUT)[0]) for f in taken] == [0, 1, 2]
    task = stream.task
    del stream, taken
    wait_until(lambda: Path(log + ".end").exists(), what="the generator closed")
    assert Path(log + ".end").read_text() == "closed"
    assert task.result(timeout=TIMEOUT) >= 3  # it ended: the items it sent
    store = runtime.store
    wait_until(lambda: store.stats()["used_bytes"] == 0, what="its items freed")


def test_close_before_it_starts_cancels_it(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with sc.Runtime(num_workers=1):
        blocker = sc.submit(time.sleep, 0.5)
        stream = sc.submit(counted, log)
        stream.close()
        assert blocker.result(timeout=TIMEOUT) is None
        try:  # cancelled while it waited, or stopped before its first item on the worker
            count = stream.task.result(timeout=TIMEOUT)
        except concurrent.futures.CancelledError:
            count = 0
        assert count == 0 and not Path(log).exists()  # it never ran
        assert list(stream) == []  # the stream ends at once


def test_a_crash_with_retries_left_reruns_without_repeating_items(
    runtime: sc.Runtime, tmp_path: Path
) -> None:
    marker = str(tmp_path / "crashed")
    stream = sc.remote(crashes_once).options(max_retries=1).submit(marker, 8)
    assert [f.result(timeout=TIMEOUT) for f in stream] == list(range(8))
    assert Path(marker).exists()  # it did crash once


def test_a_crash_without_retries_fails_the_next_future(runtime: sc.Runtime) -> None:
    futures = list(sc.remote(crashes).options(max_retries=0).submit(5))
    assert [f.result(timeout=TIMEOUT) for f in futures[:2]] == [0, 1]
    assert len(futures) == 3
    with pytest.raises(WorkerCrashedError, match="9"):
        futures[2].result(timeout=TIMEOUT)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_in_process_schedulers_stream_too(scheduler: str) -> None:
    with sc.Runtime(num_workers=2, scheduler=scheduler):
        assert [f.result(timeout=TIMEOUT) for f in sc.submit(squares, 4)] == [0, 1, 4, 9]
        futures = list(sc.submit(fails_after_two))
        assert [f.result(timeout=TIMEOUT) for f in futures[:2]] == [1, 2]
        with pytest.raises(KeyError):
            futures[2].result(timeout=TIMEOUT)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="generator_backpressure"):
        sc.remote(squares).options(generator_backpressure=-1)
    with pytest.raises(ValueError, match="num_returns"), sc.Runtime(num_workers=1):
        sc.remote(squares).options(num_returns=2).submit(3)


def consume_inside(n: int, backpressure: int) -> list[int]:
    """A task that streams another task's items (the head forwards each to it)."""
    stream = sc.remote(squares).options(generator_backpressure=backpressure).submit(n)
    return [future.result() for future in stream]


def take_three_then_drop(log: str) -> tuple[list[int], bool]:
    stream = sc.submit(counted, log)  # endless
    taken = [int(stream.next(timeout=TIMEOUT).result()[0]) for _ in range(3)]
    task = stream.task
    del stream
    return taken, task.result(timeout=TIMEOUT) >= 3


def test_a_task_streams_a_generator_it_submits(runtime: sc.Runtime, tmp_path: Path) -> None:
    assert sc.submit(consume_inside, 6, 0).result(timeout=TIMEOUT) == [0, 1, 4, 9, 16, 25]
    assert sc.submit(consume_inside, 6, 2).result(timeout=TIMEOUT) == [0, 1, 4, 9, 16, 25]
    log = str(tmp_path / "log")
    assert sc.submit(take_three_then_drop, log).result(timeout=TIMEOUT) == ([0, 1, 2], True)
    wait_until(lambda: Path(log + ".end").exists(), what="the inner generator closed")
    store = runtime.store
    wait_until(lambda: store.stats()["used_bytes"] == 0, what="its items freed")


@sc.remote
class Source:
    def __init__(self, base: int) -> None:
        self.base = base
        self.calls = 0

    def count(self, n: int) -> Any:
        self.calls += 1
        for i in range(n):
            yield self.base + i
        if n < 0:
            raise ValueError("n < 0")

    def broken(self) -> Any:
        yield self.base
        raise ValueError("the actor's generator broke")

    def how_many_calls(self) -> int:
        return self.calls


def read_actor_stream(actor: Any, n: int) -> list[int]:
    return [f.result() for f in actor.count.options(generator_backpressure=1).remote(n)]


def test_an_actor_generator_method_streams(runtime: sc.Runtime) -> None:
    actor = Source.remote(100)
    stream = actor.count.remote(4)
    assert isinstance(stream, sc.FutureStream)
    assert [f.result(timeout=TIMEOUT) for f in stream] == [100, 101, 102, 103]
    assert [f.result(timeout=TIMEOUT)
            for f in actor.count.options(generator_backpressure=1).remote(3)] == [100, 101, 102]
    futures = list(actor.broken.remote())
    assert futures[0].result(timeout=TIMEOUT) == 100
    with pytest.raises(ValueError, match="broke"):
        futures[1].result(timeout=TIMEOUT)
    # Calls still run in order, the actor's state kept; a task reads the actor's stream too.
    assert sc.submit(read_actor_stream, actor, 3).result(timeout=TIMEOUT) == [100, 101, 102]
    assert actor.how_many_calls.remote().result(timeout=TIMEOUT) == 3
    with pytest.raises(ValueError, match="num_returns"):
        actor.count.options(num_returns=2).remote(2)
