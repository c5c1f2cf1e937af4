"""runtime_env: what shipping a driver's working directory to a cluster costs.

Usage (as root: it makes network namespaces)::

    python tools/bench/runtime_env.py [--mib 50] [--json]

Three hosts on a bridge (``tools/netns.py``): the head on host 0 (no workers), a
node with one worker on each of hosts 1 and 2; the driver runs on the machine
itself (the bridge's gateway: a laptop outside the hosts). Its working directory
holds ``--mib`` MiB of incompressible data files and a module. In one run:

- **link**: ``--mib`` MiB over a raw TCP connection driver -> head and head -> node
  (``sendall`` / ``recv_into``), best of 3: what the bytes alone cost.
- **baseline**: a driver without runtime_env: ``init`` and one task on each node.
- **first**: the same driver with ``runtime_env={"working_dir": ...}``, the head
  lacking the package: packed, uploaded, fetched by both nodes, unpacked, and a
  worker started in the env on each node. Its extra cost over the baseline is
  held against the link time of the bytes moved (one upload, two fetches through
  the head's link) plus 1 s.
- **second**: the same driver again: nothing is uploaded (the head has the
  package) and the nodes' workers of that env are reused.
- **restart**: on one machine (local mode), the cost of a task whose env no
  worker has yet (a worker restarts in it) against a task on a warm worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tools import netns
from tools.bench._common import stop_processes, wait_for_file

MiB = 1024 * 1024
TOKEN = "renv" * 16
PORT = 6391
UP_TIMEOUT = 120.0

RAW_SERVER = """
import socket, sys
size = int(sys.argv[2])
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
buffer = bytearray(size)
while True:
    conn, _ = listener.accept()
    view, got = memoryview(buffer), 0
    while got < size:
        n = conn.recv_into(view[got:])
        if not n:
            break
        got += n
    conn.sendall(b"k")
    conn.close()
"""

RAW_CLIENT = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes(size)
best = float("inf")
for _ in range(3):
    started = time.perf_counter()
    with socket.create_connection((host, port)) as conn:
        conn.sendall(data)
        conn.recv(1)
    best = min(best, time.perf_counter() - started)
print(best)
"""

DRIVER = """
import json, os, sys, time
started = time.perf_counter()
import sharedcompute as sc

def where(_):
    return os.getcwd()

env = {"working_dir": sys.argv[1]} if len(sys.argv) > 1 else None
rt = sc.init(runtime_env=env)
inited = time.perf_counter()
task = sc.remote(where)
sc.get([task.options(node=n).submit(n) for n in (1, 2)], timeout=600)
done = time.perf_counter()
print(json.dumps({"init": inited - started, "total": done - started,
                  "shipped": rt.envs.shipped_bytes, "pack": rt.envs.pack_seconds}))
"""

RESTART = """
import json, os, time
import sharedcompute as sc

def pid(_):
    return os.getpid()

with sc.Runtime(num_workers=1):
    plain = sc.remote(pid)
    plain.submit(0).result(timeout=120)
    best_warm = best_new = float("inf")
    for i in range(5):
        t = time.perf_counter(); plain.submit(i).result(timeout=120)
        best_warm = min(best_warm, time.perf_counter() - t)
        fresh = plain.options(runtime_env={"env_vars": {"SC_BENCH": str(i)}})
        t = time.perf_counter(); fresh.submit(i).result(timeout=120)
        best_new = min(best_new, time.perf_counter() - t)
print(json.dumps({"warm_task": best_warm, "task_in_new_env": best_new}))
"""


def _make_workdir(root: Path, mib: int) -> Path:
    root.mkdir(parents=True)
    (root / "model.py").write_text("SCALE = 2\n")
    left, index = mib * MiB, 0
    while left > 0:
        size = min(left, 10 * MiB)
        (root / f"part{index}.bin").write_bytes(os.urandom(size))
        left -= size
        index += 1
    return root


