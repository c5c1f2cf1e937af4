"""The scheduler core's placement half: which worker a ready task goes to (pure, no I/O;
mixed into :class:`~sharedcompute._scheduler._core.SchedulerCore`).

Placement policy: an idle worker first (if its node has the task's resources; with
several nodes, on the node that holds most bytes of the task's inputs, then the one
with most CPUs free);
otherwise a short task (its function ran for under a millisecond before)
needing one CPU may be queued, at most ``max_prefetch`` deep, on a worker
whose tasks are all short, so workers never wait for a round trip between two
short tasks and nothing ever waits behind a long one.

Pipelining: when every worker is busy, a brief task (its function ran for under 100 ms
before) needing one CPU may still be queued behind the one brief task a worker runs (one
deep, as ``ProcessPoolExecutor`` queues calls beyond its workers), so a worker finishing a
task of a few milliseconds starts the next at once instead of idling for a round trip to
the driver (most of what such tasks lose to threads on a small machine). Of several such
workers, the one whose task was sent first (``Worker.sent``), likely the first to finish.
A worker still idle a moment later (``StealLater``, then the runtime's ``StealCheck``: the
driver usually sends the next task sooner) takes such a queued task back from the worker
it waits on (``Withdraw`` with ``task.stealing``; the worker reads it at once, even
mid-task, and hands the task back unrun, ``TaskReturned``, or runs it if it had started),
so a task never waits long behind one that turned out long while a worker is free.

Chains: a short task waiting for exactly one unfinished dependency that runs
(or is queued) on a worker of short tasks is queued right behind it on that
worker, still unresolved: its ``Dispatch`` carries ``None`` for that
dependency's ref, and the worker takes the value it has just produced itself.
Such a task is RUNNING with a non-empty ``waiting_on`` ("speculative"). If
the dependency fails, the task fails with it and the worker, lacking the
value, hands it back unrun (``TaskReturned``); a speculative task handed back
or orphaned by a dead worker goes back to WAITING until its dependency is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sharedcompute._scheduler._events import (
    UNIT,
    Instruction,
    NodeId,
    StealCheck,
    TaskKey,
    TaskState,
    Withdraw,
    WorkerId,
)
from sharedcompute._scheduler._nodes import fits
from sharedcompute._scheduler._state import Task, Worker


class Placement:
    """Placement, pipelining and chains; the state they share is the core's (declared here)."""

    max_prefetch: int
    pipeline: bool
    _tasks: dict[TaskKey, Task]
    _workers: dict[WorkerId, Worker]
    _workers_by_node: dict[NodeId, int]
    _steal_asked: bool
    _out: list[Instruction]

    if TYPE_CHECKING:

        def _assign(self, task: Task, worker: Worker) -> None: ...

    def _pick_worker(self, task: Task) -> Worker | None:
        if len(self._workers_by_node) > 1:
            return self._pick_worker_of_nodes(task)
        best: Worker | None = None
        best_load = 1 + self.max_prefetch
        behind: Worker | None = None  # one task ahead of it (Pipelining)
        idle_elsewhere = False
        for worker in self._workers.values():
            if worker.blocked_order:
                continue  # it only takes children of its top task (_serve_blocked)
            if worker.tasks_left is not None and worker.tasks_left <= 0:
                continue  # it retires once its tasks are done
            if worker.env != task.env:
                idle_elsewhere = idle_elsewhere or not worker.active
                continue
            if not worker.active:
                return worker if fits(worker.pool, task.resources) else None
            if worker.active < best_load and not worker.active_long:
                best, best_load = worker, worker.active
            if worker.active == 1 and not worker.active_slow and (
                behind is None or worker.sent < behind.sent
            ):
                behind = worker
        # (An idle worker of another env may restart in this one: no queueing then.)
        return self._queue_on(task, best, behind, idle_elsewhere)

    def _queue_on(
        self, task: Task, short_room: Worker | None, behind: Worker | None, idle: bool
    ) -> Worker | None:
        """No idle worker takes ``task``: the busy one it queues on, if any. A short task
        goes behind short ones (``short_room``, the least loaded); a brief one behind a
        worker's one brief task (``behind``), while no worker is idle (Pipelining)."""
        if not task.resources.is_unit:
            return None
        if task.short and short_room is not None:
            return short_room
        if not task.brief or not self.pipeline or idle:
            return None
        return behind

    def _pick_worker_of_nodes(self, task: Task) -> Worker | None:
        """Several nodes: an idle worker on the node holding most input bytes, then the one
        with most CPUs free; else a short task may queue behind short ones, as on one node."""
        held = self._input_bytes_by_node(task)
        best: Worker | None = None
        best_rank: tuple[float, float] | None = None
        queue_behind: Worker | None = None
        best_load = 1 + self.max_prefetch
        behind: Worker | None = None  # one task ahead of it (Pipelining)
        idle = False
        for worker in self._workers.values():
            if worker.blocked_order or (worker.tasks_left is not None and worker.tasks_left <= 0):
                continue
            if not worker.active:
                idle = True
            if worker.env != task.env:
                continue
            if not worker.active:
                if fits(worker.pool, task.resources):
                    rank = (held.get(worker.node, 0), worker.pool.get("CPU", 0.0))
                    if best_rank is None or rank > best_rank:
                        best, best_rank = worker, rank
                continue
            if worker.active < best_load and not worker.active_long:
                queue_behind, best_load = worker, worker.active
            if worker.active == 1 and not worker.active_slow and (
                behind is None or worker.sent < behind.sent
            ):
                behind = worker
        if best is not None:
            return best
        return self._queue_on(task, queue_behind, behind, idle)

    def _input_bytes_by_node(self, task: Task) -> dict[NodeId, int]:
        held: dict[NodeId, int] = {}
        for key in task.dependencies:
            dependency = self._tasks.get(key)
            if dependency is not None and dependency.node is not None:
                held[dependency.node] = held.get(dependency.node, 0) + dependency.nbytes
        return held

    def _on_StealCheck(self, event: StealCheck) -> None:
        """Each worker still idle takes back one task queued behind another worker's running
        one (see Pipelining): a ``Withdraw``, answered by ``TaskReturned`` (then READY at
        the front, placed as usual) or by the task's own answer if it had started."""
        self._steal_asked = False
        for victim, task in self._steals():
            task.stealing = True
            self._out.append(Withdraw(victim.id, task.key))

    def _steals(self) -> list[tuple[Worker, Task]]:
        """The queued tasks idle workers would take back now, with their workers."""
        # Asked after most answers: first the cheap test that anything is queued at all.
        if not any(w.active >= 2 and not w.blocked_order for w in self._workers.values()):
            return []
        idle = [
            worker for worker in self._workers.values()
            if not worker.active and not worker.blocked_order
            and (worker.tasks_left is None or worker.tasks_left > 0)
        ]
        steals: list[tuple[Worker, Task]] = []
        if not idle:
            return steals
        for victim in self._workers.values():
            if victim.active < 2 or victim.blocked_order:
                continue
            for key in victim.assigned[1:]:  # the first one runs (nothing is blocked here)
                task = self._tasks[key]
                if (
                    task.short or task.stealing or task.withdrawing or task.waiting_on
                    or task.actor is not None or not task.resources.is_unit
                ):
                    continue
                thief = next((w for w in idle if w.env == task.env), None)
                if thief is None:
                    continue
                idle.remove(thief)
                steals.append((victim, task))
                if not idle:
                    return steals
        return steals

    def _follow(self, first: Task) -> None:
        """Queue the short task waiting only for ``first`` right behind it (see Chains)."""
        dependency: Task | None = first
        while dependency is not None:
            task, dependency = dependency, None
            if task.state is not TaskState.RUNNING or task.worker is None or task.blocked:
                return
            if task.actor is not None or not task.short or task.followed:
                return
            worker = self._workers.get(task.worker)
            if (
                worker is None or worker.blocked_order or worker.active_long
                or worker.active > self.max_prefetch
                or (worker.tasks_left is not None and worker.tasks_left <= 0)
            ):
                return
            for key in sorted(task.dependents):
                dependent = self._tasks.get(key)
                if (
                    dependent is not None and dependent.state is TaskState.WAITING
                    and dependent.short and dependent.actor is None
                    and dependent.resources is UNIT and dependent.waiting_on == {task.key}
                    and dependent.env == worker.env
                ):
                    task.followed = True
                    self._assign(dependent, worker)
                    dependency = dependent  # one per task: a fan-out spreads once it is done
                    break
