"""The cluster between simulated hosts (network namespaces), against a raw socket, Dask and Ray.

Usage (as root: it makes network namespaces)::

    python tools/bench/cluster.py [--quick] [--json] [--tasks 5000] [--no-peers] [--tls]

Two hosts on a bridge (``tools/netns.py``), in one run, one table, ratios:

- **transfer**: an object pulled node to node (``TransferServer`` on host 0, ``Puller``
  on host 1: the code nodes use) against a raw TCP loop between the same hosts
  (``sendall`` / ``recv_into`` a preallocated buffer), for 100 MiB and 1 GiB, taking
  turns; best of ``--repeats`` (warm destination memory for both; the first, cold pull
  is reported apart). Targets: >= 80% of raw for 1 GiB, >= 70% for 100 MiB. With ``--tls``
  the pulls run again over mutual TLS (certificates made with ``openssl`` for the run),
  against the same plain raw loop (target: >= 50% of it for 1 GiB).
- **tasks**: a driver on host 0 through the head (host 0, no workers of its own) to a
  node on host 1 (one worker): the median round trip of a trivial task, and the
  throughput of ``--tasks`` trivial tasks submitted at once. The same with Dask
  distributed (``dask scheduler`` / ``dask worker``) and Ray (``ray start --head`` /
  ``ray start --address``) on the same hosts, when installed (``--no-peers``: skip).

Local mode before and after a change is ``tools/latency_ab.py``'s job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tools import netns
from tools.bench._common import stop_processes, wait_for_file

MiB = 1024 * 1024
TOKEN = "bench" * 13
PORT = 6390
UP_TIMEOUT = 120.0


# -- transfer -----------------------------------------------------------------------------------

SOURCE = """
import json, socket, sys, threading
import numpy as np
from sharedcompute._store import OwnerStore
from sharedcompute._cluster._transfer import TransferServer

host, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
store = OwnerStore(sum(sizes) + (64 << 20))
server = TransferServer(store, TOKEN, host=host)
refs = {size: store.put(np.frombuffer(np.random.bytes(size), np.uint8)) for size in sizes}
raw = bytes(max(sizes))
listener = socket.create_server((host, 0))

def serve_raw():
    conn, _ = listener.accept()
    view = memoryview(raw)
    while True:
        asked = conn.recv(8)
        if len(asked) < 8:
            return
        conn.sendall(view[: int.from_bytes(asked, "big")])

threading.Thread(target=serve_raw, daemon=True).start()
objects = {s: [r.object_id, r.nbytes, r.header.hex()] for s, r in refs.items()}
raw_at = "%s:%d" % listener.getsockname()
print(json.dumps({"transfer": server.address, "raw": raw_at, "objects": objects}), flush=True)
sys.stdin.read()
"""

SINK = """
import json, socket, sys, time
from sharedcompute._store import OwnerStore, RemoteObject
from sharedcompute._cluster._transfer import Puller

said = json.loads(sys.argv[1]); repeats = int(sys.argv[2])
objects = {int(s): v for s, v in said["objects"].items()}
store = OwnerStore(max(objects) * 2 + (64 << 20))
puller = Puller(store, TOKEN)
puller.addresses[0] = said["transfer"]
host, port = said["raw"].rsplit(":", 1)
raw = socket.create_connection((host, int(port)))
into = memoryview(bytearray(max(objects)))
into[:] = b"\\1" * len(into)  # warm, as the store's blocks are after the first pull

def raw_once(size):
    start = time.perf_counter()
    raw.sendall(size.to_bytes(8, "big"))
    got = 0
    while got < size:
        got += raw.recv_into(into[got:size])
    return time.perf_counter() - start

def pull_once(size):
    object_id, nbytes, header = objects[size]
    ref = RemoteObject(0, object_id, nbytes, bytes.fromhex(header))
    start = time.perf_counter()
    puller.pull(ref)
    took = time.perf_counter() - start
    puller.forget(0, object_id)
    return took

out = {}
for size in sorted(objects):
    cold = pull_once(size)
    raw_times, pull_times = [], []
    for _ in range(repeats):
        raw_times.append(raw_once(size))
        pull_times.append(pull_once(size))
    out[size] = {"raw": min(raw_times), "pull": min(pull_times), "cold": cold}
