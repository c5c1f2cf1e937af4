"""Events the scheduler core consumes and instructions it emits.

Events describe what happened (a task was submitted, a worker finished, a
process died); instructions say what the runtime must do next (send a task to
a worker, resolve a future, free an object, start a process). Both are plain
frozen dataclasses so tests can build them by hand.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_TASK",
    "TERMINAL",
    "UNIT",
    "ActorFailed",
    "ActorRequested",
    "ActorStarted",
    "CancelRequested",
    "Dispatch",
    "Event",
    "ExternalTask",
    "FreeObject",
    "Instruction",
    "KeyReleased",
    "KeyRetained",
    "LostInputRecheck",
    "NodeId",
    "NodeJoined",
    "NodeLeft",
    "ObjectPut",
    "PlaceActor",
    "PoolBroken",
    "Reject",
    "Resolve",
    "Resources",
    "StartWorker",
    "StealCheck",
    "StealLater",
    "StopWorker",
    "TaskFailed",
    "TaskFinished",
    "TaskKey",
    "TaskReturned",
    "TaskState",
    "TaskSubmitted",
    "Withdraw",
    "WithdrawRequested",
    "WorkerBlocked",
    "WorkerDied",
    "WorkerId",
    "WorkerJoined",
    "WorkerRetired",
    "WorkerUnblocked",
]

TaskKey = int
WorkerId = int
NodeId = int


class TaskState(enum.Enum):
    WAITING = "waiting"  # on dependencies
    READY = "ready"  # dependencies done, waiting for a worker and resources
    RUNNING = "running"  # assigned to a worker (queued there or executing)
    FINISHED = "finished"
    ERRED = "erred"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskState.FINISHED, TaskState.ERRED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Resources:
    """What a task needs while it runs: CPUs plus any custom named resources."""

    cpus: float = 1.0
    custom: tuple[tuple[str, float], ...] = ()

    @property
    def is_unit(self) -> bool:
        return self.cpus == 1.0 and not self.custom

    def as_dict(self) -> dict[str, float]:
        return {"CPU": self.cpus, **dict(self.custom)}


UNIT = Resources()


# -- events -------------------------------------------------------------------


@dataclass(slots=True)
class TaskSubmitted:
    key: TaskKey
    dependencies: tuple[TaskKey, ...] = ()
    resources: Resources = UNIT
    max_retries: int = 3
    retry_exceptions: bool = False
    payload: Any = None  # opaque to the scheduler: what the runtime sends to the worker
    actor: int | None = None  # an actor method call: runs on that actor's process, in order
    parent: TaskKey | None = None  # the task that submitted this one from inside a worker
    short: bool = False  # its function has run for under a millisecond before
    brief: bool = False  # ... for under 100 ms (short ones too): it may queue (Pipelining)
    env: Any = None  # its runtime_env (hashable; None: none): runs only on a worker of that env
    # A failed dependency fails it with that dependency's own error, not a
    # DependencyFailedError (a num_returns part: Ray's refs all raise the task's error).
    pass_errors: bool = False


@dataclass(slots=True)
class ObjectPut:
    """A value that exists without a task (``put``, or a result from another scheduler)."""

    key: TaskKey
    ref: Any
    nbytes: int = 0  # its size, for placing the tasks that read it near it
    node: NodeId = 0  # where it lives


@dataclass(slots=True)
class TaskFinished:
    key: TaskKey
    worker: WorkerId
    ref: Any  # where the result lives (inline bytes or a store descriptor)
    duration: float = 0.0  # seconds the task ran, as the worker measured it
    nbytes: int = 0  # the result's size (it lives on the worker's node)


@dataclass(slots=True)
class TaskFailed:
    """The task raised, or could not be set up (``worker`` is None when it never ran).

    ``lost_node``: it never ran because an input of node ``lost_node`` could not be
    fetched (that node is dying, most likely): it waits for that input to be made
    again (``NodeLeft``), or, if the node stays, runs again at ``LostInputRecheck``.
    """

    key: TaskKey
    worker: WorkerId | None
    error: BaseException
    lost_node: NodeId | None = None


@dataclass(slots=True)
class LostInputRecheck:
    """A while after ``TaskFailed(lost_node=...)``: if its inputs are still there, retry it."""

    key: TaskKey


@dataclass(slots=True)
class StealCheck:
    """A while after ``StealLater``: idle workers take back tasks queued behind others."""


@dataclass(slots=True)
class NodeJoined:
    """A node (a host's worker pool) with these resources takes part from now on."""

    node: NodeId
    resources: dict[str, float]


@dataclass(slots=True)
class NodeLeft:
    """A node is gone: its workers are dead, and it is never chosen again."""

    node: NodeId
    reason: str


@dataclass(slots=True)
class WorkerJoined:
    worker: WorkerId
    node: NodeId = 0
    env: Any = None  # the runtime_env it was started in


NO_TASK: TaskKey = 0  # no key is 0: "the worker was executing nothing"


@dataclass(slots=True)
class WorkerDied:
    """A worker process ended; ``executing`` says which of its tasks it was executing.

    ``executing`` is the key the worker last said it executes (``NO_TASK``: none),
    so only that task (and tasks blocked under it) is charged the crash; the
    others it had been sent either finished with their results unsent or never
    started. None: not known; the first one sent and not blocked is assumed.
    """

    worker: WorkerId
    reason: str  # "pid 123 was killed by SIGKILL", for the error message
    executing: TaskKey | None = None
    replace: bool = True  # False: the runtime starts (or not) a replacement itself


@dataclass(slots=True)
class WorkerBlocked:
    """Task ``key`` on this worker waits on a future: its resources go back to the pool."""

    worker: WorkerId
    key: TaskKey


@dataclass(slots=True)
class WorkerUnblocked:
    worker: WorkerId
    key: TaskKey


@dataclass(slots=True)
class WorkerRetired:
    """An idle pool worker leaves the pool (to become an actor); a replacement is started."""

    worker: WorkerId


@dataclass(slots=True)
class ActorStarted:
    """The actor's process is ``worker`` (first start or restart); its calls may go there."""

    actor: int
    worker: WorkerId
    description: str  # "actor Counter (id 3)", for error messages


@dataclass(slots=True)
class ActorRequested:
    """An actor needs ``resources`` for as long as it lives: ``PlaceActor`` once they are free."""

    actor: int
    resources: Resources


@dataclass(slots=True)
class ActorFailed:
    """The actor is gone for good: its queued and future calls fail with ``error``."""

    actor: int
    error: BaseException


@dataclass(slots=True)
class TaskReturned:
    """A blocked worker hands back a task it was sent but has not started."""

    worker: WorkerId
    key: TaskKey


@dataclass(slots=True)
class CancelRequested:
    key: TaskKey


@dataclass(slots=True)
class WithdrawRequested:
    """Cancel task ``key`` if it is only queued on a worker (its worker says if it was)."""

    key: TaskKey


@dataclass(slots=True)
class KeyReleased:
    """One holder of a key (a Future, a dependent, a worker) let go of it."""

    key: TaskKey


@dataclass(slots=True)
class KeyRetained:
    key: TaskKey


@dataclass(slots=True)
class PoolBroken:
    """No worker can start: every task waiting for one fails with ``error``."""

    error: BaseException


@dataclass(slots=True)
class ExternalTask:
    """A key whose value some other executor will produce (a thread or sync task)."""

    key: TaskKey


Event = (
    TaskSubmitted
    | ActorStarted
    | ActorFailed
    | WorkerRetired
    | ExternalTask
    | ObjectPut
    | TaskFinished
    | TaskFailed
    | WorkerJoined
    | WorkerDied
    | WorkerBlocked
    | WorkerUnblocked
    | TaskReturned
    | CancelRequested
    | KeyReleased
    | KeyRetained
    | PoolBroken
    | WithdrawRequested
    | ActorRequested
    | NodeJoined
    | NodeLeft
    | LostInputRecheck
    | StealCheck
)


# -- instructions --------------------------------------------------------------


@dataclass(slots=True)
class Dispatch:
    """Send task ``key`` to ``worker`` with the values of its dependencies."""

    worker: WorkerId
    key: TaskKey
    payload: Any
    dependency_refs: tuple[tuple[TaskKey, Any], ...]


@dataclass(slots=True)
class Resolve:
    key: TaskKey
    ref: Any


@dataclass(slots=True)
class Reject:
    key: TaskKey
    error: BaseException
    cancelled: bool = False


@dataclass(slots=True)
class FreeObject:
    key: TaskKey
    ref: Any


@dataclass(slots=True)
class StartWorker:
    """Start a pool worker in ``env``, on the node of the one it ``replaces``."""

    replaces: WorkerId | None = None
    env: Any = None


@dataclass(slots=True)
class StopWorker:
    """The worker has run its share of tasks (``max_tasks_per_worker``): let it exit."""

    worker: WorkerId


@dataclass(slots=True)
class Withdraw:
    """Ask ``worker`` to drop task ``key`` unrun if it is still queued there.

    It answers with ``TaskReturned`` if it dropped it (the task is then
    cancelled), or with the task's result if it had started it.
    """

    worker: WorkerId
    key: TaskKey


@dataclass(slots=True)
class PlaceActor:
    """The actor's resources are reserved on ``node`` (until it ends): start it there now."""

    actor: int
    node: NodeId = 0


@dataclass(slots=True)
class StealLater:
    """A worker is idle while a task waits queued behind another's: send ``StealCheck``
    a moment from now (most such gaps close by themselves: the next task comes)."""


Instruction = (
    Dispatch | Resolve | Reject | FreeObject | StartWorker | StopWorker | Withdraw | PlaceActor
    | StealLater
)

