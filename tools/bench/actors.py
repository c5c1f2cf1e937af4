"""Actor benchmark: sharedcompute actors against Ray actors and Dask distributed actors, in one run.

Usage::

    python tools/bench/actors.py [--quick] [--json] [--systems sharedcompute,ray,dask]
                                 [--workers 2]

Every system runs in a fresh interpreter of its own, so none inherits another's imports or warm
heap::

    actors.py ── python -c "import tools.bench.actors as a; a.child_main(SYSTEM, PLAN, OUT)"
        ▲             │ start the system (2 workers), warm it up with a task, then the workloads
        └─ OUT (JSON) ┘ rewritten after every workload, so a child killed on a timeout still
                        reports what it finished

This process is a child subreaper: what a system leaves behind (Ray's raylet and GCS, Dask's
nanny processes) is adopted, stopped after the system's turn, and reported.

What is measured, on one actor of class :class:`Echo` (each figure after a warm-up)::

    key                          what
    sequential_calls_per_s       N calls of a no-op method, waiting for each result
    pipelined_calls_per_s        M calls submitted at once, then all results (median of 3)
    create_first_call_s          Cls.remote() until the first call's result (median of R
                                 creations; each actor is killed and the system given a
                                 moment before the next)
    create_first_call_cold_s     the same, for the first actor the system ever made
    big_arg_put_s                a call taking a stored 100 MB array (put once, the handle
                                 passed) and returning its shape (median of calls)
    big_arg_put_first_s          the first such call
    big_arg_direct_s             the same call with the array itself as the argument
    big_put_s                    the put itself (sc.put / ray.put / client.scatter)

:class:`Echo` travels by value, as a script's own classes do, so a fresh actor process imports
nothing to find it: creation figures are the system's own cost.

``--quick`` shrinks the counts tenfold and the array to 10 MB; keys keep their names and the JSON
says ``"quick": true`` and gives the real sizes. Dask actor calls do not resolve futures given
as arguments, so Dask has no big_arg_put figures.

Targets (printed as PASS / FAIL / SKIP, never asserted): sequential >= 5x Ray's; pipelined >=
5x Ray's; creation + first call <= 0.1x Ray's; the 100 MB argument call (put once) <= 5 ms.

This module imports only the standard library at the top: Ray's and sharedcompute's workers
import it to find :class:`Echo` and must not pay for more.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ._common import SystemRun

ALL_SYSTEMS = ("sharedcompute", "ray", "dask")
BASELINE = "sharedcompute"
RESULT_TIMEOUT = 300.0  # seconds for any one result; a hang shows up as a TimeoutError
CHILD_CODE = "import sys; import tools.bench.actors as a; sys.exit(a.child_main(*sys.argv[1:]))"
MiB = 1024 * 1024


# -- the actor ----------------------------------------------------------------------------


class Echo:
    """The measured actor: a no-op method and one that returns an array's shape."""

    def __init__(self) -> None:
        self.calls = 0

    def ping(self) -> int:
        self.calls += 1
        return self.calls

    def shape(self, array: Any) -> tuple[int, ...]:
        return tuple(array.shape)


def noop() -> None:
    return None


# -- the systems --------------------------------------------------------------------------


