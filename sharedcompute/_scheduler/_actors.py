"""The scheduler core's actor half: which process each actor lives in, its calls in
order, its resources (pure, no I/O; mixed into :class:`SchedulerCore`).

An actor's calls are tasks bound to it (``TaskSubmitted.actor``). ``Actor.queue``
holds them in submission order, waiting or ready; they are sent to the actor's
process strictly in that order as they become ready (``_pump_actor``), and
``assigned`` holds those sent. Restarts are the runtime's decision: the core
only learns ``ActorStarted`` (first start or restart), ``ActorFailed`` (gone for
good) and the death of its process (``WorkerDied``, see ``_actor_lost``).

An actor that asks for resources (``ActorRequested``) waits in
``_actors_waiting``, first come first placed, until some node has them free;
they stay reserved in that node's pool until ``ActorFailed``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from sharedcompute._scheduler._events import (
    TERMINAL,
    ActorFailed,
    ActorRequested,
    ActorStarted,
    Instruction,
    PlaceActor,
    Resources,
    StartWorker,
    TaskKey,
    TaskState,
    WorkerId,
    WorkerRetired,
)
from sharedcompute._scheduler._nodes import NodeTable, fits, release, reserve
from sharedcompute._scheduler._state import Actor, Task, Worker
from sharedcompute.errors import ActorDiedError


class ActorScheduling:
    """Actor event handlers; the state they share is the core's (declared here)."""

    nodes: NodeTable
    _tasks: dict[TaskKey, Task]
    _workers: dict[WorkerId, Worker]
    _actors: dict[int, Actor]
    _actor_workers: dict[WorkerId, Actor]
    _actors_waiting: deque[tuple[int, Resources]]
    _out: list[Instruction]

    if TYPE_CHECKING:

        def _fail(self, task: Task, error: BaseException) -> None: ...
        def _send(self, task: Task, worker: WorkerId) -> None: ...
        def _remove_worker(self, worker: Worker) -> None: ...

    def actor_busy(self, actor_id: int) -> bool:
        """Whether the actor has calls queued or running."""
        actor = self._actors.get(actor_id)
        return actor is not None and bool(actor.queue or actor.assigned)

    def idle_workers(self) -> list[WorkerId]:
        return [w.id for w in self._workers.values() if not w.assigned]

    def _on_WorkerRetired(self, event: WorkerRetired) -> None:
        worker = self._workers.get(event.worker)
        if worker is None or worker.assigned:
            raise ValueError(f"worker {event.worker} is not an idle pool worker")
        self._remove_worker(worker)
        self._out.append(StartWorker(replaces=event.worker))

    def _actor(self, actor_id: int) -> Actor:
        actor = self._actors.get(actor_id)
        if actor is None:
            actor = self._actors[actor_id] = Actor(actor_id)
        return actor

    def _on_ActorStarted(self, event: ActorStarted) -> None:
        actor = self._actor(event.actor)
        actor.worker = event.worker
        actor.description = event.description
        self._actor_workers[event.worker] = actor
        self._pump_actor(actor)

    def _on_ActorRequested(self, event: ActorRequested) -> None:
        self._actors_waiting.append((event.actor, event.resources))

    def _place_actors(self) -> None:
        """Reserve resources for waiting actors, in order, on the node with most CPUs free."""
        while self._actors_waiting:
            actor_id, resources = self._actors_waiting[0]
            candidates = [node for node in self.nodes.alive() if fits(node.available, resources)]
            if not candidates:
                return
            node = max(candidates, key=lambda n: n.available.get("CPU", 0.0))
            self._actors_waiting.popleft()
            reserve(node.available, resources)
            actor = self._actor(actor_id)
            actor.resources, actor.reserved_in = resources, node.available
            self._out.append(PlaceActor(actor_id, node.id))

    def _on_ActorFailed(self, event: ActorFailed) -> None:
        actor = self._actor(event.actor)
        actor.error = event.error
        if actor.resources is not None and actor.reserved_in is not None:  # it is over
            release(actor.reserved_in, actor.resources)
            actor.resources = actor.reserved_in = None
        self._actors_waiting = deque(w for w in self._actors_waiting if w[0] != event.actor)
        if actor.worker is not None:
            self._actor_workers.pop(actor.worker, None)
            actor.worker = None
        for key in [*actor.assigned, *actor.queue]:
            task = self._tasks.get(key)
            if task is not None and task.state not in TERMINAL:
                task.worker = None
                self._fail(task, event.error)
        actor.assigned.clear()
        actor.queue.clear()

    def _actor_lost(self, actor: Actor, reason: str) -> None:
        """The actor's process died: retry or fail the calls it had; wait for a restart."""
        actor.worker = None
        lost, actor.assigned = actor.assigned, []
        retry = []
        for key in lost:
            task = self._tasks[key]
            task.worker = None
            if task.retries_left > 0:
                task.retries_left -= 1
                retry.append(task)
            else:
                self._fail(task, ActorDiedError(
                    f"{actor.description or f'actor {actor.id}'} died while running call "
                    f"{key}: {reason}"
                ))
        for task in reversed(retry):
            task.state = TaskState.READY
            actor.queue.appendleft(task.key)

    def _pump_actor(self, actor: Actor) -> None:
        """Send the actor its calls in submission order, as far as they are ready."""
        while actor.worker is not None and actor.queue:
            task = self._tasks[actor.queue[0]]
            if task.state is not TaskState.READY:
                return
            actor.queue.popleft()
            actor.assigned.append(task.key)
            self._send(task, actor.worker)
