"""Ecosystem benchmark: sharedcompute's map, Executor, Pool and joblib backend against the pools
people already use (joblib on loky, multiprocessing.Pool, ProcessPoolExecutor, Ray), one table.

Usage::

    python tools/bench/ecosystem.py [--json] [--quick] [--repeats 3] [--workers 2]

Measurements run in fresh interpreters (``_common.run_in_subprocess``), never in this one::

    ecosystem.py ── measure_cold("sharedcompute"), measure_cold("loky") ──> first-call seconds
                 ── measure_ways(plan, [workload], ways) ─ one child per workload ──> best of R
                 ── measure_ways(plan, [tiny, big], Ray's ways) ─ a child of its own
        (a child subreaper: what a child leaves running, loky's and Ray's helpers included,
         is stopped after it and named in the log)

A child opens every way it measures, W workers each (and stops them all when done), runs
each workload once untimed per way (workers import the functions, numpy, scikit-learn) and
checks that result against the plain loop, then times the workload R times per way, the ways
taking turns and the order reversed every other turn, so load that comes and goes on the
machine falls on all alike. Ray runs in a child of its own: its idle daemons (GCS, raylet)
take CPU that would fall on the other ways' turns; its rows are skipped, with a note, when
``import ray`` fails. The ways (``f`` is the workload's function; calls of several arguments
use ``starmap`` where a pool has one, ``map(f, *columns)`` where it does not)::

    way key               what runs the calls
    sc_map                sc.gather(sc.map(f, xs)) on sc.Runtime(num_workers=W)
    sc_executor           list(sc.Executor(W).map(f, xs))
    sc_pool               sc.Pool(W).map(f, xs)
    joblib_sharedcompute  joblib.Parallel()(delayed(f)(x) for x in xs) under
                          parallel_config(backend="sharedcompute", n_jobs=W), on sc_map's runtime
    joblib_loky           the same under backend="loky" (joblib's default)
    mp_pool               multiprocessing.Pool(W).map(f, xs), default start method and chunksize
    ppe                   concurrent.futures.ProcessPoolExecutor(W).map(f, xs), chunksize 1
    ray_pool              ray.util.multiprocessing.Pool(W).map(f, xs), ray.init(num_cpus=W)
    joblib_ray            joblib on backend="ray" (ray.util.joblib.register_ray())

The workloads (JSON keys; ``ways`` holds every way's best time per key)::

    key                  what is timed                                           ways
    cold_first_call_s    the first Parallel of 10 no-op calls in a fresh         joblib sc, loky
                         interpreter, the pool's (or runtime's) start-up included
    tiny_calls_s         2,000 calls of a no-op f(i), best of R                  all
    big_array_calls_s    200 calls f(x, i) -> float(x[i]) over one 200 MB        all
                         float64 array x, best of R (multiprocessing.Pool and
                         ProcessPoolExecutor pickle x with every chunk or call:
                         best of ``slow_repeats``, warmed up on W calls only)
    sleep_calls_s        20 calls of time.sleep(0.1) on W workers, best of R     sc_map,
                                                                                 sc_executor,
                                                                                 joblib_loky
    gridsearch_s         GridSearchCV(SVC(), 4 candidates, cv=5) on scikit-learn's joblib sc, loky
                         digits (20 fits), best of R; scores compared

The table gives each way's time over joblib-on-loky's (and, for the big array, over
multiprocessing.Pool's); below 1, the way is faster. The targets block after it checks the
project's bars (PASS/FAIL, SKIP when not measured; never asserted). ``--quick`` shrinks the
counts and the array (200 tiny calls, 20 calls over 20 MB, 4 sleeps) so it runs in seconds;
keys keep their names and the JSON says ``"quick": true``. ``results``, ``ratios`` and
``samples`` keep their older shape: the two joblib backends, ``sharedcompute`` over ``loky``.

This module imports only the standard library at the top: every way's workers import it to
find the called functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tools.bench._common import Target

BACKENDS = ("sharedcompute", "loky")  # the joblib backends of ``results`` and ``ratios``
BASELINE = "loky"
CHILD_TIMEOUT = 600.0
MB = 1_000_000


@dataclass(frozen=True)
class Plan:
    quick: bool
    workers: int
    repeats: int
    tiny_calls: int
    big_array_bytes: int
    big_array_calls: int
    sleep_calls: int
    sleep_s: float
    slow_repeats: int


FULL = Plan(quick=False, workers=2, repeats=3, tiny_calls=2000, big_array_bytes=200 * MB,
            big_array_calls=200, sleep_calls=20, sleep_s=0.1, slow_repeats=1)
QUICK = Plan(quick=True, workers=2, repeats=2, tiny_calls=200, big_array_bytes=20 * MB,
             big_array_calls=20, sleep_calls=4, sleep_s=0.1, slow_repeats=1)


@dataclass(frozen=True)
class Way:
    key: str
    label: str


WAYS = {
    way.key: way
    for way in (
        Way("sc_map", "sc.map"),
        Way("sc_executor", "sc.Executor.map"),
        Way("sc_pool", "sc.Pool.map"),
        Way("joblib_sharedcompute", "joblib sharedcompute"),
        Way("joblib_loky", "joblib loky"),
        Way("mp_pool", "multiprocessing.Pool.map"),
        Way("ppe", "ProcessPoolExecutor.map"),
        Way("ray_pool", "ray Pool.map"),
        Way("joblib_ray", "joblib ray"),
    )
}
JOBLIB_BACKEND = {"joblib_sharedcompute": "sharedcompute", "joblib_loky": "loky",
                  "joblib_ray": "ray"}
RAY_WAYS = ("ray_pool", "joblib_ray")
LOKY = "joblib_loky"
MP_POOL = "mp_pool"


@dataclass(frozen=True)
class Workload:
    key: str
    label: str  # formatted with the plan's fields
    ways: tuple[str, ...]
    slow: tuple[str, ...] = ()  # ways that get ``slow_repeats`` and a short warm-up


MAP_WAYS = tuple(WAYS)
WORKLOADS = (
    Workload("cold_first_call_s", "first Parallel (10 calls), start-up included",
             ("joblib_sharedcompute", LOKY)),
    Workload("tiny_calls_s", "{tiny_calls:,} tiny calls, best of {repeats}", MAP_WAYS),
    Workload("big_array_calls_s",
             "{big_array_calls} calls over one {big_mb} MB array, best of {repeats}", MAP_WAYS,
             slow=(MP_POOL, "ppe")),
    Workload("sleep_calls_s", "{sleep_calls} calls of {sleep_s} s, best of {repeats}",
             ("sc_map", "sc_executor", LOKY)),
    Workload("gridsearch_s", "GridSearchCV, digits, 20 fits, best of {repeats}",
             ("joblib_sharedcompute", LOKY)),
)
BY_KEY = {workload.key: workload for workload in WORKLOADS}


# -- what the workers call --------------------------------------------------------------


def noop(i: int) -> int:
    return i


def element(x: Any, i: int) -> float:
    return float(x[i])


def nap(seconds: float, i: int) -> int:
    import time

    time.sleep(seconds)
    return i


# -- in the children ------------------------------------------------------------------------


def measure_cold(backend: str, workers: int) -> float:
    """Seconds of the first Parallel of a fresh interpreter: the pool's start-up included."""
    import contextlib

    import joblib
    from joblib import Parallel, delayed

    from tools.bench import _common

    with contextlib.ExitStack() as stack:
        if backend == "sharedcompute":
            import sharedcompute as sc
            import sharedcompute.joblib  # registers the backend

            stack.enter_context(sc.Runtime(num_workers=workers))
        stack.enter_context(joblib.parallel_config(backend=backend, n_jobs=workers))
        seconds, first = _common.timed(lambda: Parallel()(delayed(noop)(i) for i in range(10)))
        assert first == list(range(10))
    return seconds


