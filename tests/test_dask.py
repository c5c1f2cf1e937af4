"""sharedcompute as a Dask scheduler: real Dask workloads, compared with Dask's "sync" scheduler.

Each test runs on a runtime of its own (two workers), so the suite's leak guard sees every
worker and segment go away. Workloads are the issue's: dask.array, dask.dataframe, dask.bag
and dask.delayed; then the scheduler's contract (entry points, graph formats, errors, what
comes back to the driver, memory along a graph) and the example script.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")

import sharedcompute as sc  # noqa: E402
import sharedcompute.dask as scd  # noqa: E402
from sharedcompute._dask_graph import fuse, make_plan  # noqa: E402
from sharedcompute.errors import RemoteTraceback  # noqa: E402
from tools.bench.memory import anonymous_memory  # noqa: E402

try:  # the public module (Dask >= 2025.1); the private one before
    from dask.task_spec import Alias, DataNode, Task, TaskRef
except ImportError:
    from dask._task_spec import Alias, DataNode, Task, TaskRef
# Containers as graph nodes (Dask >= 2024.12.0); None where Dask has none.
List: Any = getattr(sys.modules.get("dask.task_spec") or dask._task_spec, "List", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
# Workers inherit the environment, so in a worker this is still the pid of the test process.
DRIVER_PID = int(os.environ.setdefault("SHAREDCOMPUTE_TEST_DRIVER_PID", str(os.getpid())))


@pytest.fixture
def runtime() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=2) as rt:
        yield rt


def sync(*collections: Any) -> Any:
    results = dask.compute(*collections, scheduler="sync")
    return results[0] if len(collections) == 1 else results


def ours(*collections: Any, **kwargs: Any) -> Any:
    results = dask.compute(*collections, scheduler=scd.get, **kwargs)
    return results[0] if len(collections) == 1 else results


def wait_until_freed(rt: sc.Runtime, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while rt.store.stats()["num_objects"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return int(rt.store.stats()["num_objects"])


# -- the workloads ---------------------------------------------------------------


def test_array_transpose_mean(runtime: sc.Runtime) -> None:
    x = da.random.default_rng(0).random((4000, 4000), chunks=(1000, 1000))
    y = (x + x.T).mean(axis=0)
    np.testing.assert_allclose(ours(y), sync(y), rtol=1e-12)
    assert wait_until_freed(runtime) == 0


def test_array_reduction_over_100mb_chunks(runtime: sc.Runtime) -> None:
    items = 12_500_000  # 100 MB of float64 a chunk
    x = da.random.default_rng(1).random(4 * items, chunks=items)
    y = (x - x.mean()).std()  # each chunk feeds two reductions: a stored intermediate
    np.testing.assert_allclose(ours(y), sync(y), rtol=1e-9)
    assert wait_until_freed(runtime) == 0


def make_frame(partition: int, rows: int = 20_000) -> Any:
    rng = np.random.default_rng(partition)
    return pd.DataFrame(
        {
            "id": np.arange(partition * rows, (partition + 1) * rows, dtype=np.int64),
            "key": rng.integers(0, 50, rows),
            "value": rng.random(rows),
            "label": rng.choice(["red", "green", "blue"], rows),
        }
    )


def test_dataframe_groupby_aggregate(runtime: sc.Runtime) -> None:
    df = dd.from_map(make_frame, range(6))
    agg = df.groupby("key").agg({"value": ["sum", "mean", "max"], "label": "count"})
    pd.testing.assert_frame_equal(ours(agg).sort_index(), sync(agg).sort_index())


def test_dataframe_merge(runtime: sc.Runtime) -> None:
    left = dd.from_map(make_frame, range(6))
    right = dd.from_pandas(
        pd.DataFrame({"key": np.arange(50), "weight": np.arange(50) * 0.5}), npartitions=3
    )
    by_id = dd.from_map(make_frame, range(2, 8))[["id", "value"]].rename(columns={"value": "other"})
    merged = left.merge(right, on="key").merge(by_id, on="id")

    def canonical(frame: Any) -> Any:
        return frame.sort_values("id").reset_index(drop=True)

    pd.testing.assert_frame_equal(canonical(ours(merged)), canonical(sync(merged)))


def _disk_merge(tmp_path: Path) -> tuple[Any, Any]:
    """A merge that shuffles on disk under ``tmp_path``, and its result (by "sync")."""
    left = dd.from_map(make_frame, range(4))
    right = dd.from_map(make_frame, range(2, 6))[["id", "value"]].rename(
        columns={"value": "other"})
    merged = left.merge(right, on="id")
    with dask.config.set({"temporary_directory": str(tmp_path),
                          "dataframe.shuffle.method": "disk"}):
        expected = sync(merged).sort_values("id").reset_index(drop=True)
    for leftover in tmp_path.glob("*.partd"):  # sync's own: removed at exit
        shutil.rmtree(leftover)
    return merged, expected


def test_a_disk_shuffle_leaves_no_directory_behind(runtime: sc.Runtime, tmp_path: Path) -> None:
    """partd removes a disk shuffle's directory only at the exit of the process that made it,
    and workers skip exit handlers: the directory is made by the driver and removed when
    the graph ends, whether it succeeds or fails."""
    merged, expected = _disk_merge(tmp_path)
    with dask.config.set({"temporary_directory": str(tmp_path),
                          "dataframe.shuffle.method": "disk"}):
        got = ours(merged).sort_values("id").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
        assert list(tmp_path.glob("*.partd")) == []

        def fail(frame: Any) -> Any:
            raise ValueError("a shuffle that fails")

        broken = merged.map_partitions(fail, meta=merged._meta)
        with pytest.raises(ValueError, match="a shuffle that fails"):
            ours(broken)
        assert list(tmp_path.glob("*.partd")) == []


def _refuse_fsync() -> int:
    def refused(fd: Any) -> None:
        raise AssertionError("a disk shuffle's scratch file was fsynced")

    os.fsync = refused
    return os.getpid()


def test_a_disk_shuffle_never_waits_for_its_files_to_reach_the_disk(tmp_path: Path) -> None:
    """Dask asks partd to fsync every file it appends to; a worker's scratch files are
    read back through the page cache and removed with the graph, so none is synced."""
    merged, expected = _disk_merge(tmp_path)
    disk = {"temporary_directory": str(tmp_path), "dataframe.shuffle.method": "disk"}
    with dask.config.set(disk), sc.Runtime(num_workers=1):
        assert sc.submit(_refuse_fsync).result(timeout=TIMEOUT) != os.getpid()
        got = ours(merged).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    assert list(tmp_path.glob("*.partd")) == []


def test_bag_json_frequencies(runtime: sc.Runtime, tmp_path: Path) -> None:
    names = ["Alice", "Bob", "Charlie", "Dan", "Edith"]
    for index in range(4):
        lines = [json.dumps({"name": names[(i * 3 + index) % 5], "i": i}) for i in range(2000)]
        (tmp_path / f"{index}.json").write_text("\n".join(lines) + "\n")
    # The example of Dask's scheduler documentation.
    bag = db.read_text(str(tmp_path / "*.json")).map(json.loads).pluck("name").frequencies()
    result = ours(bag)
    assert sorted(result) == sorted(sync(bag))
    assert sum(count for _, count in result) == 8000


def test_delayed_graph_and_several_collections(runtime: sc.Runtime) -> None:
    @dask.delayed
    def leaf(seed: int) -> np.ndarray:
        return np.random.default_rng(seed).random(100_000)  # 800 KB: through the store

    @dask.delayed
    def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    level = [leaf(seed) for seed in range(8)]
    while len(level) > 1:
        level = [combine(a, b) for a, b in zip(level[0::2], level[1::2], strict=True)]
    total = level[0].sum()
    shape = dask.delayed(len)(level[0])
    got_total, got_shape, plain = dask.compute(total, shape, 7, scheduler=scd.get)
    want_total, want_shape, _ = dask.compute(total, shape, 7, scheduler="sync")
    assert got_total == pytest.approx(want_total, rel=1e-12)
    assert (got_shape, plain) == (want_shape, 7)


def test_persist_keeps_results_and_computes_from_them(runtime: sc.Runtime) -> None:
    x = da.random.default_rng(2).random((2000, 2000), chunks=(500, 500))
    y = (x * 2 + 1).persist(scheduler=scd.get)
    assert len(y.dask) == y.npartitions  # nothing left to compute: one node per chunk
    np.testing.assert_allclose(ours(y.sum()), sync((x * 2 + 1).sum()), rtol=1e-12)
    df = dd.from_map(make_frame, range(3)).persist(scheduler=scd.get)
    assert ours(df.value.sum()) == pytest.approx(sync(df.value.sum()), rel=1e-12)


def sleep_and_mark(folder: str, index: int, _previous: object) -> int:
    time.sleep(0.2)
    Path(folder, f"ran-{index}").touch()
    return index


class Boom(ValueError):
    pass


def explode(value: int) -> int:
    raise Boom(f"task saw {value}")


def test_exception_in_a_task_keeps_its_type_and_traceback(
    runtime: sc.Runtime, tmp_path: Path
) -> None:
    bad = dask.delayed(explode)(dask.delayed(int)(41) + 1)
    after = dask.delayed(sleep_and_mark)(str(tmp_path), 0, bad)
    with pytest.raises(Boom, match="task saw 42") as caught:
        dask.compute(after, scheduler=scd.get)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "explode" in cause.tb and "Boom: task saw 42" in cause.tb
    assert list(tmp_path.iterdir()) == []  # what depended on the failed task never ran
    # The runtime is fine afterwards, and nothing of the failed graph stays stored.
    assert ours(dask.delayed(int)(5) + 1) == 6
    assert wait_until_freed(runtime) == 0


def test_failure_cancels_what_has_not_run(runtime: sc.Runtime, tmp_path: Path) -> None:
    # A chain of 30 x 0.2 s that can only run one task at a time, and a failing task that
    # the other worker runs at once: the failure must not wait for the chain, and the
    # chain's waiting tasks must never start. (Unfused: a fused chain is one task, which
    # once started runs to its end; test_fused_graphs_run_fewer_tasks_alike.)
    dsk: dict[Any, Any] = {"link-0": (sleep_and_mark, str(tmp_path), 0, None)}
    for i in range(1, 30):
        dsk[f"link-{i}"] = (sleep_and_mark, str(tmp_path), i, f"link-{i - 1}")
    dsk["boom"] = (explode, 1)
    assert ours(dask.delayed(inc)(1)) == 2  # workers have imported Dask: time the graph only
    start = time.monotonic()
    with pytest.raises(Boom):
        scd.get(dsk, ["link-29", "boom"], max_in_flight=100, fuse=False)
    elapsed = time.monotonic() - start
    assert elapsed < 4.0  # the chain alone takes 6 s
    time.sleep(0.5)
    assert len(list(tmp_path.iterdir())) <= elapsed / 0.2 + 2  # no link started after


# -- how users reach it --------------------------------------------------------------------


def test_config_by_name_and_by_function(runtime: sc.Runtime) -> None:
    x = da.arange(1000, chunks=100)
    with dask.config.set(scheduler="sharedcompute"):
        assert dask.base.get_scheduler() is scd.get
        assert int(x.sum().compute()) == 499500
    with dask.config.set(scheduler=scd.get):
        assert int((x * 2).sum().compute()) == 999000
    assert int(x.max().compute(scheduler="sharedcompute")) == 999


def test_dask_diagnostics_see_every_task(runtime: sc.Runtime) -> None:
    from dask.diagnostics import Profiler, ProgressBar, ResourceProfiler

    x = da.ones((1000, 1000), chunks=(250, 250))
    bar = io.StringIO()
    with ProgressBar(out=bar, minimum=0, dt=0.01), Profiler() as profile, \
            ResourceProfiler(dt=0.01) as resources:
        assert ours((x + 1).sum()) == 2_000_000
    assert "100% Completed" in bar.getvalue()
    assert len(profile.results) >= 16  # at least one task a chunk
    assert all(task.end_time >= task.start_time for task in profile.results)
    # ResourceProfiler samples this process's memory and CPU while the graph runs.
    assert resources.results and all(sample.mem > 0 for sample in resources.results)
    # The timeline (and the dashboard's function table) names Dask tasks by key prefix.
    # (16 chunks summed in 4 partial sums, each fused with its chunks, then 1 total.)
    names = [record[1] for record in runtime.timeline.since(0)]
    assert len(names) >= 5 and all(name.startswith("dask ") for name in names)
    assert len(set(names)) <= 4, set(names)  # a few prefixes, not a name per key


def test_executor_as_the_scheduler() -> None:
    x = da.random.default_rng(3).random((1000, 1000), chunks=(250, 250))
    y = (x + x.T).sum(axis=1)
    with sc.Executor(max_workers=2) as ex:
        # Dask's own Executor protocol: it submits batches of tasks to ex.submit.
        np.testing.assert_allclose(y.compute(scheduler=ex), sync(y))
        # sharedcompute's scheduler on the Executor's runtime: intermediates stay stored.
        np.testing.assert_allclose(y.compute(scheduler=scd.get, executor=ex), sync(y))
        assert wait_until_freed(ex.runtime) == 0


# -- graph formats ----------------------------------------------------------------------------


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def test_legacy_tuple_graph_and_nested_keys(runtime: sc.Runtime) -> None:
    dsk = {
        "x": 1,
        "y": (inc, "x"),
        "z": (add, "y", 10),
        "w": (sum, ["x", "y", (inc, "z")]),
        "alias": "z",
    }
    assert scd.get(dsk, "z") == 12
    assert scd.get(dsk, [["x", "y"], "w", "alias"]) == ((1, 2), 16, 12)


def test_task_spec_graph(runtime: sc.Runtime) -> None:
    big = np.arange(100_000, dtype=np.float64)  # put once, read by two tasks
    dsk = {
        "data": DataNode("data", big),
        "small": DataNode("small", 3),
        "a": Task("a", np.sum, TaskRef("data")),
        "b": Task("b", np.multiply, TaskRef("data"), TaskRef("small")),
        "b-again": Alias("b-again", "b"),
        "c": Task("c", np.max, TaskRef("b-again")),
    }
    if List is not None:
        dsk["both"] = List(TaskRef("a"), TaskRef("c"))
        dsk["both"].key = "both"
    else:
        dsk["both"] = Task("both", list, (TaskRef("a"), TaskRef("c")))
    total, largest = scd.get(dsk, "both")
    assert total == big.sum() and largest == big.max() * 3
    assert scd.get(dsk, ["small", "b-again"])[0] == 3


def test_missing_dependency_is_an_error(runtime: sc.Runtime) -> None:
    with pytest.raises(ValueError, match="Missing dependency"):
        scd.get({"y": Task("y", inc, TaskRef("nowhere"))}, "y")
    with pytest.raises(KeyError):
        scd.get({"y": 1}, "x")


def test_plan_culls_and_resolves_alias_chains() -> None:
    dsk = {
        "x": DataNode("x", 1),
        "y": Task("y", inc, TaskRef("x")),
        "y1": Alias("y1", "y"),
        "y2": Alias("y2", "y1"),
        "z": Task("z", add, TaskRef("y2"), TaskRef("y")),
        "unused": Task("unused", inc, TaskRef("x")),
    }
    plan = make_plan(dsk, ["z"])
    assert set(plan.tasks) == {"y", "z"}
    assert plan.aliases == {"y1": "y", "y2": "y"}
    assert plan.producers["z"] == frozenset({"y"})  # both reads are of y
    assert plan.readers["x"] == ["y"] and plan.readers["y"] == ["z"]
    assert plan.priority["y"] < plan.priority["z"]


# -- fusion ---------------------------------------------------------------------------------


def tree_graph(leaves: int, leaf: Any = inc, join: Any = add) -> tuple[dict[Any, Any], str]:
    """A legacy graph joining ``leaves`` leaves pairwise up to one root; and the root's key."""
    dsk: dict[Any, Any] = {f"leaf-{i}": (leaf, i) for i in range(leaves)}
    level = list(dsk)
    while len(level) > 1:
        joined = []
        for a, b in zip(level[0::2], level[1::2], strict=True):
            joined.append(f"join-{len(dsk)}")
            dsk[joined[-1]] = (join, a, b)
        level = joined
    return dsk, level[0]


