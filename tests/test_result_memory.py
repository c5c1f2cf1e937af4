"""A task's large result reaches the store holding one copy at a time, not two.

The worker builds the array in its own heap; in fresh store pages it reserves them slice by
slice as it copies and gives its own pages back behind the copy (only for an array nothing
else holds). Memory is sampled: anonymous memory of the driver and its worker plus all
resident shared memory.
"""

from __future__ import annotations

import os
import time

import numpy as np
import psutil

import sharedcompute as sc
from tools.bench.memory import _peak_during

MiB = 1024 * 1024
TIMEOUT = 120
_KEPT: list[np.ndarray] = []


def _count(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _count_and_keep(n: int) -> np.ndarray:
    values = np.arange(n, dtype=np.int64)
    _KEPT.append(values)  # held by this module too: its pages must stay
    return values


def _kept_sum() -> int:
    return int(_KEPT[0].sum())


def test_a_large_result_holds_one_copy_in_a_cold_store() -> None:
    n = 512 * MiB // 8
    with sc.Runtime(num_workers=1, store_capacity=640 * MiB):
        sc.submit(_count, 1).result(timeout=TIMEOUT)  # the worker is up
        pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]
        time.sleep(0.2)
        extra, _, value = _peak_during(pids, lambda: sc.submit(_count, n).result(timeout=TIMEOUT))
        assert value[0] == 0 and value[-1] == n - 1
        assert int(value.sum()) == n * (n - 1) // 2
        # Two copies would be 1024 MiB; one, plus a slice in flight, is 576 MiB.
        assert extra < 640 * MiB, f"peak {extra / MiB:.0f} MiB over the start"
        del value


def test_a_result_held_elsewhere_keeps_its_pages() -> None:
    n = 160 * MiB // 8
    with sc.Runtime(num_workers=1, store_capacity=512 * MiB):
        value = sc.submit(_count_and_keep, n).result(timeout=TIMEOUT)
        assert int(value.sum()) == n * (n - 1) // 2
        # The same worker still reads the array it kept: not given back as it was copied.
        assert sc.submit(_kept_sum).result(timeout=TIMEOUT) == n * (n - 1) // 2
        del value
