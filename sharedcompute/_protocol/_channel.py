"""Authenticated cluster connections: messages of a small header and raw buffers.

Once the handshake (``_handshake``) has proved the token, a connection carries
messages in this format::

    message = LENGTHS | header | buffer 1 | ... | buffer n
    LENGTHS = header length u32 | n u32 | length of buffer 1 u64 | ... | of buffer n u64
    header  = a pickle (protocol 5) of a small tuple; buffers are raw bytes

Every length comes before any data, so a receiver checks them all against its
limits (``max_header``, ``max_buffers``, ``max_buffer``) before it reads, allocates
or unpickles anything: a 2**40-byte claim is refused at once. Buffers are never
joined with the header or with each other: a sender hands each to ``sendall``
as it is, and a receiver reads each straight into memory that ``allocate(size)``
gives (a store block, say) with ``recv_into``; no copy on either side beyond the
kernel's.

:class:`MessageParser` is the receiving state machine without I/O (bytes in,
messages out), so the limits are tested on their own; :class:`Channel` drives it
over a blocking socket (a data connection, which a thread of its own serves).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from sharedcompute._protocol import _tls
from sharedcompute._protocol._handshake import (
    HANDSHAKE_TIMEOUT,
    accept_handshake,
    open_handshake,
)

_FIXED = struct.Struct("!II")  # header length, number of buffers
_LENGTH = struct.Struct("!Q")
DEFAULT_MAX_HEADER = 16 * 1024 * 1024
DEFAULT_MAX_BUFFERS = 4096
DEFAULT_MAX_BUFFER = 1 << 36  # 64 GiB: more than any store here holds
_SCRATCH = 256 * 1024  # small parts are read in chunks of this; buffer data straight in

Buffer = bytearray | memoryview
Allocate = Callable[[int], Buffer]


class FrameError(ConnectionError):
    """The peer sent something that is not a message within the limits: close the connection."""


def encode_head(header: Any, buffers: Sequence[Buffer | bytes]) -> bytes:
    """LENGTHS and the pickled header (what goes before the buffers)."""
    body = pickle.dumps(header, protocol=5)
    lengths = b"".join(_LENGTH.pack(memoryview(b).nbytes) for b in buffers)
    return _FIXED.pack(len(body), len(buffers)) + lengths + body


class MessageParser:
    """Turns the bytes of a connection into (header, buffers) messages.

    Feed it with :meth:`feed`, or, to receive a large buffer without a copy, ask
    :meth:`direct` for the memory the next bytes belong in, read into it, and
    report how much with :meth:`filled`.
    """

    def __init__(
        self, allocate: Allocate = bytearray, *, max_header: int = DEFAULT_MAX_HEADER,
        max_buffers: int = DEFAULT_MAX_BUFFERS, max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        self.allocate = allocate
        self.max_header, self.max_buffers, self.max_buffer = max_header, max_buffers, max_buffer
        self._stage = "lengths"  # then "header", then "buffers", then the next message
        self._pending = bytearray()  # bytes of LENGTHS and header not parsed yet
        self._lengths: list[int] = []
        self._header_length = 0
        self._header: Any = None
        self._buffers: list[Buffer] = []
        self._target = memoryview(b"")  # the buffer being filled ("buffers")
        self._filled = 0
        self.messages: list[tuple[Any, list[Buffer]]] = []

    def direct(self) -> memoryview | None:
        """The memory the next bytes go to while a buffer is being received, else None."""
        return self._target[self._filled:] if self._stage == "buffers" else None

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were read into ``direct()``."""
        self._filled += nbytes
        self._advance()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            target = self.direct()
            if target is None:
                self._pending += view
                self._advance()
                return
            take = min(target.nbytes, view.nbytes)
            target[:take] = view[:take]
            view = view[take:]
            self.filled(take)

    def _advance(self) -> None:
        while True:
            if self._stage == "buffers":
                if self._filled < self._target.nbytes:
                    return
                self._start_buffer()
            elif self._stage == "lengths":
                if not self._read_lengths():
                    return
            else:
                if len(self._pending) < self._header_length:
                    return
                body = bytes(self._pending[:self._header_length])
                del self._pending[:self._header_length]
                self._header = pickle.loads(body)  # the peer proved the token (handshake)
                self._buffers = []
                self._start_buffer()

    def _read_lengths(self) -> bool:
        if len(self._pending) < _FIXED.size:
            return False
        header_length, count = _FIXED.unpack_from(self._pending)
        if header_length > self.max_header:
            raise FrameError(f"a header of {header_length:,} bytes exceeds {self.max_header:,}")
        if count > self.max_buffers:
            raise FrameError(f"{count:,} buffers in one message exceed {self.max_buffers:,}")
        end = _FIXED.size + _LENGTH.size * count
        if len(self._pending) < end:
            return False
        lengths = [
            _LENGTH.unpack_from(self._pending, _FIXED.size + _LENGTH.size * i)[0]
            for i in range(count)
        ]
        for length in lengths:
            if length > self.max_buffer:
                raise FrameError(f"a buffer of {length:,} bytes exceeds {self.max_buffer:,}")
        del self._pending[:end]
        self._header_length, self._lengths = header_length, lengths
        self._stage = "header"
        return True

    def _start_buffer(self) -> None:
        """Start the message's next buffer with what is pending, or hand the message out."""
        if len(self._buffers) == len(self._lengths):
            self.messages.append((self._header, self._buffers))
            self._header, self._buffers, self._stage = None, [], "lengths"
            self._target = memoryview(b"")  # holds no buffer it handed out
            return
        size = self._lengths[len(self._buffers)]
        buffer = self.allocate(size)
        target = memoryview(buffer).cast("B")
        if target.nbytes != size:
            raise FrameError(f"allocate({size}) gave {target.nbytes} bytes")
        self._buffers.append(buffer)
        take = min(size, len(self._pending))
        target[:take] = self._pending[:take]
        del self._pending[:take]
        self._target, self._filled, self._stage = target, take, "buffers"


