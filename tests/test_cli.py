"""The ``sharedcompute`` command: start a head, ask its status, stop it; nothing left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

TIMEOUT = 120


def run(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SHAREDCOMPUTE_HOME": str(home), **(env or {})}
    for name in ("SHAREDCOMPUTE_TOKEN", "SHAREDCOMPUTE_TOKEN_FILE", "SHAREDCOMPUTE_ADDRESS"):
        if name not in (env or {}):
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "sharedcompute.cli", *args], capture_output=True, text=True,
        timeout=TIMEOUT, env=environment,
    )


def ours(home: Path) -> list[psutil.Process]:
    """Processes started with this home: heads, nodes and their workers."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SHAREDCOMPUTE_HOME") == str(home) and proc.status() != (
                psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    if (home / "head.pid").exists() or (home / "node.pid").exists():
        run(home, "stop")  # a failed test must not leave its head or node running
    deadline = time.monotonic() + 30
    while ours(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = ours(home)
    for proc in left:
        proc.kill()
    assert not left, f"processes left running: {[p.pid for p in left]}"


def test_every_verb_has_help(tmp_path: Path) -> None:
    for verb in ([], ["start"], ["status"], ["stop"], ["launch"], ["tls-gen"]):
        result = run(tmp_path, *verb, "--help")
        assert result.returncode == 0 and "usage: sharedcompute" in result.stdout


def test_start_status_stop_leave_nothing_behind(home: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    started = run(home, "start", "--head", "--port", "0", "--num-workers", "1",
                  "--resources", '{"gpu": 2}')
    assert started.returncode == 0, started.stderr
    address = (home / "head.address").read_text().strip()
    assert f"sharedcompute head at {address}" in started.stdout
    assert f"sharedcompute start --address {address}" in started.stdout
    pid = int((home / "head.pid").read_text())
    head = psutil.Process(pid)
    token = home / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600

    status = run(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    (node,) = report["nodes"]
    assert node["alive"] and node["address"] == address and node["workers"] == 1
    assert node["resources"] == {"CPU": 1.0, "gpu": 2.0}
    assert set(report["tasks"]) >= {"waiting", "running", "finished"}
    table = run(home, "status")
    assert table.returncode == 0 and address in table.stdout and "'gpu': 2.0" in table.stdout

    again = run(home, "start", "--head", "--port", "0")
    assert again.returncode == 1 and "a head already runs on this host" in again.stderr

    workers = [child.pid for child in head.children(recursive=True)]
    assert len(workers) >= 1
    stopped = run(home, "stop")
    assert stopped.returncode == 0 and f"stopped the head (pid {pid})" in stopped.stdout
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in [pid, *workers]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in [pid, *workers] if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not (home / "head.pid").exists()
    assert set(os.listdir("/dev/shm")) - shm_before == set()
    assert run(home, "stop").stdout.startswith("nothing to stop")


def test_a_wrong_token_is_refused_and_said_in_one_line(home: Path) -> None:
    assert run(home, "start", "--head", "--port", "0", "--num-workers", "1").returncode == 0
    refused = run(home, "status", env={"SHAREDCOMPUTE_TOKEN": "not-the-token"})
    assert refused.returncode == 1
    assert "AuthenticationError" in refused.stderr and "refused the cluster token" in refused.stderr
    assert "Traceback" not in refused.stderr
    log = (home / "head.log").read_text()
    assert "refused a connection" in log and "sent a wrong token" in log
    assert "not-the-token" not in log  # a token never reaches a log
    assert run(home, "stop").returncode == 0


def test_status_without_a_head_is_explained(home: Path) -> None:
    missing = run(home, "status")
    assert missing.returncode == 1 and "no head runs on this host" in missing.stderr
    no_token = run(home, "start", "--address", "127.0.0.1:9")
    assert no_token.returncode == 1 and "no cluster token here" in no_token.stderr


def node_states(home: Path) -> dict[int, bool]:
    report = json.loads(run(home, "status", "--json").stdout)
    return {node["node_id"]: node["alive"] for node in report["nodes"]}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_nodes_join_and_are_declared_dead_when_killed_or_silent(home: Path) -> None:
    assert run(home, "start", "--head", "--port", "0", "--num-workers", "1",
               "--node-timeout", "1.5").returncode == 0
    address = (home / "head.address").read_text().strip()
    joined = run(home, "start", "--address", address, "--num-workers", "1",
                 "--resources", '{"gpu": 1}')
    assert joined.returncode == 0, joined.stderr
    assert f"node 1 of {address}" in joined.stdout
    report = json.loads(run(home, "status", "--json").stdout)
    assert [(n["node_id"], n["alive"]) for n in report["nodes"]] == [(0, True), (1, True)]
    assert report["nodes"][1]["resources"] == {"CPU": 1.0, "gpu": 1.0}
    node = psutil.Process(int((home / "node.pid").read_text()))
    node_workers = node.children(recursive=True)

    # Silent (stopped, its connection open): dead after the timeout, not at once.
    node.suspend()
    wait_for(lambda: node_states(home)[1] is False, "the silent node to be declared dead")
    node.resume()
    node.wait(30)  # it learns the head dropped it, and stops
    for worker in node_workers:
        wait_for(lambda w=worker: not w.is_running() or w.status() == psutil.STATUS_ZOMBIE,
                 "the node's workers to end")

    # Killed: its connection closes, and it is dead at once (a new node, a new id).
    assert run(home, "start", "--address", address, "--num-workers", "1").returncode == 0
    wait_for(lambda: node_states(home).get(2) is True, "node 2")
    psutil.Process(int((home / "node.pid").read_text())).kill()
    wait_for(lambda: node_states(home)[2] is False, "the killed node to be declared dead")
    log = (home / "head.log").read_text().splitlines()
    said = [line for line in log if "node 2 is dead" in line]
    assert said and "connection" in said[0] and "closed" in said[0], said
    assert run(home, "stop").returncode == 0


def test_a_node_stops_when_its_head_is_gone(home: Path) -> None:
    assert run(home, "start", "--head", "--port", "0", "--num-workers", "1").returncode == 0
    address = (home / "head.address").read_text().strip()
    assert run(home, "start", "--address", address, "--num-workers", "1").returncode == 0
    node = psutil.Process(int((home / "node.pid").read_text()))
    head = psutil.Process(int((home / "head.pid").read_text()))
    head.kill()
    node.wait(30)
    assert "the head at" in (home / "node.log").read_text()
    assert run(home, "stop").returncode == 0
