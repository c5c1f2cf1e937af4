"""The runtime benchmark runs end to end (quick sizes, sharedcompute and ppe) and reports every
figure.

Speed is not asserted: figures from a shared CI machine say little. This proves that the
benchmark measures what it claims for both systems, reports the targets, and that no process
of either system outlives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "bench" / "runtime.py"
TIMEOUT = 180
SYSTEMS = ("sharedcompute", "ppe")
SIZES = ("100mib", "1gib")

POSITIVE = (
    "import_s",
    "first_use_s",
    "startup_s",
    "idle_pss_bytes",
    "latency_median_s",
    "latency_p99_s",
    "throughput_tasks_per_s",
    "chain_tasks_per_s",
    *(
        f"big_arg_{size}_{what}"
        for size in SIZES
        for what in ("put_first_s", "second_s", "steady_put_first_s", "driver_sum_s")
    ),
    *(f"big_result_{size}_s" for size in SIZES),
    "arrow_first_task_s",
    "arrow_task_s",
)
MEASURED = (  # may be zero (or, for memory differences, even negative) but must be there
    "idle_cpu_s",
    "arrow_put_s",
    *(f"big_arg_{size}_peak_extra_pss_bytes" for size in SIZES),
    *(f"big_arg_{size}_steady_peak_extra_pss_bytes" for size in SIZES),
    *(f"big_result_{size}_peak_extra_pss_bytes" for size in SIZES),
)
TARGETS = {
    "latency_le_half_ppe",
    "throughput_ge_2x_ppe",
    "chain_ge_2x_ppe",
    "big_arg_steady_ge_20x_ppe",
    "big_arg_steady_memory_le_1_2x",
    "second_task_le_1_3x_driver_sum",
    "big_result_le_ray",
    "arrow_task_le_10ms",
    "startup_le_0_5s",
    "import_le_0_2s",
    "idle_pss_le_120mb",
    "idle_cpu_unmeasurable",
}

pytestmark = pytest.mark.timeout(TIMEOUT + 30)  # the module fixture runs the benchmark


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--systems", ",".join(SYSTEMS)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout)  # stdout must hold exactly one JSON object


def test_quick_run_reports_every_figure_for_both_systems(report: dict) -> None:
    assert report["quick"] is True
    assert report["systems"] == list(SYSTEMS)
    for system in SYSTEMS:
        assert report["errors"][system] == {}, report["errors"][system]
        figures = report["results"][system]
        for key in POSITIVE:
            value = figures.get(key)
            assert isinstance(value, (int, float)) and value > 0, f"{system} {key} = {value!r}"
        for key in MEASURED:
            assert isinstance(figures.get(key), (int, float)), f"{system} {key} missing"
        assert figures["arrow_num_rows_read"] == report["sizes"]["arrow_rows"] > 0


def test_peers_are_compared_and_chain_is_by_value_for_ppe(report: dict) -> None:
    assert report["results"]["sharedcompute"]["chain_passes_futures"] is True
    assert report["results"]["ppe"]["chain_passes_futures"] is False
    ratios = report["ratios"]["ppe"]
    assert ratios["latency_median_s"] > 0
    assert ratios["throughput_tasks_per_s"] > 0


def test_targets_and_cleanup_are_reported(report: dict) -> None:
    assert set(report["targets"]) == TARGETS
    assert set(report["targets"].values()) <= {"PASS", "FAIL", "SKIP"}
    assert report["targets"]["big_result_le_ray"] == "SKIP"  # Ray was not asked for
    for system in SYSTEMS:
        assert report["leftover_processes"][system] == []
        assert report["shm_entries_left"][system] == []


def test_sharedcompute_results_are_read_only_views(report: dict) -> None:
    figures = report["results"]["sharedcompute"]
    assert all(figures[f"big_result_{size}_readonly"] is True for size in SIZES)
