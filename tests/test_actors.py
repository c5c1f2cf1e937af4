"""Actors end to end: real actor processes, real signals, real shared memory.

What is covered, in the order of this file:

- calls: state, submission order (1,000 pipelined calls), ``.submit`` alias, misuse errors;
- Future arguments: dependencies resolved to values (nested too), order kept behind a slow
  dependency, a failed dependency, constructor arguments;
- large values: a 100 MB argument (direct and ``put`` once), an actor result feeding a task,
  both read in place from the store (checked against ``/proc/self/maps``, not by timing);
- handles passed to a task and to another actor, which call the actor;
- concurrency: coroutine methods overlap (start/end times recorded by the actor), their limit,
  threaded actors (``max_concurrency=4``, distinct threads met at a barrier);
- ``ActorPool``: map, map_unordered, submit / get_next / get_next_unordered;
- names: ``get_actor``, duplicate names, ``kill`` with and without restart;
- lifetime: an unnamed actor ends when its last handle goes, a named one does not;
- errors: a method's exception, a constructor's exception;
- the crash table: how an actor dies (SIGKILL from outside or inside, a real segfault,
  ``os._exit(3)``, dying while loading an argument or storing a result) or fails without dying
  (raise, argument that fails to load, result that fails to pickle), against the options that
  decide what happens next (``max_restarts``, ``max_task_retries``), as in loky's crash_cases;
- the actor benchmark's ``--quick --json`` run.

Tests that pin a known bug are ``xfail(strict=True)``: they start passing (and so failing
as XPASS) when the bug is fixed, which is the signal to drop the mark.

Every blocking wait has a timeout; the suite's fixture checks that no process, runtime thread
or /dev/shm entry outlives a test. Each test makes its own two-worker runtime.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute.errors import (
    ActorDiedError,
    DependencyFailedError,
    RemoteTraceback,
    SerializationError,
)

TIMEOUT = 30
NUM_WORKERS = 2
REPO_ROOT = Path(__file__).resolve().parents[1]

# Actors and tasks travel by value: an actor process then need not import this module (and
# pytest with it) before its first call.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@contextmanager
def runtime() -> Iterator[sc.Runtime]:
    """A two-worker runtime that outlives every actor handle made in it.

    A handle caught in a reference cycle (an exception's traceback holds the frame that held
    it) is finalized whenever the collector runs; collecting before the runtime closes makes
    it end its actor here, in the test that made it.
    """
    with sc.Runtime(num_workers=NUM_WORKERS) as made:
        try:
            yield made
        finally:
            gc.collect()


@pytest.fixture
def rt() -> Iterator[sc.Runtime]:
    with runtime() as made:
        yield made


# -- helpers -----------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_path(path: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def shared_location(array: np.ndarray) -> tuple[str, int, int] | None:
    """Where ``array``'s bytes live: (device, inode, offset in that file) of a *shared* file
    mapping, or None for private memory (a heap copy, an anonymous mapping).

    Two processes that see the same triple read the same bytes of the same file: no copy.
    """
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            if start <= address < end:
                if fields[1][3] != "s" or fields[4] == "0":
                    return None
                return fields[3], int(fields[4]), int(fields[2], 16) + address - start
    return None


def outcome(future: sc.Future[Any], timeout: float = TIMEOUT) -> Any:
    """The call's value, or the exception it raised.

    For tests pinning a known bug: they drop their handles before they fail, so the failure's
    traceback (which pytest keeps) holds no handle to be finalized after the runtime closed.
    """
    try:
        return future.result(timeout=timeout)
    except Exception as exc:
        return exc


def collect(iterator: Iterator[Any], timeout: float = TIMEOUT) -> list[Any]:
    """``list(iterator)`` with a deadline (ActorPool.map has no timeout of its own)."""
    box: list[Any] = []

    def drain() -> None:
        try:
            box.append(list(iterator))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=drain, name="test-collect", daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the iterator gave no end within {timeout} s"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


# -- actors and tasks --------------------------------------------------------------------------


@sc.remote
class Counter:
    def __init__(self, start: int = 0, extra: Any = None) -> None:
        self.n = start
        self.extra = extra
        self.log: list[Any] = []

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def value(self) -> int:
        return self.n

    def get_extra(self) -> Any:
        return self.extra

    def record(self, value: Any) -> Any:
        self.log.append(value)
        return value

    def get_log(self) -> list[Any]:
        return list(self.log)

    def pid(self) -> int:
        return os.getpid()

    def fail(self, message: str) -> None:
        raise KeyError(message)

    def total(self, numbers: list[int], named: dict[str, int]) -> int:
        return sum(numbers) + sum(named.values())

    def inspect(self, array: np.ndarray) -> dict[str, Any]:
        return {
            "shape": array.shape,
            "writeable": array.flags.writeable,
            "location": shared_location(array),
            "corners": (float(array[0]), float(array[-1])),
        }

    def make_array(self, count: int) -> np.ndarray:
        return np.arange(count, dtype=np.float64)

    def wait_for(self, path: str) -> str:
        wait_for_path(Path(path))
        return "opened"


@sc.remote
class Caller:
    """An actor that calls other actors, through a handle it keeps or one it is given."""

    def __init__(self, other: Any = None) -> None:
        self.other = other

    def call_kept(self, k: int) -> int:
        return self.other.incr.remote(k).result(timeout=TIMEOUT)

    def call_given(self, handle: Any, k: int) -> int:
        return handle.incr.remote(k).result(timeout=TIMEOUT)


@sc.remote
class Sleeper:
    """Coroutine methods: they run on the actor's event loop, interleaved."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.arrived = 0
        self.rounds: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

    async def nap(self, seconds: float) -> tuple[float, float]:
        started = time.monotonic()
        await asyncio.sleep(seconds)
        return started, time.monotonic()

    async def rendezvous(self, group: int) -> int:
        """Return once ``group`` calls of this round are in: they must run concurrently."""
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.arrived += 1
        this_round = (self.arrived - 1) // group
        if self.arrived % group == 0:
            self.rounds[this_round].set()
        try:
            await asyncio.wait_for(self.rounds[this_round].wait(), TIMEOUT)
        finally:
            self.active -= 1
        return this_round

    async def get_peak(self) -> int:
        return self.peak

    async def double_in_task(self, x: int) -> int:
        return await sc.submit(double, x)

    def thread_name(self) -> str:
        return threading.current_thread().name


