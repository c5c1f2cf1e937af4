"""``sharedcompute launch CLUSTER.toml``: a whole cluster over ssh, from one file.

::

    [cluster]
    name = "demo"
    python = "/opt/venv/bin/python"   # on every host; sharedcompute importable (default python3)
    port = 6380                        # the head's
    join_timeout = 60                  # seconds a node may take to join
    [ssh]
    user = "me"                        # default: this user
    identity_file = "~/.ssh/id_ed25519"
    port = 22
    options = ["-o", "UserKnownHostsFile=~/.ssh/cluster_hosts"]   # more ssh options
    [setup]
    commands = ["pip install -q mypackage"]   # on every host, before anything starts
    [tls]                              # optional: mutual TLS (see ``sharedcompute tls-gen``)
    cert = "/etc/sharedcompute/{host}.pem"   # paths on the hosts; {host}: each one's address
    key = "/etc/sharedcompute/{host}.key"
    ca = "/etc/sharedcompute/ca.pem"
    [runtime_env]                      # optional: under every driver's own (see sc.init)
    working_dir = "."                  # paths here: on this machine, relative to this file
    py_modules = ["../libs/mypkg"]
    env_vars = { OMP_NUM_THREADS = "1" }
    excludes = ["*.bin"]
    [head]
    host = "10.0.0.1"
    num_workers = 4
    [[nodes]]
    host = "10.0.0.2"
    num_workers = 8
    resources = { gpu = 1 }
    setup = ["..."]                    # this host's own, after the cluster's
    home = "~/.sharedcompute"          # where it keeps its pid, log and token files

The steps, each over the system ``ssh`` client (``BatchMode``: never a prompt):
check every host at once (reachable, the python found, sharedcompute importable
and of this version), run the setup commands, start the head (or find it
running), read its token back over the ssh channel, start every node at once
with the token on its stdin (never on a command line), and wait until each has
joined; then, with a ``[runtime_env]``, pack its directories here, upload to the
head what it lacks, and make it the env under every driver that connects
(reaching the head's port from this machine, as a driver does). A host that
fails is named with the reason; the others go on. Run again,
it starts only what does not run. ``--down`` stops every host's processes;
``--dry-run`` prints the commands instead of running them.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sharedcompute._env import check as check_runtime_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CHECK_TIMEOUT = 30.0
SETUP_TIMEOUT = 900.0


class LaunchError(Exception):
    """The cluster file is wrong, or a host failed: the message names it and why."""


@dataclass(frozen=True)
class HostSpec:
    host: str
    role: str  # "head" or "node"
    num_workers: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    home: str | None = None


@dataclass(frozen=True)
class ClusterFile:
    name: str
    python: str
    port: int
    join_timeout: float
    ssh_user: str | None
    ssh_identity: str | None
    ssh_port: int
    ssh_options: tuple[str, ...]
    setup: tuple[str, ...]
    tls: tuple[str, str, str] | None  # cert, key, CA paths on the hosts ("{host}" expands)
    head: HostSpec
    nodes: tuple[HostSpec, ...]
    runtime_env: dict[str, Any] | None = None  # checked; paths absolute on this machine

    @property
    def hosts(self) -> tuple[HostSpec, ...]:
        return (self.head, *self.nodes)


def load(path: str | os.PathLike[str]) -> ClusterFile:
    """Read and check a cluster file; ``LaunchError`` names what is wrong."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise LaunchError(f"cannot read the cluster file {path}: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise LaunchError(f"{path} is not valid TOML: {error}") from error
    cluster, ssh, setup = (_table(data, key, path) for key in ("cluster", "ssh", "setup"))
    if "head" not in data:
        raise LaunchError(f"{path}: a [head] table with its host is required")
    head = _host(_table(data, "head", path), "head", path)
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list):
        raise LaunchError(f"{path}: nodes must be [[nodes]] tables")
    return ClusterFile(
        name=str(cluster.get("name", "sharedcompute")),
        python=str(cluster.get("python", "python3")),
        port=_int(cluster.get("port", 6380), "cluster.port", path),
        join_timeout=float(cluster.get("join_timeout", 60)),
        ssh_user=ssh.get("user"), ssh_identity=ssh.get("identity_file"),
        ssh_port=_int(ssh.get("port", 22), "ssh.port", path),
        ssh_options=tuple(str(o) for o in ssh.get("options", [])),
        setup=tuple(str(c) for c in setup.get("commands", [])),
        tls=_tls(_table(data, "tls", path), path),
        head=head,
        nodes=tuple(_host(node, "node", path) for node in nodes),
        runtime_env=_runtime_env(data.get("runtime_env"), path),
    )