class Marker:
    pass


_markers: list[weakref.ref[Marker]] = []


def make_marker() -> Marker:
    marker = Marker()
    _markers.append(weakref.ref(marker))
    return marker


def one(_marker: Marker) -> int:
    return 1


def markers_alive(_previous: int) -> int:
    return sum(ref() is not None for ref in _markers)


def test_fuse_merges_chains_and_only_wide_reductions() -> None:
    dsk, root = tree_graph(32)
    dsk["top-0"] = (inc, root)
    dsk["top-1"] = (inc, "top-0")
    plan = make_plan(dsk, ["top-1"])
    assert len(plan.tasks) == 65
    # Heights 1 and 2 hold 16 and 8 joins, at least the width: 8 groups of 4 leaves and
    # 3 joins. Heights 3 to 5 (4, 2, 1 joins) are too narrow: their joins stay tasks. The
    # chain above the root fuses with it whatever the width.
    fused = fuse(plan, width=8)
    assert len(fused.tasks) == 8 + 4 + 2 + 1
    assert sorted(len(group) for group in fused.members.values()) == [3] + [7] * 8
    assert fused.members["top-1"] == (root, "top-0", "top-1")
    for key, group in fused.members.items():
        assert group[-1] == key
        for at, member in enumerate(group):  # each member runs after what it reads
            inside = set(plan.producers[member]) & set(group)
            assert inside <= set(group[:at])
    for key, sources in fused.producers.items():  # edges between the fused tasks only
        assert sources <= set(fused.tasks)
        assert all(fused.readers[source].count(key) == 1 for source in sources)
    # With more workers nothing is wide enough: only the chain fuses.
    assert len(fuse(plan, width=64).tasks) == 63


