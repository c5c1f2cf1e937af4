"""Promises found broken in review, each pinned by a test that failed before its fix.

Worker crashes charged to the right task, result blocks of dead workers freed,
workers that cannot start, finalizers that must never block, done-callbacks
that must not stall the I/O thread.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

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
