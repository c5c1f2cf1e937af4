"""Streaming tasks: a generator function whose items reach you while it still runs.

``submit()`` of a generator function returns an ``sc.FutureStream``: an iterator of Futures,
one per yielded item, each ready as soon as the generator yields it. Items go through the
shared-memory store like results, so a Future of an item can be handed to other tasks at
once, while the generator goes on. ``generator_backpressure=N`` pauses the generator while N
items are unconsumed, so a fast producer never fills memory ahead of a slow consumer.

Here a "reader" task produces 8 blocks of 32 MB (standing in for chunks of a file or a
query), a "summary" task starts on each block as soon as it exists, and the driver prints
results as they arrive. Run: python examples/streaming.py
"""

from __future__ import annotations

import time

import numpy as np

import sharedcompute as sc

BLOCKS = 8
ROWS = 1_000_000  # 4 float64 columns: 32 MB a block


@sc.remote(generator_backpressure=3)
def read_blocks(n: int):  # type: ignore[no-untyped-def]
    """Yield one block at a time; paused while 3 blocks wait to be taken."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        time.sleep(0.05)  # reading takes a while
        yield rng.standard_normal((ROWS, 4))


@sc.remote
def summary(block: np.ndarray) -> tuple[float, float]:
    """Runs on a block as soon as it is yielded (the block is read from the store, not copied)."""
    return float(block.mean()), float(block.std())


def main() -> None:
    with sc.Runtime(num_workers=2):
        started = time.perf_counter()
        stream = read_blocks.submit(BLOCKS)
        summaries = []
        for index, block in enumerate(stream):  # each Future as its item is yielded
            if index == 0:
                print(f"first block after {time.perf_counter() - started:.2f} s "
                      f"(the reader is still running: {not stream.task.done()})")
            summaries.append(summary.submit(block))  # starts now, on the stored block
        stds = [std for _, std in sc.get(summaries, timeout=60)]
        print(f"{stream.task.result(timeout=60)} blocks of {ROWS * 4 * 8 // 10**6} MB streamed "
              f"and summarised in {time.perf_counter() - started:.2f} s")
        print(f"standard deviation of every block within 0.01 of 1: "
              f"{all(abs(std - 1.0) < 0.01 for std in stds)}")


if __name__ == "__main__":
    main()
