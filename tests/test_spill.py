"""Spilling: objects beyond the store's capacity go to files and are read back mapped.

Real stores, real files, real worker processes; a full disk is a real small tmpfs
(root only). Nothing may stay in ``spill_dir`` after any test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute._store import OwnerStore
from sharedcompute.errors import ObjectStoreFullError
from tools.bench.memory import anonymous_memory

MiB = 1024 * 1024
TIMEOUT = 120


def _mapped_files(address: int) -> list[str]:
    """The files mapped at ``address`` in this process."""
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= address < end and len(parts) == 6:
            found.append(parts[5])
    return found


def test_objects_past_capacity_spill_and_come_back_mapped(tmp_path: Path) -> None:
    with OwnerStore(capacity=64 * MiB, spill_dir=str(tmp_path)) as store:
        refs = [store.put(np.full(2 * MiB, i, dtype=np.int64)) for i in range(10)]  # 16 MiB each
        stats = store.stats()
        assert stats["spilled_bytes"] >= 6 * 16 * MiB and stats["used_bytes"] <= 64 * MiB
        assert store.spill_path is not None and store.spill_path.startswith(str(tmp_path))
        for i, ref in enumerate(refs):
            value = store.get(ref)
            assert value[0] == i and value[-1] == i and not value.flags.writeable
        first = store.get(refs[0])  # the oldest: spilled, read from its file with no copy
        where = _mapped_files(first.__array_interface__["data"][0])
        assert where and where[0].startswith(store.spill_path), where
        del value, first
        for ref in refs:
            store.delete(ref)
        # Each file went with its object (a write in flight is thrown away once it ends).
        spill_dir = str(store.spill_path)
        wait_until(lambda: not os.listdir(spill_dir), TIMEOUT, "the spill files to go")
        spill_path = store.spill_path
    assert not os.path.exists(spill_path)  # and the directory with the store


def test_a_private_view_is_writeable_copies_only_what_is_written_and_holds_its_object(
    tmp_path: Path,
) -> None:
    with OwnerStore(capacity=64 * MiB, spill_dir=str(tmp_path)) as store:
        refs = [store.put(np.full(2 * MiB, i, dtype=np.int64)) for i in range(6)]  # 16 MiB each
        assert store.stats()["spilled_objects"] >= 1
        for i in (0, 5):  # the oldest, read from its spill file; the newest, in the arena
            before = anonymous_memory(os.getpid())
            mine = store.get(refs[i], private=True)
            assert mine.flags.writeable and int(mine.sum()) == i * 2 * MiB
            where = _mapped_files(mine.__array_interface__["data"][0])
            assert where and (str(store.spill_path) in where[0]) == (i == 0), where
            assert anonymous_memory(os.getpid()) - before < 4 * MiB  # read: nothing copied
            mine[:] = -1
            assert anonymous_memory(os.getpid()) - before >= 12 * MiB  # written: copied here
            shared = store.get(refs[i])
            assert shared[0] == i and shared[-1] == i  # the store's object as it was
            del shared, mine
        mine = store.get(refs[5], private=True)
        store.delete(refs[5])  # the owner lets go; the view still holds the object
        assert store.stats()["num_objects"] == 6
        for ref in refs[:5]:
            store.delete(ref)
        assert store.stats()["num_objects"] == 1 and mine[-1] == 5
        del mine
        wait_until(lambda: store.stats()["num_objects"] == 0, TIMEOUT, "the view's object to go")


def test_a_viewed_object_is_never_spilled(tmp_path: Path) -> None:
    with OwnerStore(capacity=64 * MiB, spill_dir=str(tmp_path)) as store:
        kept = store.put(np.ones(2 * MiB))
        view = store.get(kept)
        others = [store.put(np.zeros(2 * MiB)) for _ in range(8)]
        address = view.__array_interface__["data"][0]
        assert not any(str(tmp_path) in name for name in _mapped_files(address))
        assert view.sum() == 2 * MiB
        del view
        for ref in [kept, *others]:
            store.delete(ref)


def test_capacity_is_never_exceeded_while_a_runtime_spills(tmp_path: Path) -> None:
    samples: list[int] = []
    with sc.Runtime(num_workers=2, store_capacity=96 * MiB, spill_dir=str(tmp_path)) as rt:
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rt.store.stats()["used_bytes"])
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            parts = [sc.submit(np.full, 2 * MiB, i, dtype=np.int64) for i in range(12)]
            sums = sc.get([sc.submit(np.sum, part) for part in parts], timeout=TIMEOUT)
        finally:
            stop.set()
            sampler.join(10)
        assert sums == [i * 2 * MiB for i in range(12)]
        assert rt.store.stats()["spilled_bytes"] > 0
    assert samples and max(samples) <= 96 * MiB


def _chain_step(a: np.ndarray) -> np.ndarray:
    return a + 1


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


@pytest.mark.timeout(600)
def test_a_working_set_three_times_the_store_completes(tmp_path: Path) -> None:
    size = 256 * MiB // 8  # 256 MiB arrays, a 512 MiB store: working sets of 3x and more
    with sc.Runtime(num_workers=2, store_capacity=512 * MiB, spill_dir=str(tmp_path)):
        leaves = [sc.submit(np.full, size, i, dtype=np.int64) for i in range(6)]
        chain = leaves[0]
        for _ in range(5):
            chain = sc.submit(_chain_step, chain)
        level = leaves
        while len(level) > 1:  # a tree: every leaf is alive until its pair is summed
            level = [sc.submit(_pair, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)
                     ] + ([level[-1]] if len(level) % 2 else [])
        tree = level[0].result(timeout=TIMEOUT)
        assert tree[0] == sum(range(6)) and tree[-1] == sum(range(6))
        assert chain.result(timeout=TIMEOUT)[0] == 5
        del tree
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_a_clear_error_not_a_retry(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "sc-spill-test", str(disk)],
                   check=True)
    try:
        with OwnerStore(capacity=64 * MiB, spill_dir=str(disk), wait_s=20) as store:
            refs = [store.put(np.zeros(2 * MiB)) for _ in range(4)]  # 64 MiB: full
            started = time.monotonic()
            with pytest.raises(ObjectStoreFullError) as info:
                for _ in range(4):
                    refs.append(store.put(np.zeros(2 * MiB)))
            assert time.monotonic() - started < 15  # told at once, not after the wait
            message = str(info.value)
            assert str(disk) in message and "bytes are free there" in message, message
            for ref in refs:
                store.delete(ref)
            store.put(np.zeros(MiB))  # with room again, it works
    finally:
        subprocess.run(["umount", str(disk)], check=True)


SPILLING_DRIVER = """
import sys, time
import numpy as np
import sharedcompute as sc
sc.init(num_workers=1, store_capacity=64 << 20, spill_dir=sys.argv[1])
refs = []
for i in range(1000):
    refs.append(sc.put(np.full(2 << 20, i)))
    if i == 6:
        print("spilling", flush=True)
    time.sleep(0.01)
