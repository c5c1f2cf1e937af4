"""The cluster handshake and the token, on real TCP sockets over loopback.

Every hostile case is refused before anything the peer sent is unpickled, and a
server keeps serving good clients while a bad one is being refused.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sharedcompute._cluster import _token
from sharedcompute._protocol import _handshake
from sharedcompute._protocol._handshake import (
    HELLO_SIZE,
    accept_handshake,
    accept_handshake_async,
    open_handshake,
)
from sharedcompute.errors import AuthenticationError

TOKEN = b"a" * 64
TIMEOUT = 30


def connected_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server, _ = listener.accept()
    return client, server


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException | None]]:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_both_sides_prove_the_token() -> None:
    client, server = connected_pair()
    with client, server:
        thread, outcome = in_thread(lambda: accept_handshake(server, TOKEN, "client"))
        open_handshake(client, TOKEN, "127.0.0.1:1")
        thread.join(TIMEOUT)
        assert outcome == [None]


def test_a_wrong_token_is_refused_on_both_sides_naming_the_address() -> None:
    client, server = connected_pair()
    with client, server:
        thread, outcome = in_thread(lambda: accept_handshake(server, TOKEN, "10.0.0.9:5000"))
        with pytest.raises(AuthenticationError, match=r"127\.0\.0\.1:6380 refused the cluster"):
            open_handshake(client, b"b" * 64, "127.0.0.1:6380")
        thread.join(TIMEOUT)
        assert isinstance(outcome[0], AuthenticationError)
        assert "10.0.0.9:5000 sent a wrong token" in str(outcome[0])


def test_a_server_that_does_not_know_the_token_is_not_trusted() -> None:
    # A fake head that accepts anything: the client sees it answer wrongly.
    client, server = connected_pair()
    with client, server:
        def fake_head() -> None:
            server.sendall(_handshake.hello(os.urandom(32)))
            server.recv(_handshake.PROOF_SIZE)
            server.sendall(bytes([_handshake.ACCEPTED]) + os.urandom(32))

        thread, _ = in_thread(fake_head)
        with pytest.raises(AuthenticationError, match="does not know the cluster token"):
            open_handshake(client, TOKEN, "127.0.0.1:6380")
        thread.join(TIMEOUT)


def test_another_protocol_version_is_refused_with_the_reason() -> None:
    client, server = connected_pair()
    with client, server:
        thread, outcome = in_thread(lambda: accept_handshake(server, TOKEN, "old client"))
        with pytest.raises(AuthenticationError, match="speaks sharedcompute protocol version 1"):
            open_handshake(client, TOKEN, "127.0.0.1:6380", version=0)
        client.close()
        thread.join(TIMEOUT)
        assert isinstance(outcome[0], AuthenticationError)


def test_a_client_of_another_version_is_told_so() -> None:
    client, server = connected_pair()
    with client, server:
        thread, outcome = in_thread(lambda: accept_handshake(server, TOKEN, "old client"))
        nonce = _handshake.check_hello(client.recv(HELLO_SIZE), "head")
        client.sendall(_handshake.proof(TOKEN, nonce, os.urandom(32), version=7))
        answer = client.recv(_handshake.ANSWER_SIZE)
        with pytest.raises(AuthenticationError, match="refused this process's protocol version"):
            _handshake.check_answer(answer, TOKEN, nonce, b"", "head")
        thread.join(TIMEOUT)
        assert "version 7" in str(outcome[0])


# -- hostile peers, against an asyncio server that serves a good client meanwhile ---------------


class Server:
    """An asyncio server on loopback: handshake each connection, then echo one line."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.refused: list[str] = []
        self.served = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop
        ).result(TIMEOUT)
        self.address = self.server.sockets[0].getsockname()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "{}:{}".format(*writer.get_extra_info("peername"))
        try:
            await accept_handshake_async(reader, writer, TOKEN, peer, timeout=self.timeout)
            line = await reader.readline()
            writer.write(line)
            await writer.drain()
            self.served += 1
        except AuthenticationError as error:
            self.refused.append(str(error))
        finally:
            writer.close()

    def good_client(self) -> bytes:
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            open_handshake(sock, TOKEN, "server")
            sock.sendall(b"ping\n")
            return sock.recv(16)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server(timeout=2.0)
    yield running
    running.close()


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("send", [
    pytest.param(lambda sock, _: sock.sendall(os.urandom(200)), id="garbage bytes"),
    pytest.param(lambda sock, _: sock.sendall((2**40).to_bytes(8, "big") + b"x" * 62),
                 id="a 2**40 length prefix"),
    pytest.param(lambda sock, path: sock.sendall(pickle.dumps(CreatesAFile(path)).ljust(70)),
                 id="a pickle that would create a file"),
    pytest.param(lambda sock, _: sock.sendall(b"SHCP\x00\x01" + b"\x00" * 64),
                 id="no token (a proof of zeros)"),
])
def test_hostile_peers_are_refused_before_any_unpickling(
    server: Server, tmp_path: Path, send: Callable[[socket.socket, str], None]
) -> None:
    path = str(tmp_path / "pwned")
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        sock.recv(HELLO_SIZE)
        send(sock, path)
        assert server.good_client() == b"ping\n"  # served meanwhile
        wait_for(lambda: len(server.refused) == 1)
    assert not os.path.exists(path)
    wait_for(lambda: server.served == 1)


def test_a_peer_that_sends_one_byte_at_a_time_is_dropped_while_others_are_served(
    server: Server,
) -> None:
    with socket.create_connection(server.address, timeout=TIMEOUT) as slow:
        slow.recv(HELLO_SIZE)
        started = time.monotonic()
        for _ in range(5):
            slow.sendall(b"S")
            assert server.good_client() == b"ping\n"
            time.sleep(0.3)
        wait_for(lambda: len(server.refused) == 1)
        assert "did not finish the handshake in time" in server.refused[0]
        assert time.monotonic() - started < TIMEOUT
    wait_for(lambda: server.served == 5)


# -- the token ------------------------------------------------------------------------------


@pytest.fixture
def token_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (_token.TOKEN_ENV, _token.TOKEN_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(_token.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_head_creates_a_private_token_once(token_home: Path) -> None:
    with pytest.raises(AuthenticationError, match="no cluster token here"):
        _token.find_token()
    token = _token.find_token(create=True)
    assert len(token) == 64 and int(token, 16) >= 0
    path = token_home / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_home.stat().st_mode) == 0o700
    assert _token.find_token() == token == _token.find_token(create=True)


def test_the_environment_then_a_named_file_then_the_home(
    token_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home_token = _token.find_token(create=True)
    named = tmp_path / "cluster.token"
    named.write_text("  from-the-file \n")
    named.chmod(0o600)
    assert _token.find_token(named) == "from-the-file"
    monkeypatch.setenv(_token.TOKEN_FILE_ENV, str(named))
    assert _token.find_token() == "from-the-file"
    monkeypatch.setenv(_token.TOKEN_ENV, "from-the-environment")
    assert _token.find_token(named) == "from-the-environment"
    monkeypatch.delenv(_token.TOKEN_ENV)
    monkeypatch.delenv(_token.TOKEN_FILE_ENV)
    assert _token.find_token() == home_token


def test_a_missing_named_file_is_created_and_a_readable_one_refused(
    token_home: Path, tmp_path: Path
) -> None:
    named = tmp_path / "new" / "token"
    created = _token.find_token(named)
    assert named.read_text().strip() == created
    named.chmod(0o644)
    with pytest.raises(AuthenticationError, match="chmod 600"):
        _token.find_token(named)
