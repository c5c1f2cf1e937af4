"""Simulated hosts on one machine: network namespaces joined by veth pairs to a bridge.

::

    root namespace:   bridge scbr<tag> ── sc<tag>0h ── sc<tag>1h ── ...
                                              │            │
    namespaces:       sc-<tag>-0: sc<tag>0n 10.231.X.10   sc-<tag>-1: sc<tag>1n 10.231.X.11

Each host has its own loopback and one private address on a subnet of its own
(``10.231.X.0/24``, X random; the machine itself is ``.1`` on the bridge, a client
outside every host), so processes in different namespaces talk over
real TCP through real network devices, as on separate hosts, and never reach
anything outside this machine. ``close`` kills every process left in the
namespaces and removes them, the veth pairs and the bridge. Needs root
(``available()`` says why not otherwise). Used by the cluster tests and
``tools/bench/cluster.py``.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

PREFIX = "sc-"  # every namespace made here starts with it (the leak check looks for it)


def available() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


def namespaces() -> set[str]:
    """The namespaces of this kind that exist now."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.startswith(PREFIX)}


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class Hosts:
    """``count`` hosts; ``addresses[i]`` is host i's address, ``popen(i, argv)`` runs there."""

    def __init__(self, count: int) -> None:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.tag = secrets.token_hex(2)
        subnet = random.randrange(1, 255)
        self.bridge = f"scbr{self.tag}"
        self.names = [f"{PREFIX}{self.tag}-{i}" for i in range(count)]
        self.devices = [f"sc{self.tag}{i}n" for i in range(count)]
        self.addresses = [f"10.231.{subnet}.{10 + i}" for i in range(count)]
        self.gateway = f"10.231.{subnet}.1"
        self._made: list[tuple[str, str]] = []  # ("netns"/"link", name), to remove
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            # The machine itself is on the bridge too (.1): a "laptop" outside the hosts.
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names):
                self._add_host(i, name)
        except BaseException:
            self.close()
            raise

    def _add_host(self, i: int, name: str) -> None:
        outside, inside = f"sc{self.tag}{i}h", self.devices[i]
        _ip("netns", "add", name)
        self._made.append(("netns", name))
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._made.append(("link", outside))
        _ip("link", "set", inside, "netns", name)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", name, "addr", "add", f"{self.addresses[i]}/24", "dev", inside)
        _ip("-n", name, "link", "set", inside, "up")
        _ip("-n", name, "link", "set", "lo", "up")

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *argv]

    def popen(self, host: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(
        self, host: int, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(host, argv), **kwargs)

    def traffic(self, host: int) -> int:
        """Bytes host ``host`` has received and sent on its network device so far."""
        total = 0
        for direction in ("rx_bytes", "tx_bytes"):
            done = self.run(host, ["cat", f"/sys/class/net/{self.devices[host]}/statistics/"
                                   f"{direction}"], capture_output=True, text=True)
            total += int(done.stdout.strip() or 0)
        return total

    def pids(self, host: int) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True,
                                text=True).stdout
        return [int(pid) for pid in listed.split()]

    def kill_all(self, host: int, timeout: float = 10.0) -> None:
        """SIGKILL every process in host ``host``: the host dies at once."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids(host)
            if not pids or time.monotonic() > deadline:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def close(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "netns":
                self.kill_all(self.names.index(name))
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self._made.clear()

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
