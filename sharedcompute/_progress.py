"""Progress bars over Futures: ``sc.progress(futures)`` and ``sc.as_completed(..., progress=True)``.

A bar is tqdm's (``tqdm.auto``: a widget in a notebook, text in a terminal), advanced
once per Future as it finishes, whichever way it finishes (a failed or cancelled Future
is done too). The waiting is ``as_completed``'s, so a bar inside a task lends the
task's CPU like any wait. tqdm is an extra: ``pip install "sharedcompute[progress]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def bar(total: int, **options: Any) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            'progress bars need tqdm: pip install "sharedcompute[progress]" (or tqdm)'
        ) from None
    options.setdefault("unit", "task")
    return tqdm(total=total, **options)


def counted(finished: Iterator[T], total: int, **options: Any) -> Iterator[T]:
    """Yield what ``finished`` yields, advancing a bar of ``total`` at each."""
    with bar(total, **options) as shown:
        for item in finished:
            shown.update(1)
            yield item


def progress(futures: Iterable[T], as_completed: Callable[..., Iterator[T]],
             timeout: float | None, **options: Any) -> list[T]:
    listed = list(futures)
    for _ in counted(as_completed(listed, timeout), len(listed), **options):
        pass
    return listed
