"""Drivers that connect to a head: ``sharedcompute.init(address=...)`` from other processes.

Each driver has its own keys and its own store (its puts stay there until a task's
node pulls them); one driver's exit frees its own work only; a head that goes away
fails a driver's pending Futures instead of leaving them hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _cluster import TIMEOUT, TOKEN, Cluster
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute._cluster import ClusterClient
from sharedcompute._runtime._base import TaskOptions

MiB = 1024 * 1024


def run_driver(cluster: Cluster, script: str, **env: str) -> dict[str, object]:
    """Run ``script`` as a driver process of the cluster; return the JSON it prints last."""
    environment = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN,
                   "SHAREDCOMPUTE_ADDRESS": cluster.head.address, **env}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
        timeout=TIMEOUT, env=environment,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_driver_process_submits_puts_and_reads_results_across_nodes(cluster: Cluster) -> None:
    node = cluster.add_node(workers=2)
    said = run_driver(cluster, f"""
        import json, os
        import numpy as np
        import sharedcompute as sc

        sc.init()  # SHAREDCOMPUTE_ADDRESS

        @sc.remote
        def total(a):
            return float(a.sum())

        @sc.remote
        def ones(n):
            return np.ones(n)

        @sc.remote
        def chain(n):
            return sum(sc.get([ones.submit(100 + i) for i in range(n)])[k].sum() for k in range(n))

        data = sc.put(np.arange(4 * 1024 * 1024, dtype=np.float64))  # 32 MiB, here
        on_node = total.options(node={node}).submit(data).result(60)
        on_head = total.options(node=0).submit(data).result(60)
        made = ones.options(node={node}).submit(1024 * 1024).result(60)  # pulled here
        print(json.dumps({{
            "on_node": on_node, "on_head": on_head, "made": float(made.sum()),
            "chain": float(chain.submit(3).result(60)),
            "nodes": [n["node_id"] for n in sc.nodes()],
            "cpus": sc.cluster_resources()["CPU"],
            "many": sum(sc.get(sc.map(abs, range(-500, 0)), timeout=60)),
        }}))
    """)
    n = 4 * MiB
    assert said["on_node"] == said["on_head"] == n * (n - 1) / 2
    assert said["made"] == MiB
    assert said["chain"] == 100 + 101 + 102
    assert said["nodes"] == [0, node]
    assert said["cpus"] == 3.0
    assert said["many"] == sum(range(1, 501))
    # The driver has gone: everything it held is free, on every node.
    wait_until(lambda: cluster.head.runtime.core.counts()["finished"] == 0, TIMEOUT, "freed")
    wait_until(lambda: cluster.node(node)["store_used"] == 0, TIMEOUT, "the node frees it all")
    assert cluster.head.runtime.store.stats()["num_objects"] == 0


def test_a_driver_process_streams_a_generator_on_a_node(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)
    said = run_driver(cluster, f"""
        import json
        import numpy as np
        import sharedcompute as sc

        sc.init()  # SHAREDCOMPUTE_ADDRESS

        @sc.remote
        def filled(n):
            for i in range(n):
                yield np.full(1024 * 1024, i)  # 8 MiB each, on the node

        @sc.remote
        def endless():
            i = 0
            while True:
                yield i
                i += 1

        @sc.remote
        def total(a):
            return float(a.sum())

        stream = filled.options(node={node}, generator_backpressure=2).submit(4)
        futures = list(stream)
        firsts = [int(f.result(60)[0]) for f in futures]
        summed = total.options(node=0).submit(futures[3]).result(60)
        count = stream.task.result(60)
        broken = []
        for f in filled.options(node={node}).submit(-1):  # range(-1): none
            broken.append(f.result(60))
        forever = endless.options(node={node}).submit()
        taken = [forever.next(timeout=60).result(60) for _ in range(3)]
        task = forever.task
        del forever
        @sc.remote
        class Counter:
            def upto(self, n):
                yield from range(n)

        counter = Counter.options(node={node}).remote()
        counted = [f.result(60) for f in counter.upto.remote(3)]
        print(json.dumps({{"firsts": firsts, "summed": summed, "count": count,
                          "none": broken, "taken": taken, "stopped": task.result(60) >= 3,
                          "actor": counted}}))
    """)
    assert said == {"firsts": [0, 1, 2, 3], "summed": 3.0 * MiB, "count": 4, "none": [],
                    "taken": [0, 1, 2], "stopped": True, "actor": [0, 1, 2]}
    wait_until(lambda: cluster.node(node)["store_used"] == 0, TIMEOUT, "the node frees it all")


def test_two_drivers_keep_their_own_keys_and_one_leaving_frees_only_its_own(
    cluster: Cluster,
) -> None:
    cluster.add_node(workers=1)
    client = ClusterClient(cluster.head.address, TOKEN)
    try:
        mine = client.put(np.ones(MiB))
        kept = client.submit(np.sum, (mine,), {}, TaskOptions())
        # Another driver, at the same time, with keys that would collide were they not its own.
        said = run_driver(cluster, """
            import json
            import sharedcompute as sc
            sc.init()
            futures = [sc.submit(pow, i, 2) for i in range(300)]
            print(json.dumps({"sum": sum(sc.get(futures, timeout=60))}))
        """)
        assert said["sum"] == sum(i * i for i in range(300))
        assert kept.result(TIMEOUT) == MiB
        np.testing.assert_array_equal(mine.result(TIMEOUT), np.ones(MiB))
        assert client.submit(np.sum, (mine,), {}, TaskOptions()).result(TIMEOUT) == MiB
    finally:
        client.shutdown()


def test_a_driver_whose_head_dies_sees_its_pending_futures_fail(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "SHAREDCOMPUTE_HOME": str(home), "SHAREDCOMPUTE_TOKEN": TOKEN}
    head = subprocess.Popen(
        [sys.executable, "-m", "sharedcompute.cli", "start", "--head", "--port", "0",
         "--num-workers", "1", "--block"], env=env, stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: (home / "head.address").exists(), TIMEOUT, "the head starts")
        os.environ["SHAREDCOMPUTE_HOME"] = str(home)
        os.environ["SHAREDCOMPUTE_TOKEN"] = TOKEN
        try:
            client = sc.init(address="auto")
        finally:
            del os.environ["SHAREDCOMPUTE_HOME"], os.environ["SHAREDCOMPUTE_TOKEN"]
        try:
            assert isinstance(client, ClusterClient)
            assert sc.submit(abs, -3).result(TIMEOUT) == 3
            pending = sc.submit(time.sleep, 60)
            head.kill()
            with pytest.raises(ConnectionError, match=r"the head at .* is gone"):
                pending.result(TIMEOUT)
            with pytest.raises(ConnectionError, match="is gone"):
                sc.submit(abs, -1)
        finally:
            sc.shutdown()
    finally:
        head.kill()
        head.wait(TIMEOUT)
    # The head's workers follow it (their pipe to it closes).
    wait_until(lambda: not _children_of(head.pid), TIMEOUT, "the head's workers exit")


def test_a_wrong_token_is_refused_naming_the_address(cluster: Cluster) -> None:
    with pytest.raises(sc.errors.AuthenticationError, match=cluster.head.address.split(":")[1]):
        ClusterClient(cluster.head.address, "w" * 64)
    assert sc.submit(abs, -2).result(TIMEOUT) == 2  # the head serves its own driver meanwhile


def _children_of(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == pid]


def test_a_driver_process_creates_names_calls_and_kills_actors(cluster: Cluster) -> None:
    node = cluster.add_node(workers=1)
    said = run_driver(cluster, f"""
        import json
        import sharedcompute as sc

        sc.init()

        @sc.remote
        class Counter:
            def __init__(self, start):
                self.value = start

            def add(self, amount):
                self.value += amount
                return self.value

        pinned = Counter.options(node={node}).remote(sc.put(10))
        named = Counter.options(name="shared").remote(0)
        try:
            Counter.options(name="shared").remote(0)
            taken = "no error"
        except ValueError as error:
            taken = str(error)

        def use(handle, amount):
            return handle.add.remote(amount).result()

        out = {{
            "pinned": [pinned.add.remote(1).result(60) for _ in range(3)],
            "named": sc.get_actor("shared").add.remote(5).result(60),
            "via_task": sc.submit(use, pinned, 100).result(60),
            "taken": taken,
        }}
        sc.kill(named)
        try:
            named.add.remote(1).result(60)
            out["killed"] = "still alive"
        except sc.errors.ActorDiedError:
            out["killed"] = "ActorDiedError"
        print(json.dumps(out))
    """)
    assert said["pinned"] == [11, 12, 13]
    assert said["named"] == 5
    assert said["via_task"] == 113
    assert "already exists" in str(said["taken"])
    assert said["killed"] == "ActorDiedError"
    # The driver left: its actors end with its handles.
    records = cluster.head.runtime.actors._actor_records.values()
    wait_until(lambda: all(r.dead for r in records), TIMEOUT, "the driver's actors end")


def test_a_driver_reads_a_result_made_again_after_its_node_died(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.add_node(workers=2)  # the most CPUs free: the task goes there
    ready, go = tmp_path / "ready", tmp_path / "go"
    environment = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN,
                   "SHAREDCOMPUTE_ADDRESS": cluster.head.address}
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, os, time
        import numpy as np
        import sharedcompute as sc

        sc.init()
        made = sc.submit(np.ones, {MiB})
        sc.wait([made], timeout=60)
        open({str(ready)!r}, "w").write(str(made.ref.node))
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        print(json.dumps({{"sum": float(made.result(60).sum())}}))
    """)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ready.exists() or driver.poll() is not None, TIMEOUT, "made")
        assert ready.read_text() == str(node)
        cluster.nodes[node].kill()
        wait_until(lambda: not cluster.node(node)["alive"], TIMEOUT, "the node is dead")
        go.touch()
        out, err = driver.communicate(timeout=TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["sum"] == MiB


def test_a_driver_whose_head_stops_answering_fails_within_the_node_timeout(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "SHAREDCOMPUTE_HOME": str(home), "SHAREDCOMPUTE_TOKEN": TOKEN}
    head = subprocess.Popen(
        [sys.executable, "-m", "sharedcompute.cli", "start", "--head", "--port", "0",
         "--num-workers", "1", "--node-timeout", "2", "--block"],
        env=env, stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: (home / "head.address").exists(), TIMEOUT, "the head starts")
        address = (home / "head.address").read_text().strip()
        client = ClusterClient(address, TOKEN)
        try:
            pending = client.submit(time.sleep, (60,), {}, TaskOptions())
            head.send_signal(signal.SIGSTOP)  # alive, connections open, silent
            stopped = time.monotonic()
            with pytest.raises(ConnectionError, match="silent for 2 s"):
                pending.result(TIMEOUT)
            assert time.monotonic() - stopped < 2 + 3
        finally:
            client.shutdown()
    finally:
        head.send_signal(signal.SIGCONT)
        head.kill()
        head.wait(TIMEOUT)
    wait_until(lambda: not _children_of(head.pid), TIMEOUT, "the head's workers exit")


def test_an_executor_and_dask_run_on_a_cluster(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.add_node(workers=2)
    monkeypatch.setenv("SHAREDCOMPUTE_TOKEN", TOKEN)
    with sc.Executor(address=cluster.head.address) as executor:
        assert list(executor.map(pow, range(20), [2] * 20)) == [i * i for i in range(20)]
        assert executor.submit(sum, [1, 2, 3]).result(TIMEOUT) == 6
    import dask
    import dask.array as da

    import sharedcompute.dask  # noqa: F401 (registers the "sharedcompute" scheduler)

    client = ClusterClient(cluster.head.address, TOKEN)
    try:
        with client:
            x = da.ones((400, 400), chunks=(100, 100))
            total = (x + x.T).sum().compute(scheduler=sc.dask.get)
            assert total == 2 * 400 * 400
            with dask.config.set(scheduler="sharedcompute"):
                assert (x * 3).mean().compute() == 3.0
    finally:
        client.shutdown()
