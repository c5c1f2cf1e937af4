"""Message kinds and framing shared by every transport (private)."""

from sharedcompute._protocol._framing import Connection, ConnectionClosed
from sharedcompute._protocol._messages import Msg

__all__ = ["Connection", "ConnectionClosed", "Msg"]