class ActorSystem:
    """One actor system behind the calls the workloads use."""

    name: ClassVar[str]
    module: ClassVar[str]
    resolves_refs: ClassVar[bool] = True  # a stored value's handle may be a call's argument

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run one task, so the workers are up before anything is timed."""
        raise NotImplementedError

    def pickle_by_value(self, module: Any) -> None:
        """Send ``module``'s classes and functions by value, as a script's own would travel.

        A fresh actor process then loads nothing to find :class:`Echo`: creation figures are
        the system's, not the cost of importing this module.
        """
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)

    def create(self) -> Any:
        raise NotImplementedError

    def ping(self, actor: Any) -> Any:
        raise NotImplementedError

    def shape(self, actor: Any, array: Any) -> Any:
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        raise NotImplementedError

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return [self.result(handle) for handle in handles]

    def put(self, value: Any) -> Any:
        raise NotImplementedError

    def kill(self, actor: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def version(self) -> str:
        return str(getattr(sys.modules[self.module], "__version__", "?"))


class RayStyleSystem(ActorSystem):
    """A system used the Ray way: ``remote(Cls).remote()`` makes an actor,
    ``actor.method.remote()`` calls it, and its module has ``put``, ``kill`` and ``shutdown``.

    ``start`` sets ``_api`` (the module) and ``_echo`` (:class:`Echo` made remote).
    """

    _api: Any
    _echo: Any

    def create(self) -> Any:
        return self._echo.remote()

    def ping(self, actor: Any) -> Any:
        return actor.ping.remote()

    def shape(self, actor: Any, array: Any) -> Any:
        return actor.shape.remote(array)

    def put(self, value: Any) -> Any:
        return self._api.put(value)

    def kill(self, actor: Any) -> None:
        self._api.kill(actor)

    def close(self) -> None:
        self._api.shutdown()


class SharedCompute(RayStyleSystem):
    name = "sharedcompute"
    module = "sharedcompute"

    def start(self, workers: int) -> None:
        import sharedcompute

        self._api = sharedcompute
        self._echo = sharedcompute.remote(Echo)
        sharedcompute.init(num_workers=workers)

    def warm_up(self) -> None:
        self._api.submit(noop).result(timeout=RESULT_TIMEOUT)

    def result(self, handle: Any) -> Any:
        return handle.result(timeout=RESULT_TIMEOUT)

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return self._api.gather(handles, timeout=RESULT_TIMEOUT)


class Ray(RayStyleSystem):
    name = "ray"
    module = "ray"

    def start(self, workers: int) -> None:
        import logging

        import ray

        self._api = ray
        self._echo = ray.remote(Echo)
        self._noop = ray.remote(noop)
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )

    def warm_up(self) -> None:
        self._api.get(self._noop.remote(), timeout=RESULT_TIMEOUT)

    def pickle_by_value(self, module: Any) -> None:
        self._api.cloudpickle.register_pickle_by_value(module)

    def result(self, handle: Any) -> Any:
        return self._api.get(handle, timeout=RESULT_TIMEOUT)

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return list(self._api.get(list(handles), timeout=RESULT_TIMEOUT))


class Dask(ActorSystem):
    """Dask distributed actors on ``LocalCluster(processes=True, n_workers, 1 thread each)``."""

    name = "dask"
    module = "distributed"
    resolves_refs = False

    def start(self, workers: int) -> None:
        self._cluster, self._client = _common().start_dask_cluster(workers)

    def warm_up(self) -> None:
        self._client.submit(noop, pure=False).result(timeout=RESULT_TIMEOUT)

    def create(self) -> Any:
        return self._client.submit(Echo, actor=True, pure=False).result(timeout=RESULT_TIMEOUT)

    def ping(self, actor: Any) -> Any:
        return actor.ping()

    def shape(self, actor: Any, array: Any) -> Any:
        return actor.shape(array)

    def result(self, handle: Any) -> Any:
        return handle.result(timeout=RESULT_TIMEOUT)

    def put(self, value: Any) -> Any:
        return self._client.scatter(value, hash=False)

    def kill(self, actor: Any) -> None:
        del actor  # a Dask actor ends when its future is released

    def close(self) -> None:
        self._client.close()
        self._cluster.close()


SYSTEMS: dict[str, type[ActorSystem]] = {cls.name: cls for cls in (SharedCompute, Ray, Dask)}


# -- what one run does ----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run; it travels to each child as JSON."""

    quick: bool
    workers: int
    warmup_calls: int
    sequential_calls: int
    pipelined_calls: int
    pipelined_repeats: int
    creations: int
    big_bytes: int
    big_calls: int
    settle_s: float  # between actor creations: a killed actor's process goes, a pool refills
    child_timeout_s: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


FULL = Plan(
    quick=False,
    workers=2,
    warmup_calls=200,
    sequential_calls=2000,
    pipelined_calls=5000,
    pipelined_repeats=3,
    creations=5,
    big_bytes=100 * MiB,
    big_calls=7,
    settle_s=1.0,
    child_timeout_s=600.0,
)
QUICK = Plan(
    quick=True,
    workers=2,
    warmup_calls=20,
    sequential_calls=200,
    pipelined_calls=500,
    pipelined_repeats=3,
    creations=3,
    big_bytes=10 * MiB,
    big_calls=3,
    settle_s=0.3,
    child_timeout_s=120.0,
)


