"""The handshake that opens every cluster connection: the protocol version, and proof of the
cluster token in both directions, on raw bytes of fixed sizes.

Nothing a peer sends is unpickled before it has proved that it knows the token, so a
stranger (a port scanner, a wrong cluster, a crafted pickle) reaches no code but
this file's byte comparisons. A challenge-response with fresh nonces on both sides
means the token never crosses the wire and a recorded handshake cannot be replayed::

    server -> client   HELLO   MAGIC | version u16 | server nonce (32)              38 bytes
    client -> server   PROOF   MAGIC | version u16 | client nonce (32) | mac_c      70 bytes
    server -> client   ANSWER  status u8 | mac_s (32; zeros unless accepted)        33 bytes

    mac_c = HMAC-SHA256(token, b"client" | server nonce | client nonce)
    mac_s = HMAC-SHA256(token, b"server" | client nonce | server nonce)

Status: 0 accepted, 1 protocol version refused, 2 token refused. Both MACs are
compared in constant time. Each side allows the whole handshake ``timeout``
seconds (default 10), so a peer that sends one byte a second is dropped, not
waited for. Failures raise :class:`~sharedcompute.errors.AuthenticationError`
naming the peer's address; a server should log that once and close.

``open_handshake`` / ``accept_handshake`` work on a blocking socket;
``accept_handshake_async`` on asyncio streams (for a server of many connections).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from sharedcompute.errors import AuthenticationError

if TYPE_CHECKING:
    import asyncio

PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 10.0
MAGIC = b"SHCP"
_NONCE = 32
_HEAD = struct.Struct("!4sH")  # magic, version
HELLO_SIZE = _HEAD.size + _NONCE
PROOF_SIZE = _HEAD.size + _NONCE + 32
ANSWER_SIZE = 1 + 32
ACCEPTED, VERSION_REFUSED, TOKEN_REFUSED = 0, 1, 2


# -- the messages (pure) -----------------------------------------------------------------------


def _mac(token: bytes, side: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, side + first + second, hashlib.sha256).digest()


def hello(server_nonce: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    return _HEAD.pack(MAGIC, version) + server_nonce


def proof(token: bytes, server_nonce: bytes, client_nonce: bytes,
          version: int = PROTOCOL_VERSION) -> bytes:
    return (
        _HEAD.pack(MAGIC, version) + client_nonce
        + _mac(token, b"client", server_nonce, client_nonce)
    )


def _read_head(data: bytes, peer: str, what: str) -> int:
    magic, version = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise AuthenticationError(
            f"{peer} does not speak the sharedcompute protocol (its {what} starts with "
            f"{data[:4]!r}, not {MAGIC!r})"
        )
    return int(version)


def check_hello(data: bytes, peer: str, version: int = PROTOCOL_VERSION) -> bytes:
    """The server nonce from a HELLO; raises if it is not ours or another version."""
    theirs = _read_head(data, peer, "greeting")
    if theirs != version:
        raise AuthenticationError(
            f"{peer} speaks sharedcompute protocol version {theirs}; this process speaks "
            f"version {version}: run the same sharedcompute version everywhere"
        )
    return data[_HEAD.size:]


def check_proof(
    data: bytes, token: bytes, server_nonce: bytes, peer: str, version: int = PROTOCOL_VERSION
) -> tuple[int, bytes, str]:
    """(status, the answer to send, why when refused) for a client's PROOF."""
    try:
        theirs = _read_head(data, peer, "proof")
    except AuthenticationError as error:
        return TOKEN_REFUSED, bytes([TOKEN_REFUSED]) + bytes(32), str(error)
    client_nonce = data[_HEAD.size:_HEAD.size + _NONCE]
    if theirs != version:
        why = f"{peer} speaks protocol version {theirs}; this process speaks version {version}"
        return VERSION_REFUSED, bytes([VERSION_REFUSED]) + bytes(32), why
    expected = _mac(token, b"client", server_nonce, client_nonce)
    if not hmac.compare_digest(expected, data[_HEAD.size + _NONCE:]):
        return TOKEN_REFUSED, bytes([TOKEN_REFUSED]) + bytes(32), f"{peer} sent a wrong token"
    answer = bytes([ACCEPTED]) + _mac(token, b"server", client_nonce, server_nonce)
    return ACCEPTED, answer, ""


