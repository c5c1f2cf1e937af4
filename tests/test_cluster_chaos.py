"""Chaos: a mixed workload on four namespace hosts while a killer takes nodes down at random.

The head runs on host 0, a node on each of hosts 1-3. A driver (this machine, a client on the
hosts' bridge) runs rounds of dependent tasks, 100 MiB and 8 MiB objects passed between tasks
and calls to an actor with unlimited restarts, while the killer, every ~2 s, SIGKILLs every
process of a random node host, or one worker of one, or takes a host's link down for a while;
a killed node starts again (a new incarnation, a new id). Every result must be right, every
Future must resolve exactly once, the cluster's CPUs must be back to full and every store empty
at the end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute._cluster import ClusterClient
from sharedcompute._runtime._base import TaskOptions
from tools import netns

TOKEN = "x" * 64
TIMEOUT = 90
CHAOS_SECONDS = 40.0
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=f"no network namespaces here: {netns.available()}")


class FourHosts:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hosts = netns.Hosts(4)
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.starts = 0
        try:
            self.head = self._start(0, "--head", "--host", self.hosts.addresses[0], "--port",
                                    "6380", "--num-workers", "1", "--node-timeout", "2")
            for host in (1, 2, 3):
                self.start_node(host)
        except BaseException:
            self.hosts.close()
            raise

    def env(self, name: str) -> dict[str, str]:
        # This module on the nodes' path: their workers load its functions by name.
        here = str(Path(__file__).resolve().parent)
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN, "PYTHONPATH": path,
                "SHAREDCOMPUTE_HOME": str(self.tmp / name)}

    def _start(self, host: int, *args: str) -> str:
        self.starts += 1
        name = f"start{self.starts}"
        proc = self.hosts.popen(host, [sys.executable, "-m", "sharedcompute.cli", "start",
                                       *args, "--block"], env=self.env(name),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        role = "head" if "--head" in args else "node"
        written = self.tmp / name / f"{role}.address"
        wait_until(lambda: written.exists() or proc.poll() is not None, TIMEOUT, f"{role} up")
        assert proc.poll() is None, f"the {role} on host {host} exited with {proc.returncode}"
        if role == "node":
            self.nodes[host] = proc
        return written.read_text().split()[0]

    def start_node(self, host: int) -> None:
        self._start(host, "--address", f"{self.hosts.addresses[0]}:6380", "--num-workers", "1")

    def close(self) -> None:
        self.hosts.close()


@pytest.fixture
def four_hosts(tmp_path: Path) -> Iterator[FourHosts]:
    made = FourHosts(tmp_path)
    try:
        yield made
    finally:
        made.close()


class Killer(threading.Thread):
    """Every ~2 s: kill a node host, or one of its workers, or cut its link for a while."""

    def __init__(self, cluster: FourHosts, seed: int) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.cluster = cluster
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.done: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.random.uniform(1.5, 2.5)):
                self.strike()
        except BaseException as error:  # reported by the test
            self.error = error

    def strike(self) -> None:
        hosts = self.cluster.hosts
        host = self.random.choice([1, 2, 3])
        kind = self.random.choice(["host", "worker", "link"])
        if kind == "host":
            hosts.kill_all(host)
            self.cluster.nodes[host].wait(TIMEOUT)
            self.cluster.start_node(host)
        elif kind == "worker":
            node = self.cluster.nodes[host]
            workers = [p for p in hosts.pids(host) if p != node.pid]
            if workers:
                os.kill(self.random.choice(workers), signal.SIGKILL)
        else:
            device = hosts.devices[host]
            hosts.run(host, ["ip", "link", "set", device, "down"], check=True)
            time.sleep(self.random.uniform(0.5, 3.0))
            hosts.run(host, ["ip", "link", "set", device, "up"], check=True)
            node = self.cluster.nodes[host]
            try:  # a node that lost its head stops; one that stayed (a short cut) goes on
                node.wait(8)
            except subprocess.TimeoutExpired:
                self.done.append(f"{kind} {host} (kept)")
                return
            self.cluster.start_node(host)
        self.done.append(f"{kind} {host}")


@sc.remote
class Doubler:
    def twice(self, x: int) -> int:
        return 2 * x


def step(x: int, i: int) -> int:
    return x * 3 + i


def blob(seed: int, mib: int) -> np.ndarray:
    return np.full(mib * MiB // 8, seed, dtype=np.float64)  # in the store, pulled between nodes


def weigh(a: np.ndarray) -> float:
    return float(a[::16384].sum())


@pytest.mark.timeout(300)
def test_a_mixed_workload_survives_nodes_killed_at_random(four_hosts: FourHosts) -> None:
    client = ClusterClient(four_hosts.head, TOKEN)
    retries = TaskOptions(max_retries=50)
    killer = Killer(four_hosts, seed=int(time.time()))
    settled: dict[int, int] = {}
    lock = threading.Lock()

    def count(future: sc.Future[object]) -> None:
        with lock:
            settled[future.key] = settled.get(future.key, 0) + 1

    try:
        with client:
            doubler = Doubler.options(num_cpus=1, max_restarts=-1, max_task_retries=-1).remote()
            killer.start()
            rounds = 0
            deadline = time.monotonic() + CHAOS_SECONDS
            keys: set[int] = set()  # (not the Futures: their values must be freed as we go)
            while time.monotonic() < deadline:
                x = client.submit(step, (1, 0), {}, retries)
                for i in range(1, 6):
                    x = client.submit(step, (x, i), {}, retries)
                sizes = (100, 8, 8)  # MiB
                blobs = [client.submit(blob, (rounds + k, sizes[k]), {}, retries)
                         for k in range(3)]
                weights = [client.submit(weigh, (b,), {}, retries) for b in blobs]
                doubled = [doubler.twice.remote(rounds * 10 + k) for k in range(4)]
                for future in (x, *blobs, *weights, *doubled):
                    future.add_done_callback(count)
                    keys.add(future.key)
                expected = 1
                for i in range(6):
                    expected = expected * 3 + i
                assert x.result(TIMEOUT) == expected
                assert [w.result(TIMEOUT) for w in weights] == [
                    float((rounds + k) * (sizes[k] * MiB // 8 // 16384)) for k in range(3)
                ]
                assert [d.result(TIMEOUT) for d in doubled] == [
                    2 * (rounds * 10 + k) for k in range(4)
                ]
                rounds += 1
            killer.stop.set()
            killer.join(TIMEOUT)
            assert killer.error is None, killer.error
            assert killer.done, "the killer struck nothing"
            del x, blobs, weights, doubled
            wait_until(lambda: len(settled) == len(keys), TIMEOUT, "every Future's callback")
            assert set(settled.values()) == {1}, "a Future resolved more than once"
            full = 1.0 + 3 * 1.0
            wait_until(lambda: client.cluster_resources().get("CPU") == full, TIMEOUT,
                       "the cluster's CPUs back to full")
            # Nothing is left in any store once the Futures are gone (heartbeats report it).
            wait_until(lambda: [n["store_used"] for n in client.node_table() if n["alive"]]
                       == [0, 0, 0, 0], TIMEOUT, "every store empty")
            print(f"{rounds} rounds under chaos: {killer.done}")
            assert rounds >= 3
    finally:
        killer.stop.set()
        client.shutdown()