def child_main(system_name: str, plan_json: str, out_path: str) -> int:
    """Entry point of a child interpreter: measure one system, write JSON to ``out_path``."""
    plan = Plan.from_json(plan_json)
    system = SYSTEMS[system_name]()
    results: dict[str, Any] = {"errors": {}}
    system.start(plan.workers)
    system.pickle_by_value(sys.modules[__name__])
    results["version"] = system.version()
    workloads: list[tuple[str, Callable[[ActorSystem, Plan], dict[str, Any]]]] = [
        ("create", _create),
        ("calls", _calls),
        ("big_arg", _big_arg),
    ]
    _common().run_workloads(system, plan, workloads, results, out_path, warm_up=system.warm_up)
    return 0


def _create(system: ActorSystem, plan: Plan) -> dict[str, Any]:
    """Cls.remote() until the first call's result; the first creation is reported apart."""
    samples = []
    for _ in range(plan.creations + 1):
        start = time.perf_counter()
        actor = system.create()
        if system.result(system.ping(actor)) != 1:
            raise AssertionError("a fresh actor's first ping did not return 1")
        samples.append(time.perf_counter() - start)
        system.kill(actor)
        del actor
        gc.collect()
        time.sleep(plan.settle_s)
    return {
        "create_first_call_cold_s": samples[0],
        "create_first_call_s": statistics.median(samples[1:]),
        "create_first_call_samples_s": samples[1:],
    }


def _calls(system: ActorSystem, plan: Plan) -> dict[str, Any]:
    actor = system.create()
    for _ in range(plan.warmup_calls):
        system.result(system.ping(actor))
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(plan.sequential_calls):
            system.result(system.ping(actor))
        sequential = time.perf_counter() - start
        rates = []
        in_order = True
        for _ in range(plan.pipelined_repeats):
            start = time.perf_counter()
            handles = [system.ping(actor) for _ in range(plan.pipelined_calls)]
            values = system.gather(handles)
            rates.append(plan.pipelined_calls / (time.perf_counter() - start))
            in_order = in_order and values == list(range(values[0], values[0] + len(values)))
            del handles
    finally:
        gc.enable()
    system.kill(actor)
    return {
        "sequential_calls_per_s": plan.sequential_calls / sequential,
        "pipelined_calls_per_s": statistics.median(rates),
        "pipelined_samples_calls_per_s": rates,
        "pipelined_in_submission_order": in_order,
    }


def _big_arg(system: ActorSystem, plan: Plan) -> dict[str, Any]:
    import numpy as np

    array = np.full(plan.big_bytes // 8, 1.0)  # every page touched: the user's data, built
    expected = tuple(array.shape)
    actor = system.create()
    system.result(system.ping(actor))
    results: dict[str, Any] = {"big_arg_bytes": array.nbytes}

    def timed_call(argument: Any) -> float:
        start = time.perf_counter()
        shape = system.result(system.shape(actor, argument))
        elapsed = time.perf_counter() - start
        if tuple(shape) != expected:
            raise AssertionError(f"the actor saw shape {shape}, expected {expected}")
        return elapsed

    direct = []
    for _ in range(plan.big_calls):
        direct.append(timed_call(array))
        gc.collect()
    results["big_arg_direct_s"] = statistics.median(direct)
    results["big_arg_direct_first_s"] = direct[0]
    if system.resolves_refs:
        start = time.perf_counter()
        stored = system.put(array)
        results["big_put_s"] = time.perf_counter() - start
        by_ref = [timed_call(stored) for _ in range(plan.big_calls)]
        results["big_arg_put_first_s"] = by_ref[0]
        results["big_arg_put_s"] = statistics.median(by_ref)
        del stored
    system.kill(actor)
    return results


# -- running the children --------------------------------------------------------------------


def _common() -> Any:
    if __package__:
        from . import _common as common
    else:
        import _common as common  # type: ignore[no-redef]
    return common


def measure_system(name: str, plan: Plan) -> SystemRun:
    common = _common()
    with common.system_run(name) as run:
        common.log(f"[{name}] starting")
        with tempfile.TemporaryDirectory(prefix="sharedcompute-bench-actors-") as folder:
            out_path = os.path.join(folder, "out.json")
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE, name, plan.to_json(), out_path],
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr,  # stdout is the report's (--json)
                env=common.child_env(),
                cwd=common.REPO_ROOT,
            )
            try:
                code = child.wait(timeout=plan.child_timeout_s)
                if code != 0:
                    run.errors["child"] = f"exited with code {code} (its traceback is on stderr)"
            except subprocess.TimeoutExpired:
                run.errors["child"] = f"ran past {plan.child_timeout_s:.0f} s and was killed"
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait(timeout=10)
            if os.path.exists(out_path):
                with open(out_path) as written:
                    run.figures = json.load(written)
        run.errors.update(run.figures.pop("errors", {}))
        run.stop_leftovers()
    return run


