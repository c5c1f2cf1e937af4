"""The object-store benchmark runs end to end (quick sizes) and reports every figure.

Speed is not asserted here: figures from a shared CI machine say little. This only proves that
the benchmark measures what it claims (the reader really read the table) and cleans up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "bench" / "store.py"
TIMEOUT = 120

CASES = ("1mib", "100mib", "1gib", "arrow_200mb")
REQUIRED_SECONDS = (
    "put_1gib_s",
    "put_1gib_cold_s",
    "memcpy_1gib_s",
    *(f"{measure}_{case}_s" for measure in ("put", "memcpy", "pickle") for case in CASES),
    *(f"get_{case}_other_process_s" for case in CASES),
)
REQUIRED_RATIOS = ("put_over_memcpy_1gib", "put_cold_over_warm_1gib")


@pytest.fixture(scope="module")
def quick_results() -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # stdout must hold exactly one JSON object


def test_quick_run_reports_every_figure_as_positive_seconds(quick_results: dict) -> None:
    assert quick_results["quick"] is True
    for key in (*REQUIRED_SECONDS, *REQUIRED_RATIOS):
        value = quick_results[key]
        assert isinstance(value, float), f"{key} is {value!r}"
        assert value > 0, f"{key} is {value!r}"


def test_reader_really_read_the_values(quick_results: dict) -> None:
    assert quick_results["arrow_num_rows_read"] == quick_results["arrow_num_rows"] > 0
    for case in ("1mib", "100mib", "1gib"):
        assert quick_results[f"touch_{case}_sum_matches"] is True


def test_targets_and_cleanup_are_reported(quick_results: dict) -> None:
    assert set(quick_results["targets"]) == {
        "put_1gib_le_2x_memcpy",
        "get_1gib_other_process_le_1ms",
        "get_arrow_200mb_other_process_le_5ms",
    }
    assert quick_results["shm_entries_left"] == []


def test_markdown_output_has_table_and_targets() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| size" in proc.stdout
    assert proc.stdout.count("PASS") + proc.stdout.count("FAIL") == 3


def test_common_helpers() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from tools.bench import _common
    finally:
        sys.path.remove(str(REPO_ROOT))
    table = _common.markdown_table(["a", "b"], [["x", 1.5], ["yy", 10]])
    assert table.splitlines()[1] == "| -- | --: |"
    assert _common.repeat(lambda: None, 3).median >= 0
    assert _common.run_in_subprocess(os.getpid, timeout=60) != os.getpid()
    memory = _common.tree_memory()
    assert memory.processes >= 1 and memory.rss_bytes > 0
