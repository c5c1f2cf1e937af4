"""Ecosystem benchmark: joblib's ``Parallel`` and scikit-learn on sharedcompute against loky.

Usage::

    python tools/bench/ecosystem.py [--json] [--quick] [--repeats 3] [--workers 2]

Measurements run in fresh interpreters (``_common.run_in_subprocess``), never in this one::

    ecosystem.py ── measure_cold("sharedcompute"), measure_cold("loky") ──> first-call seconds
                 ── measure_warm(plan) ──────────────────────────────────> best of R, both
        (a child subreaper: loky's workers and resource trackers are stopped after each)

``measure_warm`` starts ``sc.Runtime(num_workers=W)`` and warms both backends up, then times
each workload R times per backend, the two taking turns (who goes first alternates), so load
that comes and goes on the machine falls on both alike. Every call runs under
``joblib.parallel_config(backend=..., n_jobs=W)``::

    key                  what is timed                                            repetitions
    cold_first_call_s    the first Parallel of 10 no-op calls in a fresh           1
                         interpreter: the pool's (or runtime's) start-up included
    tiny_calls_s         Parallel()(delayed(f)(i) for i in range(2000)), f a no-op,  best of R
                         joblib's auto-batching on
    big_array_calls_s    200 calls f(x, i) over one 200 MB float64 array x: each  best of R
                         Parallel call stores it once (sharedcompute: one put into
                         the shared-memory store; loky: one memmap dump to /dev/shm)
    gridsearch_s         GridSearchCV(SVC(), 4 candidates, cv=5) on scikit-learn's best of R
                         digits (20 fits)

Each workload runs once untimed first (workers import the functions, scikit-learn).
Results are checked against the plain loop, and both backends' GridSearchCV scores against each
other. ``--quick`` shrinks the counts and the array (200 calls, 20 MB) so a test runs in
seconds; keys keep their names and the JSON says ``"quick": true``. Ratios are sharedcompute's
time over loky's (below 1: sharedcompute is faster).

This module imports only the standard library at the top: both backends' workers import it to
find the called functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

BACKENDS = ("sharedcompute", "loky")
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


FULL = Plan(quick=False, workers=2, repeats=3, tiny_calls=2000, big_array_bytes=200 * MB,
            big_array_calls=200)
QUICK = Plan(quick=True, workers=2, repeats=2, tiny_calls=200, big_array_bytes=20 * MB,
             big_array_calls=50)

ROWS = (
    ("cold_first_call_s", "first Parallel (10 calls), pool start-up included"),
    ("tiny_calls_s", "{tiny_calls:,} tiny calls, best of {repeats}"),
    ("big_array_calls_s", "{big_array_calls} calls over one {big_mb} MB array, best of {repeats}"),
    ("gridsearch_s", "GridSearchCV, digits, 20 fits, best of {repeats}"),
)


# -- what the workers call --------------------------------------------------------------


def noop(i: int) -> int:
    return i


def element(x: Any, i: int) -> float:
    return float(x[i])


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


def measure_warm(plan_fields: dict[str, Any]) -> dict[str, Any]:
    """The warm workloads on both backends, in one interpreter, taking turns."""
    import time

    import joblib
    import numpy as np
    from joblib import Parallel, delayed
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    import sharedcompute as sc
    import sharedcompute.joblib  # registers the backend
    from tools.bench import _common

    plan = Plan(**plan_fields)
    x = np.arange(plan.big_array_bytes // 8, dtype=np.float64)
    step = len(x) // plan.big_array_calls
    X, y = load_digits(return_X_y=True)
    grid = {"C": [1.0, 10.0], "gamma": [0.0005, 0.001]}

    def tiny() -> Any:
        return Parallel()(delayed(noop)(i) for i in range(plan.tiny_calls))

    def big() -> Any:
        return Parallel()(delayed(element)(x, i * step) for i in range(plan.big_array_calls))

    def search() -> Any:
        return GridSearchCV(SVC(), grid, cv=5).fit(X, y).cv_results_["mean_test_score"]

    workloads = {"tiny_calls_s": tiny, "big_array_calls_s": big, "gridsearch_s": search}
    expected = {
        "tiny_calls_s": list(range(plan.tiny_calls)),
        "big_array_calls_s": [float(i * step) for i in range(plan.big_array_calls)],
    }
    samples: dict[str, dict[str, list[float]]] = {b: {k: [] for k in workloads} for b in BACKENDS}
    scores: dict[str, list[float]] = {}
    with sc.Runtime(num_workers=plan.workers):
        for key, workload in workloads.items():
            for backend in BACKENDS:  # warm-up: workers import the functions, scikit-learn
                with joblib.parallel_config(backend=backend, n_jobs=plan.workers):
                    result = workload()
                if key in expected:
                    assert result == expected[key], (backend, key)
                else:
                    scores[backend] = [float(s) for s in result]
            for turn in range(plan.repeats):
                # Turns, the first backend alternating: load that comes and goes on the
                # machine falls on both alike.
                order = BACKENDS if turn % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    with (
                        joblib.parallel_config(backend=backend, n_jobs=plan.workers),
                        _common.gc_paused(),
                    ):
                        start = time.perf_counter()
                        workload()
                        samples[backend][key].append(time.perf_counter() - start)
    return {
        "best": {b: {k: min(v) for k, v in by_key.items()} for b, by_key in samples.items()},
        "samples": samples,
        "gridsearch_scores": scores,
    }


# -- the report ---------------------------------------------------------------------------


def run(plan: Plan) -> dict[str, Any]:
    # This file again, by its importable name: the children unpickle its functions from it.
    from tools.bench import _common, ecosystem

    _common.become_child_subreaper()
    results: dict[str, dict[str, float]] = {backend: {} for backend in BACKENDS}
    errors: dict[str, str] = {}
    warm: dict[str, Any] = {}
    steps: list[tuple[str, Any, tuple[Any, ...]]] = [
        *((f"cold {b}", ecosystem.measure_cold, (b, plan.workers)) for b in BACKENDS),
        ("warm workloads", ecosystem.measure_warm, (asdict(plan),)),
    ]
    for name, fn, args in steps:
        _common.log(f"[{name}] measuring ...")
        try:
            value = _common.run_in_subprocess(fn, *args, timeout=CHILD_TIMEOUT)
        except (RuntimeError, TimeoutError) as error:
            errors[name] = str(error)
            continue
        finally:
            left = _common.end_descendants(grace=2.0, settle=1.0)
            if left:
                _common.log(f"[{name}] left behind (stopped): {', '.join(left)}")
        if name.startswith("cold "):
            results[name.removeprefix("cold ")]["cold_first_call_s"] = value
        else:
            warm = value
            for backend, best in value["best"].items():
                results[backend].update(best)
    ratios = {
        key: results["sharedcompute"][key] / results[BASELINE][key]
        for key, _ in ROWS
        if results[BASELINE].get(key) and key in results["sharedcompute"]
    }
    scores = warm.get("gridsearch_scores", {})
    return {
        "quick": plan.quick,
        "plan": asdict(plan),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "results": results,
        "ratios": ratios,
        "samples": warm.get("samples", {}),
        "gridsearch_scores_identical": bool(scores)
        and scores.get("sharedcompute") == scores.get(BASELINE),
        "errors": errors,
    }


def render_markdown(report: dict[str, Any]) -> str:
    from tools.bench import _common

    plan = Plan(**report["plan"])
    names = {"big_mb": plan.big_array_bytes // MB, **asdict(plan)}
    rows = []
    for key, label in ROWS:
        cells = [label.format(**names)]
        for backend in BACKENDS:
            value = report["results"].get(backend, {}).get(key)
            cells.append("—" if value is None else _common.format_seconds(value))
        ratio = report["ratios"].get(key)
        cells.append("—" if ratio is None else f"{ratio:.2f}x")
        rows.append(cells)
    lines = [
        f"joblib backends, {plan.workers} workers (n_jobs={plan.workers}); "
        f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}"
        + (" (--quick)" if plan.quick else ""),
        "",
        _common.markdown_table(["workload", *BACKENDS, "sharedcompute / loky"], rows),
        "",
        "GridSearchCV scores identical on both backends: "
        + ("yes" if report["gridsearch_scores_identical"] else "NO"),
    ]
    for backend, error in report["errors"].items():
        lines.append(f"FAILED {backend}: {error}")
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
