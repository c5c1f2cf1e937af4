"""What Dask hands a scheduler, turned into a plan sharedcompute can run (no runtime, no I/O).

Dask gives a scheduler one of three things: an expression object (Dask >= 2025.1, with
``__dask_graph__()``), a mapping of task-spec nodes (``Task``, ``Alias``, ``DataNode`` and
the containers ``List`` / ``Tuple`` / ``Dict`` / ``Set``), or a legacy graph of tuples. All
three become one ``{key: GraphNode}`` mapping through Dask's own conversion, and then a
:class:`GraphPlan` splits the nodes by how they run:

- ``DataNode``: a value the driver already holds. It is never a task: small values travel
  inline in their dependents' arguments, large ones are put in the store once.
- ``Alias``: another name for a key. Never a task: the alias resolves, through chains, to
  the key that really produces the value.
- every other node (``Task`` and its container subclasses): one sharedcompute task, called
  in a worker as ``node(values)`` with the values of its dependencies.

Only the part of the graph the requested keys need is kept (culling), so a persisted or
reused graph does not run work nobody asked for.

Then :func:`fuse` may run several tasks as one (a :class:`Fused` node), where that costs no
parallelism the workers could use: every task a driver submits costs it a few hundred
microseconds of CPU (messages, the scheduler core, the store), which on a graph of
millisecond tasks is time taken from the workers on the same cores. Two cases, both
merging producers into their only reader (never a requested key, never a node ``keep``
names):

- a chain: a task whose only task input is a task read by nothing else runs right after
  it anyway, so the two become one (Dask's own ``fuse`` of linear chains);
- a reduction: a task reading several tasks that nothing else reads absorbs them, but
  only where at least ``width`` such reductions (say two per worker) of like size (none
  over twice the median) stand at one height, counted from the graph's sources: then all
  of those fuse, so every worker still has groups to run and they come out alike (a tree
  of 32 leaves on 2 workers: 4 groups of 8 leaves and 7 sums, then 3 sums), and a sum of
  200 leaves stays 201 tasks.

A fused task runs its members in order in one worker, each given the values of what it
reads, and drops each intermediate once its reader has run; its result is the last
member's. What fusion changes for a user: a fused group, once started, runs to its end
(a failure elsewhere does not stop it), and Dask's callbacks see its members start
together and finish together.

Private Dask names used, all guarded at import: ``dask._task_spec.convert_legacy_graph``
(the only way to read legacy tuple graphs; ``dask.local`` uses it for the same job), and
the task-spec classes from ``dask._task_spec`` where the public ``dask.task_spec`` module
does not exist yet (before Dask 2025.1). Dask 2024.11.2 and 2024.12.0 store an ``Alias``
target as a ``TaskRef``; later versions as the key itself: both are read.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask
from dask.core import flatten
from dask.order import order

try:  # the public home of the task-spec classes (Dask >= 2025.1)
    from dask.task_spec import Alias, DataNode, GraphNode, TaskRef
except ImportError:  # Dask 2024.12: the same classes, only under the private name
    from dask._task_spec import Alias, DataNode, GraphNode, TaskRef

try:
    from dask._task_spec import convert_legacy_graph
except ImportError as error:  # pragma: no cover - only on an unsupported Dask
    raise ImportError(
        f"sharedcompute.dask needs Dask's task-spec graphs (Dask >= 2024.11.2); "
        f"this is Dask {dask.__version__}"
    ) from error

Key = Hashable


@dataclass
class GraphPlan:
    """A culled graph, split into what runs as tasks and what the driver resolves itself.

    Invariants: every key in ``tasks``, ``data`` and ``aliases`` is needed by ``outputs``;
    ``aliases`` map straight to a key of ``tasks`` or ``data`` (chains resolved; after
    :func:`fuse`, maybe to a fused task's member, which only its group reads);
    ``producers[t]`` is the set of ``tasks`` / ``data`` keys task ``t`` reads (aliases
    resolved), and ``readers[p]`` the tasks that read ``p`` (the same edges, reversed);
    ``priority`` orders tasks as Dask's own schedulers would run them (lower first).
    """

    tasks: dict[Key, Any]
    data: dict[Key, Any]
    aliases: dict[Key, Key]
    producers: dict[Key, frozenset[Key]]
    readers: dict[Key, list[Key]]
    priority: dict[Key, int]
    outputs: list[Key] = field(default_factory=list)
    # fused task -> every key it runs, in order (itself last); see fuse()
    members: dict[Key, tuple[Key, ...]] = field(default_factory=dict)

    def resolve(self, key: Key) -> Key:
        """The key that really produces ``key``'s value (``key`` itself unless an alias)."""
        return self.aliases.get(key, key)


def to_task_graph(dsk: Any) -> dict[Key, Any]:
    """Whatever Dask passed (expression, task-spec or legacy mapping) as ``{key: GraphNode}``."""
    if not isinstance(dsk, Mapping):
        graph = getattr(dsk, "__dask_graph__", None)
        if graph is None:
            raise TypeError(
                f"expected a Dask graph (a mapping) or an object with __dask_graph__(), "
                f"got {type(dsk).__name__}"
            )
        dsk = graph()
    converted: dict[Key, Any] = convert_legacy_graph(dsk)
    return converted


def make_plan(dsk: Any, keys: Any) -> GraphPlan:
    """Cull ``dsk`` to what ``keys`` (a key or a nested list of keys) need, and split it."""
    graph = to_task_graph(dsk)
    outputs = list(flatten(keys)) if isinstance(keys, list) else [keys]
    needed = _cull(graph, outputs)
    tasks: dict[Key, Any] = {}
    data: dict[Key, Any] = {}
    direct_aliases: dict[Key, Key] = {}
    for key in needed:
        node = graph[key]
        if isinstance(node, Alias):
            target = node.target  # a key; a TaskRef up to Dask 2024.12.0
            direct_aliases[key] = target.key if isinstance(target, TaskRef) else target
        elif isinstance(node, DataNode):
            data[key] = node.value
        elif isinstance(node, GraphNode):
            tasks[key] = node
        else:  # convert_legacy_graph wraps plain values; be safe with anything else
            data[key] = node
    aliases = {key: _follow(key, direct_aliases) for key in direct_aliases}
    producers: dict[Key, frozenset[Key]] = {}
    readers: dict[Key, list[Key]] = {key: [] for key in (*tasks, *data)}
    for key, node in tasks.items():
        reads = frozenset(aliases.get(dep, dep) for dep in node.dependencies)
        producers[key] = reads
        for producer in reads:
            readers[producer].append(key)
    culled: dict[Any, Any] = {key: graph[key] for key in needed}
    ranks: dict[Any, int] = order(culled)
    priority = {key: ranks.get(key, 0) for key in tasks}
    return GraphPlan(tasks, data, aliases, producers, readers, priority, outputs)


class Fused:
    """Several Dask nodes run as one task (see :func:`fuse`); called like a node.

    ``steps``: (key, node, reads, done) in order, where ``reads`` pairs each key the node
    names with the key that produces it (aliases resolved) and ``done`` lists the members
    whose only reader this step is. ``dependencies``: the producers from outside.
    """

    __slots__ = ("dependencies", "steps")

    def __init__(
        self,
        steps: tuple[tuple[Key, Any, tuple[tuple[Key, Key], ...], tuple[Key, ...]], ...],
        dependencies: tuple[Key, ...],
    ) -> None:
        self.steps = steps
        self.dependencies = dependencies

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fused, (self.steps, self.dependencies))

    def __call__(self, values: Mapping[Key, Any]) -> Any:
        results = dict(values)
        inputs: dict[Key, Any] = {}
        try:
            value = None
            for key, node, reads, done in self.steps:
                inputs = {name: results[source] for name, source in reads}
                value = node(inputs)
                inputs.clear()
                for member in done:  # its only reader has run
                    del results[member]
                results[key] = value
            return value
        finally:  # a frame kept in a cycle (some Dask versions) must hold no values
            inputs.clear()
            results.clear()


