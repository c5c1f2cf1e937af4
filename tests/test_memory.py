"""The memory report: ``sc.memory_summary()`` locally and through a cluster's head, and
``sharedcompute memory``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from _cluster import TIMEOUT, TOKEN, Cluster
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute._cluster import ClusterClient

MiB = 1024 * 1024


def _block(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.uint8)


def test_the_report_names_each_object_where_it_is_and_who_holds_it(tmp_path: Path) -> None:
    with sc.Runtime(num_workers=1, store_capacity=64 * MiB, spill_dir=str(tmp_path)) as rt:
        put = sc.put(np.zeros(8 * MiB, dtype=np.uint8))
        made = sc.submit(_block, 4 * MiB)
        made.result(timeout=TIMEOUT)
        olds = [sc.put(np.zeros(12 * MiB, dtype=np.uint8)) for _ in range(5)]  # some spill
        # The block the worker leased ahead for a next result goes back once it is idle.
        wait_until(lambda: rt.store.stats()["unsealed_objects"] == 0)
        report = sc.memory_summary()
        lines = report.splitlines()
        assert lines[0] == "sharedcompute memory"
        assert "node 0" in lines[2] and "store of 64.0 MiB" in lines[2] and "spilled" in lines[2]
        assert str(tmp_path) in lines[2]
        put_line = next(line for line in lines if f"put {put.key}" in line)
        assert "8.0 MiB" in put_line and "1 Future" in put_line
        made_line = next(line for line in lines if f"result of task {made.key}" in line)
        assert "_block" in made_line and "4.0 MiB" in made_line
        assert any("spilled" in line and "12.0 MiB" in line for line in lines)
        assert lines[-1].startswith("7 objects, ")
        del olds, put, made


def test_sharedcompute_memory_asks_the_head(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)
    runtime = cluster.head.runtime
    with runtime:
        # numpy's functions: the node imports them (this test module is not on its path)
        far = sc.remote(np.ones).options(node=node).submit(2 * MiB, dtype=np.uint8)
        here = sc.put(np.zeros(3 * MiB, dtype=np.uint8))
        assert sc.remote(np.max).options(node=node).submit(far).result(timeout=TIMEOUT) == 1
        env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN}
        done = subprocess.run(
            [sys.executable, "-m", "sharedcompute.cli", "memory", "--address",
             cluster.head.address], capture_output=True, text=True, timeout=TIMEOUT, env=env,
        )
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert f"node {node} " in text and "store of 256.0 MiB" in text
        assert f"put {here.key}" in text and "3.0 MiB" in text
        far_line = next(line for line in text.splitlines()
                        if f"result of task {far.key}" in line)
        assert "2.0 MiB" in far_line and f" {node} " in far_line, far_line
        driver = ClusterClient(cluster.head.address, TOKEN)  # a driver asks the head too
        try:
            from_driver = driver.memory_summary()
        finally:
            driver.shutdown()
        assert f"put {here.key}" in from_driver and "this driver (node" in from_driver
        del far, here
