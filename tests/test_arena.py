"""Large numpy arrays of a worker's tasks are made in the store; a result is sealed, not copied.

Real workers and a real store: where an array lies is read off its data address in the
worker and off the result's view in the driver; what the store holds, off its stats.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute._store import OwnerStore
from sharedcompute._store._table import ObjectTable
from sharedcompute.errors import WorkerCrashedError

MiB = 1024 * 1024
TIMEOUT = 60
N = 8 * MiB // 8  # 8 MiB of float64: over the arena's threshold
_KEPT: list[np.ndarray] = []

def _has_handler() -> bool:
    try:
        from sharedcompute._worker import _arena_handler  # noqa: F401
    except ImportError:
        return False
    return True


needs_handler = pytest.mark.skipif(
    not _has_handler(), reason="the numpy memory handler was not built (no C compiler)"
)


def _offset_in_store(array: np.ndarray) -> int | None:
    """Where ``array``'s data lies in this worker's mapping of the store (None: elsewhere)."""
    from sharedcompute._runtime import _context

    segment = _context.current().store.segment  # type: ignore[union-attr]
    address = array.__array_interface__["data"][0]
    offset = address - segment.address
    return offset if 0 <= offset < segment.capacity else None


def _made_at(path: str) -> np.ndarray:
    values = np.arange(N, dtype=np.float64)
    with open(path, "w") as out:
        out.write(repr(_offset_in_store(values)))
    return values


def _driver_offset(rt: sc.Runtime, value: np.ndarray) -> int:
    return int(value.__array_interface__["data"][0] - rt.store.segment.address)


def _temporaries() -> tuple[float, bool]:
    a = np.ones(N)
    b = a * 3  # two leased blocks, both freed before the task returns
    leased = _offset_in_store(b) is not None
    return float(b.sum()), leased


def _kept_result() -> np.ndarray:
    values = np.full(N, 7.0)
    _KEPT.append(values)  # held here too: it must be copied, never sealed where it is
    return values


def _spoil_kept() -> float:
    _KEPT[0][:] = -1.0
    return float(_KEPT[0][0])


def _zeros_after_ones() -> tuple[bool, bool]:
    ones = np.ones(N)
    del ones  # its block goes back; the next lease of that size may reuse it
    zeros = np.zeros(N)
    return bool((zeros == 0).all()), _offset_in_store(zeros) is not None


def _temporaries_in_a_loop(rounds: int) -> float:
    total = 0.0
    for step in range(rounds):
        scratch = np.full(N, float(step))  # freed at the next round: its block serves again
        total += float((scratch * 2)[0])
    return total


_DROPPED_LATER: list[np.ndarray] = []


def _dropped_after(seconds: float) -> bool:
    kept = np.ones(N)  # leased; let go of by a timer thread once the worker is idle
    _DROPPED_LATER.append(kept)
    threading.Timer(seconds, _DROPPED_LATER.clear).start()
    return _offset_in_store(kept) is not None


def _resized() -> tuple[float, float, int]:
    values = np.arange(N, dtype=np.float64)
    values.resize(2 * N, refcheck=False)  # numpy reallocates its data
    return float(values[N - 1]), float(values[2 * N - 1]), values.size


def _where_made() -> bool:
    return _offset_in_store(np.ones(N)) is not None


def _sleep_holding(path: str) -> None:
    held = np.ones(N)
    with open(path, "w") as out:
        out.write(repr(_offset_in_store(held)))
    time.sleep(60)


def _fork_and_allocate() -> tuple[int, float]:
    inherited = np.ones(N)  # leased by the worker
    pid = os.fork()
    if pid == 0:  # the child must not lease on, nor release, through the worker's connection
        try:
            made = np.ones(N) * 2
            code = 0 if _offset_in_store(made) is None else 1
            del inherited
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), float(inherited.sum())


class Holder:
    def __init__(self) -> None:
        self.state = np.ones(N)

    def state_in_store(self) -> bool:
        return _offset_in_store(self.state) is not None


def _store_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """(op, first argument) of each request the store's owner serves from now on."""
    from sharedcompute._store import _server

    told: list[tuple[str, Any]] = []
    dispatch = _server.StoreServer._dispatch

    def recording(self: Any, client: int, op: str, args: list[Any]) -> Any:
        told.append((op, args[0] if args else None))
        return dispatch(self, client, op, args)

    monkeypatch.setattr(_server.StoreServer, "_dispatch", recording)
    return told


def _used(rt: sc.Runtime) -> int:
    return int(rt.store.stats()["used_bytes"])  # type: ignore[attr-defined]


@needs_handler
def test_a_large_array_result_is_sealed_where_the_task_made_it(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "offset")
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        value = sc.submit(_made_at, path).result(timeout=TIMEOUT)
        with open(path) as made:
            offset = eval(made.read())
        assert offset is not None, "the array was not made in the store"
        assert _driver_offset(rt, value) == offset  # the same bytes: no copy
        assert value[0] == 0 and value[-1] == N - 1 and not value.flags.writeable
        del value


