"""Suite-wide guards: every test must leave no child process, no runtime thread,
no /dev/shm entry and no network namespace behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from _cluster import cluster  # noqa: F401 (a fixture: a head here, nodes as processes)
from _hosts import three_hosts  # noqa: F401 (a fixture: a cluster on three namespace hosts)

from tools import netns

SHM_DIR = "/dev/shm"
GRACE_SECONDS = 10.0


def _shm_entries() -> set[str]:
    # POSIX semaphores ("sem.*") belong to other libraries (multiprocessing, loky) that the
    # benchmarks start; sharedcompute itself never names anything in /dev/shm.
    try:
        return {name for name in os.listdir(SHM_DIR) if not name.startswith("sem.")}
    except FileNotFoundError:
        return set()


def _runtime_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sharedcompute")]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    shm_before = _shm_entries()
    namespaces_before = netns.namespaces() if netns.available() is None else set()
    yield
    me = psutil.Process()
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        children = [c for c in me.children(recursive=True) if c.is_running()]
        children = [c for c in children if c.status() != psutil.STATUS_ZOMBIE]
        threads = _runtime_threads()
        shm_new = _shm_entries() - shm_before
        if not (children or threads or shm_new) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    problems = []
    if children:
        problems.append(f"child processes left running: {[c.pid for c in children]}")
    if threads:
        problems.append(f"runtime threads left running: {[t.name for t in threads]}")
    if shm_new:
        problems.append(f"/dev/shm entries left behind: {sorted(shm_new)}")
    if netns.available() is None:
        namespaces_left = netns.namespaces() - namespaces_before
        if namespaces_left:
            problems.append(f"network namespaces left behind: {sorted(namespaces_left)}")
    if problems:
        pytest.fail("; ".join(problems))
