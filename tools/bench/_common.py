"""Helpers every benchmark shares: timing, medians, memory of a process tree, Markdown tables,
running a function in a fresh interpreter, a measuring child's environment, workload loop and
results file, what a system's turn left behind, and a Dask cluster.

Benchmarks run as scripts (``python tools/bench/NAME.py``), where neither the repository root
nor this folder's parent is importable; :func:`ensure_repo_on_path` fixes that before a
benchmark imports ``sharedcompute``. Nothing here imports ``sharedcompute`` itself.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import select
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def proc_kib(path: str, field: str) -> int | None:
    """A ``Field:   N kB`` line of a /proc file (``status``, ``smaps_rollup``, ``meminfo``),
    in bytes; None where the file (a process gone) or the field is missing."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ensure_repo_on_path() -> None:
    """Make ``import sharedcompute`` work however the benchmark was started."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


# -- timing ------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds taken by each repetition of one measured call."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def worst(self) -> float:
        return max(self.samples)


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout: float = 30.0) -> None:
    """Terminate ``procs`` last first (workers before their head), killing what lingers."""
    for proc in reversed(procs):
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_for_file(path: Path, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists (a started process writes it once it is up)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep a collection from landing inside a measurement."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Run ``fn`` once; return (seconds, its result)."""
    with gc_paused():
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    return elapsed, result


def repeat(
    fn: Callable[[], T], repeats: int, *, after: Callable[[T], object] | None = None
) -> Timing:
    """Time ``repeats`` calls of ``fn``; ``after`` gets each result, outside the timing.

    ``after`` is where a benchmark undoes the call (deletes what a put stored, drops the
    copy a load made), so every repetition starts from the same state.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    samples = []
    for _ in range(repeats):
        elapsed, result = timed(fn)
        samples.append(elapsed)
        if after is not None:
            after(result)
        del result
    return Timing(tuple(samples))


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


# -- memory ------------------------------------------------------------------


@dataclass(frozen=True)
class TreeMemory:
    """Memory of a process and all its descendants.

    ``rss_bytes`` counts a shared page once per process that maps it, so it overstates a
    shared-memory store; ``pss_bytes`` splits each shared page among its users, so its sum
    over the tree is the memory the tree really holds (None where the OS does not say).
    """

    processes: int
    rss_bytes: int
    pss_bytes: int | None
    uss_bytes: int | None


def tree_memory(pid: int | None = None) -> TreeMemory:
    """Sum the memory of process ``pid`` (default: this one) and its descendants."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = 0
    pss: int | None = 0
    uss: int | None = 0
    counted = 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.AccessDenied:
            info = process.memory_info()
        except psutil.NoSuchProcess:
            continue  # exited while we looked
        counted += 1
        rss += info.rss
        pss = pss + info.pss if pss is not None and hasattr(info, "pss") else None
        uss = uss + info.uss if uss is not None and hasattr(info, "uss") else None
    return TreeMemory(counted, rss, pss, uss)


# -- formatting --------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def format_bytes(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{nbytes:.0f} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; the first column left-aligned, the others right."""
    cells = [[str(cell) for cell in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, the table has {len(headers)}")
    widths = [max(len(text) for text in column) for column in zip(headers, *cells, strict=True)]

    def line(values: Sequence[str]) -> str:
        padded = [
            value.ljust(width) if index == 0 else value.rjust(width)
            for index, (value, width) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (width - 1) + (":" if index else "-") for index, width in enumerate(widths)]
    return "\n".join([line(headers), line(rule), *(line(row) for row in cells)])


# -- isolation ---------------------------------------------------------------


def run_in_subprocess(fn: Callable[..., T], *args: Any, timeout: float = 600.0) -> T:
    """Call ``fn(*args)`` in a fresh interpreter and return its result.

    For measurements that must not inherit this process's warm heap, page tables or imports.
    ``fn`` and ``args`` travel pickled, so ``fn`` must be a module-level function of an
    importable module (not of a script's ``__main__``); the child gets this process's
    ``sys.path``. Its exception comes back as a ``RuntimeError`` carrying the child's
    traceback; a child that runs past ``timeout`` seconds is killed and reported with
    ``TimeoutError``. A plain ``subprocess`` rather than ``multiprocessing`` spawn: spawn also
    starts a resource-tracker process that outlives the call.
    """
    # Two layers: the child must extend sys.path before unpickling ``fn`` can import its module.
    call = pickle.dumps((sys.path, pickle.dumps((fn, args), protocol=5)), protocol=5)
    result_r, result_w = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, str(result_w)],
            stdin=subprocess.PIPE,
            pass_fds=(result_w,),
        )
    except BaseException:
        os.close(result_r)
        os.close(result_w)
        raise
    os.close(result_w)
    try:
        assert child.stdin is not None
        child.stdin.write(call)
        child.stdin.close()
        reply = _read_until_eof(result_r, timeout, what=fn.__qualname__)
        child.wait(timeout=10)
    finally:
        os.close(result_r)
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    if not reply:
        raise RuntimeError(
            f"the subprocess running {fn.__qualname__} died (exit code {child.returncode})"
        )
    status, payload = pickle.loads(reply)
    if status == "err":
        raise RuntimeError(f"{fn.__qualname__} failed in a subprocess:\n{payload}")
    result: T = payload
    return result


