"""The scheduler core: a state machine over tasks, workers and resources, with no I/O.

Everything the runtime learns becomes an event passed to
:meth:`SchedulerCore.handle`, which updates the state and returns the
instructions the runtime must carry out (send a task, resolve or reject a
future, free an object, start a worker). Nothing here blocks, sleeps, touches
a socket or a process, so the whole policy is tested with plain objects.

Beside this file: ``_events`` (what goes in and out), ``_state`` (the records
of tasks, workers and actors), ``_nodes`` (nodes and their resource pools),
``_placement`` (which worker a task goes to, mixed in here) and ``_actors`` (the
actor half of the handlers, mixed in here).

Task life cycle::

    WAITING --deps done--> READY --worker free--> RUNNING --> FINISHED
       |                     |                      |  \\
       +--dep failed---------+--cancel--> CANCELLED |   +--> ERRED
                                                    +--worker died, retries left--> READY

State:
- ``_tasks``: every key still of interest (a holder or an unfinished dependent
  needs it). ``holders`` counts Futures and other outside references;
  ``pending_dependents`` counts dependents that have not finished yet.
- ``_ready``: READY keys in submission order (FIFO: fair, and what users of
  ``concurrent.futures`` expect). Entries go stale when a task leaves READY
  another way (dispatched as a child, cancelled, failed); they are skipped.
- ``_ready_children``: READY keys by the task that submitted them, so a worker
  whose tasks all wait on Futures runs only the top task's own children nested
  (anything else could nest without bound, and a task's children are what it
  waits for).
- ``_workers``: each worker's ``assigned`` keys in the order they were sent; a
  worker runs them in that order, so the started ones are always a prefix.
- ``nodes``: the nodes (host worker pools), each with its resource pool
  (``_nodes.NodeTable``); a task's resources are reserved in its worker's node.
- a FINISHED task's ``node`` and ``nbytes``: where its result lives and its size
  (the object directory), so a task is placed on the node holding most of its inputs.

Placement (an idle worker first, else queueing on a busy one: short tasks, pipelining,
chains): see ``_placement``, mixed in here.

Environments: a task submitted with a runtime_env (``env``, an opaque hashable
value) runs only on a worker started in that env, and a task without one only on
a worker without one. When no worker of its env is free but one of another env is
idle, that worker is retired and a new one starts in the task's env in its place
(``StopWorker`` + ``StartWorker(env=...)``; the runtime reports the new worker at
once); one restart per such task and pass, so a burst of them spreads. Until any
env appears (``_envs_in_use``) none of this costs anything.

Each worker holds the reservation of exactly one task, its first assigned
task that is not blocked; when a task blocks on a future,
that reservation passes on (or back to the node), which is how a task waiting
on nested tasks gives its CPU back.

Invariants:
- a READY key is in ``_ready`` (possibly besides stale entries);
- a RUNNING key is in exactly one worker's ``assigned`` list;
- a record is dropped once it is terminal, has no holders and no pending
  dependents; its object is freed then (``FreeObject``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from concurrent.futures import CancelledError
from typing import Any

from sharedcompute._scheduler._actors import ActorScheduling
from sharedcompute._scheduler._events import (
    NO_TASK,
    TERMINAL,
    ActorFailed,
    ActorRequested,
    ActorStarted,
    CancelRequested,
    Dispatch,
    Event,
    ExternalTask,
    FreeObject,
    Instruction,
    KeyReleased,
    KeyRetained,
    LostInputRecheck,
    NodeId,
    NodeJoined,
    NodeLeft,
    ObjectPut,
    PoolBroken,
    Reject,
    Resolve,
    Resources,
    StartWorker,
    StealCheck,
    StealLater,
    StopWorker,
    TaskFailed,
    TaskFinished,
    TaskKey,
    TaskReturned,
    TaskState,
    TaskSubmitted,
    Withdraw,
    WithdrawRequested,
    WorkerBlocked,
    WorkerDied,
    WorkerId,
    WorkerJoined,
    WorkerRetired,
    WorkerUnblocked,
)
from sharedcompute._scheduler._nodes import LOCAL_NODE, NodeTable, fits, release, reserve
from sharedcompute._scheduler._placement import Placement
from sharedcompute._scheduler._state import Actor, Task, Worker
from sharedcompute.errors import DependencyFailedError, ObjectLostError, WorkerCrashedError


class SchedulerCore(Placement, ActorScheduling):
    _handlers: dict[type, Any]

    def __init__(
        self, resources: dict[str, float] | None = None, *, max_prefetch: int = 16,
        max_tasks_per_worker: int | None = None, pipeline: bool = False,
    ) -> None:
        # Local mode is one node; a cluster's head starts with none (NodeJoined).
        self.nodes = NodeTable()
        if resources is not None:
            self.nodes.join(LOCAL_NODE, resources)
        self.max_prefetch = max_prefetch
        self.pipeline = pipeline  # queue a task behind a busy worker's one task (Pipelining)
        self._sends = 0  # tasks sent to workers so far (Worker.sent)
        self._idle_seen = False  # a worker may have been left idle: see whether it can steal
        self._steal_asked = False  # a StealLater is out, its StealCheck not come yet
        self.max_tasks_per_worker = max_tasks_per_worker
        self._tasks: dict[TaskKey, Task] = {}
        self._ready: deque[TaskKey] = deque()
        # READY tasks by the task that submitted them (entries may be stale: check state).
        self._ready_children: dict[TaskKey, deque[TaskKey]] = {}
        self._workers: dict[WorkerId, Worker] = {}
        self._workers_by_node: dict[NodeId, int] = {}  # how many workers each node has
        self._actors: dict[int, Actor] = {}
        self._actor_workers: dict[WorkerId, Actor] = {}
        self._out: list[Instruction] = []
        self._broken: BaseException | None = None  # PoolBroken: tasks that become ready fail
        # Actors waiting for their resources (ActorRequested), first come first placed.
        self._actors_waiting: deque[tuple[int, Resources]] = deque()
        # Set once a task or worker has a runtime_env: placement then matches envs and may
        # restart an idle worker in another env (see Environments).
        self._envs_in_use = False

    # -- queries (for tests, the dashboard and error messages) -------------

    def state_of(self, key: TaskKey) -> TaskState | None:
        task = self._tasks.get(key)
        return task.state if task else None

    def outcome(self, key: TaskKey) -> tuple[TaskState, Any, BaseException | None] | None:
        """(state, result ref, error) of a key, or None if it is unknown."""
        task = self._tasks.get(key)
        return (task.state, task.ref, task.error) if task else None

    def __contains__(self, key: TaskKey) -> bool:
        return key in self._tasks

    def worker_of(self, key: TaskKey) -> WorkerId | None:
        """The worker a task was sent to (running, or queued there), if any."""
        task = self._tasks.get(key)
        return task.worker if task is not None and task.state is TaskState.RUNNING else None

    @property
    def total(self) -> dict[str, float]:
        """Resources of all live nodes together."""
        return self.nodes.total()

    @property
    def available(self) -> dict[str, float]:
        """Free resources of all live nodes together."""
        return self.nodes.available()

    def workers(self) -> dict[WorkerId, list[TaskKey]]:
        return {w.id: list(w.assigned) for w in self._workers.values()}

    def objects(self) -> list[tuple[TaskKey, Any, int, int, str | None]]:
        """(key, ref, holders, pending dependents, name) of every value that exists: the
        results of finished tasks (their payload's name) and values put (None)."""
        return [
            (task.key, task.ref, task.holders, task.pending_dependents, task.name)
            for task in self._tasks.values()
            if task.state is TaskState.FINISHED and task.ref is not None
        ]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in TaskState}
        for task in self._tasks.values():
            counts[task.state.value] += 1
        return counts

    # -- the one entry point -------------------------------------------------

    def handle(self, events: Event | Iterable[Event]) -> list[Instruction]:
        if type(events) is list or type(events) is tuple:
            for event in events:
                self._handlers[type(event)](self, event)
        else:
            self._handlers[type(events)](self, events)
        if self._actors_waiting:
            self._place_actors()
        if self._ready:
            self._schedule()
        if self._idle_seen:
            self._idle_seen = False
            if self.pipeline and not self._steal_asked and self._steals():
                self._steal_asked = True
                self._out.append(StealLater())
        out, self._out = self._out, []
        return out

    # -- event handlers -------------------------------------------------------

    def _on_TaskSubmitted(self, event: TaskSubmitted) -> None:
        if event.key in self._tasks:
            raise ValueError(f"task key {event.key} is already in use")
        task = Task(
            key=event.key,
            state=TaskState.WAITING,
            resources=event.resources,
            dependencies=event.dependencies,
            retries_left=event.max_retries,
            retry_exceptions=event.retry_exceptions,
            payload=event.payload,
            actor=event.actor,
            parent=event.parent,
            short=event.short,
            brief=event.brief or event.short,
            env=event.env,
            name=getattr(event.payload, "name", ""),
            pass_errors=event.pass_errors,
        )
        self._tasks[event.key] = task
        if event.env is not None:
            self._envs_in_use = True
        if event.actor is not None:
            actor = self._actor(event.actor)
            if actor.error is not None:
                self._fail(task, actor.error)
                return
            actor.queue.append(task.key)
        infeasible = None if event.actor is not None else self.nodes.infeasible(event.resources)
        if infeasible:
            self._fail(task, ValueError(infeasible))
            return
        for dep_key in dict.fromkeys(event.dependencies):
            dep = self._tasks.get(dep_key)
            if dep is None:
                self._fail(task, KeyError(f"dependency {dep_key} is unknown or already freed"))
                return
            if dep.state is TaskState.FINISHED:
                dep.pending_dependents += 1
                dep.dependents.add(task.key)
            elif dep.state in (TaskState.ERRED, TaskState.CANCELLED):
                self._fail_dependent(task, dep)
                return
            else:
                dep.pending_dependents += 1
                dep.dependents.add(task.key)
                task.waiting_on.add(dep_key)
        if not task.waiting_on:
            self._make_ready(task)
        elif task.short and len(task.waiting_on) == 1:
            self._follow(self._tasks[next(iter(task.waiting_on))])

    def _on_ExternalTask(self, event: ExternalTask) -> None:
        self._tasks[event.key] = Task(key=event.key, state=TaskState.RUNNING)

    def _on_ObjectPut(self, event: ObjectPut) -> None:
        task = self._tasks.get(event.key)
        if task is None:
            self._tasks[event.key] = Task(
                key=event.key, state=TaskState.FINISHED, ref=event.ref, node=event.node,
                nbytes=event.nbytes, name=None,
            )
        else:  # an external task completed
            task.node, task.nbytes = event.node, event.nbytes
            self._finish(task, event.ref)

    def _on_TaskFinished(self, event: TaskFinished) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.state is not TaskState.RUNNING or task.worker != event.worker:
            # A late answer from a worker we gave up on; its result is not ours.
            self._out.append(FreeObject(event.key, event.ref))
            return
        worker = self._workers.get(event.worker)
        self._unassign(task)
        if worker is not None:
            task.node, task.nbytes = worker.node, event.nbytes
        self._finish(task, event.ref)
        if worker is not None and worker.assigned:
            # Room freed on this worker: the chain queued on it may grow.
            last = self._tasks.get(worker.assigned[-1])
            if last is not None:
                self._follow(last)

    def _on_TaskFailed(self, event: TaskFailed) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.state in TERMINAL:
            return
        if event.worker is not None:
            if task.worker != event.worker:
                return
            self._unassign(task)
            if event.lost_node is not None and task.actor is None:
                self._wait_for_lost_inputs(task, event.lost_node)
                return
            if task.retry_exceptions and task.retries_left > 0:
                task.retries_left -= 1
                self._make_ready(task, front=True)
                return
        self._fail(task, event.error)

    def _wait_for_lost_inputs(self, task: Task, node: NodeId) -> None:
        """It never ran: an input on ``node`` could not be fetched. Wait for that node's
        inputs to be made again (``NodeLeft``), or for ``LostInputRecheck``."""
        suspects = {
            key for key in dict.fromkeys(task.dependencies)
            if (dep := self._tasks.get(key)) is not None
            and dep.state is TaskState.FINISHED and dep.node == node
        }
        if not suspects:  # already made again elsewhere (or being made): as its inputs allow
            task.waiting_on = {
                key for key in dict.fromkeys(task.dependencies)
                if (dep := self._tasks.get(key)) is not None and dep.state is not TaskState.FINISHED
            }
            if task.waiting_on:
                task.state = TaskState.WAITING
            else:
                self._make_ready(task, front=True)
            return
        task.state = TaskState.WAITING
        task.waiting_on |= suspects

    def _on_LostInputRecheck(self, event: LostInputRecheck) -> None:
        """The node of a lost input did not leave: its objects are there; try again."""
        task = self._tasks.get(event.key)
        if task is None or task.state is not TaskState.WAITING:
            return
        lost = {k for k in task.waiting_on if self._tasks[k].state is TaskState.FINISHED}
        if not lost:
            return  # waiting for inputs being made again, as it should
        if task.retries_left <= 0:
            self._fail(task, ObjectLostError(
                f"task {task.key} could not fetch its inputs {sorted(lost)} from their node"
            ))
            return
        task.retries_left -= 1
        task.waiting_on -= lost
        if not task.waiting_on:
            self._make_ready(task, front=True)

    def _on_NodeJoined(self, event: NodeJoined) -> None:
        self.nodes.join(event.node, event.resources)

    def _on_NodeLeft(self, event: NodeLeft) -> None:
        """Its workers died with it: their tasks rerun elsewhere under their retries, and
        the results that lived only there are made again (lineage) where that can be."""
        for worker in [w for w in self._workers.values() if w.node == event.node]:
            self._on_WorkerDied(WorkerDied(worker.id, event.reason, replace=False))
        self.nodes.leave(event.node)
        self._recompute_lost(event.node)

    def _recompute_lost(self, node: NodeId) -> None:
        """Run again the finished tasks whose results were on ``node`` (it left).

        A task can run again while its inputs exist (each of its dependencies is
        finished, its result elsewhere, or is itself run again) and a live node can
        fit it. Its dependents that
        have not been sent yet wait for it again. One that cannot (an input was freed)
        stays as it is: reading its result raises ``ObjectLostError``.
        """
        lost = {
            t.key: t for t in self._tasks.values()
            if t.state is TaskState.FINISHED and t.node == node and t.payload is not None
        }
        again: dict[TaskKey, Task] = {}
        changed = True
        while changed:  # until every task whose inputs can be had is in
            changed = False
            for key, task in lost.items():
                if key in again or self.nodes.infeasible(task.resources):
                    continue  # (infeasible: it was pinned to that node, say)
                deps = [self._tasks.get(k) for k in dict.fromkeys(task.dependencies)]
                if all(d is not None and (d.key in again or (
                    d.state is TaskState.FINISHED and d.key not in lost
                )) for d in deps):
                    again[key] = task
                    changed = True
        for task in again.values():
            task.ref, task.node, task.nbytes = None, None, 0
            task.state = TaskState.WAITING
            for dep_key in dict.fromkeys(task.dependencies):
                dep = self._tasks[dep_key]
                dep.pending_dependents += 1
                dep.dependents.add(task.key)
                if dep_key in again:
                    task.waiting_on.add(dep_key)
        for task in again.values():
            for dep_key in task.dependents:
                dependent = self._tasks.get(dep_key)
                if dependent is not None and dependent.state in (
                    TaskState.WAITING, TaskState.READY
                ):
                    dependent.waiting_on.add(task.key)
                    dependent.state = TaskState.WAITING  # a READY entry goes stale
            if not task.waiting_on:
                self._make_ready(task)

    def _on_WorkerJoined(self, event: WorkerJoined) -> None:
        if event.node not in self.nodes:
            raise ValueError(f"worker {event.worker} joined node {event.node}, which is unknown")
        self._workers[event.worker] = Worker(
            event.worker, event.node, self.nodes[event.node].available,
            tasks_left=self.max_tasks_per_worker, env=event.env,
        )
        if event.env is not None:
            self._envs_in_use = True
        self._workers_by_node[event.node] = self._workers_by_node.get(event.node, 0) + 1
        self._idle_seen = True

    def _on_WorkerDied(self, event: WorkerDied) -> None:
        actor = self._actor_workers.pop(event.worker, None)
        if actor is not None:
            self._actor_lost(actor, event.reason)
            return
        worker = self._workers.get(event.worker)
        if worker is None:
            return
        self._remove_worker(worker)
        executing = self._executing(event)
        started = executing is None
        requeue: list[Task] = []
        for key in worker.assigned:
            task = self._tasks.get(key)
            if task is None or task.state in TERMINAL:
                continue  # a speculative task that failed with a dependency just now
            if task.reserved_in is not None:
                release(task.reserved_in, task.resources)
                task.reserved_in = None
            task.worker = None
            # Blocked tasks had started. Of the others, only the one executing crashed:
            # those sent before it finished (results lost with the worker), those after
            # it never started. Unknown: tasks run in the order sent, so the first one.
            if executing is None:
                was_running = task.blocked or started
                if not task.blocked:
                    started = False
            else:
                was_running = task.blocked or key == executing
            if was_running:
                task.withdrawing = False  # its DROP came too late: it had started
            task.blocked = False
            if not was_running:
                requeue.append(task)
            elif task.retries_left > 0:
                task.retries_left -= 1
                requeue.append(task)
            else:
                self._fail(
                    task,
                    WorkerCrashedError(
                        f"the worker running task {key} died: {event.reason}; "
                        "no retries left (raise max_retries to retry more)"
                    ),
                )
        worker.assigned.clear()
        # Back to the front of the queue, in the order they were submitted.
        for task in reversed(requeue):
            self._requeue(task)
        if event.replace:
            self._out.append(StartWorker(replaces=event.worker, env=worker.env))

    def _executing(self, event: WorkerDied) -> TaskKey | None:
        """The task the dead worker was executing; None if it cannot be told."""
        if event.executing is None or event.executing == NO_TASK:
            return event.executing
        task = self._tasks.get(event.executing)
        if task is None or task.worker != event.worker or task.state in TERMINAL:
            return NO_TASK  # its answer came in: it had finished
        if task.blocked:
            return None  # a thread of the blocked task ran another: which crashed is unknown
        return event.executing

    def _on_WorkerBlocked(self, event: WorkerBlocked) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.worker != event.worker or task.actor is not None:
            return
        if task.blocked:
            return
        task.blocked = True
        worker = self._workers[event.worker]
        worker.count(task, -1)
        worker.blocked_order.append(task.key)
        self._rebalance(worker)

    def _on_WorkerUnblocked(self, event: WorkerUnblocked) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.worker != event.worker or task.actor is not None:
            return
        if not task.blocked:
            return
        task.blocked = False
        worker = self._workers[event.worker]
        worker.count(task, +1)
        worker.blocked_order.remove(task.key)
        self._rebalance(worker)

    def _on_TaskReturned(self, event: TaskReturned) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.worker != event.worker or task.state is not TaskState.RUNNING:
            return
        self._unassign(task)
        if task.withdrawing:
            self._terminate(
                task, TaskState.CANCELLED, CancelledError(f"task {task.key} was cancelled")
            )
        else:
            self._requeue(task)

    def _on_WithdrawRequested(self, event: WithdrawRequested) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.state in (TaskState.WAITING, TaskState.READY):
            self._on_CancelRequested(CancelRequested(event.key))
            return
        if (
            task.state is not TaskState.RUNNING or task.actor is not None or task.worker is None
            or task.blocked or task.withdrawing or task.worker not in self._workers
        ):
            return
        if task.stealing:  # its DROP is on its way: handed back, it is cancelled instead
            task.withdrawing = True
            return
        # The first task a worker has that is not blocked runs, or runs next: it stays (as
        # the work in ProcessPoolExecutor's call queue does). Those behind it are withdrawn.
        head = next(
            (key for key in self._workers[task.worker].assigned if not self._tasks[key].blocked),
            None,
        )
        if head != task.key:
            task.withdrawing = True
            self._out.append(Withdraw(task.worker, task.key))

    def _on_CancelRequested(self, event: CancelRequested) -> None:
        task = self._tasks.get(event.key)
        if task is None or task.state not in (TaskState.WAITING, TaskState.READY):
            return
        self._terminate(task, TaskState.CANCELLED, CancelledError(f"task {task.key} was cancelled"))

    def _on_PoolBroken(self, event: PoolBroken) -> None:
        self._broken = event.error
        for task in list(self._tasks.values()):
            if task.actor is None and task.state in (TaskState.WAITING, TaskState.READY):
                self._fail(task, event.error)

    def _on_KeyRetained(self, event: KeyRetained) -> None:
        task = self._tasks.get(event.key)
        if task is not None:
            task.holders += 1

    def _on_KeyReleased(self, event: KeyReleased) -> None:
        task = self._tasks.get(event.key)
        if task is None:
            return
        task.holders -= 1
        self._maybe_forget(task)

    # -- transitions -------------------------------------------------------------

    def _make_ready(self, task: Task, *, front: bool = False) -> None:
        task.state = TaskState.READY
        if task.actor is not None:
            actor = self._actors[task.actor]
            if front:
                actor.queue.appendleft(task.key)
            self._pump_actor(actor)
            return
        if front:
            self._ready.appendleft(task.key)
        else:
            self._ready.append(task.key)
        if task.parent is not None:
            self._ready_children.setdefault(task.parent, deque()).append(task.key)

    def _requeue(self, task: Task) -> None:
        """A task that was sent but never ran goes back: READY, or WAITING if speculative."""
        if task.withdrawing:  # its worker died before it could drop it: cancel it here
            task.withdrawing = False
            self._terminate(
                task, TaskState.CANCELLED, CancelledError(f"task {task.key} was cancelled")
            )
            return
        task.stealing = False
        task.waiting_on = {
            key for key in task.dependencies
            if (dependency := self._tasks.get(key)) is not None
            and dependency.state is not TaskState.FINISHED
        }
        if task.waiting_on:
            task.state = TaskState.WAITING
        else:
            self._make_ready(task, front=True)

    def _finish(self, task: Task, ref: Any) -> None:
        task.state = TaskState.FINISHED
        task.ref = ref
        if task.node in (None, LOCAL_NODE) or task.actor is not None:
            task.payload = None  # (kept for a result on another node: lineage)
        self._out.append(Resolve(task.key, ref))
        for dep_key in task.dependents:
            dependent = self._tasks.get(dep_key)
            if dependent is None:
                continue
            dependent.waiting_on.discard(task.key)  # also for a speculative dependent
            if dependent.state is TaskState.WAITING and not dependent.waiting_on:
                self._make_ready(dependent)
        self._done_with_dependencies(task)
        self._maybe_forget(task)

    def _fail(self, task: Task, error: BaseException) -> None:
        self._terminate(task, TaskState.ERRED, error)

    def _terminate(self, task: Task, state: TaskState, error: BaseException) -> None:
        # A worklist, not recursion: a failure may run down a chain thousands long.
        pending = [(task, state, error)]
        while pending:
            task, state, error = pending.pop()
            if task.state in TERMINAL:
                continue
            task.state = state
            task.error = error
            task.payload = None
            self._out.append(Reject(task.key, error, cancelled=state is TaskState.CANCELLED))
            for dep_key in list(task.dependents):
                dependent = self._tasks.get(dep_key)
                if dependent is None:
                    continue
                if dependent.state is TaskState.RUNNING and dependent.waiting_on:
                    self._unassign(dependent)  # speculative: its worker will hand it back
                elif dependent.state not in (TaskState.WAITING, TaskState.READY):
                    continue
                failure = self._dependency_error(dependent, task)
                pending.append((dependent, TaskState.ERRED, failure))
            self._done_with_dependencies(task)
            if task.actor is not None:
                actor = self._actors[task.actor]
                if task.key in actor.queue:
                    actor.queue.remove(task.key)
                    self._pump_actor(actor)
            self._maybe_forget(task)

    def _fail_dependent(self, task: Task, failed: Task) -> None:
        self._fail(task, self._dependency_error(task, failed))

    @staticmethod
    def _dependency_error(task: Task, failed: Task) -> BaseException:
        cause = failed.error
        if task.pass_errors and cause is not None:
            return cause
        # Name the root failure, not the whole chain of "did not run" messages before it.
        reason = getattr(cause, "reason", None) or f"{type(cause).__name__}: {cause}"
        verb = "was cancelled" if failed.state is TaskState.CANCELLED else "failed"
        error = DependencyFailedError(
            f"task {task.key} did not run: its dependency {failed.key} {verb} ({reason})"
        )
        error.reason = reason
        error.__cause__ = cause
        return error

    def _done_with_dependencies(self, task: Task) -> None:
        """``task`` no longer needs its dependencies' values."""
        for dep_key in dict.fromkeys(task.dependencies):
            dep = self._tasks.get(dep_key)
            if dep is not None and task.key in dep.dependents:
                dep.dependents.discard(task.key)
                dep.pending_dependents -= 1
                self._maybe_forget(dep)
        task.waiting_on.clear()

    def _maybe_forget(self, task: Task) -> None:
        if task.state in TERMINAL and task.holders <= 0 and task.pending_dependents <= 0:
            del self._tasks[task.key]
            self._ready_children.pop(task.key, None)
            if task.state is TaskState.FINISHED:
                self._out.append(FreeObject(task.key, task.ref))

    # -- resources and placement ---------------------------------------------------

    def infeasible(self, resources: Resources, what: str = "the task") -> str | None:
        """Why no node can ever fit ``resources`` (None: one can)."""
        return self.nodes.infeasible(resources, what)

    def _rebalance(self, worker: Worker) -> None:
        """Give the worker's one reservation to its first active task."""
        holder = None
        if worker.active:
            for key in worker.assigned:
                if not self._tasks[key].blocked:
                    holder = self._tasks[key]
                    break
        for key in worker.assigned:
            task = self._tasks[key]
            if task is not holder and task.reserved_in is not None:
                release(task.reserved_in, task.resources)
                task.reserved_in = None
        if holder is not None and holder.reserved_in is None:
            reserve(worker.pool, holder.resources)
            holder.reserved_in = worker.pool

    def _unassign(self, task: Task) -> None:
        if task.actor is not None:
            actor = self._actors[task.actor]
            if task.key in actor.assigned:
                actor.assigned.remove(task.key)
            task.worker = None
            return
        worker = self._workers.get(task.worker) if task.worker is not None else None
        if task.reserved_in is not None:
            release(task.reserved_in, task.resources)
            task.reserved_in = None
        if worker is not None:
            worker.assigned.remove(task.key)
            if not task.blocked:
                worker.count(task, -1)
            elif task.key in worker.blocked_order:
                worker.blocked_order.remove(task.key)
        task.blocked = False
        task.worker = None
        task.stealing = False
        if worker is not None:
            self._rebalance(worker)
            if not worker.active:
                self._idle_seen = True
            if worker.tasks_left is not None and worker.tasks_left <= 0 and not worker.assigned:
                self._retire(worker)

    def _retire(self, worker: Worker, env: Any = None, *, new_env: bool = False) -> None:
        """The worker exits, and another takes its place: in the same env once it has had its
        share of tasks, in ``env`` when a task needs that env (``new_env``)."""
        self._remove_worker(worker)
        self._out.append(StopWorker(worker.id))
        self._out.append(StartWorker(replaces=worker.id, env=env if new_env else worker.env))

    def _remove_worker(self, worker: Worker) -> None:
        del self._workers[worker.id]
        left = self._workers_by_node[worker.node] - 1
        if left:
            self._workers_by_node[worker.node] = left
        else:
            del self._workers_by_node[worker.node]

    def _serve_blocked(self) -> None:
        """A worker whose tasks all wait runs the top one's ready children, nested."""
        for worker in self._workers.values():
            if worker.active or not worker.blocked_order:
                continue
            children = self._ready_children.get(worker.blocked_order[-1])
            while children:
                task = self._tasks.get(children.popleft())
                if task is not None and task.state is TaskState.READY and fits(
                    worker.pool, task.resources
                ) and task.env == worker.env:
                    self._assign(task, worker)
                    break

    def _schedule(self) -> None:
        if self._broken is not None:  # no worker will ever take them
            for key in self._ready:
                task = self._tasks.get(key)
                if task is not None and task.state is TaskState.READY and task.actor is None:
                    self._fail(task, self._broken)
            self._ready.clear()
            return
        if self._ready_children:
            self._serve_blocked()
        skipped: list[TaskKey] = []
        while self._ready:
            key = self._ready.popleft()
            task = self._tasks.get(key)
            if task is None or task.state is not TaskState.READY:
                continue  # stale: dispatched as a child, cancelled or failed meanwhile
            worker = self._pick_worker(task)
            if worker is None:
                skipped.append(key)
                if self._envs_in_use and self._restart_for(task):
                    continue
                if task.resources.is_unit:
                    break  # no unit task can be placed now, and other tasks need more
                continue
            self._assign(task, worker)
            if task.dependents and task.short:
                self._follow(task)
        self._ready.extendleft(reversed(skipped))

    def _restart_for(self, task: Task) -> bool:
        """No worker of the task's env is free: restart an idle worker of another env in it.

        True when other tasks may still be placed (a worker restarts, or one of another env
        is idle); the task waits in the queue for the new worker, which joins at once.
        """
        other_idle = False
        for worker in self._workers.values():
            if worker.active or worker.blocked_order or worker.assigned:
                continue
            if worker.tasks_left is not None and worker.tasks_left <= 0:
                continue
            other_idle = True
            if worker.env != task.env and fits(worker.pool, task.resources):
                self._retire(worker, task.env, new_env=True)
                return True
        return other_idle

    def _assign(self, task: Task, worker: Worker) -> None:
        if worker.tasks_left is not None:
            worker.tasks_left -= 1  # nested children too (never refused: they must run)
        worker.assigned.append(task.key)
        worker.count(task, +1)
        worker.sent = self._sends
        self._sends += 1
        self._send(task, worker.id)
        self._rebalance(worker)

    def _send(self, task: Task, worker: WorkerId) -> None:
        """RUNNING on ``worker``, with its dependencies' refs (None: not finished yet)."""
        task.state = TaskState.RUNNING
        task.worker = worker
        refs = (
            tuple((k, self._tasks[k].ref) for k in dict.fromkeys(task.dependencies))
            if task.dependencies else ()
        )
        self._out.append(Dispatch(worker, task.key, task.payload, refs))


SchedulerCore._handlers = {
    event_type: getattr(SchedulerCore, "_on_" + event_type.__name__)
    for event_type in (
        ActorStarted, ActorFailed, WorkerRetired, TaskReturned, TaskSubmitted, ExternalTask,
        ObjectPut, TaskFinished, TaskFailed, WorkerJoined, WorkerDied, WorkerBlocked,
        WorkerUnblocked, CancelRequested, KeyReleased, KeyRetained, PoolBroken,
        WithdrawRequested, ActorRequested, NodeJoined, NodeLeft, LostInputRecheck, StealCheck,
    )
}
