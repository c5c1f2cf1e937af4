"""Three hosts (network namespaces on a bridge) running a cluster started with the CLI.

The head runs on host 0 and a node on each of hosts 1 and 2 (one worker each);
drivers run on any host. Used by the tests of whole clusters on separate hosts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import wait_until

from tools import netns

TOKEN = "h" * 64
TIMEOUT = 90
GiB = 1 << 30

class ThreeHosts:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hosts = netns.Hosts(3)
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self.head = self._start(0, "--head", "--host", self.hosts.addresses[0], "--port",
                                    "0", "--num-workers", "1")
            self.node1 = self._start(1, "--address", self.head, "--num-workers", "1")
            self.node2 = self._start(2, "--address", self.head, "--num-workers", "1")
        except BaseException:
            self.close()
            raise

    def env(self, host: int) -> dict[str, str]:
        return {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN,
                "SHAREDCOMPUTE_HOME": str(self.tmp / f"host{host}")}

    def _start(self, host: int, *args: str) -> str:
        role = "head" if "--head" in args else "node"
        proc = self.hosts.popen(host, [sys.executable, "-m", "sharedcompute.cli", "start",
                                       *args, "--block"], env=self.env(host),
                                stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        written = self.tmp / f"host{host}" / f"{role}.address"
        wait_until(lambda: written.exists() or proc.poll() is not None, TIMEOUT, f"{role} up")
        assert proc.poll() is None, f"the {role} on host {host} exited with {proc.returncode}"
        said = written.read_text().split()
        return said[0] if role == "head" else said[1]  # "ADDRESS" / "node ID of ADDRESS"

    def driver(self, host: int, script: str) -> dict[str, object]:
        env = {**self.env(host), "SHAREDCOMPUTE_ADDRESS": self.head}
        done = self.hosts.run(host, [sys.executable, "-c", textwrap.dedent(script)],
                              capture_output=True, text=True, timeout=TIMEOUT * 2, env=env)
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def private_driver(self, host: int, tree: Path, workdir: str, *argv: str,
                       check: bool = True) -> dict[str, object]:
        """Run ``python *argv`` in ``tree/workdir`` as a driver whose files no other host sees.

        In a mount namespace of its own, ``tree`` is copied onto a tmpfs mounted over an
        empty directory: the nodes (same machine, other namespaces) find that directory
        empty, as a real second host would lack the driver's code.
        """
        private = self.tmp / "private"
        private.mkdir(exist_ok=True)
        shell = ('mount -t tmpfs -o size=256m sc-private "$1" && cp -a "$2"/. "$1"/ && '
                 'cd "$1/$3" && shift 3 && exec "$@"')
        env = {**self.env(host), "SHAREDCOMPUTE_ADDRESS": self.head}
        done = self.hosts.run(
            host, ["unshare", "--mount", "--propagation", "private", "bash", "-c", shell,
                   "bash", str(private), str(tree), workdir, sys.executable, *argv],
            capture_output=True, text=True, timeout=TIMEOUT * 2, env=env,
        )
        if check:
            assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def driver_popen(self, host: int, script: str) -> subprocess.Popen[str]:
        env = {**self.env(host), "SHAREDCOMPUTE_ADDRESS": self.head}
        proc = self.hosts.popen(host, [sys.executable, "-c", textwrap.dedent(script)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        self.procs.append(proc)
        return proc

    def alive(self, node_id: int) -> bool:
        done = self.hosts.run(0, [sys.executable, "-m", "sharedcompute.cli", "status",
                                  "--address", self.head, "--json"],
                              capture_output=True, text=True, timeout=TIMEOUT, env=self.env(0))
        nodes = json.loads(done.stdout)["nodes"]
        return bool(next(n["alive"] for n in nodes if n["node_id"] == node_id))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self.hosts.close()


@pytest.fixture
def three_hosts(tmp_path: Path) -> Iterator[ThreeHosts]:
    made = ThreeHosts(tmp_path)
    try:
        yield made
    finally:
        made.close()