def test_fuse_leaves_shared_requested_and_kept_tasks() -> None:
    chain = {"x": (inc, 1), "y": (inc, "x"), "z": (inc, "y")}
    whole = fuse(make_plan(chain, ["z"]), width=8)
    assert whole.members == {"z": ("x", "y", "z")}
    assert whole.tasks["z"]({}) == 4  # a fused node is called like any Dask node
    # A requested key keeps its own task (its value is returned).
    assert fuse(make_plan(chain, ["z", "y"]), width=8).members == {"y": ("x", "y")}
    # A node `keep` names (a disk shuffle's start) is never merged into its reader.
    kept = fuse(make_plan(chain, ["z"]), width=8, keep=lambda node: node.key == "x")
    assert kept.members == {"z": ("y", "z")} and kept.producers["z"] == {"x"}
    assert kept.tasks["z"]({"x": 2}) == 4
    # A task read twice stays a task of its own; its readers may fuse (at any width here).
    shared = {"x": (inc, 1), "y": (inc, "x"), "w": (inc, "x"), "z": (add, "y", "w")}
    wide = fuse(make_plan(shared, ["z"]), width=1)
    assert wide.members == {"z": ("y", "w", "z")} and wide.producers["z"] == {"x"}
    assert wide.tasks["z"]({"x": 2}) == 6
    assert fuse(make_plan(shared, ["z"]), width=2).members == {}  # one task at z's height
    # Fused members let go of what they made once its reader has run.
    dropped = {"m": (make_marker,), "one": (one, "m"), "alive": (markers_alive, "one")}
    node = fuse(make_plan(dropped, ["alive"]), width=8).tasks["alive"]
    assert node({}) == 0


