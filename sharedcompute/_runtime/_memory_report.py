"""The memory report of a runtime: its store's objects, named by what made them and who holds them.

Reads the scheduler core (which values exist, how many Futures and pending tasks
hold each), the runtime's own tables (task names, the arguments of pending tasks)
and the store (sizes, spilled or not, which processes hold each); the rendering
is ``_memory``'s. On a head, other nodes' objects are listed from the core (their
stores report only totals, with their heartbeats).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sharedcompute._memory import ObjectRow, StoreRow, render
from sharedcompute._store import RemoteObject, StoredObject

if TYPE_CHECKING:
    from sharedcompute._runtime._driver import Runtime


def memory_report(runtime: Runtime, address: str | None = None,
                  other_nodes: list[dict[str, Any]] | None = None) -> str:
    with runtime._lock:
        values = runtime.core.objects()
        arguments = dict(runtime._args_refs)
    described: dict[tuple[int, int], tuple[str, list[str]]] = {}
    for key, ref, holders, pending, name in values:
        what = f"put {key}" if name is None else (
            f"result of task {key}" + (f" ({name})" if name else ""))
        held = []
        if holders:
            held.append(f"{holders} Future{'s' if holders != 1 else ''}")
        if pending:
            held.append(f"{pending} pending task{'s' if pending != 1 else ''}")
        described[_where(ref)] = (what, held)
    for key, ref in arguments.items():
        if isinstance(ref, (StoredObject, RemoteObject)):
            described.setdefault(_where(ref), (f"arguments of task {key}", ["the task"]))
    stores: list[StoreRow] = []
    objects: list[ObjectRow] = []
    store = runtime._store
    if store is not None:
        stats = store.stats()
        stores.append(StoreRow(0, stats["capacity"], stats["used_bytes"], stats["num_objects"],
                               stats["spilled_bytes"], stats["spilled_objects"],
                               store.spill_path, address or ""))
        for object_id, nbytes, spilled, processes, sealed in store.objects():
            what, held = described.pop((0, object_id), (
                "an object" if sealed else "being written (or leased to a worker ahead)", []))
            objects.append(ObjectRow(0, object_id, nbytes, spilled, what, held + processes))
    for node in other_nodes or []:
        if not node["alive"]:
            continue
        stores.append(StoreRow(node["node_id"], node["store_capacity"], node["store_used"], -1,
                               address=node["address"]))
    for (node_id, object_id), (what, held) in described.items():
        if node_id > 0:  # another node's (0: gone from the store meanwhile; -1: inline)
            size = _size_of(values, node_id, object_id)
            objects.append(ObjectRow(node_id, object_id, size, False, what, held))
    return render(stores, objects)


def _where(ref: Any) -> tuple[int, int]:
    if isinstance(ref, RemoteObject):
        return ref.node, ref.object_id
    if isinstance(ref, StoredObject):
        return 0, ref.object_id
    return -1, id(ref)  # inline: in no store


def _size_of(values: list[tuple[Any, ...]], node: int, object_id: int) -> int:
    for _key, ref, *_ in values:
        if isinstance(ref, RemoteObject) and (ref.node, ref.object_id) == (node, object_id):
            return int(ref.nbytes)
    return 0
