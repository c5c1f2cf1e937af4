"""Progress bars: ``sc.progress`` and ``sc.as_completed(..., progress=True)``, on real workers."""

from __future__ import annotations

import io
import time

import pytest

import sharedcompute as sc

TIMEOUT = 60


def _nap(i: int) -> int:
    time.sleep(0.01 * (i % 3))
    return i


def _fail(i: int) -> int:
    raise ValueError(f"bad {i}")


def test_progress_draws_a_bar_until_every_future_is_done() -> None:
    with sc.Runtime(num_workers=2):
        futures = [sc.submit(_nap, i) for i in range(12)] + [sc.submit(_fail, 99)]
        out = io.StringIO()
        returned = sc.progress(futures, timeout=TIMEOUT, file=out, desc="naps")
        assert returned == futures and all(f.done() for f in futures)
        text = out.getvalue()
        assert "naps" in text and "13/13" in text and "100%" in text, text
        with pytest.raises(ValueError, match="bad 99"):
            futures[-1].result(timeout=0)


def test_as_completed_with_progress_yields_every_future_once() -> None:
    with sc.Runtime(num_workers=2):
        futures = [sc.submit(_nap, i) for i in range(8)]
        seen = sorted(f.result(timeout=0) for f in sc.as_completed(futures, TIMEOUT,
                                                                  progress=True))
        assert seen == list(range(8))


def _parent(n: int) -> int:
    children = [sc.submit(_nap, i) for i in range(n)]
    sc.progress(children, timeout=TIMEOUT, file=io.StringIO())
    return sum(f.result(timeout=TIMEOUT) for f in children)


def test_a_task_can_wait_on_its_children_under_a_bar() -> None:
    with sc.Runtime(num_workers=1):  # the parent lends its CPU while the bar waits
        assert sc.submit(_parent, 6).result(timeout=TIMEOUT) == sum(range(6))