@needs_handler
def test_a_sealed_result_takes_the_workers_hold_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each result made in the store reaches the owner in one message, the worker's hold on
    its block with it: no release of it follows, and results still go when dropped."""
    told = _store_requests(monkeypatch)
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        assert sc.get([sc.submit(_where_made) for _ in range(4)], timeout=TIMEOUT)[-1]
        made = [sc.submit(np.ones, N) for _ in range(4)]
        ids = {f.ref.object_id for f in sc.wait(made, timeout=TIMEOUT).done}
        assert len(ids) == 4
        sc.submit(time.sleep, 0.3).result(timeout=TIMEOUT)  # the worker goes idle meanwhile
        delivered = {args for op, args in told if op == "deliver"}
        released = {object_id for op, counts in told if op == "decref" for object_id in counts}
        assert ids <= delivered and not ids & released, (ids, delivered, released)
        del made
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)


@needs_handler
def test_temporaries_go_back_to_the_store() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        total, leased = sc.submit(_temporaries).result(timeout=TIMEOUT)
        assert leased and total == 3.0 * N
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)


@needs_handler
def test_freed_blocks_serve_the_next_arrays_without_a_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task making and dropping arrays of one size asks the owner for blocks a few times,
    not once an array; the blocks it kept go back once the worker is idle."""
    told = _store_requests(monkeypatch)
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        rounds = 20  # 40 arrays of 8 MiB
        total = sc.submit(_temporaries_in_a_loop, rounds).result(timeout=TIMEOUT)
        assert total == 2.0 * sum(range(rounds))
        ops = [op for op, _ in told]
        asked = ops.count("lease") + ops.count("lease_ahead")
        assert 2 <= asked <= 4, ops
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)


@needs_handler
def test_a_block_freed_while_the_worker_is_idle_goes_back() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        assert sc.submit(_dropped_after, 0.5).result(timeout=TIMEOUT)
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)  # not kept for a next task


@needs_handler
def test_a_result_the_task_keeps_is_copied() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB):
        value = sc.submit(_kept_result).result(timeout=TIMEOUT)
        # The worker writes over the array it kept; the driver's result must not change.
        assert sc.submit(_spoil_kept).result(timeout=TIMEOUT) == -1.0
        assert float(value.min()) == 7.0 and float(value.max()) == 7.0
        del value


@needs_handler
def test_zeros_in_a_reused_block_read_as_zeros() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB):
        all_zero, leased = sc.submit(_zeros_after_ones).result(timeout=TIMEOUT)
        assert all_zero and leased


@needs_handler
def test_a_leased_array_may_grow() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        last_kept, last_new, size = sc.submit(_resized).result(timeout=TIMEOUT)
        assert (last_kept, last_new, size) == (N - 1, 0.0, 2 * N)
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)


@needs_handler
def test_no_lease_past_the_spill_threshold() -> None:
    # 48 MiB of 64 put by the driver: a lease of 8 MiB more would pass the spill threshold
    # (0.8 of capacity), so numpy allocates from the heap and the result is copied.
    with sc.Runtime(num_workers=1, store_capacity=64 * MiB) as rt:
        filler = [sc.put(np.ones(8 * MiB // 8)) for _ in range(6)]
        assert sc.submit(_where_made).result(timeout=TIMEOUT) is False
        del filler
        wait_until(lambda: _used(rt) == 0, timeout=TIMEOUT)
        assert sc.submit(_where_made).result(timeout=TIMEOUT) is True


@needs_handler
def test_a_forked_child_neither_leases_nor_releases() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        assert sc.submit(_fork_and_allocate).result(timeout=TIMEOUT) == (0, float(N))
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)


@needs_handler
def test_an_actor_makes_its_arrays_in_its_own_heap() -> None:
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB):
        holder = sc.remote(Holder).remote()
        assert holder.state_in_store.remote().result(timeout=TIMEOUT) is False


@needs_handler
def test_a_killed_worker_leaves_no_lease(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "offset")
    with sc.Runtime(num_workers=1, store_capacity=256 * MiB) as rt:
        before = _used(rt)
        future = sc.remote(_sleep_holding).options(max_retries=0).submit(path)
        wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, timeout=TIMEOUT)
        with open(path) as made:
            assert eval(made.read()) is not None
        assert _used(rt) > before
        os.kill(rt.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            future.result(timeout=TIMEOUT)
        wait_until(lambda: _used(rt) == before, timeout=TIMEOUT)


def test_the_table_discards_a_lease_let_go_unsealed() -> None:
    owner, worker = 0, 7
    table = ObjectTable(1 << 20)
    temporary, _ = table.create(owner, 4096, courier=worker)
    table.lease(temporary, worker, owner)
    result, _ = table.create(owner, 4096, courier=worker)
    table.lease(result, worker, owner)
    assert _counts(table) == (0, 2)
    table.seal(result, b"header")
    assert _counts(table) == (1, 1)
    table.decref(worker, temporary)  # numpy freed a temporary: gone
    table.decref(worker, result)  # freed after sealing: the owner's now
    assert temporary not in table and result in table
    assert _counts(table) == (1, 0)
    table.delivered(result)
    assert table.drop_deliveries(worker, owner) == 0
    other = worker + 1
    dead, _ = table.create(owner, 4096, courier=other)
    table.lease(dead, other, owner)
    assert _counts(table) == (1, 1)
    table.drop_client(other)  # that worker died holding it unsealed
    assert dead not in table and len(table) == 1
    assert _counts(table) == (1, 0)
    table.decref(owner, result)
    assert _counts(table) == (0, 0) and len(table) == 0


def _counts(table: ObjectTable) -> tuple[int, int]:
    """(sealed, unsealed) objects as the table's stats count them."""
    stats = table.stats()
    return stats["num_objects"], stats["unsealed_objects"]


def test_the_owner_leases_nothing_of_its_own() -> None:
    with OwnerStore(64 * MiB) as store:
        assert store.lease(8 * MiB) is None


def test_without_the_extension_nothing_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # No C compiler at install: the module is missing, and results are copied as before.
    import sharedcompute._worker
    from sharedcompute._worker._arena import Arena

    monkeypatch.setitem(sys.modules, "sharedcompute._worker._arena_handler", None)
    monkeypatch.delattr(sharedcompute._worker, "_arena_handler", raising=False)
    with OwnerStore(64 * MiB) as store:
        assert Arena.install(store) is None
