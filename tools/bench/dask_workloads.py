"""Dask workloads on Dask's own schedulers and on sharedcompute, in one run.

Usage::

    python tools/bench/dask_workloads.py [--quick] [--json] [--repeats N] [--rounds N]
                                         [--workloads array_100mb,bag,...]
                                         [--schedulers sync,threads,...]

Measurements run in fresh interpreters, never in this one::

    this process ── python dask_workloads.py --child MODE WORKLOAD SCHEDULERS PLAN OUT ──┐
        ▲   (child subreaper: stops whatever a scheduler leaves behind)                  │
        └── OUT.json (figures per scheduler), OUT.pkl (the result) ◀─────────────────────┘

``memory`` children, one per (workload, scheduler), so no scheduler inherits another's heap,
workers or pages: measure the process tree (baseline), start the scheduler, one warm-up
compute, then one compute under a memory sampler. Peak memory is the highest PSS of the child
and all its descendants (workers, nannies, the store's shared memory counted once) above the
baseline: what choosing that scheduler costs in memory, its own processes included. That
compute's result is compared with the "sync" scheduler's.

``time`` children, one per workload and round: every scheduler is started and warmed up in
the same process, then they take turns, compute by compute, ``repeats`` times (who goes
first rotates). On a machine whose other load comes and goes, turns spread it over every
scheduler alike, where back-to-back blocks would hand it to whichever ran at the wrong
minute. Time is the median over all turns and rounds; CPU is what the whole process tree
used during the compute. The sampler never runs during a timed compute (reading the smaps
of processes mapping gigabytes costs it a good part of a CPU). "distributed" is timed in a
process of its own: while a Client exists Dask builds some graphs differently (a dataframe
shuffle becomes its "p2p" kind). Start-up of a distributed cluster or of the sharedcompute
runtime is not timed; Dask's "processes" scheduler starts a new process pool inside every
compute, as it does for its users, and "processes-pool" gives it one reused pool to show
that start-up apart.

Workloads (sizes of a full run; ``--quick`` shrinks them to run in seconds)::

    array_transpose   (x + x.T).mean(axis=0), 4000x4000 float64 in 1000x1000 chunks
    array_100mb       (x - x.mean()).std() over 16 chunks of 100 MB (12.5M float64):
                      every chunk feeds two reductions, so it is a real intermediate
    dataframe_groupby groupby("key").agg(sum, mean, max) on 16 x 250,000 generated rows
    dataframe_merge   merge on "id" of 16 x 250,000 rows with 8 x 250,000 rows
    bag               read_text("*.json").map(json.loads).pluck("name").frequencies()
                      on 8 generated JSON-lines files of 100,000 records (pure Python)
    delayed_tree      dask.delayed: 32 leaves of 1M float64, pairwise sums to one total

Every result is compared with the "sync" scheduler's. Targets of the issue (printed PASS /
FAIL / SKIP, never asserted): every workload on sharedcompute gives sync's result; on
array_100mb sharedcompute is >= 3x faster than "processes", no slower than "threads", and
peaks lower in memory than "processes"; on bag it is faster than "threads" (2 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

if __package__:
    from . import _common
else:  # run as a script: this folder is sys.path[0]
    import _common  # type: ignore[no-redef]

_common.ensure_repo_on_path()

WORKERS = 2
ALL_SCHEDULERS = ("sharedcompute", "sync", "threads", "processes", "processes-pool", "distributed")
ALL_WORKLOADS = (
    "array_transpose",
    "array_100mb",
    "dataframe_groupby",
    "dataframe_merge",
    "bag",
    "delayed_tree",
)
REFERENCE = "sync"
BASELINE = "sharedcompute"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; the same object reaches every child as JSON."""

    quick: bool
    repeats: int
    transpose_side: int
    transpose_chunk: int
    big_chunk_items: int
    big_chunks: int
    frame_rows: int
    frame_partitions: int
    bag_files: int
    bag_lines: int
    delayed_leaves: int
    delayed_items: int
    data_dir: str = ""
    child_timeout_s: float = 900.0
    rounds: int = 1


