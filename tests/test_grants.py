"""A task's stored inputs are held for its worker by the store while it runs (no round trip).

The driver takes a hold on a dispatched task's stored inputs in the worker's name; the
worker reads them without asking, and the hold goes when the task is over. A view that
outlives the task gets the worker's own reference before the driver hears the task ended.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute.errors import WorkerCrashedError

TIMEOUT = 60
N = 1 << 17  # 1 MiB of float64: a stored object, well under the grant's limit
_KEPT: list[np.ndarray] = []


def _make(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


def _read_granted(array: np.ndarray) -> tuple[float, bool]:
    from sharedcompute._runtime import _context

    store = _context.current().store  # type: ignore[union-attr]
    return float(array.sum()), bool(store._granted)


def _keep(array: np.ndarray) -> float:
    _KEPT.append(array)  # a view that outlives the task
    return float(array[0])


def _kept_sum() -> float:
    return float(_KEPT[0].sum())


def _read(array: np.ndarray) -> float:
    return float(array.sum())


def _drop_kept() -> int:
    import gc

    _KEPT.clear()
    gc.collect()
    return len(_KEPT)


def _sleep_on(array: np.ndarray, path: str) -> None:
    with open(path, "w") as out:
        out.write(str(float(array[0])))
    time.sleep(60)


def _used(rt: sc.Runtime) -> int:
    return int(rt.store.stats()["used_bytes"])


def test_a_task_reads_its_inputs_under_the_drivers_hold() -> None:
    with sc.Runtime(num_workers=1) as rt:
        made = sc.submit(_make, N, 2.0)
        total, granted = sc.submit(_read_granted, made).result(timeout=TIMEOUT)
        assert total == 2.0 * N and granted
        del made
        wait_until(lambda: _used(rt) == 0, timeout=TIMEOUT)


def test_a_view_that_outlives_its_task_keeps_the_object() -> None:
    with sc.Runtime(num_workers=1) as rt:
        made = sc.submit(_make, N, 3.0)
        assert sc.submit(_keep, made).result(timeout=TIMEOUT) == 3.0
        del made  # nobody but the worker's global holds it now
        for _ in range(3):  # the driver's objects come and go; the kept one must stay
            sc.submit(_make, N, 9.0).result(timeout=TIMEOUT)
        assert sc.submit(_kept_sum).result(timeout=TIMEOUT) == 3.0 * N
        assert _used(rt) > 0


def test_a_kept_view_read_again_under_a_grant_is_released_once() -> None:
    # The first task's kept view took a reference of the worker's own; a second task reads
    # the object under a grant; when every view is gone that reference goes too, once.
    with sc.Runtime(num_workers=1) as rt:
        made = sc.submit(_make, N, 5.0)
        assert sc.submit(_keep, made).result(timeout=TIMEOUT) == 5.0
        assert sc.submit(_read, made).result(timeout=TIMEOUT) == 5.0 * N
        assert sc.submit(_drop_kept).result(timeout=TIMEOUT) == 0
        del made
        wait_until(lambda: _used(rt) == 0, timeout=TIMEOUT)


def test_a_worker_killed_under_a_grant_leaves_nothing(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "read")
    with sc.Runtime(num_workers=1) as rt:
        made = sc.submit(_make, N, 4.0)
        made.result(timeout=TIMEOUT)
        sleeper = sc.remote(_sleep_on).options(max_retries=0).submit(made, path)
        wait_until(lambda: os.path.exists(path) and os.path.getsize(path) > 0, timeout=TIMEOUT)
        os.kill(rt.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            sleeper.result(timeout=TIMEOUT)
        del made, sleeper
        wait_until(lambda: _used(rt) == 0, timeout=TIMEOUT)
