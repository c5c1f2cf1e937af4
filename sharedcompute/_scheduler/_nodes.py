"""Nodes and their resource pools, for the scheduler core (pure: no I/O).

A node is one host's worker pool: its total resources (``CPU`` and custom ones)
and what is free of them now. Local mode is one node (``LOCAL_NODE``); on a
cluster every host that joins is another. A task's resources are reserved in
the pool of the node its worker belongs to, so a task never "fits" the cluster
as a whole while fitting no single node.

Each pool is a plain dict shared by reference with the node's workers, so the
hot path (does a one-CPU task fit beside this worker?) is one dict lookup.

Invariants:
- ``available[name] <= total[name]`` on every node, for every resource;
- a node that left holds no reservation any more and is never chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sharedcompute._scheduler._events import UNIT, NodeId, Resources

LOCAL_NODE: NodeId = 0

# Every node has this resource, named with its id: a task pinned to a node asks for one
# (``f.options(node=...)``), as Ray's ``node:<ip>`` resources do. Shown to nobody.
NODE_RESOURCE = "node:"
PINS_PER_NODE = 1_000_000.0


def node_resource(node: NodeId) -> str:
    return f"{NODE_RESOURCE}{node}"


def public_resources(resources: dict[str, float]) -> dict[str, float]:
    """``resources`` without the per-node pin resources."""
    return {k: v for k, v in resources.items() if not k.startswith(NODE_RESOURCE)}


@dataclass(slots=True)
class Node:
    id: NodeId
    total: dict[str, float]
    available: dict[str, float] = field(default_factory=dict)
    alive: bool = True


class NodeTable:
    """The nodes the core schedules on, and what each has free."""

    def __init__(self) -> None:
        self._nodes: dict[NodeId, Node] = {}
        self.max_cpus = 0.0  # the most CPUs any live node has (the UNIT feasibility check)

    def __contains__(self, node: NodeId) -> bool:
        return node in self._nodes and self._nodes[node].alive

    def __getitem__(self, node: NodeId) -> Node:
        return self._nodes[node]

    def alive(self) -> list[Node]:
        return [node for node in self._nodes.values() if node.alive]

    def join(self, node: NodeId, resources: dict[str, float]) -> Node:
        if node in self._nodes and self._nodes[node].alive:
            raise ValueError(f"node {node} has joined already")
        joined = Node(node, dict(resources), dict(resources))
        self._nodes[node] = joined
        self.max_cpus = max(self.max_cpus, joined.total.get("CPU", 0.0))
        return joined

    def leave(self, node: NodeId) -> None:
        left = self._nodes.get(node)
        if left is None or not left.alive:
            return
        left.alive = False
        left.available.clear()
        self.max_cpus = max((n.total.get("CPU", 0.0) for n in self.alive()), default=0.0)

    # -- totals over the live nodes -------------------------------------------------------

    def total(self) -> dict[str, float]:
        return _summed(node.total for node in self.alive())

    def available(self) -> dict[str, float]:
        return _summed(node.available for node in self.alive())

    # -- feasibility ---------------------------------------------------------------------

    def infeasible(self, resources: Resources, what: str = "the task") -> str | None:
        """Why no live node can ever fit ``resources`` (None: one can)."""
        if resources is UNIT and self.max_cpus >= 1.0:
            return None
        needs = resources.as_dict()
        nodes = self.alive()
        if any(_covers(node.total, needs) for node in nodes):
            return None
        if not nodes:
            return f"{what} needs {resources.as_dict()} but no node has joined"
        pinned = [name for name in needs if name.startswith(NODE_RESOURCE)]
        if pinned:
            node = pinned[0][len(NODE_RESOURCE):]
            return (f"{what} is pinned to node {node}, which is not alive (live nodes: "
                    f"{sorted(n.id for n in nodes)})")
        largest = max(nodes, key=lambda n: (n.total.get("CPU", 0.0), sum(n.total.values())))
        name, amount = next(
            (name, amount) for name, amount in needs.items()
            if amount > largest.total.get(name, 0.0)
        )
        have = largest.total.get(name, 0.0)
        where = (
            f"the runtime has {have:g} in all" if len(nodes) == 1
            else f"the largest node (node {largest.id}) has {have:g}"
        )
        return f"{what} needs {amount:g} {name} but {where} (resources: {largest.total})"


def fits(pool: dict[str, float], resources: Resources) -> bool:
    if resources is UNIT:
        return pool["CPU"] >= 1.0
    return all(pool.get(name, 0.0) >= amount for name, amount in resources.as_dict().items())


def reserve(pool: dict[str, float], resources: Resources) -> None:
    if resources is UNIT:
        pool["CPU"] -= 1.0
        return
    for name, amount in resources.as_dict().items():
        pool[name] = pool.get(name, 0.0) - amount


def release(pool: dict[str, float], resources: Resources) -> None:
    if resources is UNIT:
        pool["CPU"] += 1.0
        return
    for name, amount in resources.as_dict().items():
        pool[name] = pool.get(name, 0.0) + amount


def _covers(total: dict[str, float], needs: dict[str, float]) -> bool:
    return all(amount <= total.get(name, 0.0) for name, amount in needs.items())


def _summed(pools: Iterable[dict[str, float]]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for pool in pools:
        for name, amount in pool.items():
            summed[name] = summed.get(name, 0.0) + amount
    return summed