print(json.dumps(out), flush=True)
"""


def tls_environment(folder: Path) -> dict[str, str]:
    """A CA and a certificate signed by it, for this run, as the TLS environment variables."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "1", "-subj", "/CN=bench-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "host.key", "-out", "host.csr",
            "-subj", "/CN=bench-host")
    openssl("x509", "-req", "-in", "host.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "host.pem", "-days", "1")
    return {"SHAREDCOMPUTE_TLS_CERT": str(folder / "host.pem"),
            "SHAREDCOMPUTE_TLS_KEY": str(folder / "host.key"),
            "SHAREDCOMPUTE_TLS_CA": str(folder / "ca.pem")}


def transfer(repeats: int, sizes: list[int], tls: dict[str, str] | None = None
             ) -> dict[int, dict[str, float]]:
    """Pulls against the raw loop; with ``tls``, the pulls (not the raw loop) use TLS."""
    env = {**os.environ, **(tls or {})}
    with netns.Hosts(2) as hosts:
        prelude = f"TOKEN = {TOKEN.encode()!r}\n"
        source = hosts.popen(
            0, [sys.executable, "-c", prelude + SOURCE, hosts.addresses[0],
                ",".join(map(str, sizes))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert source.stdout is not None
            said = source.stdout.readline()
            sink = hosts.run(1, [sys.executable, "-c", prelude + SINK, said, str(repeats)],
                             capture_output=True, text=True, timeout=600, env=env)
            if sink.returncode:
                raise RuntimeError(f"the transfer sink failed:\n{sink.stderr}")
            return {int(k): v for k, v in json.loads(sink.stdout).items()}
        finally:
            source.kill()
            source.wait()


# -- tasks through a head --------------------------------------------------------------------

WORKLOAD = """
import json, statistics, sys, time

def noop(x):
    return x

def measure(submit, result, gather, tasks):
    for i in range(20):
        result(submit(noop, i))
    samples = []
    for i in range(300):
        start = time.perf_counter()
        result(submit(noop, i))
        samples.append(time.perf_counter() - start)
    start = time.perf_counter()
    futures = [submit(noop, i) for i in range(tasks)]
    assert gather(futures) == list(range(tasks))
    took = time.perf_counter() - start
    print(json.dumps({"latency": statistics.median(samples), "throughput": tasks / took}))
"""

DRIVERS = {
    "sharedcompute": """
import sharedcompute as sc
sc.init(address=ADDRESS)
measure(lambda f, x: sc.submit(f, x), lambda f: f.result(60), lambda fs: sc.get(fs, timeout=600),
        TASKS)
sc.shutdown()
""",
    "dask": """
from distributed import Client
client = Client(ADDRESS)
measure(lambda f, x: client.submit(f, x, pure=False), lambda f: f.result(60),
        lambda fs: client.gather(fs), TASKS)
client.close()
""",
    "ray": """
import ray
ray.init(address=ADDRESS, logging_level="ERROR")
remote_noop = ray.remote(num_cpus=1)(noop)
measure(lambda f, x: remote_noop.remote(x), lambda r: ray.get(r, timeout=60),
        lambda rs: ray.get(rs, timeout=600), TASKS)
ray.shutdown()
""",
}


def _installed(system: str) -> bool:
    module = {"sharedcompute": "sharedcompute", "dask": "distributed", "ray": "ray"}[system]
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def _start_cluster(system: str, hosts: netns.Hosts, home: Path) -> tuple[str, list[Any]]:
    """Start ``system``'s head on host 0 and one single-worker node on host 1."""
    head_ip, node_ip = hosts.addresses
    env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN, "SHAREDCOMPUTE_HOME": str(home)}
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                             "env": env}
    cli = [sys.executable, "-m", "sharedcompute.cli"]
    if system == "sharedcompute":
        head = hosts.popen(0, [*cli, "start", "--head", "--host", head_ip, "--port", str(PORT),
                               "--num-workers", "0", "--block"], **quiet)
        address = f"{head_ip}:{PORT}"
        _wait_port(hosts, head_ip, PORT)
        node_home = home / "node"
        node = hosts.popen(1, [*cli, "start", "--address", address, "--num-workers", "1",
                               "--block"], **{**quiet, "env": {**env, "SHAREDCOMPUTE_HOME":
                                                               str(node_home)}})
        wait_for_file(node_home / "node.address", UP_TIMEOUT)
        return address, [head, node]
    if system == "dask":
        bin_dir = Path(sys.executable).parent
        scheduler = hosts.popen(0, [str(bin_dir / "dask"), "scheduler", "--host", head_ip,
                                    "--port", str(PORT), "--no-dashboard"], **quiet)
        _wait_port(hosts, head_ip, PORT)
        worker = hosts.popen(1, [str(bin_dir / "dask"), "worker", f"tcp://{head_ip}:{PORT}",
                                 "--nworkers", "1", "--nthreads", "1", "--host", node_ip,
                                 "--no-dashboard"], **quiet)
        return f"tcp://{head_ip}:{PORT}", [scheduler, worker]
    bin_dir = Path(sys.executable).parent
    temp = str(home / "ray")
    hosts.run(0, [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", head_ip,
                  "--port", str(PORT), "--num-cpus", "0", "--temp-dir", temp,
                  "--include-dashboard", "false", "--disable-usage-stats"],
              timeout=UP_TIMEOUT, **quiet)
    hosts.run(1, [str(bin_dir / "ray"), "start", "--address", f"{head_ip}:{PORT}",
                  "--node-ip-address", node_ip, "--num-cpus", "1",
                  "--disable-usage-stats"], timeout=UP_TIMEOUT, **quiet)
    return f"{head_ip}:{PORT}", []


def _stop_cluster(system: str, hosts: netns.Hosts, procs: list[Any]) -> None:
    """Stop ``system``'s processes politely before the hosts go (which SIGKILLs what is left):
    killed outright, Dask's and Ray's processes leave their semaphores in /dev/shm."""
    if system == "ray":
        ray = str(Path(sys.executable).parent / "ray")
        for host in (1, 0):
            hosts.run(host, [ray, "stop"], capture_output=True, timeout=UP_TIMEOUT)
    stop_processes(procs)  # the workers first, then the scheduler or head


def _wait_port(hosts: netns.Hosts, ip: str, port: int) -> None:
    probe = f"import socket; socket.create_connection(({ip!r}, {port}), timeout=1).close()"
    deadline = time.monotonic() + UP_TIMEOUT
    while hosts.run(0, [sys.executable, "-c", probe], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {ip}:{port}")
        time.sleep(0.2)


def tasks(system: str, count: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix=f"bench-{system}-"))
    try:
        with netns.Hosts(2) as hosts:
            address, procs = _start_cluster(system, hosts, home)
            try:
                script = (f"ADDRESS = {address!r}\nTASKS = {count}\n" + WORKLOAD
                          + DRIVERS[system])
                env = {**os.environ, "SHAREDCOMPUTE_TOKEN": TOKEN}
                done = hosts.run(0, [sys.executable, "-c", textwrap.dedent(script)],
                                 capture_output=True, text=True, timeout=900, env=env)
                if done.returncode:
                    raise RuntimeError(f"the {system} driver failed:\n{done.stderr[-3000:]}")
                result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
                return result
            finally:
                _stop_cluster(system, hosts, procs)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- the table ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few tasks (tests)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="skip Dask and Ray")
    parser.add_argument("--tls", action="store_true", help="also pull over mutual TLS")
    args = parser.parse_args(argv)
    root = str(Path(__file__).resolve().parent.parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p
    )
    reason = netns.available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    sizes = [8 * MiB, 32 * MiB] if args.quick else [100 * MiB, 1024 * MiB]
    count = 300 if args.quick else args.tasks
    results: dict[str, Any] = {"transfer": transfer(args.repeats, sizes), "tasks": {}}
    if args.tls:
        with tempfile.TemporaryDirectory() as folder:
            results["transfer_tls"] = transfer(args.repeats, sizes, tls_environment(Path(folder)))
    for system in ("sharedcompute", "dask", "ray"):
        if system != "sharedcompute" and (args.no_peers or not _installed(system)):
            continue
        try:
            results["tasks"][system] = tasks(system, count)
        except Exception as error:  # a peer that cannot start here is reported, not fatal
            results["tasks"][system] = {"error": f"{type(error).__name__}: {error}"[:300]}
    if args.json:
        print(json.dumps(results))
    else:
        print(table(results, count))
    return 0


