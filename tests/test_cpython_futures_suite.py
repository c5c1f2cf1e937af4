"""CPython 3.11's own concurrent.futures tests against sharedcompute.Executor.

The tool ``tools/cpython_futures_suite.py`` runs them (see its docstring); here it runs in a
subprocess of its own session, so that whatever it starts, even when it hangs or is killed,
is found by process group and stopped before the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "cpython_futures_suite.py"
EXIT_UNAVAILABLE = 3  # the tool's: no CPython test file (or test.support) on this machine
SUITE_TIMEOUT = 600.0
PER_TEST_TIMEOUT = 120.0
GROUP_GRACE = 10.0


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _stop_group(pgid: int) -> list[str]:
    """Give the group's processes a moment to exit on their own, then kill the rest.

    Returns what had to be killed (workers notice their driver's exit asynchronously).
    """
    deadline = time.monotonic() + GROUP_GRACE
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = []
    for member in _group_members(pgid):
        try:
            left.append(f"{member.pid} {' '.join(member.cmdline()[:4])}")
        except psutil.Error:
            continue
    deadline = time.monotonic() + GROUP_GRACE
    while _group_members(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return left


@pytest.mark.slow
@pytest.mark.timeout(SUITE_TIMEOUT + 3 * GROUP_GRACE + 30)
def test_cpython_futures_suite(tmp_path: Path) -> None:
    log_path = tmp_path / "suite.log"
    with log_path.open("wb") as log:
        # A file, not a pipe: a grandchild left holding a pipe would block the read.
        proc = subprocess.Popen(
            [sys.executable, str(TOOL), "--per-test-timeout", str(PER_TEST_TIMEOUT)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode: int | None = proc.wait(timeout=SUITE_TIMEOUT)
        except subprocess.TimeoutExpired:
            returncode = None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=GROUP_GRACE)
        left_running = _stop_group(proc.pid)
    output = log_path.read_text(errors="replace")
    if returncode == EXIT_UNAVAILABLE:
        pytest.skip(output.strip().splitlines()[-1])
    summary = output[output.rfind("\n== "):] if "\n== " in output else output[-4000:]
    assert returncode is not None, f"the suite ran past {SUITE_TIMEOUT} s:\n{output[-4000:]}"
    assert not left_running, f"the suite left processes running: {left_running}"
    assert returncode == 0, f"CPython's tests failed (exit {returncode}):{summary}"
