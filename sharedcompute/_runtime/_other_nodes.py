"""The driver's runtime on a head: other nodes' workers, drivers elsewhere, lost results.

A head (``_cluster``) gives its runtime a :class:`NodeHost` (``Runtime.cluster``):
the way to other nodes' workers (their connections are links), their objects
(freed where they live, pulled here when read) and their processes (started and
killed through their node). The runtime keeps their workers beside its own, so
the scheduler places work on any of them the same way (``add_node`` /
``remove_node``), and a driver connected to the head speaks as a worker that runs
nothing (``add_driver`` / ``remove_driver``). In local mode ``cluster`` is None
and none of this runs.

A mixin of :class:`~sharedcompute._runtime._driver.Runtime`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
from typing import TYPE_CHECKING, Any, Protocol

from sharedcompute._env import Env
from sharedcompute._runtime._pool import WorkerHandle, WorkerSlot
from sharedcompute._scheduler import (
    Event,
    KeyReleased,
    LostInputRecheck,
    NodeJoined,
    NodeLeft,
    TaskState,
    WorkerJoined,
)
from sharedcompute._store import ObjectRef, RemoteObject, StoredObject

if TYPE_CHECKING:
    from collections import defaultdict
    from collections.abc import Callable

    from sharedcompute._runtime._actors_driver import ActorManager
    from sharedcompute._runtime._pool import ProcessPool
    from sharedcompute._scheduler import SchedulerCore
    from sharedcompute._store import ObjectRef
    from sharedcompute._sync import DrainingLock


class NodeHost(Protocol):
    """What a head adds to its runtime: the workers and objects of other nodes."""

    def deliver(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        """Send to a worker (of any node) once the objects the messages name are there."""

    def spawn(self, node: int, worker_id: int, env: Env | None = None) -> WorkerSlot | None:
        """Start a worker (in ``env``) on a node other than this one (None: it is gone)."""

    def freed(self, refs: list[ObjectRef]) -> None:
        """Objects nobody needs: free them where they live, and drop their copies."""

    def kill(self, worker: WorkerSlot) -> None:
        """SIGKILL a worker of another node."""

    def pull(self, ref: RemoteObject) -> StoredObject:
        """A copy here of another node's object (held by the host)."""

    lost_input_recheck_s: float  # after this, a task whose input was lost tries again


