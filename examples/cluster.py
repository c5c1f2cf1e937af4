"""Run work on a sharedcompute cluster.

    sharedcompute start --head --host HEAD_IP        # on the head's host
    sharedcompute start --address HEAD_IP:6380       # on each other host (with the head's token)
    python examples/cluster.py HEAD_IP:6380          # from any host that reaches the head

Without an address, this starts a head and one node on this host (in a temporary home, on
loopback), runs the same work on them, and stops them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np

import sharedcompute as sc


@sc.remote
def block_stats(data: np.ndarray, start: int, stop: int) -> tuple[str, float]:
    """Sum of squares of one slice of a big array that lives in the driver's store."""
    part = data[start:stop]
    return f"{socket.gethostname()}:{os.getpid()}", float(np.dot(part, part))


def work(address: str) -> None:
    sc.init(address=address)
    try:
        alive = [n for n in sc.nodes() if n["alive"]]
        print(f"nodes: {len(alive)} alive, {sc.cluster_resources()['CPU']:g} CPUs in all")
        data = np.arange(8_000_000, dtype=np.float64)  # 64 MB: put once, pulled by each node once
        stored = sc.put(data)
        bounds = np.linspace(0, len(data), 17, dtype=int)
        parts = [block_stats.submit(stored, int(a), int(b)) for a, b in pairwise(bounds)]
        results = sc.get(parts, timeout=300)
        total = sum(value for _, value in results)
        expected = float(np.dot(data, data))
        print(f"sum of squares over 16 tasks: {total:.6e} (expected {expected:.6e})")
        print(f"tasks per worker: {sorted(Counter(where for where, _ in results).values())}")
        last = alive[-1]["node_id"]
        where, _ = block_stats.options(node=last).submit(stored, 0, 10).result(60)
        print(f"a task pinned to node {last} ran in worker {where}")
    finally:
        sc.shutdown()


def on_this_host() -> None:
    """Start a head and a node here, run ``work`` on them, stop them."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SHAREDCOMPUTE_HOME": home}
        env.pop("SHAREDCOMPUTE_TOKEN", None)
        env.pop("SHAREDCOMPUTE_TOKEN_FILE", None)
        command = [sys.executable, "-m", "sharedcompute.cli"]

        def run(*args: str) -> None:
            subprocess.run([*command, *args], env=env, check=True, stdout=subprocess.DEVNULL)

        run("start", "--head", "--port", "0", "--num-workers", "1")
        try:
            address = Path(home, "head.address").read_text().strip()
            node_home = Path(home, "node-host")  # a second "host": its own home, same token
            node_home.mkdir()
            (node_home / "token").write_text(Path(home, "token").read_text())
            os.chmod(node_home / "token", 0o600)
            subprocess.run([*command, "start", "--address", address, "--num-workers", "2"],
                           env={**env, "SHAREDCOMPUTE_HOME": str(node_home)}, check=True,
                           stdout=subprocess.DEVNULL)
            os.environ["SHAREDCOMPUTE_HOME"] = home  # where the driver finds the token
            try:
                work(address)
            finally:
                subprocess.run([*command, "stop"], env={**env, "SHAREDCOMPUTE_HOME":
                                                        str(node_home)}, stdout=subprocess.DEVNULL)
        finally:
            run("stop")
            time.sleep(0.1)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        work(sys.argv[1])
    else:
        on_this_host()
