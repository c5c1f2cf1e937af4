"""Runtime benchmark: sharedcompute against ProcessPoolExecutor, loky, Dask and Ray, in one run.

Usage::

    python tools/bench/runtime.py [--quick] [--json] [--systems sharedcompute,ppe,...]
                                  [--workers 2]
    python tools/bench/runtime.py --from-json saved.json     # Markdown of a saved --json run

Every system runs in fresh interpreters of its own (two per system: one for start-up and idle
figures, loading nothing before the import it times; one for the workloads), so imports,
memory and start-up are measured cleanly and no system inherits another's warm heap. This
process adopts what the systems leave behind (it is a child subreaper) and stops it after each
system; what it had to stop is reported. Import times come from further fresh interpreters.

What is measured (``_systems.py`` holds the workloads)::

    key                                     what
    import_s / first_use_s                  `import X` in a fresh interpreter (median of runs);
                                            the same plus first use of its API (sharedcompute
                                            loads its runtime lazily)
    import_wall_minus_empty_s               wall time of `python -c "import X"` minus `-c pass`
    startup_s                               init (2 workers) until the first noop result
    idle_pss_bytes / idle_cpu_s             PSS of the driver and all its descendants after
                                            start-up and 1 s idle; CPU seconds they use in 2 s
    latency_median_s / latency_p99_s        submit(noop).result(), one at a time, after warm-up
    throughput_tasks_per_s                  N noop submits, then gather (median of 3)
    chain_tasks_per_s                       N tasks, each taking the previous future (median of 3)
    big_arg_<size>_put_first_s              put + the first task returning arr.sum()
    big_arg_<size>_second_s                 a second task on the same stored value
    big_arg_<size>_steady_put_first_s       after the first handle is dropped: put a second
                                            array of the same size + a task on it
    big_arg_<size>_driver_sum_s             arr.sum() in the driver, for reference
    big_arg_<size>_[steady_]peak_extra_pss_bytes   peak PSS of the whole tree above the
                                            baseline taken before the first put [*]
    big_result_<size>_s                     a task returning np.ones(size) until the driver has it
    big_result_<size>_peak_extra_pss_bytes  the same for big-result [*]
    arrow_put_s / arrow_task_s              a ~200 MB pyarrow.Table: put once; task -> num_rows

[*] Memory comes from a second pass of the same sequences, each on a freshly restarted system,
sampled every 20 ms by a separate process: reading PSS walks every page table of the tree, which
on a small machine slows the copies being timed, and a restart keeps memory that earlier work
left (a store's warm pages, a heap not yet given back) out of the baseline.

Sizes: ``100mib`` and ``1gib`` float64 arrays; ``--quick`` shrinks them to 1 MiB and 10 MiB,
the Arrow table to ~4 MB and the counts tenfold, and runs sharedcompute and ppe only by default;
keys keep the full-run names and the JSON says ``"quick": true`` and gives the real ``sizes``.

Targets of the issue (printed as PASS / FAIL / SKIP lines, never asserted): latency median <=
0.5x PPE; throughput >= 2x PPE; chain >= 2x PPE; 1 GiB big-arg steady-state put + round trip >=
20x faster than PPE by value (the median of PPE's by-value round trips of that size), with peak
extra memory <= 1.2x the array; the second task on the
stored array <= 1.3x arr.sum() in the driver; 1 GiB big-result no slower than Ray; the Arrow
task <= 10 ms; start-up <= 0.5 s; import <= 0.2 s; idle with 2 workers <= 120 MB PSS and no
measurable CPU (<= 20 ms in 2 s, two clock ticks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

if __package__:
    from . import _common, _systems
else:  # run as a script: this folder is sys.path[0]
    import _common  # type: ignore[no-redef]
    import _systems  # type: ignore[no-redef]

MiB = _common.MiB
GiB = _common.GiB
ALL_SYSTEMS = ("sharedcompute", "ppe", "loky", "dask", "ray")
QUICK_SYSTEMS = ("sharedcompute", "ppe")
BASELINE = "sharedcompute"
CHILD_CODE = "import sys; import tools.bench._systems as s; sys.exit(s.child_main(*sys.argv[1:]))"
IMPORT_CODE = """
import json, sys, time
start = time.perf_counter()
__import__(sys.argv[1])
imported = time.perf_counter()
module = sys.modules[sys.argv[1]]
getattr(module, sys.argv[2])
used = time.perf_counter()
top = sys.modules[sys.argv[1].partition(".")[0]]
print(json.dumps({"import_s": imported - start, "first_use_s": used - start,
                  "version": getattr(top, "__version__", None),
                  "location": getattr(top, "__file__", None)}))
