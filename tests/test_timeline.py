"""``sc.timeline``: recent task executions as Chrome trace events, locally and on a cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from _cluster import TIMEOUT, TOKEN, Cluster

import sharedcompute as sc
from sharedcompute._cluster import ClusterClient
from sharedcompute._runtime._base import TaskOptions


def _sleepy(seconds: float, data: object = None) -> float:
    time.sleep(seconds)
    return seconds


def _broken() -> None:
    raise ValueError("no")


def test_the_timeline_has_a_row_per_worker_and_an_event_per_task(tmp_path: Path) -> None:
    with sc.Runtime(num_workers=2):
        big = np.zeros(1 << 20)  # 8 MiB of arguments: stored, its size recorded
        futures = [sc.submit(_sleepy, 0.05, big if i == 0 else None) for i in range(6)]
        sc.wait(futures, timeout=TIMEOUT)
        with pytest.raises(ValueError):
            sc.submit(_broken).result(timeout=TIMEOUT)
        path = tmp_path / "trace.json"
        trace = sc.timeline(path)
    assert json.loads(path.read_text()) == trace
    tasks = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(tasks) == 7
    sleepy = [e for e in tasks if e["name"].endswith("_sleepy")]
    assert len(sleepy) == 6 and all(40_000 <= e["dur"] < 5_000_000 for e in sleepy)
    assert {e["tid"] for e in sleepy} == {e["tid"] for e in tasks if e["ph"] == "X"}
    assert len({e["tid"] for e in sleepy}) == 2  # both workers ran some
    assert max(e["args"]["input_bytes"] for e in sleepy) >= 8 << 20
    failed = [e for e in tasks if not e["args"]["ok"]]
    assert len(failed) == 1 and failed[0]["name"].endswith("_broken")
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert len(names) == 2 and all(name.startswith("worker ") for name in names)


def test_a_connected_driver_gets_the_heads_timeline_of_every_node(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)
    driver = ClusterClient(cluster.head.address, TOKEN)
    try:
        on_node = driver.submit(np.zeros, (10,), {}, TaskOptions(node=node))
        on_node.result(timeout=TIMEOUT)
        trace = driver.timeline_trace()
    finally:
        driver.shutdown()
    tasks = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert any(e["pid"] == node and e["name"] == "zeros" for e in tasks), tasks
