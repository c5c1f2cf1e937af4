"""joblib's "sharedcompute" backend: the same results as loky, on the runtime's workers.

Each test runs on a runtime of its own (the suite's leak guard sees its workers go away). loky's
reference results are computed once, in a fresh interpreter: loky leaves its workers and two
resource trackers running until the interpreter exits, which the leak guard would report.
Every Parallel is given ``timeout=``, every Future a timeout in ``result()``.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _cluster import TOKEN, Cluster
from _helpers import wait_until

joblib = pytest.importorskip("joblib")

from joblib import Parallel, delayed  # noqa: E402

import sharedcompute as sc  # noqa: E402
import sharedcompute.joblib as scj  # noqa: E402
from sharedcompute._cluster import ClusterClient  # noqa: E402
from sharedcompute.errors import RemoteTraceback  # noqa: E402
from tools.bench._common import run_in_subprocess  # noqa: E402

TIMEOUT = 60
MiB = 1024 * 1024
GRID = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.1]}
# scikit-learn is imported where it is used: workers import this module to find its functions,
# and each test's fresh workers would otherwise pay for importing scikit-learn.
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)


# -- what the calls do (module level: workers import them from here) -----------------------


def square(i: int) -> int:
    return i * i


def divide(a: float, b: float = 1.0) -> float:
    return a / b


def boom(i: int) -> int:
    if i == 7:
        raise KeyError(f"seven: {i}")
    return i


def where(_: int) -> int:
    return os.getpid()


def element(x: np.ndarray, i: int, pause: float = 0.0) -> tuple[float, bool]:
    time.sleep(pause)
    return float(x[i]), bool(x.flags.writeable)


def ones(n: int) -> np.ndarray:
    return np.ones(n)


def blas_threads(_: int) -> int:
    from threadpoolctl import threadpool_info

    return max((pool["num_threads"] for pool in threadpool_info()), default=0)


def inner_parallel(n: int) -> tuple[int, str]:
    """A Parallel inside a batch: joblib's nested backend (threads), as under loky."""
    total = sum(Parallel(n_jobs=-1, timeout=TIMEOUT)(delayed(square)(i) for i in range(n)))
    return total, type(joblib.parallel.get_active_backend()[0]).__name__


def parallel_on_sharedcompute(n: int, return_as: str = "list") -> int:
    """A Parallel that asks for this backend inside a task: it submits to the same runtime."""
    with joblib.parallel_config(backend="sharedcompute"):
        out = Parallel(n_jobs=2, timeout=TIMEOUT, return_as=return_as)(
            delayed(square)(i) for i in range(n)
        )
        return sum(out)


def sklearn_results() -> dict[str, Any]:
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    search = GridSearchCV(SVC(), GRID, cv=5, n_jobs=-1).fit(X, y)
    forest = RandomForestClassifier(n_estimators=20, random_state=0)
    return {
        "mean_test_score": search.cv_results_["mean_test_score"],
        "best_params": search.best_params_,
        "cross_val_score": cross_val_score(forest, X, y, cv=5, n_jobs=-1),
    }


def parallel_results() -> dict[str, Any]:
    calls = [delayed(divide)(i, b=2.0) for i in range(300)]
    results: dict[str, Any] = {
        "list": Parallel(n_jobs=2, timeout=TIMEOUT)(calls),
        "generator": list(Parallel(n_jobs=2, timeout=TIMEOUT, return_as="generator")(calls)),
        "generator_unordered": sorted(
            Parallel(n_jobs=2, timeout=TIMEOUT, return_as="generator_unordered")(calls)
        ),
    }
    try:
        Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(boom)(i) for i in range(20))
    except Exception as error:
        results["error"] = (type(error), str(error))
    return results


def loky_reference() -> dict[str, Any]:
    """Run in a fresh interpreter: what joblib's default backend (loky) gives."""
    with joblib.parallel_config(backend="loky"):
        results = parallel_results()
        if importlib.util.find_spec("sklearn") is not None:
            results.update(sklearn_results())
        return results


@pytest.fixture(scope="module")
def loky() -> dict[str, Any]:
    return run_in_subprocess(loky_reference, timeout=2 * TIMEOUT)


@pytest.fixture
def runtime() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=2) as rt, joblib.parallel_config(backend="sharedcompute"):
        yield rt