@dataclass
class Opened:
    """A way, started: ``map(fn, columns)`` runs ``fn`` over the zipped columns, results in
    order; ``scope()`` is the joblib configuration a scikit-learn call runs under."""

    map: Callable[[Callable[..., Any], Sequence[Sequence[Any]]], list[Any]]
    scope: Callable[[], AbstractContextManager[Any]] | None = None


@dataclass
class Measured:
    """What one child reports: best and all samples per way and workload, and what failed."""

    best: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    gridsearch_scores: dict[str, list[float]] = field(default_factory=dict)


def measure_ways(plan_fields: dict[str, Any], keys: list[str], ways: list[str]) -> dict[str, Any]:
    """Every workload of ``keys`` on every way of ``ways``, in one interpreter, taking turns."""
    plan = Plan(**plan_fields)
    measured = Measured()
    with ExitStack() as stack:
        opened: dict[str, Opened] = {}
        # multiprocessing forks: its pools start before any runtime's threads and pipes exist.
        for way in sorted(ways, key=lambda w: w not in (MP_POOL, "ppe")):
            try:
                opened[way] = _open(way, plan.workers, stack)
            except ImportError as error:
                measured.skipped[way] = f"not installed ({error})"
            except Exception:
                measured.errors[way] = traceback.format_exc(limit=8)
        turn_order = [way for way in ways if way in opened]
        for key in keys:
            _measure_workload(plan, BY_KEY[key], opened, turn_order, measured)
    return asdict(measured)