def test_fuse_merges_only_reductions_of_like_size() -> None:
    # At height 1: a sum of 40 leaves beside 8 sums of 2 leaves. The 8 fuse (at least the
    # width of 4, and alike); the big one stays 41 tasks rather than one serial task.
    dsk: dict[Any, Any] = {f"big-{i}": (inc, i) for i in range(40)}
    dsk["big"] = (sum, [f"big-{i}" for i in range(40)])
    for pair in range(8):
        dsk[f"a-{pair}"], dsk[f"b-{pair}"] = (inc, pair), (inc, -pair)
        dsk[f"pair-{pair}"] = (add, f"a-{pair}", f"b-{pair}")
    outputs = ["big", *(f"pair-{pair}" for pair in range(8))]
    fused = fuse(make_plan(dsk, outputs), width=4)
    assert sorted(fused.members) == [f"pair-{pair}" for pair in range(8)]
    assert len(fused.tasks) == 41 + 8
    assert fuse(make_plan(dsk, outputs), width=9).members == {}  # 8 alike: too few


def make_block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(100_000)


def add_blocks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def test_fused_graphs_run_fewer_tasks_alike(runtime: sc.Runtime) -> None:
    from dask.callbacks import Callback

    dsk, root = tree_graph(32, make_block, add_blocks)
    expected = dask.get(dsk, root)
    started: list[Any] = []
    finished: list[Any] = []
    with Callback(pretask=lambda key, *_: started.append(key),
                  posttask=lambda key, *_: finished.append(key)):
        np.testing.assert_array_equal(scd.get(dsk, root), expected)
    # Two workers: fused at heights of 4 tasks or more (4 groups of 8 leaves and 7 joins,
    # then 3 joins); Dask's callbacks still see each key.
    assert sorted(started) == sorted(finished) == sorted(dsk)
    fused_tasks = len(runtime.timeline.since(0))
    assert fused_tasks == 4 + 2 + 1
    np.testing.assert_array_equal(scd.get(dsk, root, fuse=False), expected)
    assert len(runtime.timeline.since(0)) - fused_tasks == len(dsk)
    assert wait_until_freed(runtime) == 0