def table(results: dict[str, Any], count: int) -> str:
    lines = ["| measure | sharedcompute | peer | peer's figure | sharedcompute / peer |",
             "|---|---|---|---|---|"]
    for size, row in sorted(results["transfer"].items()):
        gib = size / 2**30
        pull, raw = gib / row["pull"], gib / row["raw"]
        lines.append(f"| {size // MiB} MiB node to node (GiB/s; first, cold: "
                     f"{gib / row['cold']:.2f}) | {pull:.2f} | raw TCP loop | {raw:.2f} | "
                     f"{pull / raw:.0%} |")
    for size, row in sorted(results.get("transfer_tls", {}).items()):
        gib = size / 2**30
        pull, raw = gib / row["pull"], gib / row["raw"]
        lines.append(f"| {size // MiB} MiB node to node over TLS (GiB/s) | {pull:.2f} | "
                     f"raw TCP loop (plain) | {raw:.2f} | {pull / raw:.0%} |")
    ours = results["tasks"].get("sharedcompute", {})
    for system, row in results["tasks"].items():
        if system == "sharedcompute":
            continue
        if "error" in row:
            lines.append(f"| tasks | | {system} | failed: {row['error']} | |")
            continue
        lines.append(f"| task round trip (ms) | {ours['latency'] * 1e3:.2f} | {system} | "
                     f"{row['latency'] * 1e3:.2f} | {ours['latency'] / row['latency']:.2f}x |")
        lines.append(f"| {count} tasks (tasks/s) | {ours['throughput']:,.0f} | {system} | "
                     f"{row['throughput']:,.0f} | {ours['throughput'] / row['throughput']:.1f}x |")
    if len(results["tasks"]) == 1 and ours:
        lines.append(f"| task round trip (ms) | {ours['latency'] * 1e3:.2f} | | | |")
        lines.append(f"| {count} tasks (tasks/s) | {ours['throughput']:,.0f} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
