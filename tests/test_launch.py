"""``sharedcompute launch``: three namespace hosts, each with a real sshd, brought up from one
file and taken down leaving nothing; each failure names the host and the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import netns, sshd

TIMEOUT = 120

pytestmark = pytest.mark.skipif(
    netns.available() is not None or sshd.available() is not None,
    reason=f"needs network namespaces and sshd: {netns.available() or sshd.available()}",
)


class LaunchHosts:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hosts = netns.Hosts(3)
        try:
            self.ssh = sshd.SshHosts(self.hosts, tmp / "ssh")
        except BaseException:
            self.hosts.close()
            raise

    def cluster_file(self, *, python: str = sys.executable, identity: Path | None = None,
                     node_hosts: list[str] | None = None, tls: Path | None = None,
                     setup: list[str] | None = None, runtime_env: str | None = None) -> Path:
        addresses = self.hosts.addresses
        nodes = node_hosts or addresses[1:]
        text = textwrap.dedent(f"""
            [cluster]
            name = "test"
            python = "{python}"
            port = 6380
            join_timeout = 30
            [ssh]
            user = "root"
            identity_file = "{identity or self.ssh.client_key}"
            options = ["-o", "UserKnownHostsFile={self.tmp / 'known_hosts'}"]
            [head]
            host = "{addresses[0]}"
            num_workers = 1
            home = "{self.tmp / 'home0'}"
        """)
        if setup:
            text += "[setup]\ncommands = " + json.dumps(setup) + "\n"
        if runtime_env:
            text += "[runtime_env]\n" + textwrap.dedent(runtime_env)
        if tls is not None:  # one certificate per host, named by its address
            text += textwrap.dedent(f"""
                [tls]
                cert = "{tls}/{{host}}.pem"
                key = "{tls}/{{host}}.key"
                ca = "{tls}/ca.pem"
            """)
        for i, host in enumerate(nodes, start=1):
            text += textwrap.dedent(f"""
                [[nodes]]
                host = "{host}"
                num_workers = 1
                resources = {{ slot{i} = 1 }}
                home = "{self.tmp / f'home{i}'}"
            """)
        path = self.tmp / "cluster.toml"
        path.write_text(text)
        return path

    def launch(self, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sharedcompute.cli", "launch", str(path),
                               *args], capture_output=True, text=True, timeout=TIMEOUT)

    def ours_left(self) -> list[int]:
        """Processes left on the hosts other than their sshd (and its sessions)."""
        sshds = {p.pid for p in self.ssh.procs}
        left = []
        for host in range(3):
            for pid in self.hosts.pids(host):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if pid not in sshds and b"sshd" not in cmdline:
                    left.append(pid)
        return left

    def close(self) -> None:
        self.ssh.close()
        self.hosts.close()


@pytest.fixture
def launch_hosts(tmp_path: Path) -> Iterator[LaunchHosts]:
    made = LaunchHosts(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.timeout(400)
def test_launch_brings_three_hosts_up_runs_work_and_down_leaves_nothing(launch_hosts) -> None:
    project = launch_hosts.tmp / "project"  # the [runtime_env] working_dir: no node has it
    project.mkdir()
    (project / "launched_mod.py").write_text("def name():\n    return open('tag.txt').read()\n")
    (project / "tag.txt").write_text("from the launch file")
    path = launch_hosts.cluster_file(runtime_env="""
        working_dir = "project"
        env_vars = { SC_LAUNCHED = "yes" }
    """)
    started = time.monotonic()
    up = launch_hosts.launch(path)
    took = time.monotonic() - started
    assert up.returncode == 0, up.stdout + up.stderr
    assert "2 of 2 nodes up" in up.stdout, up.stdout
    assert "runtime_env set (working_dir pkg-" in up.stdout, up.stdout
    print(f"launch took {took:.1f} s")
    head = f"{launch_hosts.hosts.addresses[0]}:6380"
    token = (launch_hosts.tmp / "home0" / "token").read_text().strip()
    driver = launch_hosts.hosts.run(1, [sys.executable, "-c", textwrap.dedent("""
        import json, os
        import sharedcompute as sc
        sc.init()
        @sc.remote
        def where():
            return os.environ.get("SHAREDCOMPUTE_HOME", "")
        @sc.remote
        def shipped():
            import launched_mod  # only in the launch file's working_dir
            return launched_mod.name(), os.environ.get("SC_LAUNCHED")
        print(json.dumps({
            "shipped": shipped.options(resources={"slot2": 1}).submit().result(60),
            "nodes": sorted(n["address"] for n in sc.nodes() if n["alive"]),
            "on1": where.options(resources={"slot1": 1}).submit().result(60),
            "on2": where.options(resources={"slot2": 1}).submit().result(60),
        }))
    """)], capture_output=True, text=True, timeout=TIMEOUT,
        env={"SHAREDCOMPUTE_ADDRESS": head, "SHAREDCOMPUTE_TOKEN": token, "PATH": "/usr/bin"})
    assert driver.returncode == 0, driver.stderr
    said = json.loads(driver.stdout.strip().splitlines()[-1])
    assert said["on1"].endswith("home1") and said["on2"].endswith("home2")
    assert said["shipped"] == ["from the launch file", "yes"]
    assert len(said["nodes"]) == 3
    again = launch_hosts.launch(path)  # everything runs already: nothing new starts
    assert again.returncode == 0 and again.stdout.count("was running") == 3, again.stdout
    down = launch_hosts.launch(path, "--down")
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 30
    while launch_hosts.ours_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert launch_hosts.ours_left() == []


@pytest.mark.parametrize("case", ["wrong key", "no python", "no sshd", "setup fails"])
def test_a_failing_host_is_named_with_the_reason(launch_hosts, case: str) -> None:
    addresses = launch_hosts.hosts.addresses
    if case == "wrong key":
        other = launch_hosts.tmp / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                       check=True)
        path = launch_hosts.cluster_file(identity=other)
        expected = "login refused"
    elif case == "no python":
        path = launch_hosts.cluster_file(python="/nowhere/python3")
        expected = "python not found there: /nowhere/python3"
    elif case == "setup fails":
        path = launch_hosts.cluster_file(setup=["echo preparing the host", "exit 3"])
        expected = "setup command failed ('exit 3', exit 3)"
    else:
        unused = addresses[2].rsplit(".", 1)[0] + ".250"  # on the subnet, no host there
        path = launch_hosts.cluster_file(node_hosts=[addresses[1], unused])
        expected = f"node {unused}: ssh failed"
    started = time.monotonic()
    result = launch_hosts.launch(path)
    assert result.returncode == 1
    assert expected in result.stdout, result.stdout
    assert time.monotonic() - started < 60
    assert launch_hosts.ours_left() == []  # nothing started when a check fails


def test_a_dry_run_prints_the_ssh_commands_and_starts_nothing(launch_hosts) -> None:
    result = launch_hosts.launch(launch_hosts.cluster_file(), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("[dry run] ssh")]
    starts = [c for c in commands if "sharedcompute.cli start" in c]
    assert len(starts) == 3 and sum("(token on stdin)" in c for c in starts) == 2
    assert not any(launch_hosts.tmp.glob("home*"))  # no host did anything


def test_a_node_that_cannot_reach_the_head_is_named_with_the_reason(launch_hosts) -> None:
    addresses = launch_hosts.hosts.addresses
    # Host 2 sends what it means for the head to a hardware address nobody has.
    launch_hosts.hosts.run(2, ["ip", "neigh", "replace", addresses[0], "lladdr",
                               "02:00:00:00:00:99", "dev", launch_hosts.hosts.devices[2],
                               "nud", "permanent"], check=True)
    path = launch_hosts.cluster_file()
    started = time.monotonic()
    result = launch_hosts.launch(path)
    assert result.returncode == 1
    assert f"FAIL node {addresses[2]}: did not join" in result.stdout, result.stdout
    assert "cannot connect to" in result.stdout, result.stdout
    assert f"ok   node {addresses[1]}: joined" in result.stdout
    assert time.monotonic() - started < 60
    down = launch_hosts.launch(path, "--down")
    assert down.returncode == 0, down.stdout
    deadline = time.monotonic() + 30
    while launch_hosts.ours_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert launch_hosts.ours_left() == []


def test_launch_with_tls_from_the_cluster_file(launch_hosts) -> None:
    pytest.importorskip("cryptography", reason="tls-gen needs sharedcompute[tls]")
    pki = launch_hosts.tmp / "pki"
    addresses = launch_hosts.hosts.addresses
    subprocess.run([sys.executable, "-m", "sharedcompute.cli", "tls-gen", str(pki),
                    *addresses, "driver"], check=True, capture_output=True, timeout=TIMEOUT)
    path = launch_hosts.cluster_file(tls=pki)
    up = launch_hosts.launch(path)
    assert up.returncode == 0, up.stdout + up.stderr
    token = (launch_hosts.tmp / "home0" / "token").read_text().strip()
    env = {"SHAREDCOMPUTE_ADDRESS": f"{addresses[0]}:6380", "SHAREDCOMPUTE_TOKEN": token,
           "PATH": "/usr/bin"}
    script = ("import sharedcompute as sc; sc.init(); "
              "print(sc.submit(sum, [1, 2, 3]).result(60))")
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=TIMEOUT, env=env)
    assert plain.returncode != 0  # no certificate: refused
    env.update(SHAREDCOMPUTE_TLS_CERT=str(pki / "driver.pem"),
               SHAREDCOMPUTE_TLS_KEY=str(pki / "driver.key"),
               SHAREDCOMPUTE_TLS_CA=str(pki / "ca.pem"))
    secure = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env)
    assert secure.returncode == 0 and secure.stdout.strip() == "6", secure.stderr
    assert launch_hosts.launch(path, "--down").returncode == 0