def _read_until_eof(fd: int, timeout: float, *, what: str) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"{what} ran past {timeout} s in a subprocess")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


_CHILD_CODE = """
import os, pickle, sys, traceback
path, call = pickle.loads(sys.stdin.buffer.read())
sys.path[:] = path
try:
    fn, args = pickle.loads(call)
    reply = pickle.dumps(("ok", fn(*args)), protocol=5)
except BaseException:
    reply = pickle.dumps(("err", traceback.format_exc()), protocol=5)
with os.fdopen(int(sys.argv[1]), "wb") as out:
    out.write(reply)
"""


# -- memory over time ------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    """PSS and RSS summed over a process tree, in bytes (PSS falls back to RSS where unknown)."""

    pss_bytes: int
    rss_bytes: int
    processes: int


class TreeMemorySampler:
    """Samples the memory of a process tree every ``interval`` seconds, from another process.

    A separate process rather than a thread: a driver busy in a long C call (a 1 GiB memcpy,
    a pickle) holds the GIL, and a sampling thread would miss exactly the peak it is there for.
    The sampler reads ``/proc`` directly (``smaps_rollup`` for PSS), leaves itself out of the
    tree, and refreshes the list of descendants every few samples so processes a system starts
    later (Ray's workers) are counted. It exits when this process closes its stdin, however this
    process ends.

    ::

        with TreeMemorySampler() as sampler:
            base = sampler.reset()      # now, and the start of a new peak window
            ...                         # the workload
            extra = sampler.peak().pss_bytes - base.pss_bytes
    """

    def __init__(self, root_pid: int | None = None, interval: float = 0.02) -> None:
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.interval = interval
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> TreeMemorySampler:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER_CODE, str(self.root_pid), str(self.interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._ask("now")  # wait until it runs
        return self

    def __exit__(self, *exc_info: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()

    def reset(self) -> MemorySample:
        """Take a sample now, and start a new peak window from it."""
        return self._ask("reset")

    def peak(self) -> MemorySample:
        """The largest sample since the last reset (a sample is taken now too)."""
        return self._ask("peak")

    def _ask(self, command: str) -> MemorySample:
        if self._proc is None:
            raise RuntimeError("the sampler is not running; use it as a context manager")
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the memory sampler exited (code {self._proc.poll()})")
        pss, rss, count = (int(field) for field in line.split())
        return MemorySample(pss, rss, count)


# Runs in the sampler process: standard library only, no psutil, so it starts in ~20 ms.
_SAMPLER_CODE = r"""
import os, select, sys, time
root, interval = int(sys.argv[1]), float(sys.argv[2])
me = os.getpid()

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid != me:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found

def memory(pid):
    pss = rss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    if rss is None:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None
    return (rss if pss is None else pss), rss

pids, since_refresh = [], 10**9
def sample():
    global pids, since_refresh
    if since_refresh >= 10:
        pids, since_refresh = descendants(), 0
    since_refresh += 1
    pss = rss = count = 0
    for pid in pids:
        got = memory(pid)
        if got is not None:
            pss, rss, count = pss + got[0], rss + got[1], count + 1
    return pss, rss, count

peak = sample()
while True:
    if select.select([sys.stdin], [], [], interval)[0]:
        command = sys.stdin.readline().strip()
        if not command:
            break
        since_refresh = 10**9  # a command marks a phase change: look for new processes
        now = sample()
        if command == "reset":
            peak = now
        elif now[0] > peak[0]:
            peak = now
        reply = now if command in ("reset", "now") else peak
        sys.stdout.write("%d %d %d\n" % reply)
        sys.stdout.flush()
    else:
        now = sample()
        if now[0] > peak[0]:
            peak = now
"""


def tree_cpu_seconds(pid: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system) used so far by process ``pid`` and by each descendant."""
    root = psutil.Process(pid)
    used: dict[int, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        used[process.pid] = times.user + times.system
    return used


# -- process hygiene ---------------------------------------------------------------


def become_child_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``); False where unsupported.

    A system that daemonizes helpers (Ray's raylet, a resource tracker) leaves them orphaned
    when the process that started them exits; as a subreaper this process inherits them, so
    :func:`end_descendants` can still find and stop them.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)


def end_descendants(grace: float = 5.0, settle: float = 0.0) -> list[str]:
    """Stop every descendant of this process (SIGTERM, then SIGKILL after ``grace``) and reap it.

    Descendants get ``settle`` seconds to exit by themselves first (a helper that notices its
    parent is gone needs a moment). Returns ``"name (pid N)"`` for each process that was still
    running after that, zombies left out: what the systems measured left behind.
    """
    me = psutil.Process()
    left: list[str] = []
    processes = me.children(recursive=True)
    if settle > 0 and processes:
        _, processes = psutil.wait_procs(processes, timeout=settle)
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.name()} (pid {process.pid})")
                process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace)
    _reap_zombies()
    return left


def _reap_zombies() -> None:
    """Collect the exit status of every child that has ended (orphans adopted included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# -- one system's turn -------------------------------------------------------------

SHM_DIR = "/dev/shm"
LEFTOVER_SETTLE_S = 3.0  # how long a system's helpers may take to exit after its driver


def log(message: str) -> None:
    """Progress goes to stderr: stdout is the report's (``--json``)."""
    print(message, file=sys.stderr, flush=True)


def shm_entries() -> set[str]:
    """The names in /dev/shm, POSIX semaphores ("sem.*") left out.

    multiprocessing (and loky) name a semaphore and unlink it at once, so on a shared machine
    any process's pool shows up in the window; the systems' own named segments stay.
    """
    try:
        return {name for name in os.listdir(SHM_DIR) if not name.startswith("sem.")}
    except FileNotFoundError:
        return set()


@dataclass
class SystemRun:
    """Everything measured for one system, and what went wrong."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    leftover_processes: list[str] = field(default_factory=list)
    shm_entries_left: list[str] = field(default_factory=list)

    def stop_leftovers(self, step: str | None = None) -> None:
        """Stop what the system left running and note it (under ``step``, where given)."""
        left = end_descendants(settle=LEFTOVER_SETTLE_S)
        self.leftover_processes += [p if step is None else f"{step}: {p}" for p in left]


@contextmanager
def system_run(name: str) -> Iterator[SystemRun]:
    """A :class:`SystemRun` to fill; when the block ends it gets the /dev/shm entries that
    appeared meanwhile and the 1-minute load average before and after (``load_average_1min``).
    """
    run = SystemRun(name)
    shm_before = shm_entries()
    load_before = os.getloadavg()[0]
    yield run
    run.shm_entries_left = sorted(shm_entries() - shm_before)
    run.figures["load_average_1min"] = [load_before, os.getloadavg()[0]]


def child_env() -> dict[str, str]:
    """The environment of a measuring child: the repository importable, for the systems'
    workers too, and Ray's usage statistics off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def write_results(out_path: str, results: dict[str, Any]) -> None:
    """Replace ``out_path`` with ``results`` as JSON in one step, so that a child killed
    mid-write leaves the previous version whole."""
    temporary = out_path + ".tmp"
    with open(temporary, "w") as out:
        json.dump(results, out)
    os.replace(temporary, out_path)


def run_workloads(
    system: Any,
    plan: Any,
    workloads: Sequence[tuple[str, Callable[[Any, Any], dict[str, Any]]]],
    results: dict[str, Any],
    out_path: str,
    *,
    warm_up: Callable[[], object] | None = None,
) -> None:
    """In a measuring child: ``warm_up``, each workload on ``system`` in turn, then close it.

    A workload's exception goes to ``results["errors"][name]`` and the next one runs. The
    results file is rewritten after every workload and after the close (``shutdown_s``), so a
    child killed on a timeout still reports what it finished.
    """
    try:
        if warm_up is not None:
            warm_up()
        for name, workload in workloads:
            log(f"[{system.name}] {name}")
            try:
                results.update(workload(system, plan))
            except Exception:
                results["errors"][name] = traceback.format_exc(limit=8)
            gc.collect()
            write_results(out_path, results)
    finally:
        closing = time.perf_counter()
        system.close()
        results["shutdown_s"] = time.perf_counter() - closing
        write_results(out_path, results)


@dataclass(frozen=True)
class Target:
    """One target of a benchmark's issue, checked against the figures (never asserted)."""

    name: str
    status: str  # PASS, FAIL or SKIP
    text: str


def start_dask_cluster(workers: int, *, dashboard_address: str | None = None) -> tuple[Any, Any]:
    """A Dask ``LocalCluster`` of ``workers`` processes with one thread each, and a ``Client``
    on it: ``(cluster, client)``. Close the client, then the cluster.

    ``dashboard_address=None`` starts no dashboard.
    """
    import logging

    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        processes=True,
        n_workers=workers,
        threads_per_worker=1,
        dashboard_address=dashboard_address,
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster)


# -- data ----------------------------------------------------------------------------


def make_arrow_table(rows: int) -> Any:
    """A pyarrow.Table of four int64/float64 columns and a string column (~43 bytes a row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = np.arange(rows, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "group": ids % 1000,
            "x": ids * 0.5,
            "y": np.sqrt(ids, dtype=np.float64),
            "name": pc.cast(pa.array(ids), pa.string()),
        }
    )
