"""A worker's side of streaming tasks: run a generator, send each item as it comes.

::

    for item in generator:            (a task whose function is a generator function)
        store it ──▶ YIELD(key, index, ref) ──▶ driver: the item's Future is ready
        read what arrived (never waiting): STREAM_ACK(key, taken), STREAM_STOP(key)
        stopped?  close the generator, end the task
        ``backpressure`` items sent and not taken?  wait (the task counts as blocked,
        as a task waiting on a Future does) until an ACK or a STOP comes
    DONE(key, number of items)   or   FAILED(key, the generator's error) after its items

State (``StreamControl``, one per worker): how many items of each running stream
the driver says were taken (``taken``), and the streams it asked to stop
(``stopped``: kept for a while even for a task not started here yet, since a STOP
may overtake nothing but the task itself may still be queued).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from sharedcompute._protocol import Msg
from sharedcompute._serialization import serialize
from sharedcompute._store import ref_to_wire

if TYPE_CHECKING:
    from sharedcompute._worker._main import WorkerRuntime

_STOPS_KEPT = 1024


class StreamControl:
    """What the driver said about this worker's streams (see the module docstring)."""

    def __init__(self) -> None:
        self.taken: dict[int, int] = {}  # running stream -> items the driver says were taken
        self.stopped: dict[int, None] = {}  # an ordered set, bounded

    def ack(self, key: int, taken: int) -> None:
        if key in self.taken and taken > self.taken[key]:
            self.taken[key] = taken

    def may_send(self, key: int, sent: int, backpressure: int) -> bool:
        """Whether a stream that sent ``sent`` items may send another (or is stopped)."""
        return key in self.stopped or sent - self.taken[key] < backpressure

    def stop(self, key: int) -> None:
        self.stopped[key] = None
        if len(self.stopped) > _STOPS_KEPT:
            del self.stopped[next(iter(self.stopped))]


def stream_out(
    worker: WorkerRuntime, key: int, items: Generator[Any, Any, Any], backpressure: int,
    name: str, send: Callable[[tuple[Any, ...]], None],
) -> int | None:
    """Send the items of ``items`` as they come; the number sent, or None if it failed
    (FAILED is sent then, naming the task, how many items came first and why)."""
    from sharedcompute._worker._main import pack_error

    control = worker.streams
    control.taken[key] = 0
    index = 0
    try:
        while True:
            if key in control.stopped:
                items.close()
                return index
            if backpressure and index - control.taken[key] >= backpressure:
                worker.wait_until(
                    functools.partial(control.may_send, key, index, backpressure), None
                )
                continue
            try:
                item = next(items)
            except StopIteration:
                return index
            except BaseException as exc:
                where = (f"Generator task {name or key} failed after {index} item(s), in worker "
                         f"{worker.worker_id} (pid {os.getpid()})")
                send((Msg.FAILED, key, pack_error(worker._named_missing_module(exc), where)))
                return None
            try:
                ref = worker.store.put_serialized(serialize(item, "result"), for_owner=True)
            except BaseException as exc:
                items.close()
                where = (f"Item {index} of generator task {name or key} could not be stored")
                send((Msg.FAILED, key, pack_error(exc, where)))
                return None
            del item
            send((Msg.YIELD, key, index, ref_to_wire(ref)))
            index += 1
            worker.read_arrived()  # an ACK or a STOP, if one came
    finally:
        control.taken.pop(key, None)
        control.stopped.pop(key, None)
