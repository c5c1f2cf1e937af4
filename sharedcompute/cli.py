"""The ``sharedcompute`` command: start, inspect and stop a head on this host.

::

    sharedcompute start --head [--host 127.0.0.1] [--port 6380] [--num-workers N]
                        [--resources JSON] [--store-capacity BYTES] [--token-file PATH] [--block]
    sharedcompute start --address HOST:PORT [--host ADDR] [--num-workers N] [--resources JSON]
                        [--token-file PATH] [--block]
    sharedcompute status [--address HOST:PORT] [--json]
    sharedcompute stop
    sharedcompute launch CLUSTER.toml [--down] [--dry-run]   # a whole cluster over ssh
    sharedcompute tls-gen DIR [NAME ...]   # a CA and certificates, for --tls-*

    (start and status also take --tls-cert PEM --tls-key PEM --tls-ca PEM: mutual TLS)

``start --head`` runs the head in the background and returns once it answers
(``--block``: in the foreground, for containers and systemd), printing its address
and how to join it; ``start --address`` runs a node that joins that head and
returns once it has joined. Their pid, address and log files live in the
sharedcompute home (``$SHAREDCOMPUTE_HOME``, default ``~/.sharedcompute``), with the
cluster token (see ``_cluster/_token.py``). ``stop`` ends what ``start`` began on
this host and leaves no process and no shared memory behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sharedcompute._cluster._token import find_token, home
from sharedcompute._env import sweep_dead_caches
from sharedcompute._protocol._tls import CA_ENV, CERT_ENV, KEY_ENV, configure
from sharedcompute.errors import AuthenticationError

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def _files(role: str = "head") -> dict[str, Path]:
    """The pid, address (head) or node id (node) and log files of ``role`` on this host."""
    base = home()
    return {
        "pid": base / f"{role}.pid", "address": base / f"{role}.address",
        "log": base / f"{role}.log",
    }


def _running_pid(role: str = "head") -> int | None:
    pid_file = _files(role)["pid"]
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _parse_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, AttributeError, TypeError) as error:
        raise SystemExit(f"--resources must be a JSON object of numbers, like '{{\"gpu\": 2}}': "
                         f"{error}") from None


# -- start ---------------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    role = "head" if args.head else "node"
    pid = _running_pid(role)
    if pid is not None:
        files = _files(role)
        address = files["address"].read_text().strip() if files["address"].exists() else "?"
        print(f"a {role} already runs on this host (pid {pid}, {address}); "
              "stop it first with: sharedcompute stop", file=sys.stderr)
        return 1
    token = find_token(args.token_file, create=args.head)
    if args.block:
        return _run_head(args, token) if args.head else _run_node(args, token)
    return _start_in_background(args, role)


def _run_node(args: argparse.Namespace, token: str) -> int:
    from sharedcompute._cluster._node import Node

    files = _files("node")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = Node(
        args.address, token, num_workers=args.num_workers,
        resources=_parse_resources(args.resources), store_capacity=args.store_capacity,
        host=args.host,
    )
    try:
        files["pid"].parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        files["pid"].write_text(f"{os.getpid()}\n")
        files["address"].write_text(f"node {node.node_id} of {args.address}\n")
        print(f"sharedcompute node {node.node_id} joined the head at {args.address}", flush=True)
        while not stop.wait(0.5) and not node.lost.is_set():
            pass
        if node.lost.is_set():
            print(f"sharedcompute node {node.node_id}: {node.lost_reason}; stopping", flush=True)
    finally:
        node.close()
        for name in ("pid", "address"):
            files[name].unlink(missing_ok=True)
    return 1 if node.lost.is_set() else 0


def _run_head(args: argparse.Namespace, token: str) -> int:
    from sharedcompute._cluster._head import Head

    files = _files()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    head = Head(
        token, host=args.host or "127.0.0.1", port=args.port, num_workers=args.num_workers,
        resources=_parse_resources(args.resources), store_capacity=args.store_capacity,
        node_timeout=args.node_timeout,
    )
    try:
        if args.dashboard_port is not None:
            from sharedcompute._api import start_dashboard

            # Every node, as `status` lists them, and every node's workers' CPU and memory
            # (from their heartbeats); off loopback it asks for the token.
            start_dashboard(head.runtime, host=args.host or "127.0.0.1",
                            port=args.dashboard_port or None, token=token,
                            nodes=lambda: [node.as_dict() for node in head.status().nodes],
                            worker_processes=head.worker_processes)
        files["pid"].parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        files["pid"].write_text(f"{os.getpid()}\n")
        files["address"].write_text(f"{head.address}\n")
        _print_head(head.address, "")
        while not stop.wait(0.5):
            pass
    finally:
        head.close()
        for name in ("pid", "address"):
            files[name].unlink(missing_ok=True)
    return 0


def _print_head(address: str, where: str) -> None:
    print(f"sharedcompute head at {address}{where}", flush=True)
    print(f"  join from another host: sharedcompute start --address {address}  "
          f"(with the token of {home() / 'token'} there)", flush=True)
    print(f"  connect a driver: sc.init(address={address!r})", flush=True)


def _start_in_background(args: argparse.Namespace, role: str) -> int:
    files = _files(role)
    files["log"].parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [sys.executable, "-m", "sharedcompute.cli", "start", "--block"]
    if role == "head":
        command += ["--head", "--host", args.host or "127.0.0.1", "--port", str(args.port),
                    "--node-timeout", str(args.node_timeout)]
        if args.dashboard_port is not None:
            command += ["--dashboard-port", str(args.dashboard_port)]
    else:
        command += ["--address", args.address]
        if args.host:
            command += ["--host", args.host]
    for option in ("num_workers", "resources", "store_capacity", "token_file"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    with open(files["log"], "ab") as log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = files["log"].read_text(errors="replace").splitlines()[-15:]
            print(f"the head exited with code {proc.returncode} before it answered; the end of "
                  f"{files['log']}:\n" + "\n".join(f"    {line}" for line in tail),
                  file=sys.stderr)
            return 1
        if files["address"].exists() and _running_pid(role) == proc.pid:
            address = files["address"].read_text().strip()
            if role == "node":
                print(f"sharedcompute {address} (pid {proc.pid}, log {files['log']})")
                return 0
            try:
                _status_reply(address, args.token_file)
            except (ConnectionError, OSError):
                time.sleep(0.1)
                continue
            _print_head(address, f" (pid {proc.pid}, log {files['log']})")
            return 0
        time.sleep(0.1)
    proc.kill()
    print(f"the head did not answer within {START_TIMEOUT:.0f} s; see {files['log']}",
          file=sys.stderr)
    return 1


# -- status --------------------------------------------------------------------------------------


def _status_reply(address: str, token_file: str | None) -> Any:
    from sharedcompute._cluster._messages import StatusRequest
    from sharedcompute._cluster._server import request

    return request(address, find_token(token_file), StatusRequest())


def _head_address(args: argparse.Namespace) -> str | None:
    """--address, SHAREDCOMPUTE_ADDRESS or the head started on this host (None: said why)."""
    address: str | None = args.address or os.environ.get("SHAREDCOMPUTE_ADDRESS")
    if not address:
        address_file = _files()["address"]
        if not address_file.exists():
            print("no head runs on this host; pass --address HOST:PORT", file=sys.stderr)
            return None
        address = address_file.read_text().strip()
    return address


def _memory(args: argparse.Namespace) -> int:
    from sharedcompute._cluster._messages import MemoryRequest
    from sharedcompute._cluster._server import request

    address = _head_address(args)
    if address is None:
        return 1
    try:
        reply = request(address, find_token(args.token_file), MemoryRequest())
    except AuthenticationError:
        raise
    except (ConnectionError, OSError) as error:
        print(f"cannot reach the head at {address}: {error}", file=sys.stderr)
        return 1
    print(reply.text)
    return 0


def _status(args: argparse.Namespace) -> int:
    address = _head_address(args)
    if address is None:
        return 1
    try:
        reply = _status_reply(address, args.token_file)
    except AuthenticationError:
        raise  # said by main, in one line
    except (ConnectionError, OSError) as error:
        print(f"cannot reach the head at {address}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply.as_dict(), indent=2))
        return 0
    print(f"head {address}")
    print(f"{'node':>4}  {'address':<22} {'alive':<5} {'workers':>7}  {'CPU used/total':<15} "
          f"{'store used/capacity':<24} custom")
    for node in reply.nodes:
        cpu_total = node.resources.get("CPU", 0.0)
        cpu_used: float | str = cpu_total - node.available.get("CPU", 0.0) if node.alive else "-"
        custom = {k: v for k, v in node.resources.items() if k != "CPU"}
        store = f"{node.store_used / 2**20:.0f}/{node.store_capacity / 2**20:.0f} MiB"
        print(f"{node.node_id:>4}  {node.address:<22} {str(node.alive).lower():<5} "
              f"{node.workers:>7}  {f'{cpu_used}/{cpu_total:g}':<15} {store:<24} "
              f"{custom or ''}")
    counts = ", ".join(f"{state} {count}" for state, count in reply.tasks.items() if count)
    print(f"tasks: {counts or 'none'}")
    return 0


# -- stop ----------------------------------------------------------------------------------------


def _stop(args: argparse.Namespace) -> int:
    stopped = [_stop_role(role) for role in ("node", "head")]
    # What processes killed before they could clean up left of their runtime_env caches.
    sweep_dead_caches()
    if not any(stopped):
        print("nothing to stop: no head or node runs on this host")
    return 0


def _stop_role(role: str) -> bool:
    pid = _running_pid(role)
    files = _files(role)
    if pid is None:
        for name in ("pid", "address"):
            files[name].unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _running_pid(role) == pid:
        time.sleep(0.1)
    if _running_pid(role) == pid:
        # Its workers end with it (they watch a pipe only it holds).
        if os.getpgid(pid) == pid:  # started by `start`: a session of its own
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        print(f"the {role} (pid {pid}) did not stop within {STOP_TIMEOUT:.0f} s: killed")
    else:
        print(f"stopped the {role} (pid {pid})")
    for name in ("pid", "address"):
        files[name].unlink(missing_ok=True)
    return True


# -- the parser ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="sharedcompute", description="Start, inspect and stop a sharedcompute head."
    )
    verbs = main_parser.add_subparsers(dest="verb", required=True)
    start = verbs.add_parser("start", help="start a head on this host (in the background)")
    role = start.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head (it runs a node too)")
    role.add_argument("--address", help="HOST:PORT of the head to join as a node")
    start.add_argument("--host", help="head: the address to bind (default 127.0.0.1); node: "
                       "the address other nodes reach it at (default: the one it reaches "
                       "the head from)")
    start.add_argument("--port", type=int, default=6380, help="port (default 6380; 0: any)")
    start.add_argument("--num-workers", type=int, help="worker processes (default: CPUs)")
    start.add_argument("--resources", help='custom resources as JSON, e.g. \'{"gpu": 2}\'')
    start.add_argument("--store-capacity", type=int, help="object store bytes")
    start.add_argument("--token-file", help="the cluster token's file (created if missing)")
    start.add_argument("--block", action="store_true", help="stay in the foreground")
    start.add_argument("--dashboard-port", type=int, metavar="PORT",
                       help="head: serve the live dashboard on this port (0: any free one; "
                       "needs sharedcompute[dashboard])")
    start.add_argument("--node-timeout", type=float, default=5.0,
                       help="seconds a node may be silent before it is dead (default 5)")
    _tls_flags(start)
    start.set_defaults(run=_start)
    status = verbs.add_parser("status", help="nodes and tasks of a running head")
    status.add_argument("--address", help="HOST:PORT (default: the head started on this host)")
    status.add_argument("--json", action="store_true", help='{"nodes": [...], "tasks": {...}}')
    status.add_argument("--token-file", help="the cluster token's file")
    _tls_flags(status)
    status.set_defaults(run=_status)
    memory = verbs.add_parser("memory", help="objects in the stores, their sizes and holders, "
                              "in memory or spilled")
    memory.add_argument("--address", help="HOST:PORT (default: the head started on this host)")
    memory.add_argument("--token-file", help="the cluster token's file")
    _tls_flags(memory)
    memory.set_defaults(run=_memory)
    stop = verbs.add_parser("stop", help="stop what `start` began on this host")
    stop.set_defaults(run=_stop)
    launch = verbs.add_parser("launch", help="start (or --down: stop) a whole cluster over ssh, "
                              "from a TOML file")
    launch.add_argument("cluster_file", metavar="CLUSTER.toml")
    launch.add_argument("--down", action="store_true", help="stop every host's processes")
    launch.add_argument("--dry-run", action="store_true", help="print the ssh commands only")
    launch.set_defaults(run=_launch)
    tls_gen = verbs.add_parser("tls-gen", help="write a cluster CA and certificates signed by "
                               "it (needs sharedcompute[tls])")
    tls_gen.add_argument("folder", metavar="DIR")
    tls_gen.add_argument("names", nargs="*", default=["cluster"],
                         help="a certificate per name (default: one, 'cluster')")
    tls_gen.set_defaults(run=_tls_gen)
    return main_parser


def _launch(args: argparse.Namespace) -> int:
    from sharedcompute._launch import launch

    return launch(args.cluster_file, down=args.down, dry_run=args.dry_run)


def _tls_gen(args: argparse.Namespace) -> int:
    from sharedcompute._cluster._tls_gen import generate

    for path in generate(args.folder, args.names):
        print(path)
    first = args.names[0]
    print(f"start with: --tls-cert {Path(args.folder) / (first + '.pem')} "
          f"--tls-key {Path(args.folder) / (first + '.key')} "
          f"--tls-ca {Path(args.folder) / 'ca.pem'}")
    return 0


def _tls_flags(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("--tls-cert", help="TLS: this host's certificate (PEM), signed by --tls-ca")
    verb.add_argument("--tls-key", help="TLS: the certificate's private key (PEM)")
    verb.add_argument("--tls-ca", help="TLS: the cluster's CA certificate (PEM); with all three, "
                      "every cluster connection is mutual TLS")


def _use_tls(args: argparse.Namespace) -> None:
    """TLS for this process, and for the processes it starts (through the environment)."""
    files = {CERT_ENV: args.tls_cert, KEY_ENV: args.tls_key, CA_ENV: args.tls_ca}
    if not any(files.values()):
        return
    for name, path in files.items():
        if path:
            os.environ[name] = os.path.abspath(path)
    configure(os.environ.get(CERT_ENV), os.environ.get(KEY_ENV), os.environ.get(CA_ENV))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "tls_cert"):
            _use_tls(args)
        result: int = args.run(args)
    except Exception as error:  # an AuthenticationError, say: one line, not a traceback
        print(f"sharedcompute {args.verb}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
