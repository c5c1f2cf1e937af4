"""Cluster channels: messages of a header and raw buffers, with limits checked before
anything is read into memory or unpickled, over real TCP sockets on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from sharedcompute._protocol._channel import (
    Channel,
    FrameError,
    MessageParser,
    accept,
    connect,
    encode_head,
)
from sharedcompute.errors import AuthenticationError

TOKEN = b"t" * 64
TIMEOUT = 30
MiB = 1024 * 1024


def message_bytes(header: Any, *buffers: bytes) -> bytes:
    return encode_head(header, buffers) + b"".join(buffers)


def never_allocate(size: int) -> bytearray:
    raise AssertionError(f"allocated {size} bytes for a message that breaks the limits")


# -- the parser, without I/O --------------------------------------------------------------------


def test_messages_fed_a_byte_at_a_time_come_out_whole_and_in_order() -> None:
    parser = MessageParser()
    data = message_bytes(("put", 1), b"abc", b"", b"x" * 1000) + message_bytes(None)
    for i in range(len(data)):
        parser.feed(data[i:i + 1])
    assert [(h, [bytes(b) for b in bs]) for h, bs in parser.messages] == [
        (("put", 1), [b"abc", b"", b"x" * 1000]), (None, []),
    ]


@pytest.mark.parametrize("raw, limit", [
    pytest.param((2**31).to_bytes(4, "big") + bytes(4), "header of", id="huge header"),
    pytest.param(bytes(4) + (10**6).to_bytes(4, "big"), "buffers in one message",
                 id="too many buffers"),
    pytest.param(bytes(4) + (1).to_bytes(4, "big") + (2**40).to_bytes(8, "big"),
                 "buffer of 1,099,511,627,776 bytes", id="a 2**40 buffer"),
])
def test_lengths_beyond_the_limits_are_refused_before_allocating(raw: bytes, limit: str) -> None:
    parser = MessageParser(never_allocate)
    with pytest.raises(FrameError, match=limit):
        parser.feed(raw)


def test_a_buffer_is_read_into_the_memory_allocate_gives() -> None:
    destination = np.zeros(1000, dtype=np.uint8)
    parser = MessageParser(lambda size: memoryview(destination)[:size])
    payload = bytes(range(256)) * 3
    parser.feed(message_bytes("x", payload))
    (_, [buffer]), = parser.messages
    assert bytes(destination[:len(payload)]) == payload
    assert np.shares_memory(np.asarray(buffer), destination)


# -- channels on loopback ------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[Callable[..., tuple[Channel, Channel]]]:
    opened: list[Channel] = []

    def make(allocate: Callable[[int], Any] = bytearray) -> tuple[Channel, Channel]:
        listener = socket.create_server(("127.0.0.1", 0))
        server: list[Channel] = []

        def serve() -> None:
            sock, address = listener.accept()
            server.append(accept(sock, f"{address[0]}:{address[1]}", TOKEN, allocate))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = connect(listener.getsockname(), TOKEN, allocate)
        thread.join(TIMEOUT)
        listener.close()
        opened.extend([client, server[0]])
        return client, server[0]

    yield make
    for channel in opened:
        channel.close()


def test_a_large_array_crosses_straight_into_the_receivers_memory(pair: Any) -> None:
    received = np.empty(100 * MiB, dtype=np.uint8)
    client, server = pair(lambda size: memoryview(received)[:size])
    sent = np.random.default_rng(0).integers(0, 256, 100 * MiB, dtype=np.uint8)
    sender = threading.Thread(target=client.send, args=(("array", sent.nbytes), [sent]))
    sender.start()
    header, [buffer] = server.receive()
    sender.join(TIMEOUT)
    assert header == ("array", sent.nbytes)
    assert np.shares_memory(np.asarray(buffer), received)
    assert np.array_equal(received, sent)


def test_many_small_messages_both_ways_keep_their_order(pair: Any) -> None:
    client, server = pair()
    for i in range(500):
        client.send(("n", i), [str(i).encode()])
    got = [server.receive() for _ in range(500)]
    assert [(h, bytes(b[0])) for h, b in got] == [(("n", i), str(i).encode()) for i in range(500)]
    server.send("bye")
    assert client.receive() == ("bye", [])


def test_a_peer_gone_mid_message_is_a_connection_error(pair: Any) -> None:
    client, server = pair()
    client.sock.sendall(encode_head("half", [b"x" * 100]) + b"x" * 10)
    client.close()
    with pytest.raises(ConnectionError, match="closed the connection"):
        server.receive()


def test_connect_with_a_wrong_token_is_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[BaseException] = []

    def serve() -> None:
        sock, _ = listener.accept()
        try:
            accept(sock, "client", TOKEN)
        except AuthenticationError as error:
            outcome.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with pytest.raises(AuthenticationError, match="refused the cluster token"):
        connect(listener.getsockname(), b"wrong" * 10)
    thread.join(TIMEOUT)
    listener.close()
    assert outcome and "sent a wrong token" in str(outcome[0])


def test_the_channel_benchmark_runs_and_reports_both_loops() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "tools" / "bench" / "channel.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", "--repeats", "1"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    report = json.loads(out)
    assert set(report["results"]) == {"100mib", "1gib"}
    for result in report["results"].values():
        assert result["raw_gib_s"] > 0 and result["channel_gib_s"] > 0