"""

FULL = _systems.Plan(
    quick=False,
    workers=2,
    latency_warmup=200,
    latency_iterations=2000,
    throughput_tasks=5000,
    throughput_repeats=3,
    chain_length=1000,
    chain_repeats=3,
    big_bytes={"100mib": 100 * MiB, "1gib": GiB},
    big_result_repeats={"100mib": 5, "1gib": 3},
    arrow_rows=4_650_000,  # ~200 MB: 4 x 8 B numbers + ~7 B string + 4 B offset a row
    arrow_repeats=7,
    child_timeout_s=600.0,
)
QUICK = _systems.Plan(
    quick=True,
    workers=2,
    latency_warmup=20,
    latency_iterations=200,
    throughput_tasks=500,
    throughput_repeats=3,
    chain_length=100,
    chain_repeats=3,
    big_bytes={"100mib": MiB, "1gib": 10 * MiB},
    big_result_repeats={"100mib": 2, "1gib": 2},
    arrow_rows=100_000,
    arrow_repeats=5,
    child_timeout_s=120.0,
)
IMPORT_REPEATS = {False: 5, True: 3}


# -- running the children ----------------------------------------------------------------


def run_child(kind: str, system: str, plan: _systems.Plan) -> tuple[dict[str, Any], str | None]:
    """Run one measuring child; return what it wrote and an error (None when it exited 0)."""
    with tempfile.TemporaryDirectory(prefix="sharedcompute-bench-") as folder:
        out_path = os.path.join(folder, "out.json")
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, kind, system, plan.to_json(), out_path],
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,  # keep stdout for the report (--json)
            env=_common.child_env(),
            cwd=_common.REPO_ROOT,
        )
        error = None
        try:
            code = child.wait(timeout=plan.child_timeout_s)
            if code != 0:
                error = f"the {kind} child exited with code {code} (its traceback is on stderr)"
        except subprocess.TimeoutExpired:
            error = f"the {kind} child ran past {plan.child_timeout_s:.0f} s and was killed"
            _common.end_descendants(grace=2.0)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        figures: dict[str, Any] = {}
        if os.path.exists(out_path):
            with open(out_path) as written:
                figures = json.load(written)
    return figures, error


def measure_import(system: str, repeats: int) -> dict[str, Any]:
    """`import X` timed inside fresh interpreters, and their wall time against an empty one."""
    cls = _systems.SYSTEMS[system]
    env = _common.child_env()
    inside: list[dict[str, Any]] = []
    walls: list[float] = []
    empties: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
        empties.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", f"import {cls.module}"], env=env, check=True, timeout=120
        )
        walls.append(time.perf_counter() - start)
        proc = subprocess.run(
            [sys.executable, "-c", IMPORT_CODE, cls.module, cls.first_use],
            env=env,
            check=True,
            timeout=120,
            capture_output=True,
            text=True,
        )
        inside.append(json.loads(proc.stdout))
    return {
        "import_s": statistics.median(run["import_s"] for run in inside),
        "first_use_s": statistics.median(run["first_use_s"] for run in inside),
        "import_wall_minus_empty_s": statistics.median(walls) - statistics.median(empties),
        "empty_interpreter_s": statistics.median(empties),
        "imported_from": inside[0]["location"],
        "version": inside[0]["version"] or f"(stdlib of Python {platform.python_version()})",
    }


def measure_system(system: str, plan: _systems.Plan) -> _common.SystemRun:
    steps: list[tuple[str, Callable[[], tuple[dict[str, Any], str | None]]]] = [
        ("import", lambda: (measure_import(system, IMPORT_REPEATS[plan.quick]), None)),
        ("startup", lambda: run_child("startup", system, plan)),
        ("workloads", lambda: run_child("workloads", system, plan)),
    ]
    with _common.system_run(system) as run:
        for step, measure in steps:
            _common.log(f"[{system}] {step}")
            try:
                figures, error = measure()
            except Exception as exc:  # a broken import: report it, go on with the others
                figures, error = {}, f"{type(exc).__name__}: {exc}"
            run.errors.update({f"{step}/{k}": v for k, v in figures.pop("errors", {}).items()})
            if error is not None:
                run.errors[step] = error
            run.figures.update(figures)
            run.stop_leftovers(step)
    return run


# -- comparing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "s", "rate", "bytes", "count"

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "rate"


def metrics(plan: _systems.Plan) -> list[Metric]:
    def size(label: str) -> str:
        return _common.format_bytes(plan.big_bytes[label])

    rows = [
        Metric("import_s", "import (fresh interpreter)", "s"),
        Metric("first_use_s", "import + first use of the API", "s"),
        Metric("startup_s", f"startup: init ({plan.workers} workers) to first result", "s"),
        Metric("idle_pss_bytes", "idle PSS, driver + all descendants", "bytes"),
        Metric("idle_processes", "idle processes", "count"),
        Metric("idle_cpu_s", f"idle CPU in {plan.idle_cpu_window_s:g} s", "s"),
        Metric("latency_median_s", "latency median", "s"),
        Metric("latency_p99_s", "latency p99", "s"),
        Metric("throughput_tasks_per_s", f"throughput, {plan.throughput_tasks} noops", "rate"),
        Metric("chain_tasks_per_s", f"chain of {plan.chain_length} (tasks/s) [1]", "rate"),
    ]
    big_arg = [
        ("put_first_s", "put + 1st task [2]", "s"),
        ("second_s", "2nd task", "s"),
        ("steady_put_first_s", "steady put + task [3]", "s"),
        ("driver_sum_s", "arr.sum() in the driver", "s"),
        ("peak_extra_pss_bytes", "peak extra PSS", "bytes"),
        ("steady_peak_extra_pss_bytes", "steady peak extra PSS [3]", "bytes"),
    ]
    for label in plan.big_bytes:
        rows += [
            Metric(f"big_arg_{label}_{key}", f"big-arg {size(label)}: {text}", unit)
            for key, text, unit in big_arg
        ]
    for label in plan.big_bytes:
        rows += [
            Metric(f"big_result_{label}_s", f"big-result {size(label)}", "s"),
            Metric(
                f"big_result_{label}_peak_extra_pss_bytes",
                f"big-result {size(label)}: peak extra PSS",
                "bytes",
            ),
        ]
    table = "Arrow table"
    rows += [
        Metric("arrow_put_s", f"{table}: put", "s"),
        Metric("arrow_first_task_s", f"{table}: first task", "s"),
        Metric("arrow_task_s", f"{table}: task (median)", "s"),
        Metric("shutdown_s", "shutdown", "s"),
    ]
    return rows


def advantage(metric: Metric, ours: Any, theirs: Any) -> float | None:
    """How many times better sharedcompute is (> 1: faster, smaller); None where undefined."""
    if not _is_number(ours) or not _is_number(theirs) or metric.unit == "count":
        return None
    if metric.higher_is_better:
        return float(ours) / float(theirs) if theirs > 0 else None
    return float(theirs) / float(ours) if ours > 0 else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ratios(runs: dict[str, _common.SystemRun], plan: _systems.Plan) -> dict[str, dict[str, float]]:
    base = runs.get(BASELINE)
    if base is None:
        return {}
    table: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        if name == BASELINE:
            continue
        row = {}
        for metric in metrics(plan):
            value = advantage(metric, base.figures.get(metric.key), run.figures.get(metric.key))
            if value is not None:
                row[metric.key] = value
        table[name] = row
    return table


def evaluate_targets(
    runs: dict[str, _common.SystemRun], plan: _systems.Plan
) -> list[_common.Target]:
    sc = runs[BASELINE].figures if BASELINE in runs else {}
    ppe = runs["ppe"].figures if "ppe" in runs else {}
    ray = runs["ray"].figures if "ray" in runs else {}
    big = list(plan.big_bytes)[-1]
    big_size = plan.big_bytes[big]
    size = _common.format_bytes
    targets: list[_common.Target] = []

    def check(name: str, figures: Sequence[Any], test: Callable[..., bool], text: str) -> None:
        if not all(_is_number(f) for f in figures):
            title = text.rsplit(": ", 1)[0]  # the text without its figures
            targets.append(_common.Target(name, "SKIP", f"{title}: not measured"))
            return
        targets.append(
            _common.Target(name, "PASS" if test(*figures) else "FAIL", text.format(*figures))
        )

    check(
        "latency_le_half_ppe",
        [sc.get("latency_median_s"), ppe.get("latency_median_s")],
        lambda ours, theirs: ours <= 0.5 * theirs,
        "latency median <= 0.5x PPE: {0:.6f} s vs {1:.6f} s",
    )
    check(
        "throughput_ge_2x_ppe",
        [sc.get("throughput_tasks_per_s"), ppe.get("throughput_tasks_per_s")],
        lambda ours, theirs: ours >= 2 * theirs,
        "throughput >= 2x PPE: {0:,.0f} vs {1:,.0f} tasks/s",
    )
    check(
        "chain_ge_2x_ppe",
        [sc.get("chain_tasks_per_s"), ppe.get("chain_tasks_per_s")],
        lambda ours, theirs: ours >= 2 * theirs,
        "chain >= 2x PPE: {0:,.0f} vs {1:,.0f} tasks/s",
    )
    check(
        "big_arg_steady_ge_20x_ppe",
        [sc.get(f"big_arg_{big}_steady_put_first_s"), ppe.get(f"big_arg_{big}_by_value_median_s")],
        lambda ours, theirs: theirs >= 20 * ours,
        f"{size(big_size)} big-arg steady put + round trip >= 20x faster than PPE by value: "
        "{0:.3f} s vs {1:.3f} s",
    )
    check(
        "big_arg_steady_memory_le_1_2x",
        [sc.get(f"big_arg_{big}_steady_peak_extra_pss_bytes")],
        lambda extra: extra <= 1.2 * big_size,
        f"{size(big_size)} big-arg steady state, peak extra PSS <= 1.2x the array "
        f"({size(1.2 * big_size)}): {{0:,}} bytes",
    )
    check(
        "second_task_le_1_3x_driver_sum",
        [sc.get(f"big_arg_{big}_second_s"), sc.get(f"big_arg_{big}_driver_sum_s")],
        lambda task, local: task <= 1.3 * local,
        f"second task on the stored {size(big_size)} <= 1.3x arr.sum() in the driver: "
        "{0:.4f} s vs {1:.4f} s",
    )
    check(
        "big_result_le_ray",
        [sc.get(f"big_result_{big}_s"), ray.get(f"big_result_{big}_s")],
        lambda ours, theirs: ours <= theirs,
        f"{size(big_size)} big-result no slower than Ray: {{0:.3f}} s vs {{1:.3f}} s",
    )
    check(
        "arrow_task_le_10ms",
        [sc.get("arrow_task_s")],
        lambda task: task <= 0.010,
        f"Arrow table ({plan.arrow_rows:,} rows, "
        f"{size(sc.get('arrow_table_bytes') or 0)}) task <= 10 ms: {{0:.5f}} s",
    )
    check(
        "startup_le_0_5s",
        [sc.get("startup_s")],
        lambda startup: startup <= 0.5,
        f"startup ({plan.workers} workers, init to first result) <= 0.5 s: {{0:.3f}} s",
    )
    check(
        "import_le_0_2s",
        [sc.get("import_s")],
        lambda imported: imported <= 0.2,
        "import sharedcompute <= 0.2 s: {0:.4f} s",
    )
    check(
        "idle_pss_le_120mb",
        [sc.get("idle_pss_bytes")],
        lambda pss: pss <= 120e6,
        f"idle runtime ({plan.workers} workers) <= 120 MB PSS: {{0:,}} bytes",
    )
    check(
        "idle_cpu_unmeasurable",
        [sc.get("idle_cpu_s")],
        lambda cpu: cpu <= 0.020,
        f"idle runtime uses no measurable CPU (<= 20 ms in {plan.idle_cpu_window_s:g} s): "
        "{0:.3f} s",
    )
    if plan.quick:
        targets = [replace(t, text=t.text + " (quick sizes and counts)") for t in targets]
    return targets


# -- output ----------------------------------------------------------------------------


def format_value(metric: Metric, value: Any) -> str:
    if not _is_number(value):
        return "—"
    if metric.unit == "s":
        return _common.format_seconds(value)
    if metric.unit == "bytes":
        return ("-" if value < 0 else "") + _common.format_bytes(abs(value))
    if metric.unit == "rate":
        return f"{value:,.0f}/s"
    return f"{value:g}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table of every figure, footnotes, targets, problems."""
    plan = _systems.Plan(**report["plan"])
    results: dict[str, dict[str, Any]] = report["results"]
    names = list(results)
    rows = []
    for metric in metrics(plan):
        row = [metric.label]
        for name in names:
            cell = format_value(metric, results[name].get(metric.key))
            ratio = report["ratios"].get(name, {}).get(metric.key)
            if ratio is not None:
                cell += f" ({ratio:.2g}x)" if ratio < 100 else f" ({ratio:,.0f}x)"
            row.append(cell)
        rows.append(row)
    lines = []
    if plan.quick:
        lines += ["**--quick: small sizes and counts; labels give the real sizes.**", ""]
    machine = report["machine"]
    versions = ", ".join(f"{name} {results[name].get('version')}" for name in names)
    lines += [
        f"Medians; {plan.workers} workers; Python {machine['python']}, {machine['cpus']} CPUs; "
        f"{versions}.",
        "",
        _common.markdown_table(["metric", *names], rows),
        "",
        "(Nx) after a peer's figure: how many times better sharedcompute is on that line "
        "(> 1: sharedcompute faster or smaller; < 1: the peer is).",
        "",
        "[1] Systems that cannot pass a future as an argument (ppe, loky) wait on each result "
        "and pass the value to the next submit.",
        "[2] put: sharedcompute sc.put, Ray ray.put, Dask client.scatter; ppe and loky get the "
        "array by value (pickled) in every task, so every big-arg line is a by-value round trip "
        "for them.",
        "[3] After the first array's handle is dropped and collected, a second array of the same "
        "size is put. Peaks are of the whole process tree (PSS), against the baseline taken "
        "before the first put with both arrays already built in the driver, measured in a "
        "separate pass, each sequence on a freshly restarted system, so sampling slows no "
        "timed figure.",
        "",
        "Targets:",
        "",
    ]
    lines += [f"- {t['status']}: {t['text']}" for t in report["target_list"]]
    lines += ["", "Notes:", ""]
    loads = ", ".join(
        "{} {:.1f}-{:.1f}".format(name, *results[name]["load_average_1min"])
        for name in names
        if "load_average_1min" in results[name]
    )
    lines.append(f"- 1-minute load average before-after each system: {loads}")
    if BASELINE in results and results[BASELINE].get("imported_from"):
        lines.append(f"- sharedcompute imported from {results[BASELINE]['imported_from']}")
    for name in names:
        for step, error in report["errors"][name].items():
            last_line = error.strip().splitlines()[-1] if error.strip() else error
            lines.append(f"- ERROR {name} {step}: {last_line}")
        if report["leftover_processes"][name]:
            left = ", ".join(report["leftover_processes"][name])
            lines.append(f"- {name} left processes running: {left}")
        if report["shm_entries_left"][name]:
            left = ", ".join(report["shm_entries_left"][name])
            lines.append(
                f"- new /dev/shm entries (semaphores aside) while {name} ran (other "
                f"processes on the machine may have made them): {left}"
            )
    for name, reason in report["skipped"].items():
        lines.append(f"- skipped {name}: {reason}")
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------