def _measure_workload(plan: Plan, workload: Workload, opened: dict[str, Opened],
                      turn_order: list[str], measured: Measured) -> None:
    import time

    from tools.bench import _common

    run, expected = _calls(plan, workload.key)
    ready = []
    for way in turn_order:  # warm-up, untimed, and the result checked
        calls = plan.workers if way in workload.slow else None
        try:
            result = run(opened[way], calls)
            _check(workload.key, way, result, expected and expected[:calls], measured)
            ready.append(way)
        except Exception:
            measured.errors[f"{way} {workload.key}"] = traceback.format_exc(limit=8)
    for turn in range(plan.repeats):
        # Turns, the first way alternating: load that comes and goes falls on all alike.
        order = ready[:] if turn % 2 == 0 else ready[::-1]  # a copy: a failed way leaves ready
        for way in order:
            if way in workload.slow and turn >= plan.slow_repeats:
                continue
            try:
                with _common.gc_paused():
                    start = time.perf_counter()
                    result = run(opened[way], None)
                    elapsed = time.perf_counter() - start
                _check(workload.key, way, result, expected, measured)
            except Exception:  # the other ways' figures still count; this one's turns end
                measured.errors[f"{way} {workload.key}"] = traceback.format_exc(limit=8)
                ready.remove(way)
                continue
            measured.samples.setdefault(way, {}).setdefault(workload.key, []).append(elapsed)
    for way, by_key in measured.samples.items():
        if workload.key in by_key:
            measured.best.setdefault(way, {})[workload.key] = min(by_key[workload.key])


def _check(key: str, way: str, result: Any, expected: list[Any] | None,
           measured: Measured) -> None:
    if expected is None:  # GridSearchCV: the backends' scores are compared with each other
        measured.gridsearch_scores[way] = [float(score) for score in result]
    else:
        assert result == expected, f"{way} {key}: the results differ from the plain loop's"


def _calls(plan: Plan, key: str) -> tuple[Callable[[Opened, int | None], Any], list[Any] | None]:
    """The workload ``key`` as ``run(way, calls=None)`` (``calls``: its first few only, for a
    slow way's warm-up), and the plain loop's result (None: no single right answer)."""
    fn: Callable[..., Any]
    columns: list[list[Any]]
    if key == "tiny_calls_s":
        fn, columns = noop, [list(range(plan.tiny_calls))]
    elif key == "big_array_calls_s":
        import numpy as np

        x = np.arange(plan.big_array_bytes // 8, dtype=np.float64)
        step = len(x) // plan.big_array_calls
        fn, columns = element, [[x] * plan.big_array_calls,
                                [i * step for i in range(plan.big_array_calls)]]
    elif key == "sleep_calls_s":
        fn, columns = nap, [[plan.sleep_s] * plan.sleep_calls, list(range(plan.sleep_calls))]
    elif key == "gridsearch_s":
        return _gridsearch(), None
    else:
        raise ValueError(f"no workload {key!r}")

    def run(way: Opened, calls: int | None) -> list[Any]:
        return way.map(fn, [column[:calls] for column in columns])

    return run, [fn(*args) for args in zip(*columns, strict=True)]


def _gridsearch() -> Callable[[Opened, int | None], Any]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)
    grid = {"C": [1.0, 10.0], "gamma": [0.0005, 0.001]}

    def run(way: Opened, calls: int | None) -> Any:
        assert way.scope is not None, "GridSearchCV runs on joblib ways only"
        with way.scope():
            return GridSearchCV(SVC(), grid, cv=5).fit(X, y).cv_results_["mean_test_score"]

    return run


