"""``num_returns=N``: one task's result as N Futures, each a value of its own in the store.

The task runs as any other; then N small tasks each take one part of its result
(``pick``: ``result[i]``) and return it, so every part is stored on its own and each
Future is a dependency like any other, on one machine or a cluster (a pick is short and
follows its task onto the same worker: the core queues it right behind). A result that
is not a sequence of N values fails every pick with an error naming the function, N and
what came back; if the task fails, every part fails with the task's own error (its type,
its remote traceback: the picks pass their dependency's error on), as each of Ray's refs
raises the task's error.
"""

from __future__ import annotations

from typing import Any

from sharedcompute._runtime._base import RuntimeBase, TaskOptions
from sharedcompute._runtime._future import Future

_PICK = TaskOptions(max_retries=0, pass_errors=True)


def pick(result: Any, index: int, count: int, function: str) -> Any:
    """In a worker: part ``index`` of a result that must hold ``count`` values."""
    try:
        size = len(result)
    except TypeError:
        size = None
    if size != count or isinstance(result, (str, bytes, dict)):
        what = (f"a {type(result).__name__} of {size} values" if size is not None
                else f"a {type(result).__name__}, which has no length")
        raise ValueError(f"{function} has num_returns={count} but returned {what}")
    return result[index]


def split(runtime: RuntimeBase, whole: Future[Any], count: int,
          function: str) -> list[Future[Any]]:
    """The ``count`` Futures of a task submitted with ``num_returns=count``."""
    parts = [runtime.submit(pick, (whole, index, count, function), {}, _PICK)
             for index in range(count)]
    for index, part in enumerate(parts):
        part.name = f"{function}[{index}]"
    return parts


def check_num_returns(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_returns must be an int >= 1, got {value!r}")
    return value
