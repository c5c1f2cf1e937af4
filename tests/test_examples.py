"""Every script in examples/ runs to completion and prints what it promises.

Each runs as its own process (as a user would run it), with a timeout. A new
example is picked up automatically: it must exit with code 0 and print
something; add its expected lines to EXPECTED to check more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 300

# script name -> (arguments, lines or fragments the output must contain)
EXPECTED: dict[str, tuple[list[str], list[str]]] = {
    "quickstart.py": (
        [],
        [
            "square(7) = 49",
            "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
            "9 + 16 = 25",
            "add(1, 2) = 3",
            "caught: ValueError(",
        ],
    ),
    "streaming.py": (
        [],
        [
            "(the reader is still running: True)",
            "8 blocks of 32 MB streamed and summarised in",
            "standard deviation of every block within 0.01 of 1: True",
        ],
    ),
    "numpy_pipeline.py": (
        [],
        [
            "pushed 256 MB of arrays through 3 stages",
            "block 0: mean column norm 63.25 (expected 63.25)",
            "block 1: mean column norm 63.25 (expected 63.25)",
            "four tasks summed the same stored array: 49999995000000.0",
        ],
    ),
    "actors.py": (
        [],
        [
            "updates applied: [1, 2, 3, 4, 5, 6, 7, 8]",
            "read-only view: True",
            "word counts: [4, 2, 3, 3]",
        ],
    ),
    "cluster.py": (
        [],
        [
            "nodes: 2 alive, 3 CPUs in all",
            "sum of squares over 16 tasks: 1.706666e+20 (expected 1.706666e+20)",
        ],
    ),
    "dask_on_sharedcompute.py": (
        ["--small"],
        ["(x + x.T).mean(axis=0)", "results are the same as Dask's sync scheduler's"],
    ),
}

SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_examples_are_found() -> None:
    assert {"quickstart.py", "numpy_pipeline.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example(script: str) -> None:
    args, expected = EXPECTED.get(script, ([], []))
    env = dict(os.environ)
    env.pop("SHAREDCOMPUTE_WORKER", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script} printed nothing"
    for fragment in expected:
        assert fragment in proc.stdout, f"{script}: {fragment!r} not in output:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "RESULTS DIFFER" not in proc.stdout