class Channel:
    """A message connection over a blocking socket, after the handshake.

    One thread sends and one receives at a time (a data connection is served by
    threads of its own); ``send`` hands buffers to ``sendall`` as they are, and
    ``receive`` reads a large buffer straight into ``allocate``'s memory.
    """

    def __init__(self, sock: socket.socket, peer: str, allocate: Allocate = bytearray,
                 **limits: int) -> None:
        self.sock = sock
        self.peer = peer
        self._allocate = allocate
        self._parser = MessageParser(allocate, **limits)
        self._scratch = bytearray(_SCRATCH)

    def send(self, header: Any, buffers: Sequence[Buffer | bytes] = ()) -> None:
        head = encode_head(header, buffers)
        try:
            if len(buffers) == 1 and memoryview(buffers[0]).nbytes <= _SCRATCH:
                self.sock.sendall(head + bytes(buffers[0]))  # one small message, one send
                return
            self.sock.sendall(head)
            for buffer in buffers:
                self.sock.sendall(buffer)
        except OSError as error:
            raise ConnectionError(f"sending to {self.peer} failed: {error}") from error

    def receive(self, allocate: Allocate | None = None) -> tuple[Any, list[Buffer]]:
        """The next message (blocks); ``ConnectionError`` when the peer is gone.

        ``allocate``: where this message's buffers go, instead of the channel's own.
        """
        parser = self._parser
        if allocate is not None:
            parser.allocate = allocate
        while not parser.messages:
            target = parser.direct()
            try:
                if target is not None and target.nbytes >= _SCRATCH:
                    received = self.sock.recv_into(target)
                    if received:
                        parser.filled(received)
                else:
                    received = self.sock.recv_into(self._scratch)
                    if received:
                        parser.feed(memoryview(self._scratch)[:received])
            except OSError as error:
                raise ConnectionError(f"receiving from {self.peer} failed: {error}") from error
            if not received:
                raise ConnectionError(f"{self.peer} closed the connection")
        parser.allocate = self._allocate
        return parser.messages.pop(0)

    def close(self) -> None:
        """Close it; a thread blocked receiving from it wakes with ``ConnectionError``."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # close() alone leaves a reader blocked
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def connect(address: tuple[str, int], token: bytes, allocate: Allocate = bytearray, *,
            timeout: float = HANDSHAKE_TIMEOUT, **limits: int) -> Channel:
    """A channel to ``address``, after both sides proved the token."""
    peer = f"{address[0]}:{address[1]}"
    try:
        plain = socket.create_connection(address, timeout=timeout)
    except OSError as error:
        raise ConnectionError(f"cannot connect to {peer}: {error}") from error
    sock = _tls.wrap_client(plain, peer)
    return _channel(sock, peer, lambda: open_handshake(sock, token, peer, timeout=timeout),
                    allocate, limits)


def accept(sock: socket.socket, peer: str, token: bytes, allocate: Allocate = bytearray, *,
           timeout: float = HANDSHAKE_TIMEOUT, **limits: int) -> Channel:
    """The server's side of ``connect`` on an accepted socket (closed if refused)."""
    if _tls.enabled():
        sock.settimeout(timeout)  # the TLS handshake counts in the handshake's time
        try:
            sock = _tls.wrap_server(sock, peer)
        except BaseException:
            sock.close()
            raise
    secured = sock
    return _channel(secured, peer, lambda: accept_handshake(secured, token, peer, timeout=timeout),
                    allocate, limits)


def _channel(sock: socket.socket, peer: str, handshake: Callable[[], None], allocate: Allocate,
             limits: dict[str, int]) -> Channel:
    """A Channel over ``sock`` once ``handshake`` has passed; the socket closed if not."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake()
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, peer, allocate, **limits)