def _open(way: str, workers: int, stack: ExitStack) -> Opened:
    """Start ``way`` with ``workers`` workers; ``stack`` stops it (ImportError: not installed)."""
    if way in JOBLIB_BACKEND:
        return _open_joblib(way, workers, stack)
    if way == "sc_map":
        import sharedcompute as sc

        _shared_runtime(workers, stack)
        return Opened(lambda fn, columns: sc.gather(sc.map(fn, *columns)))
    if way == "sc_executor":
        import sharedcompute as sc

        executor = stack.enter_context(sc.Executor(workers))
        return Opened(lambda fn, columns: list(executor.map(fn, *columns)))
    if way == "ppe":
        import concurrent.futures

        ppe = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers))
        ppe.submit(noop, 0).result()  # forks its workers now, before any runtime starts
        return Opened(lambda fn, columns: list(ppe.map(fn, *columns)))
    return Opened(_pool_map(_open_pool(way, workers, stack)))


def _open_pool(way: str, workers: int, stack: ExitStack) -> Any:
    """A ``multiprocessing.Pool``-like pool; closed (terminated, then joined) by ``stack``."""
    pool: Any
    if way == "sc_pool":
        import sharedcompute as sc

        pool = sc.Pool(workers)
    elif way == MP_POOL:
        import multiprocessing

        pool = multiprocessing.Pool(workers)
    elif way == "ray_pool":
        _ray(workers, stack)
        from ray.util.multiprocessing import Pool

        pool = Pool(workers)
    else:
        raise ValueError(f"no way {way!r}")
    stack.callback(pool.join)
    stack.callback(pool.terminate)  # runs first: the stack unwinds last in, first out
    return pool


def _pool_map(pool: Any) -> Callable[[Callable[..., Any], Sequence[Sequence[Any]]], list[Any]]:
    def run(fn: Callable[..., Any], columns: Sequence[Sequence[Any]]) -> list[Any]:
        if len(columns) == 1:
            return list(pool.map(fn, columns[0]))
        return list(pool.starmap(fn, list(zip(*columns, strict=True))))

    return run


def _open_joblib(way: str, workers: int, stack: ExitStack) -> Opened:
    import joblib
    from joblib import Parallel, delayed

    backend = JOBLIB_BACKEND[way]
    if backend == "sharedcompute":
        import sharedcompute.joblib  # noqa: F401  (registers the backend)

        _shared_runtime(workers, stack)
    elif backend == "loky":
        stack.callback(_stop_loky)
    elif backend == "ray":
        _ray(workers, stack)
        from ray.util.joblib import register_ray

        register_ray()

    def scope() -> AbstractContextManager[Any]:
        return joblib.parallel_config(backend=backend, n_jobs=workers)

    def run(fn: Callable[..., Any], columns: Sequence[Sequence[Any]]) -> list[Any]:
        with scope():
            return list(Parallel()(delayed(fn)(*args) for args in zip(*columns, strict=True)))

    return Opened(run, scope)


_started: dict[str, Any] = {}  # per child: the sharedcompute runtime and Ray, started once


def _shared_runtime(workers: int, stack: ExitStack) -> None:
    """One runtime for sc.map and joblib's backend, as a program that uses both has."""
    if "sharedcompute" not in _started:
        import sharedcompute as sc

        _started["sharedcompute"] = stack.enter_context(sc.Runtime(num_workers=workers))