def parse_systems(text: str | None, quick: bool) -> tuple[list[str], dict[str, str]]:
    wanted = [s.strip() for s in text.split(",") if s.strip()] if text else None
    unknown = sorted(set(wanted or ()) - set(ALL_SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {', '.join(ALL_SYSTEMS)}")
    chosen = wanted or list(QUICK_SYSTEMS if quick else ALL_SYSTEMS)
    skipped = {}
    systems = []
    for name in chosen:
        module = _systems.SYSTEMS[name].module.partition(".")[0]
        if importlib.util.find_spec(module) is None:
            skipped[name] = f"{module} is not installed"
        else:
            systems.append(name)
    return systems, skipped


def run(plan: _systems.Plan, systems: list[str], skipped: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    _common.become_child_subreaper()
    # Interrupted (Ctrl-C, SIGTERM), the run still stops every process the systems started.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        runs = {name: measure_system(name, plan) for name in systems}
    finally:
        _common.end_descendants(grace=2.0)
    target_list = evaluate_targets(runs, plan)
    report: dict[str, Any] = {
        "quick": plan.quick,
        "workers": plan.workers,
        "plan": asdict(plan),
        "sizes": {**plan.big_bytes, "arrow_rows": plan.arrow_rows},
        "systems": systems,
        "skipped": skipped,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": {name: run.figures for name, run in runs.items()},
        "ratios": ratios(runs, plan),
        "targets": {t.name: t.status for t in target_list},
        "target_list": [asdict(t) for t in target_list],
        "errors": {name: run.errors for name, run in runs.items()},
        "leftover_processes": {name: run.leftover_processes for name, run in runs.items()},
        "shm_entries_left": {name: run.shm_entries_left for name, run in runs.items()},
    }
    report["elapsed_s"] = time.perf_counter() - started
    return report


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    parser.add_argument(
        "--systems",
        help=f"comma-separated, of {','.join(ALL_SYSTEMS)} (default: all installed; "
        f"with --quick: {','.join(QUICK_SYSTEMS)})",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--from-json", metavar="FILE", help="measure nothing: print a saved --json report"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.from_json:
        with open(args.from_json) as saved:
            report = json.load(saved)
    else:
        plan = replace(QUICK if args.quick else FULL, workers=args.workers)
        systems, skipped = parse_systems(args.systems, args.quick)
        report = run(plan, systems, skipped)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_markdown(report))
    return 1 if report["errors"].get(BASELINE) else 0


if __name__ == "__main__":
    sys.exit(main())
