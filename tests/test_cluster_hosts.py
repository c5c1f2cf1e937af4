"""A cluster on three hosts: network namespaces on a bridge, each with its own address.

The head runs on host 0, a node on each of hosts 1 and 2, and a driver on host 1
(not the head's host). Started with the ``sharedcompute`` command, as on real hosts.
Skipped, saying why, where namespaces cannot be made (not root)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import wait_until
from _hosts import TIMEOUT, GiB

from tools import netns

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=f"no network namespaces here: {netns.available()}")


@pytest.mark.timeout(400)
def test_three_hosts_run_dependent_tasks_actors_and_move_a_gib_node_to_node(three_hosts) -> None:
    node1, node2 = int(three_hosts.node1), int(three_hosts.node2)
    head_traffic = three_hosts.hosts.traffic(0)
    said = three_hosts.driver(1, f"""
        import json, socket
        import numpy as np
        import sharedcompute as sc

        sc.init()

        @sc.remote
        def host():
            return socket.gethostbyname(socket.gethostname()), sorted(
                a for a in __import__("psutil").net_if_addrs() if a != "lo")

        @sc.remote
        def big(n):
            return np.full(n, 3, dtype=np.uint8)

        @sc.remote
        def checksum(a):
            return int(a[::4096].sum()), a.nbytes

        @sc.remote
        def step(x, i):
            return x * 2 + i

        x = sc.put(1)
        for i in range(9):
            x = step.options(node=[0, {node1}, {node2}][i % 3]).submit(x, i)
        @sc.remote
        class Tally:
            def __init__(self):
                self.total = 0

            def add(self, part):
                self.total += int(part.sum())
                return self.total

        @sc.remote
        def feed(tally, n):  # on host 1: calls an actor on host 2 with an array made here
            return tally.add.remote(np.full(n, 2, dtype=np.int64)).result()

        tally = Tally.options(node={node2}).remote()
        fed = [feed.options(node={node1}).submit(tally, 100_000) for _ in range(3)]
        sc.wait(fed, timeout=120)
        made = big.options(node={node1}).submit({GiB})
        summed = checksum.options(node={node2}).submit(made)
        total, nbytes = summed.result(300)
        print(json.dumps({{
            "tally": tally.add.remote(np.zeros(1, dtype=np.int64)).result(60),
            "chain": x.result(60), "checksum": total, "nbytes": nbytes,
            "nodes": [(n["node_id"], n["address"], n["alive"]) for n in sc.nodes()],
        }}))
    """)
    expected = 1
    for i in range(9):
        expected = expected * 2 + i
    assert said["chain"] == expected
    assert said["tally"] == 3 * 2 * 100_000  # an actor on host 2, fed by tasks on host 1
    assert said["nbytes"] == GiB and said["checksum"] == 3 * (GiB // 4096)
    addresses = three_hosts.hosts.addresses
    assert [tuple(n) for n in said["nodes"]] == [  # type: ignore[union-attr]
        (0, three_hosts.head, True), (node1, addresses[1], True), (node2, addresses[2], True),
    ]
    # The gibibyte went from host 1 to host 2 directly: the head's host saw little of it.
    assert three_hosts.hosts.traffic(0) - head_traffic < GiB // 20


@pytest.mark.timeout(300)
def test_a_host_killed_mid_workload_is_dead_within_the_timeout_and_its_work_reruns(
    three_hosts,
) -> None:
    node2 = int(three_hosts.node2)
    ready = three_hosts.tmp / "submitted"
    driver = three_hosts.driver_popen(1, f"""
        import json, time
        import sharedcompute as sc

        sc.init()

        @sc.remote
        def slow(i):
            time.sleep(1.0)
            return i

        futures = [slow.submit(i) for i in range(12)]
        time.sleep(0.5)  # running on every node now
        open("{ready}", "w").close()
        print(json.dumps({{"results": sc.get(futures, timeout=120)}}))
    """)
    wait_until(lambda: ready.exists() or driver.poll() is not None, TIMEOUT, "tasks running")
    three_hosts.hosts.kill_all(2)  # the host is gone: its node and workers, at once
    killed = time.monotonic()
    wait_until(lambda: not three_hosts.alive(node2), TIMEOUT, "host 2 declared dead")
    assert time.monotonic() - killed <= 5.0
    out, err = driver.communicate(timeout=TIMEOUT * 2)
    assert driver.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["results"] == list(range(12))


def test_the_cluster_benchmark_runs_between_namespace_hosts() -> None:
    script = Path(__file__).resolve().parent.parent / "tools" / "bench" / "cluster.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", "--no-peers",
                           "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for row in report["transfer"].values():
        assert row["raw"] > 0 and row["pull"] > 0 and row["cold"] > 0
    ours = report["tasks"]["sharedcompute"]
    assert ours["latency"] > 0 and ours["throughput"] > 0