def _ray(workers: int, stack: ExitStack) -> None:
    if "ray" in _started:
        return
    from tools.bench import _common

    # Ray's workers start from its raylet, not from here: they find this module by PYTHONPATH.
    os.environ.update({k: v for k, v in _common.child_env().items()
                       if k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")})
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    _started["ray"] = ray
    stack.callback(ray.shutdown)


def _stop_loky() -> None:
    """Stop the loky executor joblib keeps for reuse: joblib has no public call for it."""
    from joblib.externals.loky import reusable_executor

    executor = reusable_executor._executor
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


# -- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    fn_name: str
    args: tuple[Any, ...]


def steps(plan: Plan) -> list[Step]:
    fields = asdict(plan)
    local = [w for w in MAP_WAYS if w not in RAY_WAYS]
    return [
        *(Step(f"cold {b}", "measure_cold", (b, plan.workers)) for b in BACKENDS),
        Step("tiny calls", "measure_ways", (fields, ["tiny_calls_s"], local)),
        Step("big array", "measure_ways", (fields, ["big_array_calls_s"], local)),
        Step("sleep calls", "measure_ways", (fields, ["sleep_calls_s"],
                                             list(BY_KEY["sleep_calls_s"].ways))),
        Step("gridsearch", "measure_ways", (fields, ["gridsearch_s"],
                                            list(BY_KEY["gridsearch_s"].ways))),
        Step("ray", "measure_ways", (fields, ["tiny_calls_s", "big_array_calls_s"],
                                     list(RAY_WAYS))),
    ]


def run(plan: Plan) -> dict[str, Any]:
    # This file again, by its importable name: the children unpickle its functions from it.
    from tools.bench import _common, ecosystem

    _common.become_child_subreaper()
    ways: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    scores: dict[str, list[float]] = {}
    for step in steps(plan):
        _common.log(f"[{step.name}] measuring ...")
        try:
            value = _common.run_in_subprocess(
                getattr(ecosystem, step.fn_name), *step.args, timeout=CHILD_TIMEOUT
            )
        except (RuntimeError, TimeoutError) as error:
            errors[step.name] = str(error)
            continue
        finally:
            left = _common.end_descendants(grace=2.0, settle=1.0)
            if left:
                _common.log(f"[{step.name}] left behind (stopped): {', '.join(left)}")
        if step.fn_name == "measure_cold":
            backend = step.args[0]
            ways.setdefault(f"joblib_{backend}", {})["cold_first_call_s"] = value
            continue
        for way, best in value["best"].items():
            ways.setdefault(way, {}).update(best)
        for way, by_key in value["samples"].items():
            samples.setdefault(way, {}).update(by_key)
        errors.update({f"{step.name}: {k}": v for k, v in value["errors"].items()})
        skipped.update(value["skipped"])
        scores.update(value["gridsearch_scores"])
    return _report(plan, ways, samples, errors, skipped, scores)


def _report(plan: Plan, ways: dict[str, dict[str, float]],
            samples: dict[str, dict[str, list[float]]], errors: dict[str, str],
            skipped: dict[str, str], scores: dict[str, list[float]]) -> dict[str, Any]:
    results = {b: dict(ways.get(f"joblib_{b}", {})) for b in BACKENDS}
    report = {
        "quick": plan.quick,
        "plan": asdict(plan),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "results": results,
        "ratios": {
            key: results["sharedcompute"][key] / results[BASELINE][key]
            for key in BY_KEY
            if results[BASELINE].get(key) and key in results["sharedcompute"]
        },
        "samples": {b: samples.get(f"joblib_{b}", {}) for b in BACKENDS},
        "gridsearch_scores_identical": bool(scores)
        and scores.get("joblib_sharedcompute") == scores.get(LOKY),
        "ways": ways,
        "way_samples": samples,
        "ratios_vs_loky": _ratios(ways, LOKY, BY_KEY),
        "ratios_vs_mp_pool": _ratios(ways, MP_POOL, ("big_array_calls_s",)),
        "skipped": skipped,
        "errors": errors,
    }
    report["targets"] = [asdict(target) for target in evaluate_targets(report)]
    return report


def _ratios(ways: dict[str, dict[str, float]], baseline: str,
            keys: Any) -> dict[str, dict[str, float]]:
    """``{key: {way: its seconds / baseline's}}`` where both were measured."""
    base = ways.get(baseline, {})
    return {
        key: {way: by_key[key] / base[key] for way, by_key in ways.items() if key in by_key}
        for key in keys
        if base.get(key)
    }


@dataclass(frozen=True)
class Bar:
    """A target: ``way``'s time on ``key`` at most ``limit`` times ``baseline``'s
    (None: the ideal time, the sleeps spread evenly over the workers)."""

    name: str
    key: str
    way: str
    limit: float
    baseline: str | None


BARS = (
    Bar("tiny_sc_map_le_loky", "tiny_calls_s", "sc_map", 1.0, LOKY),
    Bar("tiny_executor_le_loky", "tiny_calls_s", "sc_executor", 1.0, LOKY),
    Bar("tiny_joblib_sc_le_1_2x_loky", "tiny_calls_s", "joblib_sharedcompute", 1.2, LOKY),
    Bar("big_joblib_sc_le_loky", "big_array_calls_s", "joblib_sharedcompute", 1.0, LOKY),
    Bar("big_sc_pool_le_quarter_mp_pool", "big_array_calls_s", "sc_pool", 0.25, MP_POOL),
    Bar("sleep_sc_map_le_1_3x_ideal", "sleep_calls_s", "sc_map", 1.3, None),
    Bar("sleep_executor_le_1_3x_ideal", "sleep_calls_s", "sc_executor", 1.3, None),
)


def evaluate_targets(report: dict[str, Any]) -> list[Target]:
    """Each bar of :data:`BARS` against the figures: PASS, FAIL, or SKIP where not measured."""
    from tools.bench import _common

    plan = Plan(**report["plan"])
    seconds = _common.format_seconds
    quick = " (quick sizes)" if plan.quick else ""
    targets: list[Target] = []
    for bar in BARS:
        title, theirs = _bar_title(bar, plan, report["ways"])
        ours = report["ways"].get(bar.way, {}).get(bar.key)
        if ours is None or not theirs:
            targets.append(_common.Target(bar.name, "SKIP", f"{title}: not measured"))
            continue
        status = "PASS" if ours <= bar.limit * theirs else "FAIL"
        if bar.baseline is None:
            figures = seconds(ours)
        else:
            figures = f"{format_ratio(ours / theirs)} ({seconds(ours)} vs {seconds(theirs)})"
        targets.append(_common.Target(bar.name, status, f"{title}: {figures}{quick}"))
    return targets


def _bar_title(bar: Bar, plan: Plan, ways: dict[str, dict[str, float]]) -> tuple[str, Any]:
    """The bar in words, and the seconds its limit multiplies (None: not measured)."""
    what = BY_KEY[bar.key].label.split(", best of")[0].format(**_names(plan))
    label = WAYS[bar.way].label
    if bar.baseline is None:
        ideal = math.ceil(plan.sleep_calls / plan.workers) * plan.sleep_s
        return f"{label}: {what} on {plan.workers} workers <= {bar.limit * ideal:.2f} s", ideal
    theirs = ways.get(bar.baseline, {}).get(bar.key)
    return f"{label} <= {bar.limit:g}x {WAYS[bar.baseline].label} on {what}", theirs


def format_ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (0.0024x, not 0.00x)."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _names(plan: Plan) -> dict[str, Any]:
    return {"big_mb": plan.big_array_bytes // MB, **asdict(plan)}


def table_rows(report: dict[str, Any]) -> Iterator[list[str]]:
    from tools.bench import _common

    plan = Plan(**report["plan"])
    names = _names(plan)

    def ratio(table: str, key: str, way: str) -> str:
        value = report[table].get(key, {}).get(way)
        return "—" if value is None else format_ratio(value)

    for workload in WORKLOADS:
        first = True
        for way in workload.ways:
            value = report["ways"].get(way, {}).get(workload.key)
            if value is None and way in report["skipped"]:
                seconds = "skipped"
            else:
                seconds = "—" if value is None else _common.format_seconds(value)
            label = WAYS[way].label
            if way in workload.slow and plan.slow_repeats < plan.repeats:
                label += f" (best of {plan.slow_repeats})"
            yield [
                workload.label.format(**names) if first else "",
                label,
                seconds,
                ratio("ratios_vs_loky", workload.key, way),
                ratio("ratios_vs_mp_pool", workload.key, way),
            ]
            first = False


def render_markdown(report: dict[str, Any]) -> str:
    from tools.bench import _common

    plan = Plan(**report["plan"])
    headers = ["workload", "way", "seconds", "/ joblib loky", "/ multiprocessing.Pool"]
    lines = [
        f"{plan.workers} workers each (n_jobs={plan.workers}); "
        f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}"
        + (" (--quick: small sizes, timings say little)" if plan.quick else ""),
        "",
        _common.markdown_table(headers, list(table_rows(report))),
        "",
        "GridSearchCV scores identical on both backends: "
        + ("yes" if report["gridsearch_scores_identical"] else "NO"),
    ]
    for way, reason in report["skipped"].items():
        lines.append(f"skipped {WAYS[way].label}: {reason}")
    lines += ["", "targets:"]
    lines += [f"  {t['status']:<4}  {t['text']}" for t in report["targets"]]
    for name, error in report["errors"].items():
        lines.append(f"FAILED {name}: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small counts and sizes")
    parser.add_argument("--repeats", type=int, default=None, help="best of this many")
    parser.add_argument("--workers", type=int, default=None, help="workers and n_jobs")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    changes = {"repeats": args.repeats, "workers": args.workers}
    plan = Plan(**{**asdict(plan), **{k: v for k, v in changes.items() if v is not None}})
    report = run(plan)
    print(json.dumps(report, indent=2) if args.json else render_markdown(report), flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