def _start(hosts: netns.Hosts, home: Path) -> list[subprocess.Popen[Any]]:
    env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN}
    cli = [sys.executable, "-m", "sharedcompute.cli", "start"]
    procs = []
    address = f"{hosts.addresses[0]}:{PORT}"
    procs.append(hosts.popen(0, [*cli, "--head", "--host", hosts.addresses[0], "--port",
                                 str(PORT), "--num-workers", "0", "--block"],
                             env={**env, "SHAREDCOMPUTE_HOME": str(home / "head")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_for_file(home / "head" / "head.address", UP_TIMEOUT)
    for host in (1, 2):
        node_home = home / f"node{host}"
        procs.append(hosts.popen(host, [*cli, "--address", address, "--num-workers", "1",
                                        "--block"],
                                 env={**env, "SHAREDCOMPUTE_HOME": str(node_home)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_file(node_home / "node.address", UP_TIMEOUT)
    return procs


def _link_seconds(hosts: netns.Hosts, server_host: int, client_host: int | None,
                  size: int) -> float:
    """Best of 3 raw TCP sends of ``size`` bytes to host ``server_host`` (None: the machine)."""
    ip = hosts.addresses[server_host]
    server = hosts.popen(server_host, [sys.executable, "-c", RAW_SERVER, ip, str(size)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        argv = [sys.executable, "-c", RAW_CLIENT, ip, port, str(size)]
        done = (subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
                if client_host is None else
                hosts.run(client_host, argv, capture_output=True, text=True, timeout=300,
                          check=True))
        return float(done.stdout)
    finally:
        server.kill()
        server.wait(30)


def _driver(hosts: netns.Hosts, workdir: Path | None) -> dict[str, float]:
    env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN,
           "SHAREDCOMPUTE_ADDRESS": f"{hosts.addresses[0]}:{PORT}"}
    argv = [sys.executable, "-c", DRIVER] + ([str(workdir)] if workdir else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode:
        raise RuntimeError(f"the driver failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(mib: int) -> dict[str, Any]:
    size = mib * MiB
    scratch = Path(tempfile.mkdtemp(prefix="bench-runtime-env-"))
    try:
        workdir = _make_workdir(scratch / "project", mib)
        with netns.Hosts(3) as hosts:
            procs = _start(hosts, scratch)
            try:
                up = _link_seconds(hosts, 0, None, size)
                down = _link_seconds(hosts, 1, 0, size)
                baseline = _driver(hosts, None)
                first = _driver(hosts, workdir)
                second = _driver(hosts, workdir)
            finally:
                stop_processes(procs)
        restart = json.loads(subprocess.run(
            [sys.executable, "-c", RESTART], capture_output=True, text=True, timeout=600,
            check=True).stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    link = up + 2 * down  # one upload; both nodes fetch through the head's one link
    return {"mib": mib, "link_up_s": up, "link_down_s": down, "link_s": link,
            "baseline": baseline, "first": first, "second": second,
            "first_extra_s": first["total"] - baseline["total"],
            "second_extra_s": second["total"] - baseline["total"], "restart": restart}


def table(r: dict[str, Any]) -> str:
    budget = r["link_s"] + 1.0
    rows = [
        f"runtime_env: a {r['mib']} MiB working_dir shipped to 2 nodes (times in s)",
        f"  raw link: driver->head {r['link_up_s']:.3f}, head->node {r['link_down_s']:.3f}; "
        f"bytes moved (1 up + 2 down) {r['link_s']:.3f}",
        f"  baseline driver (no env): {r['baseline']['total']:.3f}",
        f"  first driver:  {r['first']['total']:.3f}  (+{r['first_extra_s']:.3f}; budget: link "
        f"+ 1 s = {budget:.3f}: {'within' if r['first_extra_s'] <= budget else 'OVER'}); "
        f"uploaded {r['first']['shipped'] / MiB:.1f} MiB, packed in {r['first']['pack']:.3f}",
        f"  second driver: {r['second']['total']:.3f}  (+{r['second_extra_s']:.3f}); uploaded "
        f"{r['second']['shipped']} bytes, packed in {r['second']['pack']:.3f}",
        f"  local mode: a task on a warm worker {r['restart']['warm_task'] * 1e3:.1f} ms; in a "
        f"new env (a worker restarts) {r['restart']['task_in_new_env'] * 1e3:.1f} ms",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    reason = netns.available()
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    result = run(args.mib)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
