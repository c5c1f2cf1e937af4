"""What the dashboard shows, read from a runtime: snapshots, the task stream, pages of tasks.

Owns no thread and does no I/O: the server (``_server``) calls :meth:`DashboardState.tick`
every push interval, from its own thread, and turns the answers into JSON.

State, and why it is bounded:

- ``cursor``: the timeline sequence number read up to. Each tick reads only the
  records added since (``Timeline.since``), so a tick costs O(new tasks), never
  O(tasks kept), and 100,000 finished tasks in the ring cost nothing per tick.
- ``functions``: per function name, executions that finished, failed, and their total
  seconds; cumulative from the oldest record the ring held when the dashboard started
  (the ring forgets, these do not). The totals (``finished_total``, ``failed_total``)
  are the timeline's own, counted since the runtime started.
  Capped at ``MAX_FUNCTIONS`` names (the rest are counted under ``"(other)"``).
- ``buckets``: task durations, counted into the fixed ``DURATION_BUCKETS`` (the
  Prometheus histogram of ``/metrics``).
- ``_meter``: CPU and memory of this process's own workers (``_runtime/_meter.py``:
  one ``psutil.Process`` per pid, kept between ticks, dropped when the worker is gone).
  Workers on other nodes are read there, by their node: a head's dashboard gets their
  figures from ``worker_processes`` (``Head.worker_processes``, fed by heartbeats).

What the runtime's scheduler holds (its tasks' states, ``core.workers()``) is read
under the runtime's lock, briefly, once per tick: only pointers are copied there,
the counting is done after (100,000 tasks held: a few ms of this thread, not of the
lock). The timeline is read without the lock (see ``_runtime/_timeline.py``).
"""

from __future__ import annotations

import bisect
import operator
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sharedcompute._runtime._meter import ProcessMeter
from sharedcompute._scheduler import TaskState

if TYPE_CHECKING:
    from sharedcompute._cluster._messages import WorkerProcess
    from sharedcompute._runtime._driver import Runtime
    from sharedcompute._runtime._timeline import Timeline

try:
    import psutil
except ImportError:  # CPU and memory are then left out (None)
    psutil = None

MAX_FUNCTIONS = 1000
STREAM_BACKLOG = 5000  # records a new page gets at once, and at most per push
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
_STATE = operator.attrgetter("state")
RUNNING_SHOWN = 4  # task names listed per worker (the count says the rest)

# One task-stream record as JSON: [seq, key, name, worker, node, start (epoch s),
# duration (s), ok]; a compact array, since a push may carry thousands.
StreamRecord = list[Any]


@dataclass
class FunctionStats:
    finished: int = 0
    failed: int = 0
    seconds: float = 0.0


