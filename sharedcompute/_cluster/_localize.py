"""Messages for this node's workers, with every object they name made local first.

A message from the head names objects cluster-wide (``RemoteObject``: a node and
that node's id for it). A worker reads only its own node's store, so before a
message goes to a worker, each object in it becomes a reference into this
node's store: the node's own objects by a lookup (``own``), other nodes'
objects by the copy the puller holds, pulled now if it is not here yet.

Order is kept per worker: once a message waits for a pull, every later message
for that worker waits behind it, so a worker receives its tasks in the order
the scheduler assigned them. Messages that name only local objects (all of them
in local mode) go straight out. A pull that fails turns its message into the
answer the worker would have given had the task failed (``undeliverable``), so
the Future concerned fails with ``ObjectLostError`` instead of waiting forever.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sharedcompute._cluster._transfer import Puller
from sharedcompute._protocol import Msg
from sharedcompute._protocol._messages import map_refs, refs_of
from sharedcompute._store import RemoteObject, StoredObject, ref_from_wire, ref_to_wire
from sharedcompute.errors import ObjectLostError

Message = tuple[Any, ...]
_PULL_THREADS = 4


class _NotHere(Exception):
    """A message names an object that is not on this node yet."""

    def __init__(self, ref: RemoteObject) -> None:
        self.ref = ref


class Localizer:
    """Delivers messages to this node's workers once the objects they name are here.

    ``send(worker, messages)`` hands local messages to the worker;
    ``undeliverable(worker, message, error)`` answers for a message whose object
    could not be pulled.
    """

    def __init__(
        self, node_id: int, puller: Puller, own: dict[int, StoredObject],
        send: Callable[[Any, list[Message]], None],
        undeliverable: Callable[[Any, Message, BaseException], None],
    ) -> None:
        self.node_id = node_id
        self._puller = puller
        self._own = own
        self._send = send
        self._undeliverable = undeliverable
        self._lock = threading.Lock()
        self._queues: dict[int, deque[Message]] = {}  # worker id -> messages held
        self._workers: dict[int, Any] = {}
        self._lost: dict[tuple[int, int], BaseException] = {}
        self._pulls = ThreadPoolExecutor(_PULL_THREADS, thread_name_prefix="sharedcompute-pull")
        self._closed = False

    def deliver(self, worker: Any, messages: list[Message]) -> None:
        with self._lock:
            queue = self._queues.get(worker.id)
            if queue is not None:
                queue.extend(messages)
                return
            queue = deque(messages)
            ready, failed = self._take_ready(worker.id, queue)
            if queue:
                self._queues[worker.id] = queue
                self._workers[worker.id] = worker
            if ready:
                self._send(worker, ready)
        self._answer_failed(worker, failed)

    def _take_ready(
        self, worker_id: int, queue: deque[Message]
    ) -> tuple[list[Message], list[tuple[Message, BaseException]]]:
        """Take from ``queue`` the messages that can go now, in order (lock held).

        A message whose object must be pulled stops the taking (the pull starts);
        one whose object is lost is answered as its task failing.
        """
        ready: list[Message] = []
        failed: list[tuple[Message, BaseException]] = []
        while queue:
            message = queue[0]
            try:
                ready.append(self._local(message))
            except _NotHere as missing:
                self._pull(worker_id, missing.ref)
                break
            except ObjectLostError as error:
                if message[0] == Msg.RESOLVED:  # the worker waits on it: tell it
                    ready.append((Msg.RESOLVED, message[1], False, error))
                else:
                    failed.append((message, error))
            queue.popleft()
        return ready, failed

    def _answer_failed(self, worker: Any, failed: list[tuple[Message, BaseException]]) -> None:
        for message, error in failed:
            self._undeliverable(worker, message, error)

    def _local(self, message: Message) -> Message:
        """``message`` naming only local objects (``_NotHere`` if one must be pulled)."""
        for wire in refs_of(message):
            if len(wire) == 5:
                return map_refs(message, self._local_ref)
        return message

    def _local_ref(self, wire: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(wire) != 5:
            return wire
        ref = ref_from_wire(wire)
        assert isinstance(ref, RemoteObject)
        if ref.node == self.node_id:
            own = self._own.get(ref.object_id)
            if own is None:
                raise ObjectLostError(f"object {ref.object_id} of node {ref.node} was freed")
            return ref_to_wire(own)
        lost = self._lost.get((ref.node, ref.object_id))
        if lost is not None:
            raise lost
        copy = self._puller.local(ref)
        if copy is None:
            raise _NotHere(ref)
        return ref_to_wire(copy)

    def _pull(self, worker_id: int, ref: RemoteObject) -> None:
        if not self._closed:
            self._pulls.submit(self._pull_then_deliver, worker_id, ref)

    def _pull_then_deliver(self, worker_id: int, ref: RemoteObject) -> None:
        try:
            self._puller.pull(ref)
        except BaseException as error:
            error.lost_node = ref.node  # type: ignore[attr-defined]  # see failure_answer
            with self._lock:
                self._lost[(ref.node, ref.object_id)] = error
        self._flush(worker_id)

    def _flush(self, worker_id: int) -> None:
        """Send the held messages of a worker that are local now, in order (pull thread)."""
        with self._lock:
            queue = self._queues.get(worker_id)
            worker = self._workers.get(worker_id)
            if queue is None or worker is None:
                return
            ready, failed = self._take_ready(worker_id, queue)
            if not queue:
                del self._queues[worker_id]
                del self._workers[worker_id]
            if ready:
                self._send(worker, ready)
        self._answer_failed(worker, failed)

    def forget(self, node: int, object_id: int) -> None:
        """An object was freed where it lives: drop its copy here."""
        with self._lock:
            self._lost.pop((node, object_id), None)
        self._puller.forget(node, object_id)

    def worker_gone(self, worker_id: int) -> None:
        with self._lock:
            self._queues.pop(worker_id, None)
            self._workers.pop(worker_id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queues.clear()
            self._workers.clear()
        self._pulls.shutdown(wait=True, cancel_futures=True)


def failure_answer(message: Message, error: BaseException) -> Message | None:
    """What a worker answers when the task or call in ``message`` fails before it runs.

    A task whose input could not be pulled says from which node (a fourth field): the
    head has it wait for that input to be made again rather than fail.
    """
    from sharedcompute._worker._main import pack_error

    error_bytes = pack_error(error, "its input could not be fetched")
    kind = message[0]
    lost_node = getattr(error, "lost_node", None)
    if kind == Msg.RUN and lost_node is not None:
        return (Msg.FAILED, message[1], error_bytes, lost_node)
    if kind in (Msg.RUN, Msg.CALL):
        return (Msg.FAILED, message[1], error_bytes)
    if kind == Msg.CREATE:
        return (Msg.CREATE_FAILED, message[1], error_bytes)
    return None
