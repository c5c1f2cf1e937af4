"""The public surface: ``__all__`` is honest, and the errors form the documented hierarchy."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import pickle
import types

import pytest

import sharedcompute as sc
from sharedcompute import errors

# The public API the README documents: users and the rest of this suite depend on these names.
PINNED = {
    "init", "shutdown", "submit", "map", "put", "get", "wait", "as_completed", "gather",
    "remote", "config", "Executor", "Future", "Runtime", "errors", "get_actor", "kill",
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION",
    "nodes", "cluster_resources", "available_resources", "Pool", "FutureStream",
}


def public_submodules() -> set[str]:
    return {
        name for name, value in vars(sc).items()
        if isinstance(value, types.ModuleType) and value.__name__.startswith("sharedcompute.")
    }


def test_all_has_no_duplicates_and_no_private_names() -> None:
    assert len(sc.__all__) == len(set(sc.__all__))
    assert all(isinstance(name, str) for name in sc.__all__)
    assert [name for name in sc.__all__ if name.startswith("_")] == []


@pytest.mark.parametrize("name", sc.__all__)
def test_every_name_in_all_resolves(name: str) -> None:
    assert getattr(sc, name) is not None


def test_pinned_names_are_exported() -> None:
    assert set(sc.__all__) >= PINNED


def test_dir_shows_only_public_names() -> None:
    for name in sc.__all__:
        getattr(sc, name)  # resolve the lazy ones, so they are in the namespace too
    visible = {name for name in dir(sc) if not name.startswith("_")}
    stray = visible - set(sc.__all__) - public_submodules()
    assert not stray, f"public-looking names not in __all__: {sorted(stray)}"
    assert set(sc.__all__) <= set(dir(sc))


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from sharedcompute import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(sc.__all__)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        sc.no_such_name  # noqa: B018
    assert not hasattr(sc, "no_such_name")


def test_version() -> None:
    assert isinstance(sc.__version__, str) and sc.__version__


def test_concurrent_futures_compatibility() -> None:
    assert issubclass(sc.Future, concurrent.futures.Future)
    assert issubclass(sc.Executor, concurrent.futures.Executor)
    assert sc.ALL_COMPLETED == concurrent.futures.ALL_COMPLETED
    assert sc.FIRST_COMPLETED == concurrent.futures.FIRST_COMPLETED
    assert sc.FIRST_EXCEPTION == concurrent.futures.FIRST_EXCEPTION
    assert hasattr(sc.Runtime, "__enter__") and hasattr(sc.Runtime, "__exit__")


def test_config_surface() -> None:
    assert callable(sc.config.set) and callable(sc.config.get) and callable(sc.config.reset)


# -- errors ---------------------------------------------------------------------------------


def defined_in_errors() -> set[str]:
    return {
        name for name, value in vars(errors).items()
        if isinstance(value, type) and value.__module__ == errors.__name__
    }


def test_errors_all_is_exactly_the_classes_defined_there() -> None:
    assert len(errors.__all__) == len(set(errors.__all__))
    assert set(errors.__all__) == defined_in_errors()


HIERARCHY = [
    ("SharedComputeError", (Exception,)),
    ("WorkerCrashedError", (
        errors.SharedComputeError, concurrent.futures.process.BrokenProcessPool,
        concurrent.futures.BrokenExecutor,
    )),
    ("ActorDiedError", (errors.SharedComputeError,)),
    ("DependencyFailedError", (errors.SharedComputeError,)),
    ("ObjectLostError", (errors.SharedComputeError,)),
    ("ObjectStoreFullError", (errors.SharedComputeError,)),
    ("SerializationError", (errors.SharedComputeError, TypeError, pickle.PicklingError)),
    ("DeserializationError", (
        errors.SerializationError, pickle.UnpicklingError,
        concurrent.futures.process.BrokenProcessPool,
    )),
    ("AuthenticationError", (errors.SharedComputeError, PermissionError)),
    ("RuntimeEnvError", (errors.SharedComputeError,)),
]


@pytest.mark.parametrize(("name", "bases"), HIERARCHY, ids=[name for name, _ in HIERARCHY])
def test_error_hierarchy(name: str, bases: tuple[type, ...]) -> None:
    cls = getattr(errors, name)
    for base in bases:
        assert issubclass(cls, base), f"{name} should subclass {base.__name__}"
    assert name in (errors.__doc__ or ""), "the module docstring draws the hierarchy"


def test_every_runtime_error_derives_from_shared_compute_error() -> None:
    # RemoteTraceback is not raised on its own: it is the __cause__ carrying a remote traceback.
    for name in set(errors.__all__) - {"RemoteTraceback"}:
        assert issubclass(getattr(errors, name), errors.SharedComputeError), name
    assert not issubclass(errors.RemoteTraceback, errors.SharedComputeError)
    assert {name for name, _ in HIERARCHY} == set(errors.__all__) - {"RemoteTraceback"}


def test_broken_executor_handlers_catch_worker_crashes() -> None:
    with pytest.raises(concurrent.futures.BrokenExecutor):
        raise errors.WorkerCrashedError("pid 1 was killed by SIGKILL")


@pytest.mark.parametrize("name", sorted(errors.__all__))
def test_errors_survive_pickling(name: str) -> None:
    # They travel between processes.
    error = getattr(errors, name)("some message")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)


def test_remote_traceback_keeps_its_text() -> None:
    tb = errors.RemoteTraceback("Traceback (most recent call last):\n  ...\nValueError: x\n")
    assert tb.tb.endswith("ValueError: x\n")
    assert "ValueError: x" in str(tb)