class DashboardState:
    """The dashboard's view of one runtime (see the module docstring)."""

    def __init__(
        self, runtime: Runtime, nodes: Callable[[], list[dict[str, Any]]] | None = None,
        worker_processes: Callable[[], dict[int, WorkerProcess]] | None = None,
    ) -> None:
        self.runtime = runtime
        self._nodes = nodes
        self._worker_processes = worker_processes
        self.cursor = 0
        self.functions: dict[str, FunctionStats] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self._meter = ProcessMeter()
        self._me = psutil.Process() if psutil is not None else None

    @property
    def timeline(self) -> Timeline:
        return self.runtime.timeline

    @property
    def finished_total(self) -> int:
        return self.timeline.finished

    @property
    def failed_total(self) -> int:
        return self.timeline.failed

    # -- the task stream ---------------------------------------------------------------

    def advance(self) -> list[StreamRecord]:
        """The records added since the last call (at most ``STREAM_BACKLOG`` of them sent;
        all of them counted), as stream records."""
        records = self.timeline.since(self.cursor)
        if not records:
            return []
        self.cursor = records[-1][8] + 1
        for _key, name, _worker, _node, _end, duration, _nbytes, ok, _seq in records:
            self._count(name, duration, ok)
        return [_stream_record(r) for r in records[-STREAM_BACKLOG:]]

    def backlog(self, limit: int = STREAM_BACKLOG) -> list[StreamRecord]:
        """The last ``limit`` records read so far (what a page that just opened draws)."""
        records = self.timeline.since(max(0, self.cursor - limit))
        return [_stream_record(r) for r in records if r[8] < self.cursor]

    def stream_since(self, seq: int, limit: int = STREAM_BACKLOG) -> list[StreamRecord]:
        """Stream records from ``seq`` on, up to what has been read (``cursor``)."""
        cursor = self.cursor
        records = [r for r in self.timeline.since(seq) if r[8] < cursor][:limit]
        return [_stream_record(r) for r in records]

    def _count(self, name: str, duration: float, ok: bool) -> None:
        stats = self.functions.get(name)
        if stats is None:
            if len(self.functions) >= MAX_FUNCTIONS:
                name = "(other)"
            stats = self.functions.setdefault(name, FunctionStats())
        if ok:
            stats.finished += 1
            stats.seconds += duration
            self.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
            self.duration_sum += duration
        else:
            stats.failed += 1

    # -- the snapshot ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything but the stream and the errors: small, whatever the number of tasks."""
        rt = self.runtime
        with rt._lock:
            # A copy of the task table's pointers (well under a millisecond for 100,000):
            # the counting happens outside the lock (``core.counts()`` would hold it ~50 ms).
            tasks = list(rt.core._tasks.values())
            assigned = rt.core.workers()
            names = {key: rt._task_names.get(key, "") for keys in assigned.values()
                     for key in keys[:RUNNING_SHOWN]}
            remote_nodes = {wid: w.node for wid, w in rt._remote_workers.items()}
        # (by id: an Enum member's hash runs Python code, an int's does not)
        by_state = Counter(map(id, map(_STATE, tasks)))
        counts = {state.value: by_state.get(id(state), 0) for state in TaskState}
        return {
            "time": time.time(),
            "counts": counts,
            "totals": {"finished": self.finished_total, "failed": self.failed_total,
                       "recorded": self.cursor},
            "functions": self.function_table(),
            "workers": self._workers(assigned, names, remote_nodes),
            "nodes": self.nodes(),
            "store": self.store_stats(),
            "actors": self.actors(),
            "dashboard": {"pid": os.getpid(), "rss": self._rss(self._me)},
        }

    def function_table(self, limit: int = 50) -> list[dict[str, Any]]:
        ranked = sorted(self.functions.items(), key=lambda kv: -(kv[1].finished + kv[1].failed))
        return [
            {"name": name or "(unnamed)", "finished": s.finished, "failed": s.failed,
             "mean_s": s.seconds / s.finished if s.finished else None}
            for name, s in ranked[:limit]
        ]

    def _workers(
        self, assigned: dict[int, list[int]], names: dict[int, str], remote: dict[int, int]
    ) -> list[dict[str, Any]]:
        pool = self.runtime._pool
        local = dict(pool.workers) if pool is not None else {}
        readings = self._meter.read(handle.pid for handle in local.values())
        elsewhere = self._worker_processes() if self._worker_processes is not None else {}
        rows = []
        for wid in sorted(set(assigned) | set(local)):
            handle = local.get(wid)
            process = elsewhere.get(wid)
            pid: int | None = None
            cpu: float | None = None
            rss: int | None = None
            if handle is not None:
                pid = handle.pid
                cpu, rss = readings[pid]
            elif process is not None:
                pid, cpu, rss = process.pid, process.cpu_percent, process.rss
            keys = assigned.get(wid, [])
            rows.append({
                "id": wid,
                "node": remote.get(wid, 0),
                "pid": pid,
                "actor": handle.actor_id if handle is not None else None,
                "cpu": cpu,
                "rss": rss,
                "assigned": len(keys),
                "tasks": [{"key": k, "name": names.get(k) or f"task {k}"}
                          for k in keys[:RUNNING_SHOWN]],
            })
        return rows

    def nodes(self) -> list[dict[str, Any]]:
        if self._nodes is not None:
            return self._nodes()
        return self.runtime.node_table()

    def store_stats(self) -> dict[str, int]:
        store = self.runtime._store  # not .store: that would create one
        return store.stats() if store is not None else {}

    def actors(self) -> list[dict[str, Any]]:
        rt = self.runtime
        with rt._lock:
            records = list(rt.actors._actor_records.values())
            rows = []
            for record in records:
                worker = record.worker
                rows.append({
                    "id": record.id,
                    "description": record.description,
                    "name": record.options.name,
                    "alive": not record.dead and worker is not None,
                    "dead": record.dead,
                    "restarts": record.options.max_restarts - record.restarts_left
                    if record.options.max_restarts >= 0 else None,
                    "max_restarts": record.options.max_restarts,
                    "node": record.node,
                    "worker": worker.id if worker is not None else None,
                    "pid": getattr(worker, "pid", None),
                })
        return rows

    def errors(self, since: int = 0) -> list[dict[str, Any]]:
        return [e._asdict() for e in self.timeline.errors() if e.seq >= since]

    # -- pages of tasks ----------------------------------------------------------------

    def task_page(
        self, offset: int, limit: int, name: str | None = None, ok: bool | None = None
    ) -> dict[str, Any]:
        """Executions in the timeline, newest first: ``limit`` of them from ``offset``.

        Unfiltered, it reads only ``offset + limit`` records; a filter scans the ring
        (100,000 records at most: milliseconds) to count what matches."""
        timeline = self.timeline
        if name is None and ok is None:
            total = len(timeline)
            rows = timeline.since(0, offset + limit)
            rows.reverse()
            page = rows[offset:offset + limit]
        else:
            matching = [r for r in reversed(timeline.since(0))
                        if (name is None or r[1] == name) and (ok is None or r[7] == ok)]
            total = len(matching)
            page = matching[offset:offset + limit]
        return {
            "total": total, "offset": offset, "limit": limit,
            "tasks": [
                {"seq": r[8], "key": r[0], "name": r[1] or f"task {r[0]}", "worker": r[2],
                 "node": r[3], "end": r[4], "duration": r[5], "input_bytes": r[6], "ok": r[7]}
                for r in page
            ],
        }

    # -- processes ---------------------------------------------------------------------

    @staticmethod
    def _rss(proc: Any) -> int | None:
        if proc is None:
            return None
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return None


def _stream_record(r: tuple[int, str, int, int, float, float, int, bool, int]) -> StreamRecord:
    key, name, worker, node, end, duration, _nbytes, ok, seq = r
    return [seq, key, name or f"task {key}", worker, node, round(end - duration, 6),
            round(duration, 6), ok]

