"""Dask collections computed on sharedcompute: worker processes, intermediates in shared memory.

Dask builds the graph; sharedcompute runs each Dask task as one of its tasks. Chunks that one
task makes and another reads stay in the shared-memory store and pass between worker processes
by reference, and only the results you ask for come back to this process.

Run: python examples/dask_on_sharedcompute.py [--small]
(needs ``pip install "sharedcompute[dask]" "dask[array,dataframe,bag]"``)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd

import sharedcompute as sc
import sharedcompute.dask  # registers the scheduler name "sharedcompute" with Dask


def sales(partition: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(partition)
    return pd.DataFrame({"store": rng.integers(0, 20, rows), "amount": rng.gamma(2.0, 10.0, rows)})


def write_people(folder: Path, files: int, lines: int) -> str:
    names = ["Alice", "Bob", "Charlie", "Dan", "Edith", "Frank"]
    for index in range(files):
        records = (
            json.dumps({"name": names[(i + index) % 6], "age": i % 90}) for i in range(lines)
        )
        (folder / f"{index}.json").write_text("\n".join(records) + "\n")
    return str(folder / "*.json")


def main(small: bool) -> None:
    side, chunk = (1000, 250) if small else (4000, 1000)
    rows, files = (20_000, 3) if small else (500_000, 8)

    x = da.random.default_rng(0).random((side, side), chunks=(chunk, chunk))
    column_means = (x + x.T).mean(axis=0)
    by_store = dd.from_map(sales, range(8), rows=rows).groupby("store").amount.sum()

    with sc.Runtime(num_workers=2), tempfile.TemporaryDirectory() as folder:
        people = write_people(Path(folder), files, rows // 10)
        names = db.read_text(people).map(json.loads).pluck("name").frequencies()

        # Per call ...
        start = time.perf_counter()
        means = column_means.compute(scheduler=sharedcompute.dask.get)
        print(f"(x + x.T).mean(axis=0) on {side}x{side}: {time.perf_counter() - start:.2f} s")

        # ... or for a block, by name: several collections share one graph run.
        with dask.config.set(scheduler="sharedcompute"):
            start = time.perf_counter()
            totals, counts = dask.compute(by_store, names)
            print(f"groupby-sum and bag frequencies: {time.perf_counter() - start:.2f} s")

        same = (
            np.allclose(means, column_means.compute(scheduler="sync"))
            and np.allclose(totals.sort_index(), by_store.compute(scheduler="sync").sort_index())
            and sorted(counts) == sorted(names.compute(scheduler="sync"))
        )
        print("results are the same as Dask's sync scheduler's" if same else "RESULTS DIFFER")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main(small="--small" in sys.argv[1:])