# -- the contract: what moves, what stays, what is freed -----------------------------------


class DriverPoison:
    """A value that unpickles in any process but the test's own."""

    def __init__(self, payload: np.ndarray) -> None:
        self.payload = payload

    def __reduce__(self) -> Any:
        return (_unpickle_poison, (self.payload,))


def _unpickle_poison(payload: np.ndarray) -> DriverPoison:
    if os.getpid() == DRIVER_PID:
        raise AssertionError("an intermediate came back to the driver")
    return DriverPoison(payload)


def make_poison(seed: int) -> DriverPoison:
    return DriverPoison(np.full(50_000, float(seed)))


def poison_total(*values: DriverPoison) -> float:
    return float(sum(v.payload.sum() for v in values))


def test_only_requested_keys_come_back_to_the_driver(runtime: sc.Runtime) -> None:
    parts = [dask.delayed(make_poison)(seed) for seed in range(6)]
    total = dask.delayed(poison_total)(*parts)
    assert dask.compute(total, scheduler=scd.get)[0] == 50_000 * sum(range(6))


def ones_like_step(previous: np.ndarray | None, step: int) -> np.ndarray:
    return np.full(200_000, float(step))  # 1.6 MB: stored, never inline


@pytest.mark.parametrize("fused", [False, True], ids=["one-task-a-key", "fused"])
def test_memory_stays_flat_along_a_long_graph(runtime: sc.Runtime, fused: bool) -> None:
    dsk: dict[Any, Any] = {("step", 0): (ones_like_step, None, 0)}
    for step in range(1, 120):
        dsk[("step", step)] = (ones_like_step, ("step", step - 1), step)
    most = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, runtime.store.stats()["num_objects"])
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = scd.get(dsk, ("step", 119), fuse=fused)
    finally:
        stop.set()
        watcher.join(timeout=TIMEOUT)
    assert result[0] == 119.0
    # A chain needs its running task's input and output; a few more may await release.
    assert most <= 6, f"{most} objects stored at once along a chain of 120"
    del result
    assert wait_until_freed(runtime) == 0


