"""Tasks across nodes on loopback: a head (in this process, its runtime the driver) and
nodes started as real processes with ``sharedcompute start --address --block``.

Results stay on the node that made them; a task whose input lives on another node
pulls it there first; a node's death sends its tasks elsewhere."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import psutil
import pytest
from _cluster import TIMEOUT, Cluster
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute.errors import WorkerCrashedError

MiB = 1024 * 1024


@sc.remote
def pid() -> int:
    return os.getpid()


@sc.remote
def ones(n: int) -> np.ndarray:
    return np.ones(n)


@sc.remote
def total(a: np.ndarray) -> tuple[int, float]:
    return os.getpid(), float(a.sum())


def test_tasks_pinned_to_a_node_run_there_and_inputs_cross_both_ways(cluster: Cluster) -> None:
    node = cluster.add_node(workers=2)
    head_pids = set(cluster.head.runtime.worker_pids())
    assert pid.options(node=0).submit().result(TIMEOUT) in head_pids
    assert pid.options(node=node).submit().result(TIMEOUT) not in head_pids
    made_there = ones.options(node=node).submit(MiB)  # 8 MiB: in the node's store
    summed_here = total.options(node=0).submit(made_there)
    where, value = summed_here.result(TIMEOUT)
    assert where in head_pids and value == MiB
    made_here = ones.options(node=0).submit(2 * MiB)
    where, value = total.options(node=node).submit(made_here).result(TIMEOUT)
    assert where not in head_pids and value == 2 * MiB
    # The driver (on the head) reads a node's result: a copy is pulled here.
    np.testing.assert_array_equal(made_there.result(TIMEOUT), np.ones(MiB))


@sc.remote
def filled(n: int) -> Any:
    for i in range(n):
        yield np.full(MiB, i)  # 8 MiB: in its node's store


def test_a_generator_on_a_node_streams_its_items_to_the_driver(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)
    stream = filled.options(node=node).submit(3)
    futures = list(stream)
    assert [int(f.result(TIMEOUT)[0]) for f in futures] == [0, 1, 2]
    _, value = total.options(node=0).submit(futures[2]).result(TIMEOUT)
    assert value == 2 * MiB
    assert stream.task.result(TIMEOUT) == 3
    del futures, stream
    wait_until(lambda: cluster.node(node)["store_used"] == 0, TIMEOUT, "node frees the items")


def test_a_result_stays_on_its_node_until_nobody_needs_it(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)
    head_store = cluster.head.runtime.store
    made = ones.options(node=node).submit(4 * MiB)  # 32 MiB
    sc.wait([made], timeout=TIMEOUT)
    assert head_store.stats()["num_objects"] == 0  # the value did not come to the head
    wait_until(lambda: cluster.node(node)["store_used"] >= 32 * MiB, TIMEOUT, "node holds it")
    del made
    wait_until(lambda: cluster.node(node)["store_used"] == 0, TIMEOUT, "node frees it")
    assert head_store.stats()["num_objects"] == 0


def test_nested_tasks_submitted_on_a_node(cluster: Cluster) -> None:
    node = cluster.add_node(workers=2)

    def fan_out(n: int) -> float:
        futures = [ones.submit(1000 + i) for i in range(n)]
        return sum(float(f.result().sum()) for f in futures)

    assert sc.submit(fan_out, 6).result(TIMEOUT) == sum(1000 + i for i in range(6))
    fan = sc.remote(fan_out)
    assert fan.options(node=node).submit(4).result(TIMEOUT) == sum(1000 + i for i in range(4))


def test_an_error_on_a_node_keeps_its_type_and_remote_traceback(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)

    def fail() -> None:
        raise KeyError("on the node")

    future = sc.remote(fail).options(node=node).submit()
    with pytest.raises(KeyError, match="on the node") as caught:
        future.result(TIMEOUT)
    assert "fail" in str(caught.value.__cause__)


def test_a_task_pinned_to_an_unknown_node_fails_naming_it(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="pinned to node 42, which is not alive"):
        pid.options(node=42).submit().result(TIMEOUT)
    with pytest.raises(TypeError, match="node must be a node id"):
        pid.options(node="1")


def test_a_worker_crash_on_a_node_is_charged_and_its_worker_replaced(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)

    def crash() -> None:
        os._exit(7)

    future = sc.remote(crash).options(node=node, max_retries=0).submit()
    with pytest.raises(WorkerCrashedError, match="7"):
        future.result(TIMEOUT)
    assert pid.options(node=node).submit().result(TIMEOUT) not in (
        cluster.head.runtime.worker_pids()
    )


def test_a_killed_node_is_declared_dead_and_its_tasks_finish_elsewhere(cluster: Cluster) -> None:
    node = cluster.add_node(workers=2)
    proc = cluster.nodes[node]

    def slow(i: int) -> tuple[int, int]:
        time.sleep(0.5)
        return i, os.getpid()

    futures = [sc.submit(slow, i) for i in range(8)]
    node_pids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    wait_until(lambda: cluster.head.runtime.core.counts()["running"] >= 2, TIMEOUT, "running")
    killed_at = time.monotonic()
    for victim in [proc.pid, *node_pids]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not cluster.node(node)["alive"], TIMEOUT, "the node is dead")
    assert time.monotonic() - killed_at <= 5.0
    results = [f.result(TIMEOUT) for f in futures]
    assert [i for i, _ in results] == list(range(8))
    late = [where for _, where in results[-2:]]
    assert all(where in cluster.head.runtime.worker_pids() for where in late)


@sc.remote
class Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    def add(self, amount: int) -> tuple[int, int]:
        self.value += amount
        return self.value, os.getpid()


def test_an_actor_pinned_to_a_node_runs_there_restarts_there_and_takes_handles(
    cluster: Cluster,
) -> None:
    node = cluster.add_node(workers=1)
    head_pids = set(cluster.head.runtime.worker_pids())
    counter = Counter.options(node=node, max_restarts=1).remote(10)
    values = [counter.add.remote(1).result(TIMEOUT) for _ in range(3)]
    assert [v for v, _ in values] == [11, 12, 13]
    first_pid = values[0][1]
    assert first_pid not in head_pids

    def use(handle: object, amount: int) -> int:
        return handle.add.remote(amount).result()[0]  # type: ignore[attr-defined]

    assert sc.submit(use, counter, 100).result(TIMEOUT) == 113  # a handle passed to a task
    sc.kill(counter, no_restart=False)
    value, pid = counter.add.remote(1).result(TIMEOUT)  # a fresh process, on that node again
    assert value == 11 and pid != first_pid and pid not in head_pids
    with pytest.raises(ValueError, match="pinned to node 77, which is not alive"):
        Counter.options(node=77).remote(0)


def test_an_actor_whose_node_dies_restarts_on_a_live_node(cluster: Cluster) -> None:
    node = cluster.add_node(workers=2)  # the most CPUs free: an actor holding one goes there
    # A call sent while the head is still learning of the death dies with the old process;
    # max_task_retries=1 sends it again, to the restarted actor, as in Ray.
    counter = Counter.options(num_cpus=1, max_restarts=1, max_task_retries=1).remote(0)
    value, pid = counter.add.remote(1).result(TIMEOUT)
    assert value == 1 and psutil.Process(pid).ppid() != os.getpid()  # not the head's child
    proc = cluster.nodes[node]
    proc.kill()
    proc.wait(TIMEOUT)
    wait_until(lambda: not cluster.node(node)["alive"], TIMEOUT, "the node is dead")
    value, pid = counter.add.remote(5).result(TIMEOUT)  # restarted, fresh, on the head's node
    assert value == 5 and psutil.Process(pid).ppid() == os.getpid()


def test_a_result_lost_with_its_node_is_made_again_from_its_task(cluster: Cluster) -> None:
    node = cluster.add_node(workers=2)  # the most CPUs free: the task goes there
    made = ones.submit(MiB)
    sc.wait([made], timeout=TIMEOUT)
    assert made.ref.node == node  # the value lives there only (not read here yet)
    proc = cluster.nodes[node]
    proc.kill()
    proc.wait(TIMEOUT)
    wait_until(lambda: not cluster.node(node)["alive"], TIMEOUT, "the node is dead")
    np.testing.assert_array_equal(made.result(TIMEOUT), np.ones(MiB))  # made again, here
    assert total.submit(made).result(TIMEOUT)[1] == MiB