class OtherNodes:
    """The runtime's other nodes (mixed into ``Runtime``; used on a head)."""

    if TYPE_CHECKING:  # the runtime's state and methods that these use (see ``Runtime``)
        core: SchedulerCore
        actors: ActorManager
        cluster: NodeHost | None
        _lock: DrainingLock
        _closed: bool
        _remote_workers: dict[int, WorkerSlot]
        _rewaits: dict[int, list[concurrent.futures.Future[ObjectRef]]]
        _waiters: defaultdict[int, set[int]]
        _next_worker_id: Callable[[], int]
        _pool: ProcessPool | None

        def _handle(self, events: Event | list[Event]) -> None: ...
        def _settle_futures(self) -> None: ...
        def _spawn_pool_worker(self, env: Env | None = None) -> None: ...
        def load(self, ref: ObjectRef, *, private: bool = False) -> Any: ...
        def _on_messages(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None: ...
        def _on_exit(self, worker: WorkerSlot, reason: str) -> None: ...

    def add_node(self, node: int, resources: dict[str, float], workers: list[WorkerSlot]) -> None:
        """A node joins with these workers (ids from ``new_worker_id``); tasks may go there now."""
        with self._lock:
            if self._closed:
                return
            events: list[Event] = [NodeJoined(node, dict(resources))]
            for worker in workers:
                self._remote_workers[worker.id] = worker
                events.append(WorkerJoined(worker.id, node))
            self._handle(events)
        self._settle_futures()

    def remove_node(self, node: int, reason: str) -> None:
        """A node is gone: its tasks rerun elsewhere under their retries."""
        with self._lock:
            if self._closed:
                return
            gone = [w for w in self._remote_workers.values() if w.node == node]
            events: list[Event] = []
            for worker in gone:
                del self._remote_workers[worker.id]
                events += [KeyReleased(key) for key in worker.held_keys]
                worker.held_keys.clear()
                self.actors._drop_worker_actor_holds(worker)
                for waiting in self._waiters.values():
                    waiting.discard(worker.id)
            events.append(NodeLeft(node, reason))
            self._handle(events)
            for worker in gone:  # after NodeLeft: a restart goes to a node that lives
                if worker.actor_id is not None:
                    self._handle(self.actors._actor_exited(worker, reason))
        self._settle_futures()

    def add_driver(self, driver: WorkerSlot) -> None:
        """A driver elsewhere: it speaks as a worker does, and runs nothing."""
        with self._lock:
            self._remote_workers[driver.id] = driver

    def remove_driver(self, driver: WorkerSlot) -> None:
        """A driver left: the keys it held are released (its Futures are gone)."""
        with self._lock:
            if self._remote_workers.pop(driver.id, None) is None or self._closed:
                return
            events: list[Event] = [KeyReleased(key) for key in driver.held_keys]
            driver.held_keys.clear()
            self.actors._drop_worker_actor_holds(driver)  # its actor handles
            for waiting in self._waiters.values():
                waiting.discard(driver.id)
            self._handle(events)
        self._settle_futures()

    def new_worker_id(self) -> int:
        return self._next_worker_id()

    def worker_said(self, worker: WorkerSlot, messages: list[tuple[Any, ...]]) -> None:
        """What a worker of another node said (its node relays it, in order)."""
        self._on_messages(worker, messages)

    def worker_exited(self, worker: WorkerSlot, reason: str) -> None:
        """A worker of another node ended, after all it said was relayed."""
        if self._remote_workers.get(worker.id) is worker:
            self._on_exit(worker, reason)


    def _replace_worker(self, replaces: int | None, env: Env | None = None) -> None:
        """A worker for the core in ``env``, on the node of the one it replaces (lock held)."""
        old = self._remote_workers.pop(replaces, None) if replaces is not None else None
        if old is None or self.cluster is None:
            self._spawn_pool_worker(env)
            return
        worker_id = self._next_worker_id()
        worker = self.cluster.spawn(old.node, worker_id, env)
        if worker is not None:
            self._remote_workers[worker_id] = worker
            self._handle(WorkerJoined(worker_id, old.node, env))


    def _recheck_later(self, key: int) -> None:
        """A task lost an input: if that input's node has not left by then, try it again."""
        if self._pool is None or self.cluster is None:
            return
        self._pool.call_later(self.cluster.lost_input_recheck_s, lambda: self._recheck(key))

    def _recheck(self, key: int) -> None:
        with self._lock:
            if not self._closed:
                self._handle(LostInputRecheck(key))
        self._settle_futures()

    def _spawn_remote(self, node: int, env: Env | None = None) -> WorkerSlot | None:
        """A process for an actor on another node, outside the pool (lock held)."""
        if self.cluster is None:
            return None
        worker_id = self._next_worker_id()
        worker = self.cluster.spawn(node, worker_id, env)
        if worker is not None:
            self._remote_workers[worker_id] = worker
        return worker


    def _kill_worker(self, worker: WorkerSlot) -> None:
        """SIGKILL a worker's process, wherever it runs (lock held)."""
        if isinstance(worker, WorkerHandle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        elif self.cluster is not None:
            self.cluster.kill(worker)


    def _made_again(self, key: int, lost: ObjectRef) -> ObjectRef | None:
        """The new result of a task whose result was lost, once it has run again (or None);
        the core runs it again when the node leaves (``_recompute_lost``)."""
        waiter: concurrent.futures.Future[ObjectRef] = concurrent.futures.Future()
        with self._lock:
            outcome = self.core.outcome(key)
            if outcome is None:
                return None
            if outcome[0] is TaskState.FINISHED:
                return outcome[1] if outcome[1] != lost else None
            if outcome[0] in (TaskState.ERRED, TaskState.CANCELLED):
                return None
            self._rewaits.setdefault(key, []).append(waiter)
        return waiter.result()

