"""TLS under every cluster connection: a head and a node started with --tls-cert/--tls-key/
--tls-ca, a driver with the same files; a peer without TLS (or with a certificate the
cluster's CA did not sign) is refused, and the token is still asked inside TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _cluster import TIMEOUT, TOKEN
from _helpers import wait_until

from sharedcompute._cluster import ClusterClient
from sharedcompute._protocol import _tls
from sharedcompute._runtime._base import TaskOptions
from sharedcompute.errors import AuthenticationError

pytest.importorskip("cryptography", reason="tls-gen needs sharedcompute[tls]")


def make_certificates(folder: Path, name: str) -> dict[str, str]:
    """A CA and a certificate signed by it, from ``sharedcompute tls-gen``."""
    done = subprocess.run([sys.executable, "-m", "sharedcompute.cli", "tls-gen", str(folder),
                           name], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    for key in (folder / "ca.key", folder / f"{name}.key"):
        assert key.stat().st_mode & 0o777 == 0o600
    return {"cert": str(folder / f"{name}.pem"), "key": str(folder / f"{name}.key"),
            "ca": str(folder / "ca.pem")}


class TLSCluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files = make_certificates(tmp / "pki", "cluster")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address = self._start("head", "--head", "--port", "0", "--num-workers", "1")
        self._start("node", "--address", self.address, "--num-workers", "1")

    def flags(self) -> list[str]:
        return ["--tls-cert", self.files["cert"], "--tls-key", self.files["key"],
                "--tls-ca", self.files["ca"]]

    def env(self, role: str) -> dict[str, str]:
        env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN,
               "SHAREDCOMPUTE_HOME": str(self.tmp / role)}
        for name in (_tls.CERT_ENV, _tls.KEY_ENV, _tls.CA_ENV):
            env.pop(name, None)
        return env

    def _start(self, role: str, *args: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sharedcompute.cli", "start", *args, *self.flags(), "--block"],
            env=self.env(role), stdout=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        written = self.tmp / role / f"{role}.address"
        wait_until(lambda: written.exists() or proc.poll() is not None, TIMEOUT, f"{role} up")
        assert proc.poll() is None, f"the {role} exited with {proc.returncode}"
        return written.read_text().split()[0]

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(TIMEOUT)


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[TLSCluster]:
    made = TLSCluster(tmp_path)
    try:
        yield made
    finally:
        _tls.reset()
        made.close()


def test_a_driver_with_the_clusters_certificate_runs_tasks_across_nodes(tls_cluster) -> None:
    files = tls_cluster.files
    _tls.configure(files["cert"], files["key"], files["ca"])
    client = ClusterClient(tls_cluster.address, TOKEN)
    try:
        data = client.put(np.arange(1_000_000, dtype=np.float64))  # 8 MB: pulled over TLS
        node = TaskOptions(node=1)
        assert client.submit(np.sum, (data,), {}, node).result(TIMEOUT) == 999_999 * 500_000
        made = client.submit(np.ones, (500_000,), {}, node)
        assert float(made.result(TIMEOUT).sum()) == 500_000  # pulled back, over TLS
    finally:
        client.shutdown()
    status = subprocess.run(
        [sys.executable, "-m", "sharedcompute.cli", "status", "--address", tls_cluster.address,
         "--json", *tls_cluster.flags()],
        capture_output=True, text=True, timeout=TIMEOUT, env=tls_cluster.env("status"),
    )
    assert status.returncode == 0, status.stderr
    assert [n["alive"] for n in json.loads(status.stdout)["nodes"]] == [True, True]


def test_peers_without_tls_or_with_another_ca_are_refused(tls_cluster, tmp_path: Path) -> None:
    _tls.configure(None, None, None)  # the server waits for TLS, this client for its hello
    with pytest.raises(AuthenticationError, match="handshake"):
        ClusterClient(tls_cluster.address, TOKEN)
    other = make_certificates(tmp_path / "other", "intruder")
    _tls.configure(other["cert"], other["key"], other["ca"])
    with pytest.raises(AuthenticationError, match="TLS handshake"):
        ClusterClient(tls_cluster.address, TOKEN)
    # The cluster goes on serving a proper driver.
    files = tls_cluster.files
    _tls.configure(files["cert"], files["key"], files["ca"])
    client = ClusterClient(tls_cluster.address, TOKEN)
    try:
        assert client.submit(abs, (-5,), {}, TaskOptions()).result(TIMEOUT) == 5
    finally:
        client.shutdown()