def count_puts(rt: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the runtime's puts (the backend stores large arguments with them)."""
    sizes: list[int] = []
    put = rt.put

    def counting(value: Any) -> Any:
        sizes.append(int(getattr(value, "nbytes", 0)))
        return put(value)

    monkeypatch.setattr(rt, "put", counting)
    return sizes


def store_used() -> int:
    return int(sum(node["store_used"] for node in sc.nodes()))


# -- registration ------------------------------------------------------------------------


def test_importing_registers_the_backend_and_register_does_it_again() -> None:
    assert joblib.parallel.BACKENDS["sharedcompute"] is scj.SharedComputeBackend
    joblib.register_parallel_backend("sharedcompute", joblib.parallel.ThreadingBackend)
    try:
        assert joblib.parallel.BACKENDS["sharedcompute"] is not scj.SharedComputeBackend
    finally:
        scj.register()
    assert joblib.parallel.BACKENDS["sharedcompute"] is scj.SharedComputeBackend


# -- the same results as loky --------------------------------------------------------------


def test_list_generator_and_unordered_results_match_loky(
    runtime: sc.Runtime, loky: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = []
    submit = scj.SharedComputeBackend.submit

    def counting(self: Any, func: Any, callback: Any = None) -> Any:
        batches.append(len(func.items))
        return submit(self, func, callback)

    monkeypatch.setattr(scj.SharedComputeBackend, "submit", counting)
    ours = parallel_results()
    for key in ("list", "generator", "generator_unordered", "error"):
        assert ours[key] == loky[key], key
    # It ran as tasks, and joblib batched the tiny calls.
    assert sum(batches) >= 3 * 300 and len(batches) < 3 * 300


def test_an_error_keeps_its_type_and_the_remote_traceback(runtime: sc.Runtime) -> None:
    for return_as in ("list", "generator", "generator_unordered"):
        with pytest.raises(KeyError, match="seven: 7") as caught:
            list(Parallel(n_jobs=2, timeout=TIMEOUT, return_as=return_as)(
                delayed(boom)(i) for i in range(50)
            ))
        cause = caught.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "in boom" in str(cause) and 'raise KeyError(f"seven: {i}")' in str(cause)
    # The backend and the runtime go on working after an aborted call.
    assert Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(square)(i) for i in range(5)) == [
        0, 1, 4, 9, 16
    ]


@needs_sklearn
def test_gridsearchcv_and_cross_val_score_match_loky(
    runtime: sc.Runtime, loky: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = []
    submit = scj.SharedComputeBackend.submit

    def counting(self: Any, func: Any, callback: Any = None) -> Any:
        batches.append(len(func.items))
        return submit(self, func, callback)

    monkeypatch.setattr(scj.SharedComputeBackend, "submit", counting)
    ours = sklearn_results()
    np.testing.assert_array_equal(ours["mean_test_score"], loky["mean_test_score"])
    assert ours["best_params"] == loky["best_params"]
    np.testing.assert_array_equal(ours["cross_val_score"], loky["cross_val_score"])
    # 6 candidates x 5 folds and 5 folds, all on the runtime's workers.
    assert sum(batches) == 6 * 5 + 5


# -- n_jobs --------------------------------------------------------------------------------


def test_n_jobs_minus_one_is_every_cpu_of_the_runtime() -> None:
    with sc.Runtime(num_workers=3), joblib.parallel_config(backend="sharedcompute"):
        assert joblib.effective_n_jobs(-1) == 3  # its 3 workers, whatever this host has
        assert joblib.effective_n_jobs(-2) == 2
        assert joblib.effective_n_jobs(None) == 3  # unset: the whole runtime
        assert joblib.effective_n_jobs(5) == 5
        here = os.getpid()
        pids = set(Parallel(n_jobs=-1, timeout=TIMEOUT)(delayed(where)(i) for i in range(30)))
        assert here not in pids and pids
        # n_jobs=1 runs in this process, as with joblib's own backends.
        assert set(Parallel(n_jobs=1)(delayed(where)(i) for i in range(3))) == {here}


# -- nesting -----------------------------------------------------------------------------


def test_a_parallel_inside_sharedcompute_tasks_finishes(runtime: sc.Runtime) -> None:
    expected = sum(i * i for i in range(100))
    # More tasks than workers, each waiting on its own Parallel on the same runtime.
    for return_as in ("list", "generator_unordered"):
        futures = [sc.submit(parallel_on_sharedcompute, 100, return_as) for _ in range(5)]
        assert [f.result(TIMEOUT) for f in futures] == [expected] * 5


def test_a_parallel_inside_a_batch_runs_on_threads_or_on_the_runtime(runtime: sc.Runtime) -> None:
    expected = sum(i * i for i in range(40))
    nested = Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(inner_parallel)(40) for _ in range(4))
    assert nested == [(expected, "ThreadingBackend")] * 4
    asked = Parallel(n_jobs=2, timeout=TIMEOUT)(
        delayed(parallel_on_sharedcompute)(40) for _ in range(4)
    )
    assert asked == [expected] * 4


THREAD_VARS = joblib.parallel.ParallelBackendBase.MAX_NUM_THREADS_VARS
needs_threadpoolctl = pytest.mark.skipif(
    importlib.util.find_spec("threadpoolctl") is None, reason="threadpoolctl is not installed"
)


@needs_threadpoolctl
def test_calls_run_with_loky_s_thread_limits(runtime: sc.Runtime) -> None:
    unlimited = sc.submit(blas_threads, 0).result(TIMEOUT)
    if unlimited == 0:
        pytest.skip("numpy has no BLAS thread pool here")
    if not any(var in os.environ for var in THREAD_VARS):
        # loky's default: cpu_count // n_jobs threads per worker, for each call only.
        limited = Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(blas_threads)(i) for i in range(4))
        assert limited == [max((os.cpu_count() or 1) // 2, 1)] * 4
    with joblib.parallel_config(backend="sharedcompute", inner_max_num_threads=3):
        asked = Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(blas_threads)(i) for i in range(4))
    assert asked == [3] * 4
    assert sc.submit(blas_threads, 0).result(TIMEOUT) == unlimited  # a plain task: untouched


# -- large arguments -------------------------------------------------------------------------


def test_a_large_array_passed_to_50_calls_is_stored_once_per_call(
    runtime: sc.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.arange(1 * MiB, dtype=np.float64)  # 8 MiB
    small = np.arange(1000, dtype=np.float64)
    puts = count_puts(runtime, monkeypatch)
    before = store_used()
    used = []
    results = Parallel(n_jobs=2, timeout=TIMEOUT, return_as="generator")(
        delayed(element)(x, i, pause=0.02) for i in range(50)
    )
    for result in results:
        used.append(store_used() - before)  # while later calls are in flight
        assert result[1] is False  # a read-only view of the stored object
    assert puts == [x.nbytes]
    assert max(used) < 2 * x.nbytes
    assert Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(element)(small, i) for i in range(50)) == [
        (float(i), True) for i in range(50)
    ]  # small arrays go by value
    # Another call stores it again (once); a keyword argument counts the same.
    values = Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(element)(x, i=i) for i in range(50))
    assert values == [(float(i), False) for i in range(50)]
    assert puts == [x.nbytes] * 2
    with joblib.parallel_config(backend="sharedcompute", max_nbytes=None):
        Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(element)(x, i) for i in range(4))
    assert puts == [x.nbytes] * 2  # max_nbytes=None: no auto-storing, as for loky's memmapping
    # Once the calls are done, the stored copies are freed.
    wait_until(lambda: store_used() - before < x.nbytes, TIMEOUT, "the stored array is freed")


def test_results_are_the_callers_to_change_as_with_loky(runtime: sc.Runtime) -> None:
    results = Parallel(n_jobs=2, timeout=TIMEOUT)(delayed(ones)(100_000) for _ in range(4))
    for array in results:
        array += 1  # from the store, yet writeable
        assert array.sum() == 200_000


# -- a cluster -------------------------------------------------------------------------


def test_parallel_runs_on_a_cluster(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.add_node(workers=2)
    client = ClusterClient(cluster.head.address, TOKEN)
    try:
        with client, joblib.parallel_config(backend="sharedcompute"):
            assert joblib.effective_n_jobs(-1) == 3  # the head's worker and the node's two
            puts = count_puts(client, monkeypatch)
            x = np.arange(MiB // 4, dtype=np.float64)  # 2 MiB
            # A function every node can import (this test module is not on the nodes' path).
            values = Parallel(timeout=TIMEOUT)(delayed(operator.getitem)(x, i) for i in range(30))
            assert values == [float(i) for i in range(30)]
            assert len(puts) == 1
    finally:
        client.shutdown()
