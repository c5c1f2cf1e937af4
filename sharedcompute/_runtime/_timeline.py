"""The recent task executions of a runtime, as Chrome trace events (``sc.timeline``).

Each answer from a worker (a result or an error) adds one record: the task, its
name (the function's), the worker and node that ran it, when the answer came and
how long the worker says the task ran, and the bytes of its stored arguments.
The last ``capacity`` (100,000) are kept in a ring: a bounded cost, one tuple per
task. :meth:`Timeline.trace` turns them into the Trace Event Format that Perfetto
and ``chrome://tracing`` open: one row (thread) per worker, grouped by node
(process), a complete event ("X") per task.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import Any

CAPACITY = 100_000


class Timeline:
    def __init__(self, capacity: int = CAPACITY) -> None:
        # (key, name, worker, node, end (epoch s), duration (s), input bytes, ok)
        self._records: deque[tuple[int, str, int, int, float, float, int, bool]] = deque(
            maxlen=capacity
        )

    def add(self, key: int, name: str, worker: int, node: int, duration: float,
            input_bytes: int, ok: bool) -> None:
        self._records.append((key, name, worker, node, time.time(), duration, input_bytes, ok))

    def __len__(self) -> int:
        return len(self._records)

    def trace(self) -> dict[str, Any]:
        events: list[dict[str, Any]] = []
        rows: set[tuple[int, int]] = set()
        for key, name, worker, node, end, duration, input_bytes, ok in list(self._records):
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
