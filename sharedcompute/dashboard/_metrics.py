"""``/metrics``: the dashboard's state in Prometheus' text format.

A collector of our own, in a ``CollectorRegistry`` of our own (never the process-wide
default one, which a program may use for itself): every scrape reads the latest
snapshot the server made and the cumulative counts of :class:`DashboardState`, so a
scrape costs what a push does, whatever the number of tasks.

Metrics (all prefixed ``sharedcompute_``):

- ``tasks{state}``: tasks the scheduler holds, by state (gauge).
- ``tasks_finished_total`` / ``tasks_failed_total``: executions answered since the
  runtime started (counters), and ``function_tasks_total{function,outcome}``.
- ``task_duration_seconds``: durations of finished tasks (histogram).
- ``store_capacity_bytes``, ``store_used_bytes``, ``store_spilled_bytes``,
  ``store_spilled_objects``, ``store_objects``: this node's store (gauges).
- ``workers``, ``nodes`` (alive), ``actors`` (alive): gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sharedcompute.dashboard._state import DURATION_BUCKETS, DashboardState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Collector(Collector):
    def __init__(self, state: DashboardState, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.state = state
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        state = self.state
        tasks = GaugeMetricFamily("sharedcompute_tasks", "Tasks the scheduler holds, by state",
                                  labels=["state"])
        for name, count in sorted(snap.get("counts", {}).items()):
            tasks.add_metric([name], count)
        yield tasks
        yield CounterMetricFamily("sharedcompute_tasks_finished", "Task executions that returned",
                                  value=state.finished_total)
        yield CounterMetricFamily("sharedcompute_tasks_failed", "Task executions that raised",
                                  value=state.failed_total)
        by_function = CounterMetricFamily(
            "sharedcompute_function_tasks", "Task executions by function and outcome",
            labels=["function", "outcome"],
        )
        for name, stats in sorted(state.functions.items()):
            by_function.add_metric([name, "finished"], stats.finished)
            by_function.add_metric([name, "failed"], stats.failed)
        yield by_function
        cumulative, buckets = 0, []
        for bound, count in zip(DURATION_BUCKETS, state.buckets[:-1], strict=True):
            cumulative += count
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", cumulative + state.buckets[-1]))
        yield HistogramMetricFamily(
            "sharedcompute_task_duration_seconds", "Durations of finished tasks",
            buckets=buckets, sum_value=state.duration_sum,
        )
        store = snap.get("store", {})
        for key, metric, text in (
            ("capacity", "store_capacity_bytes", "Capacity of this node's object store"),
            ("used_bytes", "store_used_bytes", "Bytes in use in this node's object store"),
            ("spilled_bytes", "store_spilled_bytes", "Bytes spilled to disk"),
            ("spilled_objects", "store_spilled_objects", "Objects spilled to disk"),
            ("num_objects", "store_objects", "Objects in this node's store"),
        ):
            yield GaugeMetricFamily(f"sharedcompute_{metric}", text, value=store.get(key, 0))
        yield GaugeMetricFamily("sharedcompute_workers", "Worker processes",
                                value=len(snap.get("workers", [])))
        yield GaugeMetricFamily("sharedcompute_nodes", "Nodes alive",
                                value=sum(1 for n in snap.get("nodes", []) if n.get("alive")))
        yield GaugeMetricFamily("sharedcompute_actors", "Actors alive",
                                value=sum(1 for a in snap.get("actors", []) if a.get("alive")))


class Metrics:
    """The registry behind ``/metrics``."""

    def __init__(self, state: DashboardState, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(state, snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
