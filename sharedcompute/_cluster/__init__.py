"""The cluster (private): head, nodes, drivers that connect to a head, and transfers.

Layers, bottom up: ``_token`` (where the shared secret comes from), ``_messages``
(typed control messages), ``_transfer`` (objects node to node), ``_localize``
(a node's workers get local objects only), ``_links`` (the head's side of its
nodes and drivers), ``_head`` / ``_node`` (the two processes ``sharedcompute
start`` runs), ``_client`` (``sharedcompute.init(address=...)``).
"""

from __future__ import annotations

import os
from typing import Any

from sharedcompute._cluster._client import ClusterClient
from sharedcompute._cluster._token import find_token, home

ADDRESS_ENV = "SHAREDCOMPUTE_ADDRESS"


def connect(address: str, *, store_capacity: int | None = None,
            runtime_env: dict[str, Any] | None = None) -> ClusterClient:
    """A driver connected to the head at ``address`` ("auto": the one started here)."""
    if address == "auto":
        started = home() / "head.address"
        try:
            address = started.read_text().strip()
        except FileNotFoundError:
            raise ConnectionError(
                f"address='auto' found no head started on this host (no {started}); "
                "start one with: sharedcompute start --head"
            ) from None
    if ":" not in address:
        raise ValueError(f"address must be 'HOST:PORT' or 'auto', got {address!r}")
    return ClusterClient(address, find_token(os.environ.get("SHAREDCOMPUTE_TOKEN_FILE")),
                         store_capacity=store_capacity, runtime_env=runtime_env)


__all__ = ["ADDRESS_ENV", "ClusterClient", "connect"]
