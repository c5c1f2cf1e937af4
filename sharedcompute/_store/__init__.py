"""The shared-memory object store (private).

``OwnerStore`` lives in the process that owns a runtime's memory; every other
process of that runtime opens a ``ClientStore`` on the owner's address. Both
share the ``ObjectStore`` API: ``put``, ``get``, ``buffer``, ``locate``,
``delete``, ``stats``, ``close``.
"""

from sharedcompute._store._client import ClientStore
from sharedcompute._store._segment import default_capacity, free_shm_bytes
from sharedcompute._store._store import (
    INLINE_THRESHOLD,
    InlineObject,
    ObjectRef,
    ObjectStore,
    OwnerStore,
    RemoteObject,
    ref_from_wire,
    ref_to_wire,
)
from sharedcompute._store._table import StoredObject

__all__ = [
    "INLINE_THRESHOLD",
    "ClientStore",
    "InlineObject",
    "ObjectRef",
    "ObjectStore",
    "OwnerStore",
    "RemoteObject",
    "StoredObject",
    "default_capacity",
    "free_shm_bytes",
    "ref_from_wire",
    "ref_to_wire",
]