FULL = Plan(
    quick=False,
    repeats=3,
    transpose_side=4000,
    transpose_chunk=1000,
    big_chunk_items=12_500_000,
    big_chunks=16,
    frame_rows=250_000,
    frame_partitions=16,
    bag_files=8,
    bag_lines=100_000,
    delayed_leaves=32,
    delayed_items=1_000_000,
)
QUICK = Plan(
    quick=True,
    repeats=2,
    transpose_side=400,
    transpose_chunk=100,
    big_chunk_items=100_000,
    big_chunks=4,
    frame_rows=5_000,
    frame_partitions=4,
    bag_files=3,
    bag_lines=500,
    delayed_leaves=8,
    delayed_items=10_000,
    child_timeout_s=180.0,
)


# -- the workloads (module level: Dask's process schedulers pickle them by reference) --------


def make_frame(partition: int, rows: int) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(partition)
    return pd.DataFrame(
        {
            "id": np.arange(partition * rows, (partition + 1) * rows, dtype=np.int64),
            "key": rng.integers(0, 1000, rows),
            "value": rng.random(rows),
        }
    )


def make_right_frame(partition: int, rows: int) -> Any:
    import numpy as np
    import pandas as pd

    ids = np.arange(partition * rows, (partition + 1) * rows, dtype=np.int64) * 2
    return pd.DataFrame({"id": ids, "weight": (ids % 97).astype(np.float64)})