def available(name: str) -> bool:
    return importlib.util.find_spec(SYSTEMS[name].module) is not None


# -- comparing and reporting ----------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "rate" (higher is better) or "s"


def metrics(plan: Plan) -> list[Metric]:
    size = f"{plan.big_bytes // MiB} MiB"
    return [
        Metric(
            "sequential_calls_per_s",
            f"sequential: {plan.sequential_calls} calls, result each",
            "rate",
        ),
        Metric(
            "pipelined_calls_per_s", f"pipelined: {plan.pipelined_calls} calls, then gather", "rate"
        ),
        Metric("create_first_call_s", "actor creation + first call (median)", "s"),
        Metric("create_first_call_cold_s", "the same, first actor of the run", "s"),
        Metric("big_arg_put_s", f"{size} argument, put once, handle passed (median)", "s"),
        Metric("big_arg_put_first_s", f"{size} argument, put once: first call", "s"),
        Metric("big_put_s", f"{size}: the put itself", "s"),
        Metric("big_arg_direct_s", f"{size} argument passed directly (median)", "s"),
        Metric("shutdown_s", "shutdown", "s"),
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_targets(runs: dict[str, SystemRun], plan: Plan) -> dict[str, dict[str, Any]]:
    ours = runs[BASELINE].figures if BASELINE in runs else {}
    ray = runs["ray"].figures if "ray" in runs else {}
    quick = " (quick sizes and counts)" if plan.quick else ""
    size = f"{plan.big_bytes // MiB} MiB"
    checks: list[tuple[str, list[Any], Callable[..., bool], str]] = [
        (
            "sequential_ge_5x_ray",
            [ours.get("sequential_calls_per_s"), ray.get("sequential_calls_per_s")],
            lambda a, b: a >= 5 * b,
            "sequential calls >= 5x Ray's: {0:,.0f} vs {1:,.0f} calls/s",
        ),
        (
            "pipelined_ge_5x_ray",
            [ours.get("pipelined_calls_per_s"), ray.get("pipelined_calls_per_s")],
            lambda a, b: a >= 5 * b,
            "pipelined calls >= 5x Ray's: {0:,.0f} vs {1:,.0f} calls/s",
        ),
        (
            "create_le_0_1x_ray",
            [ours.get("create_first_call_s"), ray.get("create_first_call_s")],
            lambda a, b: a <= 0.1 * b,
            "actor creation + first call <= 0.1x Ray's: {0:.4f} s vs {1:.4f} s",
        ),
        (
            "big_arg_le_5ms",
            [ours.get("big_arg_put_s")],
            lambda a: a <= 0.005,
            f"call with a {size} argument (put once, handle passed) <= 5 ms: {{0:.5f}} s",
        ),
    ]
    targets = {}
    for name, figures, test, text in checks:
        if all(_is_number(f) for f in figures):
            status = "PASS" if test(*figures) else "FAIL"
            message = text.format(*figures)
        else:
            status, message = "SKIP", text.split(": {")[0] + ": not measured"
        targets[name] = {"status": status, "text": message + quick}
    return targets


def ratio(metric: Metric, ours: Any, theirs: Any) -> float | None:
    """sharedcompute's figure over the peer's (rates: > 1 is faster; times: < 1 is faster)."""
    if not _is_number(ours) or not _is_number(theirs) or theirs <= 0:
        return None
    return float(ours) / float(theirs)


def format_value(metric: Metric, value: Any) -> str:
    if not _is_number(value):
        return "—"
    if metric.unit == "rate":
        return f"{value:,.0f}/s"
    return _common().format_seconds(value)


def render_markdown(report: dict[str, Any]) -> str:
    plan = Plan(**report["plan"])
    systems: dict[str, dict[str, Any]] = report["systems"]
    names = list(systems)
    peers = [name for name in names if name != BASELINE]
    headers = ["metric", *names, *(f"sc / {peer}" for peer in peers if BASELINE in systems)]
    rows = []
    for metric in metrics(plan):
        row = [metric.label, *(format_value(metric, systems[n].get(metric.key)) for n in names)]
        if BASELINE in systems:
            for peer in peers:
                value = ratio(
                    metric, systems[BASELINE].get(metric.key), systems[peer].get(metric.key)
                )
                row.append("—" if value is None else f"{value:.3g}x")
            rows.append(row)
        else:
            rows.append(row)
    machine = report["machine"]
    versions = ", ".join(f"{n} {systems[n].get('version', '?')}" for n in names)
    lines = []
    if plan.quick:
        lines += ["**--quick: small counts and a 10 MiB array; labels give the real sizes.**", ""]
    lines += [
        f"{plan.workers} workers; Python {machine['python']}, {machine['cpus']} CPUs; {versions}.",
        "",
        _common().markdown_table(headers, rows),
        "",
        "sc / peer: sharedcompute's figure over the peer's (calls/s: > 1 means sharedcompute is "
        "faster; seconds: < 1 means sharedcompute is faster). Dask actor calls do not resolve "
        "futures given as arguments, so Dask has no put-once figures.",
        "",
        "Targets:",
        "",
    ]
    lines += [f"- {t['status']}: {t['text']}" for t in report["targets"].values()]
    problems = []
    for name in names:
        figures = systems[name]
        for where, error in figures.get("errors", {}).items():
            problems.append(f"- {name} {where}: {error.strip().splitlines()[-1]}")
        if figures.get("leftover_processes"):
            problems.append(
                f"- {name} left processes running (stopped by the benchmark): "
                f"{', '.join(figures['leftover_processes'])}"
            )
        if figures.get("shm_entries_left"):
            problems.append(
                f"- {name} left /dev/shm entries: {', '.join(figures['shm_entries_left'])}"
            )
    for name in report.get("not_installed", []):
        problems.append(f"- {name}: not installed, skipped")
    loads = ", ".join(
        "{} {:.1f}-{:.1f}".format(name, *systems[name]["load_average_1min"])
        for name in names
        if "load_average_1min" in systems[name]
    )
    lines += [
        "",
        f"1-minute load average before-after each system ({machine['cpus']} CPUs): "
        f"{loads}; figures from a loaded machine are noisier.",
    ]
    if problems:
        lines += ["", "Problems:", "", *problems]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts and sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated, from {','.join(ALL_SYSTEMS)}",
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")
    plan = QUICK if args.quick else FULL
    if args.workers != plan.workers:
        plan = replace(plan, workers=args.workers)
    common = _common()
    common.become_child_subreaper()
    runs: dict[str, SystemRun] = {}
    missing = []
    for name in names:
        if not available(name):
            common.log(f"[{name}] not installed: skipped")
            missing.append(name)
            continue
        runs[name] = measure_system(name, plan)
    report = {
        "quick": plan.quick,
        "plan": asdict(plan),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "systems": {
            name: {
                **run.figures,
                "errors": run.errors,
                "leftover_processes": run.leftover_processes,
                "shm_entries_left": run.shm_entries_left,
            }
            for name, run in runs.items()
        },
        "targets": evaluate_targets(runs, plan),
        "not_installed": missing,
    }
    left = common.end_descendants(grace=2.0)
    if left:
        report["leftover_at_exit"] = left
    print(json.dumps(report, indent=2) if args.json else render_markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
