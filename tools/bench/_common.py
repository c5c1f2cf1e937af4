"""Helpers every benchmark shares: timing, medians, memory of a process tree, Markdown tables,
and running a function in a fresh interpreter.

Benchmarks run as scripts (``python tools/bench/NAME.py``), where neither the repository root
nor this folder's parent is importable; :func:`ensure_repo_on_path` fixes that before a
benchmark imports ``sharedcompute``. Nothing here imports ``sharedcompute`` itself.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


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
            return f"{nbytes / size:.3g} {unit}"
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