@sc.remote(max_concurrency=4)
class Threaded:
    def __init__(self) -> None:
        self.barrier = threading.Barrier(4, timeout=TIMEOUT)

    def meet(self) -> str:
        self.barrier.wait()  # four calls at once, or BrokenBarrierError
        return threading.current_thread().name


@sc.remote
class Square:
    def compute(self, value: int) -> tuple[int, int]:
        return value * value, os.getpid()

    def wait_for(self, path: str) -> str:
        wait_for_path(Path(path))
        return "opened"

    def fail_on(self, value: int, bad: int) -> int:
        if value == bad:
            raise ValueError(f"bad value {value}")
        return value


@sc.remote
class BrokenConstructor:
    def __init__(self) -> None:
        raise ValueError("the constructor refuses")

    def method(self) -> int:
        return 1


def double(x: int) -> int:
    return 2 * x


def slow_value(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def getpid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def raise_key_error() -> None:
    raise KeyError("the dependency failed")


def call_through_handle(handle: Any, k: int) -> int:
    return handle.incr.remote(k).result(timeout=TIMEOUT)


def pipeline_through_handle(handle: Any, values: list[int]) -> list[int]:
    return sc.get([handle.record.remote(v) for v in values], timeout=TIMEOUT)


def inspect_in_task(array: np.ndarray) -> dict[str, Any]:
    return {
        "writeable": array.flags.writeable,
        "location": shared_location(array),
        "sum": float(array.sum()),
    }


# -- calls -------------------------------------------------------------------------------------


def test_calls_keep_state(rt: sc.Runtime) -> None:
    counter = Counter.remote(10)
    assert isinstance(counter, sc.ActorHandle)
    assert counter.incr.remote(1).result(timeout=TIMEOUT) == 11
    assert counter.incr.submit(k=4).result(timeout=TIMEOUT) == 15  # .submit is .remote
    assert counter.value.remote().result(timeout=TIMEOUT) == 15
    actor_pid = counter.pid.remote().result(timeout=TIMEOUT)
    task_pids = set(sc.get(sc.map(getpid_after, [0.05] * 8), timeout=TIMEOUT))
    assert actor_pid != os.getpid()
    assert actor_pid not in task_pids  # a process of its own: tasks never run there


def test_pipelined_calls_run_in_submission_order(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    futures = [counter.record.remote(i) for i in range(1000)]
    assert sc.get(futures, timeout=TIMEOUT) == list(range(1000))
    assert counter.get_log.remote().result(timeout=TIMEOUT) == list(range(1000))


def test_calls_to_a_busy_actor_never_block_the_caller(rt: sc.Runtime, tmp_path: Path) -> None:
    # The actor's process does not read while a call runs: calls sent meanwhile (6 MB of
    # inline arguments, far beyond a socket's buffer) must wait in the driver, not block it.
    gate = tmp_path / "gate"
    counter = Counter.remote()
    busy = counter.wait_for.remote(str(gate))
    payload = b"x" * 60_000
    calls = [counter.record.remote(payload) for _ in range(100)]
    assert sc.submit(len, payload).result(timeout=TIMEOUT) == 60_000  # the driver is alive
    gate.touch()
    assert busy.result(timeout=TIMEOUT) == "opened"
    assert [len(value) for value in sc.get(calls, timeout=TIMEOUT)] == [60_000] * 100


def test_calls_from_a_task_run_in_its_order(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    values = list(range(200))
    assert sc.submit(pipeline_through_handle, counter, values).result(timeout=TIMEOUT) == values
    assert counter.get_log.remote().result(timeout=TIMEOUT) == values


def test_misuse_is_explained(rt: sc.Runtime) -> None:
    with pytest.raises(TypeError, match=r"Counter.remote\(\.\.\.\)"):
        Counter(0)
    with pytest.raises(TypeError, match="unknown actor option"):
        Counter.options(max_restart=1)
    with pytest.raises(ValueError, match="max_concurrency"):
        Counter.options(max_concurrency=0)
    counter = Counter.remote()
    with pytest.raises(TypeError, match=r"\.incr\.remote"):
        counter.incr(1)
    with pytest.raises(AttributeError, match="no method 'decr'"):
        counter.decr.remote(1)
    with pytest.raises(SerializationError):
        counter.record.remote(threading.Lock())  # cannot be pickled: fails at the call
    assert counter.value.remote().result(timeout=TIMEOUT) == 0


# -- Future arguments --------------------------------------------------------------------------


def test_future_arguments_are_resolved_and_keep_the_order(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    slow = sc.submit(slow_value, 0.3, "first")
    first = counter.record.remote(slow)  # waits for its dependency ...
    second = counter.record.remote("second")  # ... and this one waits behind it
    assert sc.get([first, second], timeout=TIMEOUT) == ["first", "second"]
    nested = counter.total.remote(
        [sc.submit(slow_value, 0.1, 1), 2], named={"k": sc.submit(double, 5), "j": sc.put(4)}
    )
    assert nested.result(timeout=TIMEOUT) == 1 + 2 + 10 + 4
    assert counter.get_log.remote().result(timeout=TIMEOUT) == ["first", "second"]


def test_failed_dependency_fails_the_call_not_the_actor(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    call = counter.record.remote(sc.submit(raise_key_error))
    with pytest.raises(DependencyFailedError) as info:
        call.result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, KeyError)
    assert counter.record.remote("after").result(timeout=TIMEOUT) == "after"
    assert counter.get_log.remote().result(timeout=TIMEOUT) == ["after"]  # it never ran


def test_constructor_future_arguments(rt: sc.Runtime) -> None:
    start = sc.submit(slow_value, 0.2, 5)
    extra = sc.submit(double, 21)
    counter = Counter.remote(start, extra=[extra, "x"])
    assert counter.incr.remote(1).result(timeout=TIMEOUT) == 6
    assert counter.get_extra.remote().result(timeout=TIMEOUT) == [42, "x"]
    del start, extra


def test_constructor_future_arguments_the_caller_does_not_keep(rt: sc.Runtime) -> None:
    counter = Counter.remote(sc.put(5))  # the pool has no idle worker yet: one is started
    got = outcome(counter.value.remote(), timeout=5)
    del counter
    assert got == 5


def test_restart_after_the_constructor_future_was_dropped(
    rt: sc.Runtime, tmp_path: Path
) -> None:
    start = sc.put(5)
    counter = Counter.options(max_restarts=1).remote(start)
    assert counter.value.remote().result(timeout=TIMEOUT) == 5
    del start
    gc.collect()
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    blocked = counter.wait_for.remote(str(tmp_path / "never"))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError, match="SIGKILL"):  # the driver has seen the death
        blocked.result(timeout=TIMEOUT)
    assert counter.value.remote().result(timeout=TIMEOUT) == 5  # restarted with its argument
    assert counter.pid.remote().result(timeout=TIMEOUT) != pid


def test_constructor_with_a_failed_dependency(rt: sc.Runtime) -> None:
    counter = Counter.remote(sc.submit(raise_key_error))
    with pytest.raises(ActorDiedError, match="constructor argument failed") as info:
        counter.value.remote().result(timeout=TIMEOUT)
    assert isinstance(info.value.__cause__, KeyError)


# -- large values: by reference, read in place -------------------------------------------------


def test_100mb_argument_is_passed_by_reference(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    array = np.full(100 * 1024 * 1024 // 8, 3.0)
    array[-1] = 7.0
    direct = counter.inspect.remote(array).result(timeout=TIMEOUT)
    assert direct["shape"] == array.shape
    assert direct["corners"] == (3.0, 7.0)
    assert direct["writeable"] is False  # a view of the store, not a private copy
    assert direct["location"] is not None
    stored = sc.put(array)
    first = counter.inspect.remote(stored).result(timeout=TIMEOUT)
    second = counter.inspect.remote(stored).result(timeout=TIMEOUT)
    assert first["shape"] == second["shape"] == array.shape
    assert first["location"] is not None
    assert first["location"] == second["location"]  # the same stored bytes, twice


def test_actor_result_feeds_a_task_without_a_copy(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    count = 2_000_000
    made = counter.make_array.remote(count)
    seen = sc.submit(inspect_in_task, made).result(timeout=TIMEOUT)
    assert seen["sum"] == count * (count - 1) / 2
    assert seen["writeable"] is False
    in_driver = made.result(timeout=TIMEOUT)
    assert in_driver.flags.writeable is False
    here = shared_location(in_driver)
    assert here is not None
    assert seen["location"] == here  # the task read the very bytes the actor stored


# -- handles travel ----------------------------------------------------------------------------


def test_handle_passed_to_a_task(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    assert sc.submit(call_through_handle, counter, 5).result(timeout=TIMEOUT) == 5
    calls = [sc.submit(call_through_handle, counter, 1) for _ in range(4)]
    assert sorted(sc.get(calls, timeout=TIMEOUT)) == [6, 7, 8, 9]
    assert counter.value.remote().result(timeout=TIMEOUT) == 9


def test_handle_passed_to_another_actor(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    keeper = Caller.remote(counter)  # in its constructor, kept
    visitor = Caller.remote()
    assert keeper.call_kept.remote(2).result(timeout=TIMEOUT) == 2
    assert visitor.call_given.remote(counter, 3).result(timeout=TIMEOUT) == 5  # per call
    assert counter.value.remote().result(timeout=TIMEOUT) == 5


def test_handle_held_by_another_actor_keeps_the_actor(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    keeper = Caller.remote(counter)
    assert keeper.call_kept.remote(1).result(timeout=TIMEOUT) == 1
    del counter
    gc.collect()
    assert keeper.call_kept.remote(1).result(timeout=TIMEOUT) == 2
    assert process_alive(pid)


# -- concurrency inside an actor ---------------------------------------------------------------


def test_coroutine_methods_overlap(rt: sc.Runtime) -> None:
    sleeper = Sleeper.remote()
    spans = sc.get([sleeper.nap.remote(0.3) for _ in range(4)], timeout=TIMEOUT)
    latest_start = max(started for started, _ in spans)
    earliest_end = min(ended for _, ended in spans)
    assert latest_start < earliest_end, f"the four naps did not overlap: {spans}"
    assert sleeper.thread_name.remote().result(timeout=TIMEOUT) == "MainThread"


def test_coroutine_methods_rendezvous_and_respect_max_concurrency(rt: sc.Runtime) -> None:
    unlimited = Sleeper.remote()
    rounds = sc.get([unlimited.rendezvous.remote(4) for _ in range(4)], timeout=TIMEOUT)
    assert rounds == [0, 0, 0, 0]
    assert unlimited.get_peak.remote().result(timeout=TIMEOUT) == 4
    limited = Sleeper.options(max_concurrency=2).remote()
    rounds = sc.get([limited.rendezvous.remote(2) for _ in range(4)], timeout=TIMEOUT)
    assert sorted(rounds) == [0, 0, 1, 1]
    assert limited.get_peak.remote().result(timeout=TIMEOUT) == 2


def test_coroutine_method_awaits_a_task(rt: sc.Runtime) -> None:
    sleeper = Sleeper.remote()
    results = sc.get([sleeper.double_in_task.remote(i) for i in range(4)], timeout=TIMEOUT)
    assert results == [0, 2, 4, 6]


def test_threaded_actor_runs_calls_on_distinct_threads(rt: sc.Runtime) -> None:
    threaded = Threaded.remote()
    names = sc.get([threaded.meet.remote() for _ in range(4)], timeout=TIMEOUT)
    assert len(set(names)) == 4, names
    assert "MainThread" not in names
    via_options = Threaded.options(max_concurrency=4).remote()
    assert len(set(sc.get([via_options.meet.remote() for _ in range(4)], timeout=TIMEOUT))) == 4


def test_plain_actor_runs_calls_on_its_main_thread(rt: sc.Runtime) -> None:
    sleeper = Sleeper.remote()
    names = sc.get([sleeper.thread_name.remote() for _ in range(4)], timeout=TIMEOUT)
    assert names == ["MainThread"] * 4


# -- ActorPool ---------------------------------------------------------------------------------


def test_actor_pool_map_keeps_order_and_uses_every_actor(rt: sc.Runtime) -> None:
    pool = sc.ActorPool([Square.remote(), Square.remote()])
    results = collect(pool.map(lambda actor, v: actor.compute.remote(v), range(20)))
    assert [square for square, _ in results] == [v * v for v in range(20)]
    assert len({pid for _, pid in results}) == 2


def test_actor_pool_map_unordered(rt: sc.Runtime) -> None:
    pool = sc.ActorPool([Square.remote(), Square.remote()])
    results = collect(pool.map_unordered(lambda actor, v: actor.compute.remote(v), range(20)))
    assert sorted(square for square, _ in results) == [v * v for v in range(20)]


def test_actor_pool_submit_and_get_next(rt: sc.Runtime, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        sc.ActorPool([])
    pool = sc.ActorPool([Square.remote(), Square.remote()])
    gate = tmp_path / "gate"
    pool.submit(lambda actor, path: actor.wait_for.remote(path), str(gate))
    pool.submit(lambda actor, v: actor.compute.remote(v), 3)
    pool.submit(lambda actor, v: actor.compute.remote(v), 4)  # waits for a free actor
    assert not pool.has_free()
    assert pool.get_next_unordered(timeout=TIMEOUT)[0] == 9
    assert pool.get_next_unordered(timeout=TIMEOUT)[0] == 16
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.1)  # the first call still waits for its gate
    gate.touch()
    assert pool.get_next(timeout=TIMEOUT) == "opened"
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next(timeout=TIMEOUT)


def test_actor_pool_moves_past_a_failed_call(rt: sc.Runtime) -> None:
    pool = sc.ActorPool([Square.remote(), Square.remote()])
    for value in range(4):
        pool.submit(lambda actor, v: actor.fail_on.remote(v, 1), value)
    outcomes: list[Any] = []
    while pool.has_next() and len(outcomes) < 6:
        try:
            outcomes.append(pool.get_next(timeout=TIMEOUT))
        except ValueError:
            outcomes.append("failed")
    del pool
    assert outcomes == [0, "failed", 2, 3]


# -- names and kill ----------------------------------------------------------------------------


def test_named_actor_get_actor_and_duplicates(rt: sc.Runtime) -> None:
    counter = Counter.options(name="counter").remote(100)
    with pytest.raises(ValueError, match="already exists"):
        Counter.options(name="counter").remote(0)
    found = sc.get_actor("counter")
    assert found == counter
    assert found.incr.remote(1).result(timeout=TIMEOUT) == 101
    assert counter.value.remote().result(timeout=TIMEOUT) == 101  # one actor, two handles
    with pytest.raises(ValueError, match="no live actor named 'nobody'"):
        sc.get_actor("nobody")


def test_named_actor_outlives_its_handles(rt: sc.Runtime) -> None:
    counter = Counter.options(name="kept").remote(7)
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    del counter
    gc.collect()
    again = sc.get_actor("kept")
    assert again.value.remote().result(timeout=TIMEOUT) == 7
    assert again.pid.remote().result(timeout=TIMEOUT) == pid


def test_kill_ends_the_actor_and_frees_its_name(rt: sc.Runtime) -> None:
    counter = Counter.options(name="doomed", max_restarts=3).remote()
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    sc.kill(counter)  # no_restart=True by default: max_restarts does not apply
    with pytest.raises(ActorDiedError, match="doomed"):
        counter.value.remote().result(timeout=TIMEOUT)
    wait_until(lambda: not process_alive(pid), TIMEOUT, "the killed actor's process to end")
    with pytest.raises(ActorDiedError):
        counter.value.remote().result(timeout=TIMEOUT)
    with pytest.raises(ValueError):
        sc.get_actor("doomed")
    reborn = Counter.options(name="doomed").remote(1)
    assert reborn.value.remote().result(timeout=TIMEOUT) == 1
    sc.kill(reborn)
    sc.kill(reborn)  # killing a dead actor is a no-op


def test_kill_without_no_restart_restarts_the_actor(rt: sc.Runtime) -> None:
    counter = Counter.options(max_restarts=1).remote(5)
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    assert counter.incr.remote(1).result(timeout=TIMEOUT) == 6
    sc.kill(counter, no_restart=False)
    assert counter.value.remote().result(timeout=TIMEOUT) == 5  # the constructor ran again
    assert counter.pid.remote().result(timeout=TIMEOUT) != pid
    sc.kill(counter, no_restart=False)  # restarts are used up: this one ends it
    with pytest.raises(ActorDiedError):
        counter.value.remote().result(timeout=TIMEOUT)


def test_call_right_after_kill_with_restart_runs_on_the_new_process(rt: sc.Runtime) -> None:
    counter = Counter.options(max_restarts=1).remote(5)
    counter.pid.remote().result(timeout=TIMEOUT)
    sc.kill(counter, no_restart=False)
    got = outcome(counter.value.remote())
    del counter
    assert got == 5


def test_call_in_flight_at_kill_with_restart_fails_and_the_actor_goes_on(
    rt: sc.Runtime, tmp_path: Path
) -> None:
    counter = Counter.options(max_restarts=1).remote(5)
    assert counter.incr.remote(1).result(timeout=TIMEOUT) == 6
    busy = counter.wait_for.remote(str(tmp_path / "never"))
    sc.kill(counter, no_restart=False)
    with pytest.raises(ActorDiedError, match=r"killed by sharedcompute\.kill\(\)"):
        busy.result(timeout=TIMEOUT)
    assert counter.value.remote().result(timeout=TIMEOUT) == 5


# -- lifetime ----------------------------------------------------------------------------------


def test_unnamed_actor_ends_when_its_last_handle_goes(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    copy = counter
    del counter
    gc.collect()
    assert copy.value.remote().result(timeout=TIMEOUT) == 0  # one handle is left
    assert process_alive(pid)
    del copy
    gc.collect()
    wait_until(lambda: not process_alive(pid), TIMEOUT, "the unreferenced actor to end")


def test_pending_calls_finish_after_the_last_handle_goes(rt: sc.Runtime) -> None:
    # Not inside an assert: pytest's rewriting would keep the temporary handle alive.
    from_temporary = outcome(Counter.remote(3).value.remote())
    assert from_temporary == 3
    counter = Counter.remote()
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    pending = counter.record.remote(sc.submit(slow_value, 0.3, "late"))
    del counter
    gc.collect()
    assert pending.result(timeout=TIMEOUT) == "late"
    wait_until(lambda: not process_alive(pid), TIMEOUT, "the actor to end after its last call")


HANDLE_OUTLIVES_RUNTIME = """
import sharedcompute as sc

@sc.remote
class Actor:
    def ping(self):
        return "pong"

with sc.Runtime(num_workers=1):
    handle = Actor.remote()
    print(handle.ping.remote().result(timeout=30), flush=True)
del handle  # its runtime is closed
print("dropped", flush=True)
"""


def test_handle_outliving_its_runtime_is_harmless() -> None:
    """Regression: finalizing such a handle used to spin forever in ``Runtime._unlock``."""
    env = {k: v for k, v in os.environ.items() if k != "SHAREDCOMPUTE_WORKER"}
    done = subprocess.run(
        [sys.executable, "-c", HANDLE_OUTLIVES_RUNTIME], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=15,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pong", "dropped"]


def _start_named_actors() -> list[int]:
    """Two named actors (one of them restarted once): pids of the three processes."""
    plain = Counter.options(name="plain").remote()
    restarted = Counter.options(name="restarted", max_restarts=1, max_task_retries=1).remote()
    pids = [a.pid.remote().result(timeout=TIMEOUT) for a in (plain, restarted)]
    sc.kill(restarted, no_restart=False)
    pids.append(restarted.pid.remote().result(timeout=TIMEOUT))
    return pids


def test_every_actor_process_ends_with_the_runtime() -> None:
    with runtime():
        pids = _start_named_actors()  # named: they live on without handles, until shutdown
        assert len(set(pids)) == 3
        assert process_alive(pids[0]) and process_alive(pids[2])  # [1]: killed
    wait_until(lambda: not any(map(process_alive, pids)), TIMEOUT, "actor processes to end")


# -- errors ------------------------------------------------------------------------------------


def test_method_exception_comes_back_as_its_type_and_the_actor_lives(rt: sc.Runtime) -> None:
    counter = Counter.remote()
    counter.incr.remote(2).result(timeout=TIMEOUT)
    pid = counter.pid.remote().result(timeout=TIMEOUT)
    with pytest.raises(KeyError, match="no such thing") as info:
        counter.fail.remote("no such thing").result(timeout=TIMEOUT)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail" in cause.tb and f"pid {pid}" in cause.tb
    assert counter.incr.remote(1).result(timeout=TIMEOUT) == 3  # state kept
    assert counter.pid.remote().result(timeout=TIMEOUT) == pid


def test_constructor_exception_fails_every_call(rt: sc.Runtime) -> None:
    broken = BrokenConstructor.options(max_restarts=2).remote()
    early = [broken.method.remote() for _ in range(3)]  # sent before the failure is known
    for future in early:
        with pytest.raises(ActorDiedError, match="BrokenConstructor") as info:
            future.result(timeout=TIMEOUT)
    later = broken.method.remote()
    with pytest.raises(ActorDiedError) as info:
        later.result(timeout=TIMEOUT)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and "refuses" in str(cause)
    assert isinstance(cause.__cause__, RemoteTraceback)
    assert "__init__" in cause.__cause__.tb


# -- the crash table ---------------------------------------------------------------------------
#
# One actor call crashes (or fails) in one way; the actor has the options of the case. The
# test checks three calls: the one that crashes, one sent behind it before the death ("in
# flight": already sent to the actor's process), and one made after the first's outcome is
# known. The crash waits for a "go" file, so the second call is surely sent before the death.
# With ``once``, a crash happens only the first time: a retried call then survives.


DIED = ActorDiedError
RESTART = {"max_restarts": 1}
RETRY = {"max_task_retries": 1}
BOTH = {"max_restarts": 1, "max_task_retries": 1}
REASONS = {
    "kill": "SIGKILL", "sigkill": "SIGKILL", "sigsegv": "SIGSEGV", "exit": "code 3",
}


def _crash_point(how: str, folder: str) -> str:
    """Where a case crashes: say it started, wait for the go, then crash (or raise)."""
    where = Path(folder)
    (where / "started").touch()
    wait_for_path(where / "go")
    crashed = where / "crashed"
    if crashed.exists() and (where / "once").exists():
        return "survived"
    crashed.touch()
    if how == "kill":
        time.sleep(TIMEOUT)  # the test kills this process meanwhile
        return "not killed"
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "sigsegv":
        ctypes.string_at(0)  # a real segmentation fault
    elif how == "exit":
        os._exit(3)
    raise ValueError(f"raised on purpose ({how})")


class CrashOnLoad:
    """An argument that crashes (or raises) while the actor loads it."""

    def __init__(self, how: str, folder: str) -> None:
        self.how, self.folder = how, folder

    def __reduce__(self) -> Any:
        return _crash_point, (self.how, self.folder)


class CrashOnDump:
    """A result that crashes (or raises) while the actor stores it."""

    def __init__(self, how: str, folder: str) -> None:
        self.how, self.folder = how, folder

    def __reduce__(self) -> Any:
        return str, (_crash_point(self.how, self.folder),)


@sc.remote
class Crasher:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n

    def pid(self) -> int:
        return os.getpid()

    def crash(self, how: str, folder: str) -> str:
        return _crash_point(how, folder)

    def take(self, argument: Any) -> Any:
        return argument

    def give(self, how: str, folder: str) -> CrashOnDump:
        return CrashOnDump(how, folder)


@dataclass(frozen=True)
class CrashCase:
    how: str  # kill | sigkill | sigsegv | exit | raise
    site: str = "method"  # method | load-argument | store-result
    options: dict[str, int] = field(default_factory=dict)
    once: bool = True  # crash the first time only (a retry survives)
    crashing: Any = DIED  # an exception type, or the value the call returns
    in_flight: Any = DIED  # the call sent behind it (incr: 2 on the same process)
    later: Any = DIED  # a call made after the crash is known
    restarted: bool = False  # the actor runs in a new process afterwards

    @property
    def dies(self) -> bool:
        return self.how != "raise"


def _death_cases() -> dict[str, CrashCase]:
    cases = {}
    for how in ("kill", "sigkill", "sigsegv", "exit"):
        cases[f"{how}, no options"] = CrashCase(how)
        cases[f"{how}, max_restarts"] = CrashCase(how, options=RESTART, later=1, restarted=True)
        cases[f"{how}, max_task_retries alone"] = CrashCase(how, options=RETRY)
        cases[f"{how}, restarts and retries"] = CrashCase(
            how, options=BOTH, crashing="survived", in_flight=1, later=2, restarted=True
        )
    return cases


CRASH_CASES: dict[str, CrashCase] = {
    **_death_cases(),
    "exit every time, restarts and retries": CrashCase("exit", options=BOTH, once=False),
    "exit while loading the argument": CrashCase("exit", "load-argument"),
    "exit while loading the argument, restarts and retries": CrashCase(
        "exit", "load-argument", BOTH, crashing="survived", in_flight=1, later=2, restarted=True
    ),
    "SIGKILL while storing the result": CrashCase("sigkill", "store-result"),
    "SIGKILL while storing the result, max_restarts": CrashCase(
        "sigkill", "store-result", RESTART, later=1, restarted=True
    ),
    "segfault while storing the result, restarts and retries": CrashCase(
        "sigsegv", "store-result", BOTH, crashing="survived", in_flight=1, later=2,
        restarted=True,
    ),
    "method raises": CrashCase("raise", crashing=ValueError, in_flight=2, later=3),
    "method raises, restarts and retries (not for exceptions)": CrashCase(
        "raise", options=BOTH, crashing=ValueError, in_flight=2, later=3
    ),
    "argument fails to load": CrashCase(
        "raise", "load-argument", crashing=SerializationError, in_flight=2, later=3
    ),
    "result fails to pickle": CrashCase(
        "raise", "store-result", BOTH, crashing=SerializationError, in_flight=2, later=3
    ),
}


def _start_crash(actor: Any, case: CrashCase, folder: Path) -> sc.Future[Any]:
    if case.site == "method":
        return actor.crash.remote(case.how, str(folder))
    if case.site == "load-argument":
        return actor.take.remote(CrashOnLoad(case.how, str(folder)))
    return actor.give.remote(case.how, str(folder))


def _check(future: sc.Future[Any], expected: Any, case: CrashCase, what: str) -> None:
    if isinstance(expected, type) and issubclass(expected, BaseException):
        with pytest.raises(expected) as info:
            future.result(timeout=TIMEOUT)
        if expected is DIED:
            message = str(info.value)
            assert "actor Crasher" in message, f"{what}: {message}"
            assert "pid " in message and REASONS[case.how] in message, f"{what}: {message}"
    else:
        assert future.result(timeout=TIMEOUT) == expected, what


@pytest.mark.parametrize("case", CRASH_CASES.values(), ids=CRASH_CASES.keys())
def test_crash_table(case: CrashCase, tmp_path: Path, rt: sc.Runtime) -> None:
    if case.once:
        (tmp_path / "once").touch()
    actor = Crasher.options(**case.options).remote()
    first_pid = actor.pid.remote().result(timeout=TIMEOUT)
    assert actor.incr.remote().result(timeout=TIMEOUT) == 1
    crashing = _start_crash(actor, case, tmp_path)
    in_flight = actor.incr.remote()
    if case.how == "kill":
        wait_for_path(tmp_path / "started")
        (tmp_path / "go").touch()
        wait_for_path(tmp_path / "crashed")
        os.kill(first_pid, signal.SIGKILL)
    else:
        (tmp_path / "go").touch()
    _check(crashing, case.crashing, case, "the crashing call")
    _check(in_flight, case.in_flight, case, "the call in flight")
    if case.dies:
        wait_until(lambda: not process_alive(first_pid), TIMEOUT, "the actor's process to end")
    _check(actor.incr.remote(), case.later, case, "the later call")
    if case.later is not DIED:
        pid_now = actor.pid.remote().result(timeout=TIMEOUT)
        assert (pid_now != first_pid) is case.restarted


@sc.remote
class ExitsOnce:
    def __init__(self, folder: str | None) -> None:
        if folder is None or not Path(folder, "exited").exists():
            if folder is not None:
                Path(folder, "exited").touch()
            os._exit(7)

    def ready(self) -> str:
        return "ready"


def test_constructor_that_exits_once_with_restarts_and_retries(
    tmp_path: Path, rt: sc.Runtime
) -> None:
    flaky = ExitsOnce.options(max_restarts=1, max_task_retries=1).remote(str(tmp_path))
    assert flaky.ready.remote().result(timeout=TIMEOUT) == "ready"
    always = ExitsOnce.options(max_restarts=2).remote(None)
    with pytest.raises(ActorDiedError, match="code 7"):
        always.ready.remote().result(timeout=TIMEOUT)


# -- the benchmark -----------------------------------------------------------------------------


BENCH_KEYS = (
    "sequential_calls_per_s",
    "pipelined_calls_per_s",
    "create_first_call_s",
    "big_arg_put_s",
    "big_arg_direct_s",
)


def test_bench_quick_json() -> None:
    env = dict(os.environ)
    env.pop("SHAREDCOMPUTE_WORKER", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "bench" / "actors.py"),
         "--quick", "--json", "--systems", "sharedcompute"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["quick"] is True
    figures = report["systems"]["sharedcompute"]
    assert not figures.get("errors"), figures.get("errors")
    for key in BENCH_KEYS:
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["leftover_processes"] == []
    assert {"sequential_ge_5x_ray", "pipelined_ge_5x_ray", "create_le_0_1x_ray",
            "big_arg_le_5ms"} <= set(report["targets"])


# -- resources an actor reserves for its life ----------------------------------------------------


def test_an_actor_holds_its_num_cpus_while_it_lives() -> None:
    with sc.Runtime(num_workers=2) as rt:
        counter = Counter.options(num_cpus=1).remote(0)
        assert counter.incr.remote(1).result(timeout=TIMEOUT) == 1
        assert rt.core.available["CPU"] == 1.0  # one CPU left for tasks
        sc.kill(counter)
        wait_until(lambda: rt.core.available["CPU"] == 2.0, what="the CPU given back")


def test_an_actor_waits_for_a_custom_resource_another_actor_holds() -> None:
    with sc.Runtime(num_workers=2, resources={"gpu": 1}):
        first = Counter.options(resources={"gpu": 1}).remote(0)
        assert first.incr.remote(1).result(timeout=TIMEOUT) == 1
        second = Counter.options(resources={"gpu": 1}).remote(10)
        waiting = second.incr.remote(1)
        done, _ = sc.wait([waiting], timeout=0.5)
        assert not done  # the only gpu is the first actor's
        sc.kill(first)
        assert waiting.result(timeout=TIMEOUT) == 11


def test_an_actor_that_can_never_fit_is_refused_at_creation(rt: sc.Runtime) -> None:
    with pytest.raises(ValueError, match="needs 64 CPU but the runtime has 2"):
        Counter.options(num_cpus=64).remote(0)
    with pytest.raises(ValueError, match="needs 1 gpu"):
        Counter.options(resources={"gpu": 1}).remote(0)
