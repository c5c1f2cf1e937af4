"""Hostile peers against a real head, on its control port and on its transfer port.

Every case is refused before a byte of it is unpickled, and the head serves a good
driver meanwhile: its status, and a task run end to end."""

from __future__ import annotations

import os
import pickle
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _cluster import TIMEOUT, TOKEN, Cluster

from sharedcompute._cluster import ClusterClient
from sharedcompute._protocol import _handshake
from sharedcompute._protocol._handshake import HELLO_SIZE
from sharedcompute._runtime._base import TaskOptions
from sharedcompute.errors import AuthenticationError


class CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def old_version(sock: socket.socket, _: str) -> None:
    nonce = sock.recv(HELLO_SIZE)[-32:]
    sock.sendall(_handshake.proof(TOKEN.encode(), nonce, os.urandom(32), version=0))


HOSTILE = [
    pytest.param(lambda sock, _: sock.sendall(os.urandom(200)), id="garbage bytes"),
    pytest.param(lambda sock, _: sock.sendall((2**40).to_bytes(8, "big") + b"x" * 62),
                 id="a 2**40 length prefix"),
    pytest.param(lambda sock, path: sock.sendall(pickle.dumps(CreatesAFile(path)).ljust(70)),
                 id="a pickle that would create a file"),
    pytest.param(lambda sock, _: sock.sendall(b"SHCP\x00\x01" + b"\x00" * 64),
                 id="no token (a proof of zeros)"),
    pytest.param(old_version, id="an old protocol version"),
]


def serves_a_good_driver(cluster: Cluster) -> None:
    client = ClusterClient(cluster.head.address, TOKEN)
    try:
        data = client.put(np.arange(100_000))
        assert client.submit(np.sum, (data,), {}, TaskOptions()).result(TIMEOUT) == (
            100_000 * 99_999 // 2
        )
    finally:
        client.shutdown()
    assert cluster.head.status().nodes[0].alive


def said_by_head(capfd: pytest.CaptureFixture[str], text: str) -> None:
    """The head logs ``text`` (it may do so just after it closed the connection)."""
    err = ""
    deadline = time.monotonic() + TIMEOUT
    while text not in err and time.monotonic() < deadline:
        err += capfd.readouterr().err
        time.sleep(0.05)
    assert text in err


def port(cluster: Cluster, which: str) -> tuple[str, int]:
    address = cluster.head.address if which == "control" else cluster.head.cluster.transfer.address
    host, _, number = address.rpartition(":")
    return host, int(number)


@pytest.mark.parametrize("which", ["control", "data"])
@pytest.mark.parametrize("send", HOSTILE)
def test_hostile_peers_are_refused_before_unpickling_and_a_good_driver_is_served(
    cluster: Cluster, tmp_path: Path, which: str, send: Callable[[socket.socket, str], None],
    capfd: pytest.CaptureFixture[str],
) -> None:
    path = str(tmp_path / "pwned")
    with socket.create_connection(port(cluster, which), timeout=TIMEOUT) as sock:
        sock.recv(HELLO_SIZE, socket.MSG_PEEK)
        send(sock, path)
        serves_a_good_driver(cluster)
        sock.settimeout(TIMEOUT)
        try:
            while sock.recv(4096):  # the head closes it
                pass
        except ConnectionResetError:
            pass
    assert not os.path.exists(path)
    said_by_head(capfd, "refused a connection")


def test_a_peer_sending_one_byte_a_second_is_dropped_after_the_handshake_timeout(
    cluster: Cluster, capfd: pytest.CaptureFixture[str],
) -> None:
    with socket.create_connection(port(cluster, "control"), timeout=TIMEOUT) as slow:
        slow.recv(HELLO_SIZE)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < _handshake.HANDSHAKE_TIMEOUT + 5 and not closed:
            try:
                slow.sendall(b"S")
            except OSError:
                closed = True
                break
            serves_a_good_driver(cluster) if time.monotonic() - started < 2 else None
            slow.settimeout(1.0)
            try:
                closed = slow.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed = True
        assert closed, "the slow peer was not dropped"
        assert time.monotonic() - started >= _handshake.HANDSHAKE_TIMEOUT - 1
    said_by_head(capfd, "did not finish the handshake in time")


def test_a_missing_or_wrong_token_fails_on_the_client_naming_the_head(cluster: Cluster) -> None:
    for token in ("", "w" * 64):
        with pytest.raises(AuthenticationError, match=cluster.head.address.rpartition(":")[2]):
            ClusterClient(cluster.head.address, token or " ")
    serves_a_good_driver(cluster)