def slow_sum(array: np.ndarray) -> float:
    time.sleep(0.3)
    return float(array.sum())


def sleep_after(seconds: float, _previous: object) -> None:
    time.sleep(seconds)


def pair(first: float, second: float, _after: object) -> tuple[float, float]:
    return first, second


def test_intermediate_freed_when_its_last_reader_finishes(runtime: sc.Runtime) -> None:
    dsk = {
        "big": (np.ones, 100_000),  # 800 KB: stored
        "first": (slow_sum, "big"),
        "second": (slow_sum, "big"),
        "after": (sleep_after, 1.0, ["first", "second"]),  # once both readers are done
        "both": (pair, "first", "second", "after"),
    }
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(runtime.store.stats()["num_objects"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert scd.get(dsk, "both") == (100_000.0, 100_000.0)
    finally:
        done.set()
        watcher.join(timeout=TIMEOUT)
    # "big" was stored while its readers ran, and freed while "after" still slept.
    assert 1 in seen
    assert seen[seen.index(1) :][-20:] == [0] * 20


def test_results_are_writeable_and_views_on_request(runtime: sc.Runtime) -> None:
    array = ours(da.ones((1000, 1000), chunks=(500, 500)))
    array[0, 0] = 5.0
    frame = ours(dd.from_map(make_frame, range(2)))
    frame.loc[frame.index[0], "value"] = -1.0
    dsk = {"ones": (np.ones, 100_000), "frame": (make_frame, 0)}
    stored, stored_frame = scd.get(dsk, ["ones", "frame"])
    stored[0] = 2.0
    stored_frame.loc[0, "value"] = 2.0
    view = scd.get(dsk, "ones", writeable_results=False)
    assert not view.flags.writeable  # the zero-copy view of the store, on request


def test_a_large_result_is_writeable_without_a_copy(runtime: sc.Runtime) -> None:
    """The result is the store's object mapped copy-on-write: the driver gets no copy of its
    own (its pages are the store's until written), and a write changes only the driver's."""
    # 128 MiB made by one task (a collection's own finalize may run in the driver instead:
    # dask.array's concatenation did in older Dask).
    x = dask.delayed(np.ones)((4096, 4096))
    before = anonymous_memory(os.getpid())
    result = ours(x)
    assert anonymous_memory(os.getpid()) - before < 32 * 1024 * 1024
    assert result.flags.writeable and result.shape == (4096, 4096)
    result[0] = 7.0
    assert result[0, 0] == 7.0 and result[1, 0] == 1.0
    assert (ours(x)[:2, :2] == 1.0).all()
    del result
    assert wait_until_freed(runtime) == 0


def test_small_window_still_finishes(runtime: sc.Runtime) -> None:
    x = da.random.default_rng(4).random((300, 300), chunks=(100, 100))
    y = (x @ x.T).sum()
    assert ours(y, max_in_flight=1) == pytest.approx(sync(y), rel=1e-9)


# -- the example -----------------------------------------------------------------------------


def test_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "dask_on_sharedcompute.py"), "--small"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "same as Dask's sync scheduler" in proc.stdout


def test_benchmark_quick_run() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "bench" / "dask_workloads.py"),
            "--quick",
            "--json",
            "--workloads",
            "bag,delayed_tree",
            "--schedulers",
            "sharedcompute,threads",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for workload in ("bag", "delayed_tree"):
        for scheduler in ("sync", "sharedcompute", "threads"):
            figures = report["results"][workload][scheduler]
            assert "error" not in figures, figures["error"]
            assert figures["matches_sync"] is True
            assert figures["median_s"] > 0 and len(figures["times_s"]) == 2
    assert {t["name"] for t in report["targets"]} >= {"same_as_sync", "bag_faster_than_threads"}
