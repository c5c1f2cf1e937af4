"""What errors and worker output tell the user; each message names what went wrong and where.

- the runtime's errors are also the stdlib's: a SerializationError is a
  pickle.PicklingError, a WorkerCrashedError a BrokenProcessPool;
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

import pytest

import sharedcompute as sc
from sharedcompute.errors import SerializationError, WorkerCrashedError

TIMEOUT = 60


@pytest.fixture
def rt() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=1) as runtime:
        yield runtime


# -- the runtime's errors are also the stdlib's -----------------------------------------------


def test_error_classes_keep_their_stdlib_bases() -> None:
    assert SerializationError.__mro__.index(TypeError) < SerializationError.__mro__.index(
        pickle.PicklingError
    )
    error = pickle.loads(pickle.dumps(SerializationError("x")))
    assert isinstance(error, SerializationError) and str(error) == "x"
    assert issubclass(WorkerCrashedError, BrokenProcessPool)
    assert issubclass(WorkerCrashedError, sc.errors.SharedComputeError)
