"""The systems the runtime benchmark compares, and the workloads it times on each.

Every measurement here runs in a fresh interpreter that ``runtime.py`` starts for one system::

    runtime.py ── python -c "import tools.bench._systems as s; s.child_main(KIND, SYSTEM, ...)"
        ▲                 │  KIND "startup": import, init, first result, idle memory and CPU
        │                 │  KIND "workloads": latency, throughput, chain, big-arg,
        │                 │                    big-result, arrow
        └── OUT (JSON) ◀──┘  rewritten after every workload, so a child killed on a
                             timeout still reports what it finished

Each system is an adapter with the same six calls (start, submit, result, gather, put, close).
Systems that cannot pass a future as an argument (``passes_futures = False``) chain by waiting
on each result; systems that cannot store a value (``stores_values = False``) get it by value
on every task.

The task functions sit at the top of this module so that every system pickles them by
reference, and this module imports only the standard library at the top: a worker that
unpickles a task loads nothing the task does not use, so idle-memory figures stay honest.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

RESULT_TIMEOUT = 300.0  # seconds for any one result; a hang shows up as a TimeoutError
FREE_SETTLE_S = 0.2  # lets an asynchronous free (Dask, Ray) land before the next phase


# -- the tasks ---------------------------------------------------------------------


def noop() -> None:
    return None


def increment(value: int) -> int:
    return value + 1


def array_sum(array: Any) -> float:
    return float(array.sum())


def make_ones(count: int) -> Any:
    import numpy as np

    return np.ones(count, dtype=np.float64)


def table_num_rows(table: Any) -> int:
    return int(table.num_rows)


# -- the systems -------------------------------------------------------------------


class System:
    """One task system behind the six calls the workloads use."""

    name: ClassVar[str]
    module: ClassVar[str]  # what the import figure imports
    first_use: ClassVar[str]  # an attribute of it whose access loads the rest
    passes_futures: ClassVar[bool] = False
    stores_values: ClassVar[bool] = False

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def result(self, handle: Any, timeout: float = RESULT_TIMEOUT) -> Any:
        return handle.result(timeout=timeout)

    def gather(self, handles: Sequence[Any], timeout: float = RESULT_TIMEOUT) -> list[Any]:
        deadline = time.monotonic() + timeout
        return [self.result(h, max(0.0, deadline - time.monotonic())) for h in handles]

    def put(self, value: Any) -> Any:
        """A handle to pass to tasks in place of ``value`` (by default ``value`` itself)."""
        return value

    def close(self) -> None:
        raise NotImplementedError


class SharedCompute(System):
    name = "sharedcompute"
    module = "sharedcompute"
    first_use = "submit"
    passes_futures = True
    stores_values = True

    def start(self, workers: int) -> None:
        import sharedcompute

        self._sc = sharedcompute
        sharedcompute.init(num_workers=workers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._sc.submit(fn, *args)

    def gather(self, handles: Sequence[Any], timeout: float = RESULT_TIMEOUT) -> list[Any]:
        return self._sc.gather(handles, timeout=timeout)

    def put(self, value: Any) -> Any:
        return self._sc.put(value)

    def close(self) -> None:
        self._sc.shutdown()


class ProcessPool(System):
    """``concurrent.futures.ProcessPoolExecutor`` with the platform's default start method."""

    name = "ppe"
    module = "concurrent.futures"
    first_use = "ProcessPoolExecutor"

    def start(self, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=workers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Loky(System):
    name = "loky"
    module = "loky"
    first_use = "get_reusable_executor"

    def start(self, workers: int) -> None:
        from loky import get_reusable_executor

        self._pool = get_reusable_executor(max_workers=workers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, kill_workers=True)


class Dask(System):
    """Dask distributed on ``LocalCluster(processes=True, n_workers, threads_per_worker=1)``."""

    name = "dask"
    module = "dask.distributed"
    first_use = "LocalCluster"
    passes_futures = True
    stores_values = True

    def start(self, workers: int) -> None:
        # The same cluster as _common.start_dask_cluster, spelled out: start-up is timed here,
        # and loading _common (about 10 ms) would count in Dask's figure.
        import logging

        from dask.distributed import Client, LocalCluster

        self._cluster = LocalCluster(
            processes=True,
            n_workers=workers,
            threads_per_worker=1,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self._client = Client(self._cluster)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._client.submit(fn, *args, pure=False)

    def gather(self, handles: Sequence[Any], timeout: float = RESULT_TIMEOUT) -> list[Any]:
        from dask.distributed import wait

        wait(list(handles), timeout=timeout)
        return list(self._client.gather(list(handles)))

    def put(self, value: Any) -> Any:
        return self._client.scatter(value, hash=False)

    def close(self) -> None:
        self._client.close()
        self._cluster.close()


class Ray(System):
    name = "ray"
    module = "ray"
    first_use = "init"
    passes_futures = True
    stores_values = True

    def start(self, workers: int) -> None:
        import logging

        import ray

        self._ray = ray
        self._remote: dict[Callable[..., Any], Any] = {}
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        return remote.remote(*args)

    def result(self, handle: Any, timeout: float = RESULT_TIMEOUT) -> Any:
        return self._ray.get(handle, timeout=timeout)

    def gather(self, handles: Sequence[Any], timeout: float = RESULT_TIMEOUT) -> list[Any]:
        return list(self._ray.get(list(handles), timeout=timeout))

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def close(self) -> None:
        self._ray.shutdown()


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (SharedCompute, ProcessPool, Loky, Dask, Ray)
}


# -- what one run does -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run; it travels to each child as JSON."""

    quick: bool
    workers: int
    latency_warmup: int
    latency_iterations: int
    throughput_tasks: int
    throughput_repeats: int
    chain_length: int
    chain_repeats: int
    big_bytes: dict[str, int]  # label -> float64 array size, for big-arg and big-result
    big_result_repeats: dict[str, int]
    arrow_rows: int
    arrow_repeats: int
    idle_wait_s: float = 1.0
    idle_cpu_window_s: float = 2.0
    child_timeout_s: float = 600.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


def child_main(kind: str, system_name: str, plan_json: str, out_path: str) -> int:
    """Entry point of a child interpreter: measure, write JSON to ``out_path``."""
    plan = Plan.from_json(plan_json)
    system = SYSTEMS[system_name]()
    if kind == "startup":
        measure_startup(system, plan, out_path)
    elif kind == "workloads":
        measure_workloads(system, plan, out_path)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return 0


# -- startup, import, idle -------------------------------------------------------------


def measure_startup(system: System, plan: Plan, out_path: str) -> None:
    """In a fresh interpreter: import, start, first result, then idle memory and CPU.

    Nothing but the standard library (and this module) is loaded before the import is
    timed; psutil is loaded only after the first result.
    """
    results: dict[str, Any] = {}
    start = time.perf_counter()
    module = __import__(system.module)
    imported = time.perf_counter()
    getattr(sys.modules[system.module], system.first_use)
    first_use = time.perf_counter()
    system.start(plan.workers)
    if system.result(system.submit(noop), RESULT_TIMEOUT) is not None:
        raise AssertionError("noop returned a value")
    ready = time.perf_counter()
    del module
    write = _common().write_results
    results.update(
        cold_import_s=imported - start,
        cold_first_use_s=first_use - start,
        startup_s=ready - first_use,
        import_to_first_result_s=ready - start,
    )
    write(out_path, results)
    try:
        results.update(_idle(plan))
    except Exception:
        results.setdefault("errors", {})["idle"] = traceback.format_exc(limit=8)
    write(out_path, results)
    closing = time.perf_counter()
    system.close()
    results["startup_shutdown_s"] = time.perf_counter() - closing
    write(out_path, results)


def _idle(plan: Plan) -> dict[str, Any]:
    time.sleep(plan.idle_wait_s)
    common = _common()
    with common.TreeMemorySampler() as sampler:
        memory = sampler.reset()
    own = _own_memory(os.getpid())
    before = common.tree_cpu_seconds()
    time.sleep(plan.idle_cpu_window_s)
    after = common.tree_cpu_seconds()
    # A process that ended in the window counts with what it had used at the start.
    cpu = sum(after.get(pid, used) - used for pid, used in before.items())
    cpu += sum(used for pid, used in after.items() if pid not in before)
    return {
        "idle_pss_bytes": memory.pss_bytes,
        "idle_rss_bytes": memory.rss_bytes,
        "idle_processes": memory.processes,
        "idle_driver_pss_bytes": own,
        "idle_cpu_s": cpu,
        "idle_cpu_window_s": plan.idle_cpu_window_s,
    }


def _own_memory(pid: int) -> int | None:
    found: int | None = _common().proc_kib(f"/proc/{pid}/smaps_rollup", "Pss")
    return found


def _common() -> Any:
    # Loaded on demand: workers import this module to find the tasks, and must not pay for
    # psutil and the rest of the helpers.
    if __package__:
        from . import _common as common
    else:
        import _common as common  # type: ignore[no-redef]
    return common


# -- the workloads -----------------------------------------------------------------------


def measure_workloads(system: System, plan: Plan, out_path: str) -> None:
    """Timed workloads, then the memory pass (see :func:`_memory`)."""
    results: dict[str, Any] = {"errors": {}}
    system.start(plan.workers)
    system.result(system.submit(noop))
    workloads: list[tuple[str, Callable[[System, Plan], dict[str, Any]]]] = [
        ("latency", _latency),
        ("throughput", _throughput),
        ("chain", _chain),
        ("big_arg", _big_arg),
        ("big_result", _big_result),
        ("arrow", _arrow),
        ("memory", _memory),
    ]
    _common().run_workloads(system, plan, workloads, results, out_path)


def _latency(system: System, plan: Plan) -> dict[str, Any]:
    common = _common()
    for _ in range(plan.latency_warmup):
        system.result(system.submit(noop))
    samples = []
    with common.gc_paused():
        for _ in range(plan.latency_iterations):
            start = time.perf_counter()
            system.result(system.submit(noop))
            samples.append(time.perf_counter() - start)
    return {
        "latency_median_s": statistics.median(samples),
        "latency_p99_s": statistics.quantiles(samples, n=100)[98],
        "latency_iterations": len(samples),
    }


def _throughput(system: System, plan: Plan) -> dict[str, Any]:
    common = _common()

    def burst() -> list[Any]:
        return system.gather([system.submit(noop) for _ in range(plan.throughput_tasks)])

    timing = common.repeat(burst, plan.throughput_repeats, after=lambda _: gc.collect())
    rates = [plan.throughput_tasks / seconds for seconds in timing.samples]
    return {
        "throughput_tasks_per_s": statistics.median(rates),
        "throughput_samples_tasks_per_s": rates,
    }


def _chain(system: System, plan: Plan) -> dict[str, Any]:
    common = _common()

    def chain() -> int:
        if system.passes_futures:
            handle = system.submit(increment, 0)
            for _ in range(plan.chain_length - 1):
                handle = system.submit(increment, handle)
            return int(system.result(handle))
        value = 0
        for _ in range(plan.chain_length):
            value = system.result(system.submit(increment, value))
        return value

    final: list[int] = []
    timing = common.repeat(chain, plan.chain_repeats, after=final.append)
    if any(value != plan.chain_length for value in final):
        raise AssertionError(f"the chain ended at {final}, expected {plan.chain_length}")
    rates = [plan.chain_length / seconds for seconds in timing.samples]
    return {
        "chain_tasks_per_s": statistics.median(rates),
        "chain_samples_tasks_per_s": rates,
        "chain_passes_futures": system.passes_futures,
    }


class _NoSampler:
    """Stands in for a TreeMemorySampler in timed passes, which must not pay for sampling."""

    def reset(self) -> None:
        return None

    def peak(self) -> None:
        return None


def _extra(peak: Any, base: Any) -> int | None:
    return None if peak is None or base is None else int(peak.pss_bytes - base.pss_bytes)


def _big_arg(system: System, plan: Plan) -> dict[str, Any]:
    """Timed: per size, put + first task, again on the stored value, then the steady state."""
    common = _common()
    _warm_up_arrays(system, plan.workers)
    results: dict[str, Any] = {}
    for label, nbytes in plan.big_bytes.items():
        first_array, second_array = _two_arrays(nbytes)
        sums = [common.timed(first_array.sum)[0] for _ in range(3)]
        results[f"big_arg_{label}_driver_sum_s"] = statistics.median(sums)
        gc.collect()
        figures = _big_arg_sequence(system, first_array, second_array, _NoSampler())
        del first_array, second_array
        gc.collect()
        times = [figures["put_first_s"], *figures["again_s"], figures["steady_put_first_s"]]
        results.update(
            {
                f"big_arg_{label}_put_first_s": figures["put_first_s"],
                f"big_arg_{label}_second_s": figures["again_s"][0],
                f"big_arg_{label}_steady_put_first_s": figures["steady_put_first_s"],
            }
        )
        if system.stores_values:
            results[f"big_arg_{label}_third_s"] = figures["again_s"][1]
        else:  # every one was a by-value round trip of the same size
            results[f"big_arg_{label}_by_value_median_s"] = statistics.median(times)
    results["big_arg_stores_values"] = system.stores_values
    return results


def _big_arg_sequence(
    system: System, first_array: Any, second_array: Any, sampler: Any
) -> dict[str, Any]:
    """Put the first array, sum it in tasks, drop it; then put the second array and sum it.

    The steady state: once the first array's handle is dropped (and collected), a store that
    keeps its memory warm puts the second array into the same pages. With a real sampler,
    peaks are of the whole process tree against the baseline before the first put, both arrays
    already built in the driver (they are the user's data, not the system's cost).
    """
    count = first_array.size
    again_count = 2 if system.stores_values else 1  # by value, a third adds nothing but time
    base = sampler.reset()
    start = time.perf_counter()
    handle = system.put(first_array)
    totals = [system.result(system.submit(array_sum, handle))]
    first = time.perf_counter() - start
    again = []
    for _ in range(again_count):
        start = time.perf_counter()
        totals.append(system.result(system.submit(array_sum, handle)))
        again.append(time.perf_counter() - start)
    cold_peak = sampler.peak()
    del handle
    gc.collect()
    time.sleep(FREE_SETTLE_S)
    freed = sampler.reset()
    start = time.perf_counter()
    handle = system.put(second_array)
    steady_total = system.result(system.submit(array_sum, handle))
    steady = time.perf_counter() - start
    steady_peak = sampler.peak()
    del handle
    gc.collect()
    time.sleep(FREE_SETTLE_S)
    if not all(math.isclose(t, count) for t in totals) or not math.isclose(
        steady_total, 2.0 * count
    ):
        raise AssertionError(f"wrong sums: {totals}, {steady_total} (count {count})")
    return {
        "put_first_s": first,
        "again_s": again,
        "steady_put_first_s": steady,
        "peak_extra_pss_bytes": _extra(cold_peak, base),
        "peak_extra_rss_bytes": None
        if cold_peak is None
        else int(cold_peak.rss_bytes - base.rss_bytes),
        "after_free_extra_pss_bytes": _extra(freed, base),
        "steady_peak_extra_pss_bytes": _extra(steady_peak, base),
    }


def _two_arrays(nbytes: int) -> tuple[Any, Any]:
    import numpy as np

    count = nbytes // 8
    return np.full(count, 1.0), np.full(count, 2.0)  # every page touched; exact sums


def _warm_up_arrays(system: System, workers: int) -> None:
    """Let every worker load numpy and see a stored array once, outside every figure."""
    import numpy as np

    small = np.ones(128 * 1024)  # 1 MiB: over every system's inline limit
    for _ in range(3):
        handles = [system.submit(array_sum, system.put(small)) for _ in range(4 * workers)]
        system.gather(handles)
        handles = [system.submit(make_ones, 1024) for _ in range(4 * workers)]
        system.gather(handles)


def _big_result(system: System, plan: Plan) -> dict[str, Any]:
    """Timed: a task returning np.ones(size), until the driver has the value."""
    results: dict[str, Any] = {}
    for label, nbytes in plan.big_bytes.items():
        times = []
        readonly = None
        for _ in range(plan.big_result_repeats[label]):
            elapsed, readonly, _ = _big_result_once(system, nbytes // 8, _NoSampler())
            times.append(elapsed)
        results.update(
            {
                f"big_result_{label}_s": statistics.median(times),
                f"big_result_{label}_first_s": times[0],
                f"big_result_{label}_readonly": readonly,
            }
        )
    return results


def _big_result_once(system: System, count: int, sampler: Any) -> tuple[float, bool, int | None]:
    gc.collect()
    time.sleep(FREE_SETTLE_S)
    base = sampler.reset()
    start = time.perf_counter()
    value = system.result(system.submit(make_ones, count))
    elapsed = time.perf_counter() - start
    extra = _extra(sampler.peak(), base)
    if value.shape != (count,) or value[-1] != 1.0:
        raise AssertionError(f"wrong result: shape {value.shape}")
    readonly = not value.flags.writeable
    del value
    gc.collect()
    return elapsed, readonly, extra


def _restart(system: System, plan: Plan) -> dict[str, Any]:
    """Close the system and start it again, with numpy loaded in its workers."""
    system.close()
    system.start(plan.workers)
    system.result(system.submit(noop))
    _warm_up_arrays(system, plan.workers)
    gc.collect()
    return {}


def _memory(system: System, plan: Plan) -> dict[str, Any]:
    """The big-arg and big-result sequences again, this time under the memory sampler.

    Apart from the timed passes: sampling PSS walks the page tables of every process in the
    tree, which on a small machine slows the very copies being timed. Each sequence starts on a
    freshly started system, so neither memory a store keeps warm on purpose nor what an
    earlier sequence has not yet given back hides in (or inflates) its baseline.
    """
    common = _common()
    results: dict[str, Any] = {}
    with common.TreeMemorySampler() as sampler:
        for label, nbytes in plan.big_bytes.items():
            first_array, second_array = _two_arrays(nbytes)
            _restart(system, plan)
            figures = _big_arg_sequence(system, first_array, second_array, sampler)
            del first_array, second_array
            for key in (
                "peak_extra_pss_bytes",
                "peak_extra_rss_bytes",
                "after_free_extra_pss_bytes",
                "steady_peak_extra_pss_bytes",
            ):
                results[f"big_arg_{label}_{key}"] = figures[key]
        for label, nbytes in plan.big_bytes.items():
            _restart(system, plan)
            _, _, extra = _big_result_once(system, nbytes // 8, sampler)
            results[f"big_result_{label}_peak_extra_pss_bytes"] = extra
    return results


def _arrow(system: System, plan: Plan) -> dict[str, Any]:
    common = _common()
    table = common.make_arrow_table(plan.arrow_rows)
    put_s, handle = common.timed(lambda: system.put(table))
    first_s, rows = common.timed(lambda: system.result(system.submit(table_num_rows, handle)))
    timing = common.repeat(
        lambda: system.result(system.submit(table_num_rows, handle)), plan.arrow_repeats
    )
    if rows != plan.arrow_rows:
        raise AssertionError(f"the task saw {rows} rows of {plan.arrow_rows}")
    return {
        "arrow_table_bytes": table.nbytes,
        "arrow_put_s": put_s,
        "arrow_first_task_s": first_s,
        "arrow_task_s": timing.median,
        "arrow_num_rows_read": rows,
    }