def _runtime_env(table: Any, path: Any) -> dict[str, Any] | None:
    """The ``[runtime_env]`` table, its paths taken relative to the cluster file."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise LaunchError(f"{path}: runtime_env must be a [runtime_env] table")
    base = os.path.dirname(os.path.abspath(path))

    def here(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return os.path.join(base, os.path.expanduser(value))  # an absolute path stays

    spec = dict(table)
    if "working_dir" in spec:
        spec["working_dir"] = here(spec["working_dir"])
    if isinstance(spec.get("py_modules"), list):
        spec["py_modules"] = [here(module) for module in spec["py_modules"]]
    try:
        return check_runtime_env(spec, f"{path}: [runtime_env]")
    except (TypeError, ValueError) as error:
        raise LaunchError(str(error)) from error


def _tls(table: dict[str, Any], path: Any) -> tuple[str, str, str] | None:
    if not table:
        return None
    try:
        return (str(table["cert"]), str(table["key"]), str(table["ca"]))
    except KeyError as missing:
        raise LaunchError(f"{path}: [tls] needs cert, key and ca (missing {missing})") from None


def _table(data: dict[str, Any], key: str, path: Any) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise LaunchError(f"{path}: [{key}] must be a table")
    return value


def _int(value: Any, name: str, path: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LaunchError(f"{path}: {name} must be an integer, got {value!r}")
    return value


def _host(table: Any, role: str, path: Any) -> HostSpec:
    if not isinstance(table, dict) or not isinstance(table.get("host"), str):
        raise LaunchError(f"{path}: every [{role}] needs host = \"ADDRESS\"")
    workers = table.get("num_workers")
    if workers is not None:
        _int(workers, f"{role} {table['host']}: num_workers", path)
    resources = table.get("resources", {})
    if not isinstance(resources, dict):
        raise LaunchError(f"{path}: {role} {table['host']}: resources must be a table")
    return HostSpec(
        host=table["host"], role=role, num_workers=workers,
        resources={str(k): float(v) for k, v in resources.items()},
        setup=tuple(str(c) for c in table.get("setup", [])), home=table.get("home"),
    )


# -- running commands on hosts ------------------------------------------------------------------


@dataclass
class Outcome:
    host: HostSpec
    ok: bool
    said: str  # what to print about it


class Launcher:
    """Carries out the steps on the hosts of ``cluster``; ``say`` prints a line."""

    def __init__(self, cluster: ClusterFile, *, dry_run: bool = False,
                 say: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.dry_run = dry_run
        lock = threading.Lock()

        def say_whole(line: str) -> None:  # the hosts' steps run at once: a line at a time
            with lock:
                say(line)

        self.say = say_whole

    def ssh(self, host: HostSpec, command: str, *, stdin: str | None = None,
            timeout: float = CHECK_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = self.ssh_argv(host, command)
        if self.dry_run:
            self.say(f"[dry run] {shlex.join(argv)}" + (" (token on stdin)" if stdin else ""))
            return subprocess.CompletedProcess(argv, 0, "", "")
        try:
            return subprocess.run(argv, input=stdin or "", capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"no answer within {timeout:g} s")

    def ssh_argv(self, host: HostSpec, command: str) -> list[str]:
        cluster = self.cluster
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                "-o", "StrictHostKeyChecking=accept-new", "-p", str(cluster.ssh_port)]
        if cluster.ssh_identity:
            argv += ["-i", os.path.expanduser(cluster.ssh_identity)]
        argv += cluster.ssh_options
        target = f"{cluster.ssh_user}@{host.host}" if cluster.ssh_user else host.host
        return [*argv, target, command]

    def remote(self, host: HostSpec, *args: str, token: bool = False) -> str:
        """A shell command running ``python -m sharedcompute.cli ARGS`` on ``host``."""
        env = f"SHAREDCOMPUTE_HOME={shlex.quote(host.home)} " if host.home else ""
        cli = f"{env}exec {shlex.quote(self.cluster.python)} -m sharedcompute.cli " + shlex.join(
            args
        )
        if token:  # read from stdin: a token never stands on a command line
            return f"read -r SHAREDCOMPUTE_TOKEN && export SHAREDCOMPUTE_TOKEN && {cli}"
        return cli

    def each(self, hosts: Sequence[HostSpec],
             step: Callable[[HostSpec], Outcome]) -> list[Outcome]:
        """``step`` on every host at once; their outcomes in the hosts' order."""
        with ThreadPoolExecutor(max(1, len(hosts))) as pool:
            return list(pool.map(step, hosts))

    # -- the steps -------------------------------------------------------------------------

    def check(self, host: HostSpec) -> Outcome:
        from sharedcompute import __version__

        probe = ("import sharedcompute, sys; "
                 "print(sharedcompute.__version__, sys.version.split()[0])")
        done = self.ssh(host, f"{shlex.quote(self.cluster.python)} -c {shlex.quote(probe)}")
        if done.returncode == 0 and self.dry_run:
            return Outcome(host, True, "checked (dry run)")
        last = _last_line(done.stderr)
        if done.returncode == 255:
            return Outcome(host, False, f"ssh failed (host unreachable or login refused): {last}")
        if done.returncode == 124:
            return Outcome(host, False, f"ssh: {last}")
        if done.returncode == 127:
            return Outcome(host, False, f"python not found there: {self.cluster.python} ({last})")
        if done.returncode != 0:
            return Outcome(host, False, f"sharedcompute cannot be imported by "
                           f"{self.cluster.python} there: {last}")
        version = done.stdout.split()[0] if done.stdout.split() else "?"
        if version != __version__:
            return Outcome(host, False, f"sharedcompute {version} there, {__version__} here: "
                           "install the same version on every host")
        return Outcome(host, True, f"sharedcompute {version}, python {done.stdout.split()[1]}")

    def set_up(self, host: HostSpec) -> Outcome:
        for command in (*self.cluster.setup, *host.setup):
            done = self.ssh(host, command, timeout=SETUP_TIMEOUT)
            if done.returncode != 0:
                return Outcome(host, False, f"setup command failed ({command!r}, exit "
                               f"{done.returncode}):\n" + _indent(done))
        return Outcome(host, True, "set up")

    def start_head(self) -> tuple[Outcome, str | None]:
        head, cluster = self.cluster.head, self.cluster
        args = ["start", "--head", "--host", head.host, "--port", str(cluster.port)]
        args += _worker_args(head) + self.tls_args(head)
        done = self.ssh(head, self.remote(head, *args), timeout=120)
        running = "already runs" in done.stderr
        if done.returncode != 0 and not running:
            return Outcome(head, False, "the head did not start:\n" + _indent(done)), None
        token = self.ssh(head, self.read_token(head))
        if token.returncode != 0 and not self.dry_run:
            return Outcome(head, False, f"cannot read the head's token: {_last_line(token.stderr)}"
                           ), None
        said = "was running" if running else "started"
        return Outcome(head, True, said), token.stdout.strip() or "dry-run-token"

    def ship_runtime_env(self, token: str) -> Outcome:
        """Pack the ``[runtime_env]`` here, upload what the head lacks, make it the cluster's."""
        head, spec = self.cluster.head, self.cluster.runtime_env
        if self.dry_run:
            return Outcome(head, True, f"would pack and ship the runtime_env {spec}")
        from sharedcompute._cluster._messages import SetClusterEnv
        from sharedcompute._cluster._server import request, ship_package
        from sharedcompute._env import EnvResolver

        address = f"{head.host}:{self.cluster.port}"
        try:
            resolver = EnvResolver(spec, lambda package: ship_package(address, token, package))
            request(address, token, SetClusterEnv(resolver.base))
        except Exception as error:
            return Outcome(head, False, f"runtime_env not shipped: {type(error).__name__}: "
                           f"{error}")
        described = resolver.base.describe() if resolver.base is not None else "empty"
        return Outcome(head, True, f"runtime_env set ({described}; "
                       f"{resolver.shipped_bytes} bytes uploaded)")

    def tls_args(self, host: HostSpec) -> list[str]:
        if self.cluster.tls is None:
            return []
        cert, key, ca = (p.replace("{host}", host.host) for p in self.cluster.tls)
        return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]

    def read_token(self, host: HostSpec) -> str:
        home = host.home or "~/.sharedcompute"
        return f"cat {home}/token" if home.startswith("~") else f"cat {shlex.quote(home)}/token"

    def start_node(self, node: HostSpec, token: str) -> Outcome:
        address = f"{self.cluster.head.host}:{self.cluster.port}"
        args = ["start", "--address", address, "--host", node.host, *_worker_args(node),
                *self.tls_args(node)]
        done = self.ssh(node, self.remote(node, *args, token=True), stdin=token + "\n",
                        timeout=self.cluster.join_timeout + 30)
        if done.returncode == 0:
            return Outcome(node, True, "joined")
        if "already runs" in done.stderr:
            return Outcome(node, True, "was running")
        return Outcome(node, False, "did not join:\n" + _indent(done))

    def stop(self, host: HostSpec) -> Outcome:
        done = self.ssh(host, self.remote(host, "stop"), timeout=60)
        if done.returncode != 0:
            return Outcome(host, False, "stop failed:\n" + _indent(done))
        return Outcome(host, True, done.stdout.strip().replace("\n", "; ") or "stopped")


