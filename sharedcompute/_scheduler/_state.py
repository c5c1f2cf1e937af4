"""The scheduler core's records: a task, an actor, a worker, as the core tracks them.

Plain mutable dataclasses, owned by :class:`~sharedcompute._scheduler._core.SchedulerCore`
and changed only by its event handlers; nothing outside the scheduler sees them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sharedcompute._scheduler._events import UNIT, NodeId, Resources, TaskKey, TaskState, WorkerId


@dataclass(slots=True)
class Task:
    key: TaskKey
    state: TaskState
    resources: Resources = UNIT
    dependencies: tuple[TaskKey, ...] = ()
    waiting_on: set[TaskKey] = field(default_factory=set)
    dependents: set[TaskKey] = field(default_factory=set)
    pending_dependents: int = 0
    holders: int = 1
    retries_left: int = 0
    retry_exceptions: bool = False
    payload: Any = None
    worker: WorkerId | None = None
    reserved_in: dict[str, float] | None = None  # the node pool holding its resources
    blocked: bool = False
    ref: Any = None
    error: BaseException | None = None
    actor: int | None = None
    parent: TaskKey | None = None
    short: bool = False
    brief: bool = False
    node: NodeId | None = None  # FINISHED: the node its result lives on
    nbytes: int = 0  # FINISHED: the result's size
    followed: bool = False  # a dependent was once queued behind it (see Chains)
    withdrawing: bool = False  # asked to be dropped unrun from its worker's queue
    stealing: bool = False  # asked back from its worker's queue for an idle one (Pipelining)
    env: Any = None  # its runtime_env: it runs only on a worker started in the same one
    name: str | None = ""  # for reports (the payload goes once it ran); None: a value put
    pass_errors: bool = False  # a dependency's error fails it as it is (TaskSubmitted)


@dataclass(slots=True)
class Actor:
    """An actor's calls: ``queue`` in submission order (waiting or ready), ``assigned`` sent."""

    id: int
    worker: WorkerId | None = None
    description: str = ""
    queue: deque[TaskKey] = field(default_factory=deque)
    assigned: list[TaskKey] = field(default_factory=list)
    error: BaseException | None = None
    resources: Resources | None = None  # reserved for its whole life (ActorRequested)
    reserved_in: dict[str, float] | None = None  # ... in this node's pool


@dataclass(slots=True)
class Worker:
    id: WorkerId
    node: NodeId
    pool: dict[str, float]  # its node's free resources (shared with the node's workers)
    assigned: list[TaskKey] = field(default_factory=list)
    # Assigned tasks that are not blocked, and how many of those need more than one CPU
    # (kept up to date on every change, so placement never walks the lists).
    active: int = 0
    active_non_unit: int = 0
    active_long: int = 0  # active tasks not known to be short
    active_slow: int = 0  # active tasks not known to be brief
    # Tasks of this worker waiting on Futures, in the order they blocked: the last one
    # is on top of the worker's stack, and only its own children may run nested above it.
    blocked_order: list[TaskKey] = field(default_factory=list)
    tasks_left: int | None = None  # more tasks it may be given (max_tasks_per_worker)
    sent: int = 0  # when its last task was sent, in the core's count of tasks sent
    env: Any = None  # the runtime_env it was started in (None: none)

    def count(self, task: Task, sign: int) -> None:
        self.active += sign
        if task.resources is not UNIT and not task.resources.is_unit:
            self.active_non_unit += sign
        if not task.short:
            self.active_long += sign
        if not task.brief:
            self.active_slow += sign
