"""``sc.memory_summary()`` / ``sharedcompute memory``: what holds memory, in words.

A runtime gathers plain records (``ObjectRow``: an object, its size, where it is,
what it is and who holds it; ``StoreRow``: a store's totals) and :func:`render`
turns them into the report: stores first, then objects largest first, as
``ray memory`` lists references, but one line per object with its holders
spelled out (Futures, pending tasks that read it, processes viewing it).
Nothing here touches a store or a scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StoreRow:
    node: int
    capacity: int
    in_memory: int
    objects: int
    spilled: int = 0
    spilled_objects: int = 0
    spill_dir: str | None = None
    address: str = ""


@dataclass(frozen=True)
class ObjectRow:
    node: int
    object_id: int
    nbytes: int
    spilled: bool
    what: str  # "result of task 12 (fn)", "put by the driver", "arguments of task 3 (fn)"
    holders: list[str] = field(default_factory=list)


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def render(stores: list[StoreRow], objects: list[ObjectRow], *, limit: int = 50) -> str:
    lines = ["sharedcompute memory", ""]
    for store in stores:
        where = f" ({store.address})" if store.address else ""
        line = (f"node {store.node}{where}: store of {size(store.capacity)}, "
                f"{size(store.in_memory)} in memory")
        if store.objects >= 0:  # -1: another node's, whose objects are counted below
            line += f" ({store.objects - store.spilled_objects} objects)"
        if store.spilled or store.spilled_objects:
            line += (f", {size(store.spilled)} spilled ({store.spilled_objects} objects) to "
                     f"{store.spill_dir}")
        lines.append(line)
    if not objects:
        lines += ["", "no objects in any store"]
        return "\n".join(lines)
    lines += ["", f"{'size':>10}  {'where':<8} {'node':>4} {'object':>7}  what; held by"]
    ordered = sorted(objects, key=lambda row: -row.nbytes)
    for row in ordered[:limit]:
        held = ", ".join(row.holders) or "nobody (being freed)"
        where = "spilled" if row.spilled else "memory"
        lines.append(f"{size(row.nbytes):>10}  {where:<8} {row.node:>4} {row.object_id:>7}  "
                     f"{row.what}; held by {held}")
    if len(ordered) > limit:
        rest = ordered[limit:]
        lines.append(f"... and {len(rest)} smaller objects ({size(sum(r.nbytes for r in rest))})")
    total = sum(row.nbytes for row in objects)
    spilled = sum(row.nbytes for row in objects if row.spilled)
    lines += ["", f"{len(objects)} objects, {size(total)} ({size(spilled)} of it spilled)"]
    return "\n".join(lines)