def _worker_args(host: HostSpec) -> list[str]:
    args = []
    if host.num_workers is not None:
        args += ["--num-workers", str(host.num_workers)]
    if host.resources:
        args += ["--resources", json.dumps(host.resources)]
    return args


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing said)"


def _indent(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stdout + done.stderr).strip().splitlines()[-15:] or ["(nothing said)"]
    return "\n".join(f"    {line}" for line in lines)


# -- the command ---------------------------------------------------------------------------------


def launch(path: str, *, down: bool = False, dry_run: bool = False,
           say: Callable[[str], None] = print) -> int:
    """Bring the cluster of ``path`` up (or ``down``); 0 when every host did its part."""
    cluster = load(path)
    launcher = Launcher(cluster, dry_run=dry_run, say=say)
    if down:
        outcomes = launcher.each(list(reversed(cluster.hosts)), launcher.stop)
        _report(outcomes, say)
        return 0 if all(o.ok for o in outcomes) else 1
    checked = launcher.each(cluster.hosts, launcher.check)
    _report(checked, say)
    if not all(o.ok for o in checked):
        return 1
    set_up = launcher.each(cluster.hosts, launcher.set_up)
    if not all(o.ok for o in set_up):
        _report([o for o in set_up if not o.ok], say)
        return 1
    head, token = launcher.start_head()
    _report([head], say)
    if token is None:
        return 1
    if cluster.runtime_env:
        shipped = launcher.ship_runtime_env(token)
        _report([shipped], say)
        if not shipped.ok:
            return 1
    joined = launcher.each(cluster.nodes, lambda node: launcher.start_node(node, token))
    _report(joined, say)
    address = f"{cluster.head.host}:{cluster.port}"
    say(f"cluster {cluster.name!r}: head at {address}, "
        f"{sum(o.ok for o in joined)} of {len(joined)} nodes up")
    say(f"  connect a driver: sc.init(address={address!r})  (with the head's token, "
        f"{cluster.head.home or '~/.sharedcompute'}/token there)")
    return 0 if all(o.ok for o in joined) else 1


def _report(outcomes: list[Outcome], say: Callable[[str], None]) -> None:
    for outcome in outcomes:
        mark = "ok  " if outcome.ok else "FAIL"
        say(f"{mark} {outcome.host.role} {outcome.host.host}: {outcome.said}")