def fuse(
    plan: GraphPlan, width: int, keep: Callable[[Any], bool] = lambda node: False
) -> GraphPlan:
    """``plan`` with chains, and reductions where ``width`` alike stand at one height,
    fused (see the module docstring); ``plan`` itself if nothing fuses."""
    tasks = plan.tasks
    outputs = {plan.resolve(key) for key in plan.outputs}
    height = _heights(plan)
    by_height: dict[int, list[Key]] = {}
    for key in tasks:
        by_height.setdefault(height[key], []).append(key)
    groups: dict[Key, list[Key]] = {}

    def merge(reader: Key, sources: list[Key]) -> None:
        group: list[Key] = []
        for key in sorted(sources, key=plan.priority.__getitem__):
            group += groups.pop(key, [key])
        group.append(reader)
        groups[reader] = group

    for level in sorted(by_height):
        reductions: list[tuple[Key, list[Key], int]] = []
        for reader in by_height[level]:
            sources = [key for key in plan.producers[reader] if key in tasks]
            if not sources or any(
                key in outputs or len(plan.readers[key]) != 1 or keep(tasks[key])
                for key in sources
            ):
                continue
            if len(sources) == 1:
                merge(reader, sources)  # a chain
            else:
                size = 1 + sum(len(groups.get(key, [key])) for key in sources)
                reductions.append((reader, sources, size))
        # Reductions fuse only alike and at least `width` of them: never one big group
        # (a sum of 200 leaves) beside small ones, nor fewer groups than workers to run them.
        if len(reductions) >= width:
            typical = sorted(size for _, _, size in reductions)[len(reductions) // 2]
            alike = [(r, sources) for r, sources, size in reductions if size <= 2 * typical]
            if len(alike) >= width:
                for reader, sources in alike:
                    merge(reader, sources)
    if not groups:
        return plan
    top = {member: key for key, members in groups.items() for member in members}
    fused: dict[Key, Any] = {}
    producers: dict[Key, frozenset[Key]] = {}
    for key, node in tasks.items():
        if top.get(key, key) != key:
            continue  # runs inside its group's task
        members = groups.get(key, [key])
        fused[key] = _fused_node(plan, members) if len(members) > 1 else node
        producers[key] = frozenset(
            top.get(source, source) for member in members for source in plan.producers[member]
        ) - {key}
    readers: dict[Key, list[Key]] = {key: [] for key in (*fused, *plan.data)}
    for key, inputs in producers.items():
        for source in inputs:
            readers[source].append(key)
    priority = {
        key: min(plan.priority[member] for member in groups.get(key, [key])) for key in fused
    }
    return GraphPlan(
        fused, plan.data, plan.aliases, producers, readers, priority, plan.outputs,
        {key: tuple(members) for key, members in groups.items()},
    )


def _fused_node(plan: GraphPlan, members: list[Key]) -> Fused:
    inside = set(members)
    outside: dict[Key, None] = {}
    steps = []
    for key in members:
        reads = tuple((name, plan.resolve(name)) for name in plan.tasks[key].dependencies)
        for _, source in reads:
            if source not in inside:
                outside[source] = None
        done = tuple(dict.fromkeys(source for _, source in reads if source in inside))
        steps.append((key, plan.tasks[key], reads, done))
    return Fused(tuple(steps), tuple(outside))


def _heights(plan: GraphPlan) -> dict[Key, int]:
    """Each task's longest path of task inputs down to a source (0 for a task reading none)."""
    height: dict[Key, int] = {}
    # In a graph without cycles the stack never holds more than every task and edge.
    bound = len(plan.tasks) + sum(len(sources) for sources in plan.producers.values())
    for start in plan.tasks:
        stack = [start]
        while stack:
            key = stack[-1]
            if key in height:
                stack.pop()
                continue
            sources = [p for p in plan.producers[key] if p in plan.tasks]
            pending = [p for p in sources if p not in height]
            if pending:
                if len(stack) > bound:
                    raise ValueError(f"the Dask graph has a cycle through {key!r}")
                stack.extend(pending)
                continue
            height[key] = 1 + max((height[p] for p in sources), default=-1)
            stack.pop()
    return height


def _cull(graph: Mapping[Key, Any], outputs: Iterable[Key]) -> set[Key]:
    needed: set[Key] = set()
    stack: list[tuple[Key, Key | None]] = [(key, None) for key in outputs]
    while stack:
        key, dependent = stack.pop()
        if key in needed:
            continue
        node = graph.get(key)
        if node is None:
            if dependent is None:
                raise KeyError(f"requested key {key!r} is not in the Dask graph")
            raise ValueError(f"Missing dependency {key!r} for dependent {dependent!r}")
        needed.add(key)
        for dep in node.dependencies if isinstance(node, GraphNode) else ():
            stack.append((dep, key))
    return needed


def _follow(key: Key, aliases: Mapping[Key, Key]) -> Key:
    seen = {key}
    target = aliases[key]
    while target in aliases:
        if target in seen:
            raise ValueError(f"the Dask graph has a cycle of aliases through {key!r}")
        seen.add(target)
        target = aliases[target]
    return target


def nested(keys: Any, values: Mapping[Key, Any]) -> Any:
    """The result in the shape Dask's schedulers return: nested lists of keys become tuples."""
    if isinstance(keys, list):
        return tuple(nested(k, values) for k in keys)
    return values[keys]
