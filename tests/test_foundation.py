"""Promises found broken in review, each pinned by a test that failed before its fix.

Worker crashes charged to the right task, result blocks of dead workers freed,
workers that cannot start, finalizers that must never block, done-callbacks
that must not stall the I/O thread.
"""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute._protocol import Connection, Msg
from sharedcompute._store import ClientStore, OwnerStore

TIMEOUT = 60
MiB = 1024 * 1024


@pytest.fixture
def rt() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=2) as runtime:
        yield runtime


def test_a_worker_finalizer_never_waits_for_the_connection_it_interrupted() -> None:
    # A Future collected while this very thread is inside a send (holding the
    # connection's send lock) must not wait for that lock: it would wait forever.
    from sharedcompute._worker._main import WorkerRuntime

    ours, theirs = socket.socketpair()
    with OwnerStore(capacity=64 * MiB) as owner:
        client = ClientStore(owner.address)
        try:
            conn = Connection(ours)
            runtime = WorkerRuntime(0, conn, client)
            finished = threading.Event()

            def release_while_sending() -> None:
                with conn._send_lock:  # as if a send were under way in this thread
                    runtime.release_key(7)
                finished.set()

            thread = threading.Thread(target=release_while_sending, daemon=True)
            thread.start()
            assert finished.wait(TIMEOUT), "the release blocked on the send lock"
            runtime._flush()  # the next flush point sends what was held back
            peer = Connection(theirs)
            assert peer.recv_one() == (Msg.RELEASE, [7])
        finally:
            client.close()
            ours.close()
            theirs.close()


# -- a crash is charged to the task that crashed --------------------------------------------


def step(workdir: str, how: str) -> Any:
    """Short by design: the driver queues such tasks behind one another on a worker."""
    if how == "hold":
        time.sleep(0.3)  # this once it runs long: the rest queue up behind it meanwhile
    elif how == "crash":
        with open(os.path.join(workdir, "crashes"), "a") as f:
            f.write("x")
        os._exit(3)
    return np.full(64 * 1024, 7, dtype=np.int64)  # 512 KiB: stored, not inline


def crash_behind_batched_results(rt: sc.Runtime, workdir: str) -> list[sc.Future[Any]]:
    """Two tasks finish with their results batched, unsent; the third kills the worker."""
    task = sc.remote(step).options(max_retries=0)
    for _ in range(5):  # the driver and the worker learn that it is short
        task.submit(workdir, "warm").result(timeout=TIMEOUT)
    hold = task.submit(workdir, "hold")
    futures = [task.submit(workdir, how) for how in ("ok", "ok", "crash")]
    hold.result(timeout=TIMEOUT)
    return futures


def test_a_crash_is_charged_to_the_task_executing_not_to_finished_ones(tmp_path: Path) -> None:
    with sc.Runtime(num_workers=1) as rt:
        first, second, crasher = crash_behind_batched_results(rt, str(tmp_path))
        # The two that had finished rerun free of charge (max_retries=0, yet they succeed).
        assert int(first.result(timeout=TIMEOUT).sum()) == 7 * 64 * 1024
        assert int(second.result(timeout=TIMEOUT).sum()) == 7 * 64 * 1024
        with pytest.raises(sc.errors.WorkerCrashedError, match="exited with code 3"):
            crasher.result(timeout=TIMEOUT)
        assert (tmp_path / "crashes").read_text() == "x"  # it ran once: no free retry


def test_results_a_dead_worker_stored_but_never_reported_are_freed(tmp_path: Path) -> None:
    with sc.Runtime(num_workers=1) as rt:
        futures = crash_behind_batched_results(rt, str(tmp_path))
        sc.wait(futures, timeout=TIMEOUT)
        del futures
        wait_until(lambda: rt.store.stats()["num_objects"] == 0, what="an empty store")


# -- workers that cannot start ---------------------------------------------------------------


def refuse_to_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, times: int | None) -> None:
    """Make new worker processes exit before they are ready (``times`` of them; None: all)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, sys
        if "SHAREDCOMPUTE_WORKER" in os.environ:
            count = os.path.join({str(tmp_path)!r}, "refusals")
            with open(count, "a") as f:
                f.write("x")
            if {times!r} is None or os.path.getsize(count) <= {times!r}:
                sys.stderr.write("cannot start: the license server is down\\n")
                os._exit(4)
    """))
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)


