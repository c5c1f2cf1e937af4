"""A real ``sshd`` in each simulated host (``tools/netns.py``), for the launch tests.

Each host runs ``sshd -D`` on its own address, port 22, with a host key and an
authorized key that ``SshHosts`` makes for the run (``ssh-keygen``), root login
by key only, and no PAM: a login is exactly what ``sharedcompute launch`` does on
a real host. ``client_key`` is the private key a cluster file names
(``identity_file``); ``known_hosts`` keeps the hosts' keys out of the user's.
Needs ``openssh-server`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tools.netns import Hosts

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """Why an sshd cannot run here (None: it can)."""
    if not os.path.exists(SSHD):
        return "no sshd (install openssh-server)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "no ssh client (install openssh-client)"
    return None


class SshHosts:
    """An sshd on every host of ``hosts``, and the key that logs in to all of them."""

    def __init__(self, hosts: Hosts, folder: Path) -> None:
        self.hosts = hosts
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        self.client_key = folder / "client_key"
        self._keygen(self.client_key)
        self._keygen(folder / "host_key")
        authorized = folder / "authorized_keys"
        authorized.write_text((folder / "client_key.pub").read_text())
        authorized.chmod(0o600)
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for i, address in enumerate(hosts.addresses):
                self.procs.append(self._start(i, address))
            for address in hosts.addresses:
                self._wait_listening(address)
        except BaseException:
            self.close()
            raise

    def _keygen(self, path: Path) -> None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                       check=True, capture_output=True)

    def _start(self, host: int, address: str) -> subprocess.Popen[bytes]:
        config = self.folder / f"sshd_{host}.conf"
        config.write_text("\n".join([
            f"ListenAddress {address}", "Port 22", f"HostKey {self.folder / 'host_key'}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "PidFile none", "LogLevel ERROR", "",
        ]))
        return self.hosts.popen(host, [SSHD, "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_listening(self, address: str, timeout: float = 30.0) -> None:
        probe = f"import socket; socket.create_connection(({address!r}, 22), timeout=1).close()"
        deadline = time.monotonic() + timeout
        while self.hosts.run(0, ["python3", "-c", probe], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd on {address} did not listen within {timeout:g} s")
            time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(30)
        self.procs.clear()