def check_answer(
    data: bytes, token: bytes, server_nonce: bytes, client_nonce: bytes, peer: str
) -> None:
    status = data[0]
    if status == VERSION_REFUSED:
        raise AuthenticationError(
            f"{peer} refused this process's protocol version {PROTOCOL_VERSION}: run the same "
            "sharedcompute version everywhere"
        )
    if status != ACCEPTED:
        raise AuthenticationError(
            f"{peer} refused the cluster token: check SHAREDCOMPUTE_TOKEN, "
            "SHAREDCOMPUTE_TOKEN_FILE or --token-file (the head's is in ~/.sharedcompute/token)"
        )
    expected = _mac(token, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(expected, data[1:]):
        raise AuthenticationError(f"{peer} does not know the cluster token (it answered wrongly)")


# -- over a blocking socket --------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int, deadline: float, peer: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AuthenticationError(f"{peer} did not finish the handshake in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise AuthenticationError(f"{peer} did not finish the handshake in time") from None
        except OSError as error:
            raise AuthenticationError(f"the connection to {peer} failed: {error}") from error
        if not chunk:
            raise AuthenticationError(f"{peer} closed the connection during the handshake")
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, data: bytes, peer: str) -> None:
    try:
        sock.sendall(data)
    except OSError as error:
        raise AuthenticationError(f"the connection to {peer} failed: {error}") from error


def open_handshake(
    sock: socket.socket, token: bytes, peer: str, *, timeout: float = HANDSHAKE_TIMEOUT,
    version: int = PROTOCOL_VERSION,
) -> None:
    """The client's side: prove the token and check the server knows it too."""
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        server_nonce = check_hello(_recv_exactly(sock, HELLO_SIZE, deadline, peer), peer, version)
        client_nonce = os.urandom(_NONCE)
        _send(sock, proof(token, server_nonce, client_nonce, version), peer)
        answer = _recv_exactly(sock, ANSWER_SIZE, deadline, peer)
        check_answer(answer, token, server_nonce, client_nonce, peer)
    finally:
        sock.settimeout(previous)


def accept_handshake(
    sock: socket.socket, token: bytes, peer: str, *, timeout: float = HANDSHAKE_TIMEOUT
) -> None:
    """The server's side: the peer proves the token (or is refused), then we do."""
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        server_nonce = os.urandom(_NONCE)
        _send(sock, hello(server_nonce), peer)
        data = _recv_exactly(sock, PROOF_SIZE, deadline, peer)
        status, answer, why = check_proof(data, token, server_nonce, peer)
        _send(sock, answer, peer)
        if status != ACCEPTED:
            raise AuthenticationError(why)
    finally:
        sock.settimeout(previous)


# -- over asyncio streams ----------------------------------------------------------------------


async def accept_handshake_async(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: bytes, peer: str,
    *, timeout: float = HANDSHAKE_TIMEOUT,
) -> None:
    """``accept_handshake`` for a server that serves many connections on one event loop."""

    async def exchange() -> None:
        server_nonce = os.urandom(_NONCE)
        writer.write(hello(server_nonce))
        await writer.drain()
        data = await reader.readexactly(PROOF_SIZE)
        status, answer, why = check_proof(data, token, server_nonce, peer)
        writer.write(answer)
        await writer.drain()
        if status != ACCEPTED:
            raise AuthenticationError(why)

    await _bounded(exchange(), timeout, peer)


async def _bounded(exchange: Coroutine[Any, Any, None], timeout: float, peer: str) -> None:
    import asyncio

    try:
        await asyncio.wait_for(exchange, timeout)
    except TimeoutError:
        raise AuthenticationError(f"{peer} did not finish the handshake in time") from None
    except (asyncio.IncompleteReadError, ConnectionError) as error:
        raise AuthenticationError(
            f"{peer} closed the connection during the handshake ({type(error).__name__})"
        ) from None