"""


def test_a_killed_driver_leaves_no_spill_file_after_the_next_start(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SPILLING_DRIVER),
                             str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spilling"
        time.sleep(0.3)
        left = [p for p in os.listdir(tmp_path) if p.startswith("sharedcompute-spill-")]
        assert left and os.listdir(tmp_path / left[0])  # it was spilling
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(TIMEOUT)
    time.sleep(0.5)  # its workers see it gone and exit
    # The next store to spill there sweeps what the dead one left (its pid is dead).
    with OwnerStore(capacity=16 * MiB, spill_dir=str(tmp_path)) as store:
        refs = [store.put(np.zeros(MiB)) for _ in range(4)]
        assert [p for p in os.listdir(tmp_path) if p.startswith("sharedcompute-spill-")] == [
            os.path.basename(str(store.spill_path))
        ]
        for ref in refs:
            store.delete(ref)
    assert os.listdir(tmp_path) == []


def _slow_block(i: int) -> np.ndarray:
    time.sleep(0.05)
    return np.full(2 * MiB, i, dtype=np.int64)


def test_a_worker_killed_while_the_store_spills_leaves_no_file(tmp_path: Path) -> None:
    with sc.Runtime(num_workers=2, store_capacity=64 * MiB, spill_dir=str(tmp_path)) as rt:
        parts = [sc.submit(_slow_block, i) for i in range(16)]  # 256 MiB: most spill
        parts[3].result(timeout=TIMEOUT)
        os.kill(rt.worker_pids()[0], signal.SIGKILL)  # its task reruns (retries)
        values = sc.get(parts, timeout=TIMEOUT)
        assert [int(v[0]) for v in values] == list(range(16))
        assert rt.store.stats()["spilled_objects"] > 0
        del values, parts
    assert os.listdir(tmp_path) == []
