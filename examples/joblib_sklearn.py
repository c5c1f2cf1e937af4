"""scikit-learn's GridSearchCV on sharedcompute, through joblib.

Importing ``sharedcompute.joblib`` registers a joblib backend named "sharedcompute". Inside
``joblib.parallel_config(backend="sharedcompute")`` every ``n_jobs=`` of scikit-learn (and every
``joblib.Parallel``) runs its work as tasks on the runtime's worker processes; ``n_jobs=-1``
means every CPU of the runtime (of the whole cluster after ``sc.init(address=...)``). Large
arrays passed to many fits go into the shared-memory store once per search.

Run: python examples/joblib_sklearn.py
(needs ``pip install "sharedcompute[joblib]" scikit-learn``)
"""

from __future__ import annotations

import sys
import time

import joblib
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import sharedcompute as sc
import sharedcompute.joblib  # registers joblib's "sharedcompute" backend

GRID = {"C": [1.0, 10.0], "gamma": [0.0005, 0.001]}


def main() -> None:
    X, y = load_digits(return_X_y=True)

    with sc.Runtime(num_workers=2), joblib.parallel_config(backend="sharedcompute"):
        start = time.perf_counter()
        search = GridSearchCV(SVC(), GRID, cv=5, n_jobs=-1).fit(X, y)
        elapsed = time.perf_counter() - start
    fits = len(search.cv_results_["params"]) * search.n_splits_
    print(f"GridSearchCV: {fits} fits on sharedcompute in {elapsed:.2f} s")
    print(f"best parameters: {search.best_params_}, accuracy {search.best_score_:.4f}")

    # The same search in this process alone gives the same scores.
    alone = GridSearchCV(SVC(), GRID, cv=5, n_jobs=1).fit(X, y)
    same = np.array_equal(
        search.cv_results_["mean_test_score"], alone.cv_results_["mean_test_score"]
    )
    print("the same scores as n_jobs=1 in this process" if same else "RESULTS DIFFER")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
