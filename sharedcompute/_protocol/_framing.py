"""Length-prefixed framing of pickled messages over a stream socket.

Each frame is a 4-byte big-endian length followed by a pickle (protocol 5) of
one message tuple. Writers batch several frames into one ``sendall``; readers
pull whatever the socket has and return every complete frame, so one wake-up
drains a burst. A frame longer than ``max_frame`` is a protocol error: the peer
is broken or hostile, and the connection is closed rather than trusted.

A connection made with ``on_backlog`` never blocks a sender: what the socket
cannot take now is kept in order in a backlog, ``on_backlog(conn)`` is called
once, and the owner's I/O loop calls ``flush_backlog`` when the socket is
writable. The driver uses this: it sends while holding its lock, and a worker
busy in a long call (so not reading) must never stall it.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from typing import Any

_HEADER = struct.Struct("!I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# Reads go into one reused buffer: ``sock.recv(n)`` allocates n bytes per call, and a
# large n means an mmap and munmap (tens of microseconds) for every small message.
_READ_CHUNK = 256 * 1024


class ConnectionClosed(EOFError):
    """The peer closed the connection or sent something that is not a frame."""


class Connection:
    def __init__(
        self, sock: socket.socket, *, max_frame: int = DEFAULT_MAX_FRAME,
        on_backlog: Callable[[Connection], None] | None = None,
    ) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self._on_backlog = on_backlog
        self._backlog = bytearray()
        self._buffer = bytearray()
        self._scratch = bytearray(_READ_CHUNK)
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    @staticmethod
    def encode(message: tuple[Any, ...]) -> bytes:
        # The kind goes as a plain int: an IntEnum member pickles through copyreg, 10x slower.
        body = pickle.dumps((int(message[0]), *message[1:]), protocol=5)
        return _HEADER.pack(len(body)) + body

    def send(self, message: tuple[Any, ...]) -> None:
        self.send_raw(self.encode(message))

    def send_many(self, messages: Iterable[tuple[Any, ...]]) -> None:
        self.send_raw(b"".join(self.encode(m) for m in messages))

    def try_send_many(self, messages: Iterable[tuple[Any, ...]]) -> bool:
        """Send unless another send is under way (in this thread too): for finalizers."""
        return self.send_raw(b"".join(self.encode(m) for m in messages), blocking=False)

    def send_raw(self, data: bytes, *, blocking: bool = True) -> bool:
        """Send ``data``; False (nothing sent) if not ``blocking`` and a send is under way."""
        if not self._send_lock.acquire(blocking):
            return False
        try:
            try:
                if self._on_backlog is None:
                    self.sock.sendall(data)
                elif self._backlog:
                    self._backlog += data
                else:
                    try:
                        sent = self.sock.send(data, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(data):
                        self._backlog += memoryview(data)[sent:]
                        self._on_backlog(self)
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
        finally:
            self._send_lock.release()
        return True

    @property
    def backlogged(self) -> bool:
        """Whether bytes wait to be sent (``flush_backlog`` when the socket is writable)."""
        return bool(self._backlog)

    def flush_backlog(self) -> bool:
        """Send what the backlog holds, as far as the socket takes it; True once empty."""
        with self._send_lock:
            while self._backlog:
                try:
                    sent = self.sock.send(self._backlog, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self._backlog.clear()
                    raise ConnectionClosed(str(exc)) from exc
                del self._backlog[:sent]
            return True

    def recv_available(self, *, block: bool = True) -> list[tuple[Any, ...]]:
        """Read what the socket has (waiting for at least one byte if ``block``)."""
        if not self._fill(0 if block else socket.MSG_DONTWAIT):
            return []
        return self._frames()

    def _fill(self, flags: int = 0) -> bool:
        """Append one read to the buffer; False if a non-blocking read found nothing."""
        try:
            size = self.sock.recv_into(self._scratch, 0, flags)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        if not size:
            raise ConnectionClosed("connection closed by peer")
        if self._buffer:
            self._buffer += memoryview(self._scratch)[:size]
        else:
            self._buffer = self._scratch[:size]
        return True

    def recv_one(self) -> tuple[Any, ...]:
        """Block until one whole message is here (others stay buffered)."""
        while True:
            frames = self._frames(limit=1)
            if frames:
                return frames[0]
            self._fill()

    def _frames(self, limit: int | None = None) -> list[tuple[Any, ...]]:
        frames: list[tuple[Any, ...]] = []
        buffer = self._buffer
        position = 0
        while len(buffer) - position >= _HEADER.size and (limit is None or len(frames) < limit):
            (length,) = _HEADER.unpack_from(buffer, position)
            if length > self.max_frame:
                raise ConnectionClosed(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame} bytes"
                )
            end = position + _HEADER.size + length
            if len(buffer) < end:
                break
            frames.append(pickle.loads(buffer[position + _HEADER.size : end]))
            position = end
        if position:
            del buffer[:position]
        return frames

    def recv_buffered(self) -> list[tuple[Any, ...]]:
        """The whole messages already buffered, without touching the socket."""
        return self._frames()

    def pending(self) -> bool:
        """Whether a whole frame is already buffered."""
        if len(self._buffer) < _HEADER.size:
            return False
        (length,) = _HEADER.unpack_from(self._buffer, 0)
        return len(self._buffer) >= _HEADER.size + length

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