def make_leaf(seed: int, items: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(items)


def add_arrays(a: Any, b: Any) -> Any:
    return a + b


def total(a: Any) -> float:
    return float(a.sum())


def write_json_files(directory: str, files: int, lines: int) -> str:
    """Generated JSON-lines files (the example of Dask's scheduler documentation)."""
    names = ["Alice", "Bob", "Charlie", "Dan", "Edith", "Frank", "Grace", "Heidi"]
    os.makedirs(directory, exist_ok=True)
    for index in range(files):
        with open(os.path.join(directory, f"{index}.json"), "w") as out:
            for line in range(lines):
                record = {
                    "id": index * lines + line,
                    "name": names[(line * 7 + index) % len(names)],
                    "amount": line % 113,
                    "tags": ["a", "b", "c"][: line % 4],
                }
                out.write(json.dumps(record) + "\n")
    return os.path.join(directory, "*.json")


def build(workload: str, plan: Plan) -> Any:
    """The Dask collection a workload computes (built in the child, before any timing)."""
    import dask
    import dask.array as da
    import dask.bag as db
    import dask.dataframe as dd

    if workload == "array_transpose":
        side, chunk = plan.transpose_side, plan.transpose_chunk
        x = da.random.default_rng(42).random((side, side), chunks=(chunk, chunk))
        return (x + x.T).mean(axis=0)
    if workload == "array_100mb":
        items = plan.big_chunk_items
        x = da.random.default_rng(42).random(items * plan.big_chunks, chunks=items)
        return (x - x.mean()).std()
    if workload == "dataframe_groupby":
        df = dd.from_map(make_frame, range(plan.frame_partitions), rows=plan.frame_rows)
        return df.groupby("key").agg({"value": ["sum", "mean", "max"], "id": "count"})
    if workload == "dataframe_merge":
        left = dd.from_map(make_frame, range(plan.frame_partitions), rows=plan.frame_rows)
        right = dd.from_map(
            make_right_frame, range(max(1, plan.frame_partitions // 2)), rows=plan.frame_rows
        )
        return left.merge(right, on="id")
    if workload == "bag":
        pattern = os.path.join(plan.data_dir, "*.json")
        return db.read_text(pattern).map(json.loads).pluck("name").frequencies()
    if workload == "delayed_tree":
        level = [
            dask.delayed(make_leaf)(seed, plan.delayed_items) for seed in range(plan.delayed_leaves)
        ]
        while len(level) > 1:
            pairs = zip(level[0::2], level[1::2], strict=False)
            level = [dask.delayed(add_arrays)(a, b) for a, b in pairs] + level[len(level) & ~1 :]
        return dask.delayed(total)(level[0])
    raise ValueError(f"unknown workload {workload!r}")


def same_result(workload: str, ours: Any, reference: Any) -> bool:
    """Whether a scheduler's result equals the reference (sync) one."""
    import numpy as np
    import pandas as pd

    if workload in ("dataframe_groupby", "dataframe_merge"):
        if workload == "dataframe_merge":
            ours = ours.sort_values("id").reset_index(drop=True)
            reference = reference.sort_values("id").reset_index(drop=True)
        else:
            ours, reference = ours.sort_index(), reference.sort_index()
        try:
            pd.testing.assert_frame_equal(ours, reference, check_exact=False)
        except AssertionError:
            return False
        return True
    if workload == "bag":
        return sorted(ours) == sorted(reference)
    return bool(np.allclose(ours, reference, rtol=1e-9, atol=0))


# -- the schedulers --------------------------------------------------------------------------


class Scheduler:
    """How one scheduler is started, used for a compute, and stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._close: Callable[[], None] = lambda: None
        self.compute_kwargs: dict[str, Any] = {}

    def start(self) -> None:
        import dask

        dask.config.set(num_workers=WORKERS)
        if self.name in ("sync", "threads", "processes"):
            self.compute_kwargs = {"scheduler": self.name}
        elif self.name == "processes-pool":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
            self.compute_kwargs = {"scheduler": "processes", "pool": pool}
            self._close = lambda: pool.shutdown(wait=True, cancel_futures=True)
        elif self.name == "distributed":
            cluster, client = _common.start_dask_cluster(
                WORKERS,
                dashboard_address=":0",  # a free port: 8787 may be taken
            )
            self.compute_kwargs = {"scheduler": client}

            def close() -> None:
                client.close()
                cluster.close()

            self._close = close
        elif self.name == "sharedcompute":
            import sharedcompute as sc
            import sharedcompute.dask

            sc.init(num_workers=WORKERS)
            self.compute_kwargs = {"scheduler": sharedcompute.dask.get}
            self._close = sc.shutdown
        else:
            raise ValueError(f"unknown scheduler {self.name!r}")

    def compute(self, collection: Any) -> Any:
        import dask

        (result,) = dask.compute(collection, **self.compute_kwargs)
        if self.name == "distributed":
            self._wait_until_released()
        return result

    def _wait_until_released(self, timeout: float = 30.0) -> None:
        """Let the cluster forget the last compute's keys (it releases them asynchronously):
        otherwise the next compute of the same graph finds its results still in memory."""
        client = self.compute_kwargs["scheduler"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not client.run_on_scheduler(_scheduler_task_count):
                return
            time.sleep(0.01)

    def close(self) -> None:
        self._close()


def _scheduler_task_count(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process, its descendants and the children they reaped
    (Dask's "processes" pool exits after each compute; its CPU is counted once reaped)."""
    import resource

    import psutil

    used = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        used += usage.ru_utime + usage.ru_stime
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        used += times.user + times.system + times.children_user + times.children_system
    return used


def child_main(mode: str, workload: str, schedulers: str, plan_json: str, out_path: str) -> int:
    """One measuring child: ``memory`` (one scheduler) or ``time`` (several, interleaved)."""
    plan = Plan(**json.loads(plan_json))
    names = schedulers.split(",")
    figures: dict[str, Any] = {}
    try:
        if mode == "memory":
            (name,) = names
            figures[name], result = _measure_memory(workload, name, plan)
            with open(out_path + ".pkl", "wb") as out:
                pickle.dump(result, out, protocol=5)
        elif mode == "time":
            figures.update(_measure_time(workload, names, plan))
        else:
            raise ValueError(f"unknown child mode {mode!r}")
    except BaseException:
        figures["error"] = traceback.format_exc()
        raise
    finally:
        with open(out_path, "w") as out:
            json.dump(figures, out)
    return 0


def _measure_memory(workload: str, name: str, plan: Plan) -> tuple[dict[str, Any], Any]:
    """Peak PSS of one compute above the level before the scheduler started; the result."""
    collection = build(workload, plan)
    scheduler = Scheduler(name)
    try:
        base = _common.tree_memory()  # before the scheduler starts: its processes count
        scheduler.start()
        del_result = scheduler.compute(collection)  # warm-up: workers import, pages warm
        del del_result
        with _common.TreeMemorySampler() as sampler:
            sampler.reset()
            result = scheduler.compute(collection)
            peak = sampler.peak()
    finally:
        scheduler.close()
    extra = peak.pss_bytes - (base.pss_bytes or base.rss_bytes)
    return {"peak_extra_pss_bytes": [extra], "peak_processes": peak.processes}, result


def _measure_time(workload: str, names: list[str], plan: Plan) -> dict[str, Any]:
    """Wall and CPU seconds of each compute, the schedulers taking turns compute by compute
    (rotating who goes first), so a busy machine's load drifts over all of them alike."""
    collection = build(workload, plan)
    schedulers = [Scheduler(name) for name in names]
    figures: dict[str, dict[str, list[float]]] = {n: {"times_s": [], "cpu_s": []} for n in names}
    try:
        for scheduler in schedulers:
            scheduler.start()
            del_result = scheduler.compute(collection)  # warm-up
            del del_result
        for repeat in range(plan.repeats):
            turn = repeat % len(schedulers)
            for scheduler in schedulers[turn:] + schedulers[:turn]:
                cpu = _tree_cpu_seconds()
                start = time.perf_counter()
                result = scheduler.compute(collection)
                figures[scheduler.name]["times_s"].append(time.perf_counter() - start)
                figures[scheduler.name]["cpu_s"].append(_tree_cpu_seconds() - cpu)
                del result
    finally:
        for scheduler in schedulers:
            try:
                scheduler.close()
            except Exception:
                traceback.print_exc()
    return figures


# -- the parent ---------------------------------------------------------------------------

# Timed together in one process, taking turns. A distributed Client changes what Dask
# builds while it exists (a dataframe shuffle becomes its own "p2p" kind), so "distributed"
# is timed in a process of its own.
SEPARATE_TIMING = ("distributed",)


def run_child(
    mode: str, workload: str, schedulers: list[str], plan: Plan, folder: str
) -> dict[str, Any]:
    """Run one measuring child; return what it wrote, keyed by scheduler."""
    out_path = os.path.join(folder, f"{mode}-{workload}-{'-'.join(schedulers)}.json")
    argv = [sys.executable, os.path.abspath(__file__), "--child", mode, workload]
    argv += [",".join(schedulers), json.dumps(asdict(plan)), out_path]
    child = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        env=_common.child_env(),
        cwd=_common.REPO_ROOT,
    )
    error = None
    try:
        code = child.wait(timeout=plan.child_timeout_s)
        if code != 0:
            error = f"exited with code {code} (traceback on stderr)"
    except subprocess.TimeoutExpired:
        error = f"ran past {plan.child_timeout_s:.0f} s and was killed"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    left = _common.end_descendants()
    written: dict[str, Any] = {}
    if os.path.exists(out_path):
        with open(out_path) as file:
            written = json.load(file)
    child_error = written.pop("error", None)
    if child_error and error is None:
        error = "failed"
    if error is not None and child_error:
        error += ": " + child_error.strip().splitlines()[-1]
    figures = {name: written.get(name, {}) for name in schedulers}
    for name in schedulers:
        if error is not None:
            figures[name]["error"] = f"{mode} child {error}"
        figures[name]["leftover_processes"] = left
        if mode == "memory":
            figures[name]["result_path"] = out_path + ".pkl"
    return figures


def run(plan: Plan, workloads: list[str], schedulers: list[str]) -> dict[str, Any]:
    _common.become_child_subreaper()
    folder = tempfile.mkdtemp(prefix="sharedcompute-dask-bench-")
    try:
        plan = replace(plan, data_dir=os.path.join(folder, "json"))
        write_json_files(plan.data_dir, plan.bag_files, plan.bag_lines)
        results: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in workloads}
        ordered = [REFERENCE] + [s for s in schedulers if s != REFERENCE]
        together = [s for s in ordered if s not in SEPARATE_TIMING]
        timing_groups = [together] + [[s] for s in ordered if s in SEPARATE_TIMING]
        for workload in workloads:
            for scheduler in ordered:
                _common.log(f"[{workload}] memory and result: {scheduler}")
                figures = run_child("memory", workload, [scheduler], plan, folder)
                _merge(results[workload], figures)
            _compare(workload, results[workload])
            for round_index in range(plan.rounds):
                for group in (g for g in timing_groups if g):
                    _common.log(f"[{workload}] time, round {round_index + 1}: {', '.join(group)}")
                    load = os.getloadavg()[0]
                    figures = run_child("time", workload, group, plan, folder)
                    for name in group:
                        figures[name]["load_1min"] = [load]
                    _merge(results[workload], figures)
        return {
            "quick": plan.quick,
            "plan": asdict(plan),
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
            },
            "versions": _versions(),
            "results": results,
            "targets": [asdict(t) for t in evaluate_targets(results, plan)],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _merge(by_scheduler: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> None:
    """Add one child's figures to what is known; medians over all of them."""
    for scheduler, figures_new in new.items():
        figures = by_scheduler.setdefault(scheduler, {})
        for key in ("times_s", "cpu_s", "peak_extra_pss_bytes", "load_1min"):
            figures[key] = figures.get(key, []) + figures_new.get(key, [])
        for key in ("result_path", "error", "peak_processes"):
            if key in figures_new:
                figures[key] = figures_new[key]
        left = figures.get("leftover_processes", []) + figures_new.get("leftover_processes", [])
        figures["leftover_processes"] = left
        for key, name in (
            ("times_s", "median_s"),
            ("cpu_s", "cpu_median_s"),
            ("peak_extra_pss_bytes", "peak_extra_pss_bytes_median"),
        ):
            if figures[key]:
                figures[name] = statistics.median(figures[key])


def _compare(workload: str, by_scheduler: dict[str, dict[str, Any]]) -> None:
    reference = _load(by_scheduler.get(REFERENCE, {}))
    for figures in by_scheduler.values():
        result = _load(figures)
        if result is None or reference is None:
            figures["matches_sync"] = None
        else:
            figures["matches_sync"] = same_result(workload, result, reference)


def _load(figures: dict[str, Any]) -> Any:
    path = figures.get("result_path")
    if not path or not os.path.exists(path) or "error" in figures:
        return None
    with open(path, "rb") as written:
        return pickle.load(written)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("dask", "distributed", "numpy", "pandas", "pyarrow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def evaluate_targets(
    results: dict[str, dict[str, dict[str, Any]]], plan: Plan
) -> list[_common.Target]:
    targets: list[_common.Target] = []
    ours = {w: r.get(BASELINE, {}) for w, r in results.items()}
    matches = [f.get("matches_sync") for f in ours.values()]
    if not matches or any(m is None for m in matches):
        targets.append(_common.Target("same_as_sync", "SKIP", "results vs sync: not all measured"))
    else:
        status = "PASS" if all(matches) else "FAIL"
        wrong = [w for w, f in ours.items() if not f.get("matches_sync")]
        text = "every workload on sharedcompute gives sync's result" + (
            f" (differs: {', '.join(wrong)})" if wrong else ""
        )
        targets.append(_common.Target("same_as_sync", status, text))

    def figure(workload: str, scheduler: str, key: str) -> Any:
        return results.get(workload, {}).get(scheduler, {}).get(key)

    def check(name: str, values: list[Any], test: Callable[..., bool], text: str) -> None:
        if not all(isinstance(v, (int, float)) for v in values):
            targets.append(_common.Target(name, "SKIP", text.split(":")[0] + ": not measured"))
            return
        status = "PASS" if test(*values) else "FAIL"
        targets.append(_common.Target(name, status, text.format(*values)))

    big = "array_100mb"
    check(
        "array_100mb_3x_processes",
        [figure(big, BASELINE, "median_s"), figure(big, "processes", "median_s")],
        lambda a, b: b >= 3 * a,
        "array_100mb >= 3x faster than processes: {0:.3f} s vs {1:.3f} s",
    )
    check(
        "array_100mb_le_threads",
        [figure(big, BASELINE, "median_s"), figure(big, "threads", "median_s")],
        lambda a, b: a <= b,
        "array_100mb no slower than threads: {0:.3f} s vs {1:.3f} s",
    )
    check(
        "array_100mb_memory_lt_processes",
        [
            figure(big, BASELINE, "peak_extra_pss_bytes_median"),
            figure(big, "processes", "peak_extra_pss_bytes_median"),
        ],
        lambda a, b: a < b,
        "array_100mb peak memory lower than processes: {0:,} vs {1:,} bytes",
    )
    check(
        "bag_faster_than_threads",
        [figure("bag", BASELINE, "median_s"), figure("bag", "threads", "median_s")],
        lambda a, b: a < b,
        "bag faster than threads (2 workers): {0:.3f} s vs {1:.3f} s",
    )
    if plan.quick:
        targets = [
            _common.Target(t.name, t.status, t.text + " (quick sizes)")
            if t.name != "same_as_sync"
            else t
            for t in targets
        ]
    return targets


def render_markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    plan = report["plan"]
    lines = []
    if report["quick"]:
        lines += ["**--quick: small sizes; timings say little.**", ""]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    machine = report["machine"]
    loads = [
        load for by in results.values() for f in by.values() for load in f.get("load_1min", [])
    ]
    load_text = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
    lines += [
        f"{WORKERS} workers; {plan['rounds']} round(s) of {plan['repeats']} turns per "
        f"scheduler after a warm-up (schedulers alternate compute by compute); time and CPU "
        f"are medians over all turns, memory from a separate, isolated compute. Python "
        f"{machine['python']}, {machine['cpus']} CPUs, 1-minute load average before each "
        f"timing child {load_text}; {versions}.",
        "",
    ]
    headers = [
        "workload",
        "scheduler",
        "time (min-max)",
        "sharedcompute faster by",
        "CPU s / compute",
        "peak memory",
        "sharedcompute smaller by",
        "same as sync",
    ]
    rows = []
    for workload, by_scheduler in results.items():
        ours = by_scheduler.get(BASELINE, {})
        for scheduler, figures in by_scheduler.items():
            if "median_s" not in figures:
                rows.append([workload, scheduler, "ERROR", "", "", "", "", ""])
                continue
            times = figures["times_s"]
            peak = figures.get("peak_extra_pss_bytes_median", 0)
            rows.append(
                [
                    workload,
                    scheduler,
                    f"{_common.format_seconds(figures['median_s'])} "
                    f"({min(times):.2f}-{max(times):.2f})",
                    _ratio(figures.get("median_s"), ours.get("median_s")),
                    f"{figures.get('cpu_median_s', float('nan')):.2f}",
                    _common.format_bytes(max(0, peak)),
                    _ratio(peak, ours.get("peak_extra_pss_bytes_median")),
                    {True: "yes", False: "NO", None: "?"}[figures.get("matches_sync")],
                ]
            )
    lines += [_common.markdown_table(headers, rows), ""]
    lines += [
        "faster / smaller by: the scheduler's figure over sharedcompute's (> 1: sharedcompute "
        "is faster or smaller). CPU: seconds of CPU the whole process tree used per timed "
        "compute. Peak memory: PSS of the process tree above its level before the scheduler "
        "started, in a separate sampled compute.",
        "",
        "Targets:",
        "",
    ]
    lines += [f"- {t['status']}: {t['text']}" for t in report["targets"]]
    problems = []
    for workload, by_scheduler in results.items():
        left_by: dict[str, list[str]] = {}  # a timing child's leftovers show under each member
        for scheduler, figures in by_scheduler.items():
            if "error" in figures:
                problems.append(f"- ERROR {workload} / {scheduler}: {figures['error']}")
            for process in dict.fromkeys(figures.get("leftover_processes", [])):
                left_by.setdefault(process, []).append(scheduler)
        for process, names in left_by.items():
            problems.append(
                f"- {workload}: {process} was still running after the child measuring "
                f"{', '.join(names)} (stopped by the benchmark)"
            )
    if problems:
        lines += ["", "Problems:", "", *problems]
    return "\n".join(lines)


def _ratio(theirs: Any, ours: Any) -> str:
    if not isinstance(theirs, (int, float)) or not isinstance(ours, (int, float)) or ours <= 0:
        return ""
    return f"{theirs / ours:.2f}x"


def parse_list(text: str | None, allowed: tuple[str, ...], what: str) -> list[str]:
    if not text:
        return list(allowed)
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {', '.join(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--repeats", type=int, help="timed computes per pair and round")
    parser.add_argument("--rounds", type=int, help="times over every pair (default 1)")
    parser.add_argument("--workloads", help=f"comma-separated, of {', '.join(ALL_WORKLOADS)}")
    parser.add_argument("--schedulers", help=f"comma-separated, of {', '.join(ALL_SCHEDULERS)}")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    workloads = parse_list(args.workloads, ALL_WORKLOADS, "workloads")
    schedulers = parse_list(args.schedulers, ALL_SCHEDULERS, "schedulers")
    report = run(plan, workloads, schedulers)
    print(json.dumps(report, indent=2) if args.json else render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