def test_workers_that_never_start_fail_futures_with_their_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    refuse_to_start(monkeypatch, tmp_path, times=None)
    with sc.Runtime(num_workers=2) as rt:
        future = sc.submit(abs, -1)
        with pytest.raises(sc.errors.WorkerCrashedError) as caught:
            future.result(timeout=TIMEOUT)
        message = str(caught.value)
        assert "cannot start" in message and "exited with code 4" in message
        assert "the license server is down" in message
        with pytest.raises(sc.errors.WorkerCrashedError, match="license server"):
            sc.submit(abs, -2)  # broken: new work is refused at once
        assert rt.broken is not None


def test_a_worker_that_fails_to_start_once_is_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    refuse_to_start(monkeypatch, tmp_path, times=1)
    with sc.Runtime(num_workers=1) as rt:
        assert sc.submit(abs, -3).result(timeout=TIMEOUT) == 3
        assert rt.broken is None
        assert (tmp_path / "refusals").read_text() == "xx"


# -- done-callbacks ------------------------------------------------------------------------


def test_a_slow_done_callback_does_not_stall_other_results(rt: sc.Runtime) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_callback(_: Any) -> None:
        entered.set()
        release.wait(TIMEOUT)

    try:
        first = sc.submit(abs, -1)
        first.add_done_callback(slow_callback)
        assert entered.wait(TIMEOUT)
        # The callback is still running: the workers' answers must still be read.
        assert sc.submit(abs, -2).result(timeout=10) == 2
        assert sc.gather(sc.map(abs, [-3, -4]), timeout=10) == [3, 4]
    finally:
        release.set()


def test_done_callbacks_run_once_each_in_settling_order(rt: sc.Runtime) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def record(future: Any) -> None:
        with lock:
            seen.append(future.result())

    futures = [sc.submit(abs, -i) for i in range(50)]
    for future in futures:
        future.add_done_callback(record)
    sc.wait(futures, timeout=TIMEOUT)
    wait_until(lambda: len(seen) == 50, what="every callback")
    assert sorted(seen) == list(range(50))


def test_a_waiter_wakes_when_another_thread_cancels_its_future() -> None:
    # The waiting thread reads the workers' sockets itself; a Future settled by another
    # thread (not by a message) must still wake it.
    with sc.Runtime(num_workers=1):
        sc.submit(time.sleep, 20)  # no message comes from the worker meanwhile
        queued = sc.submit(abs, -1)  # waits for the only worker
        outcome: list[BaseException] = []

        def wait_for_it() -> None:
            try:
                queued.result(timeout=TIMEOUT)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.2)  # it is waiting now
        assert queued.cancel()
        waiter.join(10)
        assert not waiter.is_alive(), "the waiter slept through the cancellation"
        assert type(outcome[0]).__name__ == "CancelledError"


# -- local mode is a one-node cluster ------------------------------------------------------------


def test_nodes_and_resources_of_local_mode() -> None:
    with sc.Runtime(num_workers=2, resources={"gpu": 1}):
        (node,) = sc.nodes()
        assert set(node) == {
            "node_id", "address", "alive", "resources", "available", "store_used",
            "store_capacity", "workers",
        }
        assert node["alive"] and node["workers"] == 2
        assert sc.cluster_resources() == {"CPU": 2.0, "gpu": 1.0} == node["resources"]
        busy = sc.submit(time.sleep, 2)
        wait_until(lambda: sc.available_resources()["CPU"] == 1.0, what="one CPU taken")
        assert sc.available_resources()["gpu"] == 1.0
        busy.cancel()


def test_a_thread_still_running_after_main_returns_may_use_the_default_runtime() -> None:
    import subprocess
    import sys

    script = textwrap.dedent("""
        import threading, time
        import sharedcompute as sc

        def late() -> None:
            time.sleep(0.5)
            print(sc.submit(pow, 7, 2).result(timeout=30), flush=True)

        sc.init(num_workers=1)
        threading.Thread(target=late).start()   # not a daemon: the interpreter waits for it
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "49"
