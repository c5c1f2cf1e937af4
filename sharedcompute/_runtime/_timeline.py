"""The recent task executions of a runtime, as Chrome trace events (``sc.timeline``).

Each answer from a worker (a result or an error) adds one record: the task, its
name (the function's), the worker and node that ran it, when the answer came and
how long the worker says the task ran, and the bytes of its stored arguments.
The last ``capacity`` (100,000) are kept in a ring: a bounded cost, one tuple per
task. :meth:`Timeline.trace` turns them into the Trace Event Format that Perfetto
and ``chrome://tracing`` open: one row (thread) per worker, grouped by node
(process), a complete event ("X") per task.

Each record carries a sequence number (one per record ever added, from 0), so a
reader that polls (the dashboard) takes only what is new: :meth:`Timeline.since`.
The last ``ERRORS_KEPT`` failures are kept too, with their traceback text
(:meth:`Timeline.add_error`, :meth:`Timeline.errors`): strings only, never the
exception, so nothing a task raised is held alive by them.

A batch of ``sc.map`` items (``_batched_map``) is one task to the scheduler but
many calls to the user: its name ends in ``BATCH_SUFFIX``, its worker's answer is
kept aside rather than recorded, and :meth:`Timeline.add_items` then records each
item (its own key, name and seconds, laid end to end within the batch's time on its
worker), so the stream, the counts and the trace show calls, not batches.

Two threads add (the runtime's, under its lock, and the thread that settles batched
items); ``_lock`` keeps the numbering in the order of the ring. Others read at any
time without it: a deque's ``append`` and ``list(islice(...))`` over it each run
without releasing the GIL, and the sequence number in each record says where it stands.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import deque
from typing import Any, NamedTuple

CAPACITY = 100_000
ERRORS_KEPT = 100
BATCH_SUFFIX = " (batch)"  # the name of a task that runs a batch of sc.map's calls


class TaskError(NamedTuple):
    """A task's failure as the dashboard shows it."""

    seq: int
    time: float  # epoch seconds
    key: int
    name: str
    type_name: str
    message: str
    traceback: str  # the remote traceback's text ("" when none came)


class Timeline:
    def __init__(self, capacity: int = CAPACITY) -> None:
        # (key, name, worker, node, end (epoch s), duration (s), input bytes, ok, seq)
        self._records: deque[tuple[int, str, int, int, float, float, int, bool, int]] = deque(
            maxlen=capacity
        )
        self._seq = itertools.count()
        self._errors: deque[TaskError] = deque(maxlen=ERRORS_KEPT)
        self._error_seq = itertools.count()
        self._lock = threading.Lock()
        # executions answered since the runtime started (the ring forgets, these do not)
        self.finished = 0
        self.failed = 0
        # a batch that ran, until its items are recorded: key -> (worker, node, end)
        self._held: dict[int, tuple[int, int, float]] = {}

    def add(self, key: int, name: str, worker: int, node: int, duration: float,
            input_bytes: int, ok: bool) -> None:
        if ok and name.endswith(BATCH_SUFFIX):  # its items are recorded instead
            self._held[key] = (worker, node, time.time())
            return
        with self._lock:
            self._records.append(
                (key, name, worker, node, time.time(), duration, input_bytes, ok,
                 next(self._seq))
            )
            if ok:
                self.finished += 1
            else:
                self.failed += 1

    def add_items(self, key: int, name: str, items: list[tuple[int, float, bool]]) -> None:
        """The batch ``key`` is settled: a record per item (its key, its seconds, whether
        it raised), laid end to end up to when the batch's worker answered. Called for
        every batch once it is done, ``items`` empty when it gave no outcomes."""
        where = self._held.pop(key, None)
        if where is None or not items:
            return  # it never ran, or failed as a whole (recorded as it is)
        worker, node, end = where
        at = end - sum(seconds for _, seconds, _ in items)
        with self._lock:
            for item_key, seconds, ok in items:
                at += seconds
                self._records.append(
                    (item_key, name, worker, node, at, seconds, 0, ok, next(self._seq))
                )
                if ok:
                    self.finished += 1
                else:
                    self.failed += 1

    def seconds_of(self, keys: set[int], look_back: int = 4096) -> list[float]:
        """How long the workers say these tasks ran (those among the last records)."""
        found = []
        for index in range(len(self._records) - 1, max(-1, len(self._records) - 1 - look_back),
                           -1):
            record = self._records[index]
            if record[0] in keys:
                found.append(record[5])
                if len(found) == len(keys):
                    break
        return found

    def __len__(self) -> int:
        return len(self._records)

    def since(
        self, seq: int, limit: int = CAPACITY
    ) -> list[tuple[int, str, int, int, float, float, int, bool, int]]:
        """The records numbered ``seq`` and after, oldest first, at most the ``limit``
        newest of them (older ones may have left the ring: check the first's number)."""
        try:
            last = self._records[-1][8]
        except IndexError:
            return []
        # A few more than are new by that count: records added meanwhile are cut below.
        wanted = min(limit, max(0, last - seq + 1) + 256)
        newest = list(itertools.islice(reversed(self._records), wanted))
        cut = len(newest)
        while cut and newest[cut - 1][8] < seq:
            cut -= 1
        del newest[cut:]
        newest.reverse()
        return newest

    def add_error(self, key: int, name: str, error: BaseException) -> None:
        """A task failed with ``error`` (its ``__cause__`` may carry the remote traceback)."""
        cause = error.__cause__
        tb = getattr(cause, "tb", "") if cause is not None else ""
        self._errors.append(TaskError(
            next(self._error_seq), time.time(), key, name, type(error).__name__,
            _text(error)[:2000], tb if isinstance(tb, str) else "",
        ))

    def errors(self) -> list[TaskError]:
        """The recent failures, oldest first."""
        return list(self._errors)

    def trace(self) -> dict[str, Any]:
        events: list[dict[str, Any]] = []
        rows: set[tuple[int, int]] = set()
        for key, name, worker, node, end, duration, input_bytes, ok, _ in list(self._records):
            rows.add((node, worker))
            events.append({
                "name": name or f"task {key}", "cat": "task" if ok else "task,error",
                "ph": "X", "ts": (end - duration) * 1e6, "dur": duration * 1e6,
                "pid": node, "tid": worker,
                "args": {"key": key, "input_bytes": input_bytes, "ok": ok},
            })
        for node in sorted({node for node, _ in rows}):
            events.append({"name": "process_name", "ph": "M", "pid": node,
                           "args": {"name": f"node {node}"}})
        for node, worker in sorted(rows):
            events.append({"name": "thread_name", "ph": "M", "pid": node, "tid": worker,
                           "args": {"name": f"worker {worker}"}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(trace: dict[str, Any], path: str | os.PathLike[str]) -> None:
    with open(path, "w") as file:
        json.dump(trace, file)


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # a broken __str__ must not lose the record (or the runtime's thread)
        return f"<{type(error).__name__} whose str() failed>"
