"""``num_returns``: one task's result as several Futures, each stored on its own."""

from __future__ import annotations

import numpy as np
import pytest

import sharedcompute as sc
from sharedcompute.errors import DependencyFailedError

TIMEOUT = 60
MiB = 1 << 20


@sc.remote(num_returns=2)
def halves(x: int) -> tuple[int, int]:
    return x, x + 1


@sc.remote
def arrays(n: int) -> tuple[np.ndarray, ...]:
    return tuple(np.full(MiB // 8 * 2, i) for i in range(n))


@sc.remote
def add(a: int, b: int) -> int:
    return a + b


@sc.remote(num_returns=2)
def too_many() -> tuple[int, int, int]:
    return 1, 2, 3


@sc.remote(num_returns=2)
def broken() -> tuple[int, int]:
    raise KeyError("nope")


@sc.remote
class Pairs:
    def pair(self, x: int) -> tuple[int, int]:
        return x, -x


def test_each_part_is_a_future_and_a_dependency() -> None:
    with sc.Runtime(num_workers=2):
        first, second = halves.submit(10)
        assert (first.result(timeout=TIMEOUT), second.result(timeout=TIMEOUT)) == (10, 11)
        assert add.submit(first, second).result(timeout=TIMEOUT) == 21


def test_large_parts_go_through_the_store_each_on_its_own() -> None:
    with sc.Runtime(num_workers=2):
        parts = arrays.options(num_returns=3).submit(3)
        assert len(parts) == 3
        values = sc.get(parts, timeout=TIMEOUT)
        assert [int(v[0]) for v in values] == [0, 1, 2]
        refs = [part.ref for part in parts]
        assert len({ref.object_id for ref in refs}) == 3
        assert all(2 * MiB <= ref.nbytes < 3 * MiB for ref in refs)  # a part, not the whole


def test_a_result_of_the_wrong_length_fails_every_part_saying_so() -> None:
    with sc.Runtime(num_workers=1):
        for part in too_many.submit():
            with pytest.raises(ValueError) as raised:
                part.result(timeout=TIMEOUT)
            message = str(raised.value)
            assert "too_many" in message and "num_returns=2" in message
            assert "tuple of 3 values" in message


def test_a_failed_task_fails_every_part_with_its_own_error() -> None:
    """As each of Ray's refs raises the task's error: its type, its remote traceback."""
    with sc.Runtime(num_workers=1):
        parts = broken.submit()
        for part in parts:
            with pytest.raises(KeyError) as raised:
                part.result(timeout=TIMEOUT)
            assert "broken" in str(raised.value.__cause__)  # the remote traceback
        # A task that takes a part still sees a dependency that failed.
        with pytest.raises(DependencyFailedError) as raised:
            sc.submit(str, parts[0]).result(timeout=TIMEOUT)
        assert isinstance(raised.value.__cause__, KeyError)


def test_a_failed_task_fails_every_part_from_inside_a_task_too() -> None:
    with sc.Runtime(num_workers=2):
        assert sc.submit(part_errors).result(timeout=TIMEOUT) == ["KeyError", "KeyError"]


def part_errors() -> list[str]:
    return [type(part.exception()).__name__ for part in broken.submit()]


def test_actor_methods_take_num_returns_too() -> None:
    with sc.Runtime(num_workers=1):
        actor = Pairs.remote()
        plus, minus = actor.pair.options(num_returns=2).remote(4)
        assert sc.get([plus, minus], timeout=TIMEOUT) == [4, -4]
        with pytest.raises(ValueError, match="num_returns"):
            actor.pair.options(num_returns=0)
        with pytest.raises(ValueError, match="num_returns"):
            halves.options(num_returns="2")
