"""Large numpy arrays flowing from task to task through shared memory.

Each stage receives the previous stage's array as a read-only view of the
shared-memory store: nothing is pickled, and the driver never holds a copy
until it asks for the final value.

Run: python examples/numpy_pipeline.py
"""

from __future__ import annotations

import time

import numpy as np

import sharedcompute as sc

ROWS, COLS = 4_000, 4_000  # 128 MB of float64


def generate(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, COLS))


def normalize(block: np.ndarray) -> np.ndarray:
    # `block` is a read-only view of shared memory; the result is a new array.
    return (block - block.mean(axis=0)) / block.std(axis=0)


def column_norms(block: np.ndarray) -> np.ndarray:
    return np.sqrt((block * block).sum(axis=0))


def main() -> None:
    with sc.Runtime(num_workers=2):
        start = time.perf_counter()
        raw = [sc.submit(generate, seed) for seed in range(2)]
        normalized = [sc.submit(normalize, block) for block in raw]
        norms = [sc.submit(column_norms, block) for block in normalized]
        results = sc.gather(norms, timeout=300)
        elapsed = time.perf_counter() - start
        mb = 2 * ROWS * COLS * 8 / 1e6
        print(f"pushed {mb:.0f} MB of arrays through 3 stages in {elapsed:.2f} s")
        for i, result in enumerate(results):
            # Every column was normalized to unit variance, so its norm is sqrt(ROWS).
            print(f"block {i}: mean column norm {result.mean():.2f} (expected {ROWS ** 0.5:.2f})")

        # sc.put stores a value once; many tasks then read the same shared memory.
        shared = sc.put(np.arange(10_000_000, dtype=np.float64))
        sums = sc.gather([sc.submit(np.sum, shared) for _ in range(4)], timeout=120)
        print("four tasks summed the same stored array:", sums[0])


if __name__ == "__main__":
    main()
