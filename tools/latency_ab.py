"""Compare the round-trip latency of source trees on a noisy machine.

A shared VM's speed drifts by tens of percent within minutes, so two latency
runs made one after the other say little about a change. This script measures
each tree against ``ProcessPoolExecutor`` *interleaved*: in one process, chunks
of ``submit(os.getpid).result()`` alternate between sharedcompute and the executor,
and the figure is the median over chunks of the ratio between the two. Trees
take turns, round after round, so each sees the same moments of the machine::

    python tools/latency_ab.py                       # this checkout only
    python tools/latency_ab.py /tmp/before .         # a worktree of the old commit, and this one
    git worktree add /tmp/before HEAD~1              # (how to make the first)

Speed is never asserted anywhere: this is for working on the latency path, and
for the figure in a closing note (the benchmark suite is ``tools/bench/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

# Runs in a child process whose sys.path starts with the tree under test.
_CHILD = r"""
import concurrent.futures, gc, json, multiprocessing, os, statistics, sys, time
import sharedcompute as sc

chunks, per_chunk = int(sys.argv[1]), int(sys.argv[2])

def median_round_trip(call):
    samples = []
    for _ in range(per_chunk):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)

# Spawned, not forked: forked children would inherit the runtime's pipes and sockets
# (and a spawned child needs an importable function: os.getpid, for both systems).
spawn = multiprocessing.get_context("spawn")
executor = concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn)
sc.init(num_workers=2)
ours = lambda: sc.submit(os.getpid).result(timeout=60)
theirs = lambda: executor.submit(os.getpid).result(timeout=60)
for _ in range(300):
    ours()
    theirs()
gc.disable()
pairs = [(median_round_trip(ours), median_round_trip(theirs)) for _ in range(chunks)]
executor.shutdown()
sc.shutdown()
print(json.dumps({"file": sc.__file__, "pairs": pairs}))
"""


def measure(tree: Path, chunks: int, per_chunk: int) -> list[tuple[float, float]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(chunks), str(per_chunk)],
        env=env, cwd=tree, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    loaded = Path(report["file"]).resolve()
    if tree.resolve() not in loaded.parents:
        raise SystemExit(f"{tree} did not provide sharedcompute (imported {loaded})")
    return [(float(ours), float(theirs)) for ours, theirs in report["pairs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[_ROOT],
                        help="source trees (each holding a sharedcompute/ package)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=10, help="chunk pairs per round")
    parser.add_argument("--per-chunk", type=int, default=200, help="round trips per chunk")
    args = parser.parse_args()
    results: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in args.trees}
    for round_number in range(1, args.rounds + 1):
        for tree in args.trees:
            pairs = measure(tree, args.chunks, args.per_chunk)
            results[tree] += pairs
            ratio = statistics.median(ours / theirs for ours, theirs in pairs)
            print(f"round {round_number}  {tree}: ratio {ratio:.3f}", flush=True)
    print("\n| tree | sharedcompute | ProcessPoolExecutor | ratio (median of chunks) |")
    print("|---|---|---|---|")
    for tree, pairs in results.items():
        ours = statistics.median(p[0] for p in pairs) * 1e6
        theirs = statistics.median(p[1] for p in pairs) * 1e6
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        print(f"| {tree} | {ours:.0f} µs | {theirs:.0f} µs | {ratio:.3f} |")


if __name__ == "__main__":
    main()
