"""A head in the test's process and nodes as real processes, on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import wait_until

from sharedcompute._cluster._head import Head
from sharedcompute._runtime import _context

TOKEN = "c" * 64  # the cluster token of these tests
TIMEOUT = 60
MiB = 1024 * 1024


def start_node(
    home: Path, head_address: str, workers: int = 2, resources: str = "{}"
) -> tuple[int, subprocess.Popen[bytes]]:
    """A node process (``sharedcompute start --address``) joined to the head: its id and
    process, once the head schedules on its workers. ``home`` is the node's own."""
    env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN, "SHAREDCOMPUTE_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedcompute.cli", "start", "--address",
         head_address, "--block", "--num-workers", str(workers),
         "--resources", resources, "--store-capacity", str(256 * MiB)],
        env=env, stdout=subprocess.DEVNULL,
    )
    try:
        # Written once the node is up and the head schedules on its workers.
        address_file = home / "node.address"
        wait_until(lambda: address_file.exists() or proc.poll() is not None, TIMEOUT,
                   "the node joins")
        assert proc.poll() is None, f"the node exited with {proc.returncode} before it joined"
        return int(address_file.read_text().split()[1]), proc
    except BaseException:
        stop_processes([proc])
        raise


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (they close as they would on a user's stop), then wait; kill what lingers."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)


class Cluster:
    def __init__(self, home: Path, node_timeout: float) -> None:
        self.home = home
        self.head = Head(TOKEN, port=0, num_workers=1, store_capacity=256 * MiB,
                         node_timeout=node_timeout)
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}

    def add_node(self, workers: int = 2, resources: str = "{}") -> int:
        node_id, proc = start_node(
            self.home / f"node{len(self.nodes)}", self.head.address, workers, resources
        )
        self.nodes[node_id] = proc
        return node_id

    def node(self, node_id: int) -> dict[str, object]:
        return next(n.as_dict() for n in self.head.status().nodes if n.node_id == node_id)

    def close(self) -> None:
        stop_processes(list(self.nodes.values()))
        self.head.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path, node_timeout=2.0)
    previous = _context.default()
    _context.set_default(made.head.runtime)
    try:
        yield made
    finally:
        _context.set_default(previous)
        made.close()


