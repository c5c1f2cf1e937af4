"""The scheduler core as a pure state machine: events in, instructions out, no processes.

Most behaviour is written as scripts: a list of steps, each a batch of events
and the instructions the core must answer with (in order). Instructions are
compared through :func:`show`, which turns each into a tuple (an exception
becomes its type), so a failing script prints what the core really said.
Checks that need more than a type (error messages, causes) are separate tests.
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Any

import pytest

from sharedcompute._scheduler import (
    NO_TASK,
    ActorRequested,
    CancelRequested,
    Dispatch,
    ExternalTask,
    FreeObject,
    KeyReleased,
    KeyRetained,
    LostInputRecheck,
    NodeJoined,
    NodeLeft,
    ObjectPut,
    PlaceActor,
    Reject,
    Resolve,
    Resources,
    SchedulerCore,
    StartWorker,
    StealCheck,
    StealLater,
    TaskFailed,
    TaskFinished,
    TaskReturned,
    TaskState,
    TaskSubmitted,
    Withdraw,
    WithdrawRequested,
    WorkerBlocked,
    WorkerDied,
    WorkerJoined,
    WorkerUnblocked,
)
from sharedcompute.errors import DependencyFailedError, ObjectLostError, WorkerCrashedError

TWO_CPUS = Resources(cpus=2.0)
GPU = Resources(cpus=1.0, custom=(("GPU", 1.0),))


# -- helpers ---------------------------------------------------------------------------


def show(instruction: Any) -> tuple[Any, ...]:
    """An instruction as a comparable tuple."""
    if isinstance(instruction, Dispatch):
        return ("dispatch", instruction.worker, instruction.key, instruction.dependency_refs)
    if isinstance(instruction, Resolve):
        return ("resolve", instruction.key, instruction.ref)
    if isinstance(instruction, Reject):
        kind = "cancel" if instruction.cancelled else "reject"
        return (kind, instruction.key, type(instruction.error))
    if isinstance(instruction, FreeObject):
        return ("free", instruction.key, instruction.ref)
    if isinstance(instruction, StartWorker):
        return ("start", instruction.replaces)
    if isinstance(instruction, StealLater):
        return ("steal later",)
    if isinstance(instruction, Withdraw):
        return ("withdraw", instruction.worker, instruction.key)
    raise AssertionError(f"unknown instruction {instruction!r}")


def submit(key: int, *deps: int, **fields: Any) -> TaskSubmitted:
    return TaskSubmitted(key, dependencies=deps, payload=f"payload-{key}", **fields)


def short(key: int, *deps: int, **fields: Any) -> TaskSubmitted:
    """A task whose function is known to be short: the only kind that is prefetched."""
    return submit(key, *deps, short=True, **fields)


def brief(key: int, *deps: int, **fields: Any) -> TaskSubmitted:
    """A task whose function is known to run for under 100 ms: queued one deep (pipeline)."""
    return submit(key, *deps, brief=True, **fields)


def child(key: int, parent: int, *deps: int, **fields: Any) -> TaskSubmitted:
    """A task submitted from inside task ``parent``."""
    return submit(key, *deps, parent=parent, **fields)


def make_core(
    cpus: float = 2, workers: int = 2, max_prefetch: int | None = None,
    pipeline: bool = False, **custom: float
) -> SchedulerCore:
    options = {} if max_prefetch is None else {"max_prefetch": max_prefetch}
    core = SchedulerCore({"CPU": float(cpus), **custom}, pipeline=pipeline, **options)
    assert core.handle([WorkerJoined(w) for w in range(workers)]) == []
    return core


def run_script(core: SchedulerCore, steps: list[tuple[Any, list[tuple[Any, ...]]]]) -> None:
    for number, (events, expected) in enumerate(steps):
        got = [show(i) for i in core.handle(events)]
        assert got == expected, f"step {number} ({events!r})"


def dispatch(worker: int, key: int, *refs: tuple[int, Any]) -> tuple[Any, ...]:
    return ("dispatch", worker, key, tuple(refs))


def reject(key: int, error: type[BaseException]) -> tuple[Any, ...]:
    return ("reject", key, error)


def cancelled(key: int) -> tuple[Any, ...]:
    return ("cancel", key, CancelledError)


def resolve(key: int, ref: Any) -> tuple[Any, ...]:
    return ("resolve", key, ref)


def free(key: int, ref: Any) -> tuple[Any, ...]:
    return ("free", key, ref)


# -- scripts ------------------------------------------------------------------------------
# Each: (core factory kwargs, steps). Workers are 0..n-1, CPUs as given.

SCRIPTS: dict[str, tuple[dict[str, Any], list[tuple[Any, list[tuple[Any, ...]]]]]] = {
    "no deps: dispatched to an idle worker at once": (
        {"cpus": 2, "workers": 2},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2), [dispatch(1, 2)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
        ],
    ),
    "dependencies wait, then go with their refs": (
        {"cpus": 2, "workers": 2},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2), [dispatch(1, 2)]),
            (submit(3, 1, 2), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), dispatch(0, 3, (1, "r1"), (2, "r2"))]),
        ],
    ),
    "a dependency listed twice is waited on and sent once": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1, 1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2, (1, "r1"))]),
        ],
    ),
    "a dependency already finished: dispatched at submit": (
        {"cpus": 1, "workers": 1},
        [
            (ObjectPut(1, "put-ref"), []),
            (submit(2, 1), [dispatch(0, 2, (1, "put-ref"))]),
        ],
    ),
    "FIFO: ready tasks leave in submission order": (
        {"cpus": 1, "workers": 1},
        [
            ([submit(k) for k in (1, 2, 3, 4)], [dispatch(0, 1)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2)]),
            (TaskFinished(2, 0, "r2"), [resolve(2, "r2"), dispatch(0, 3)]),
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3"), dispatch(0, 4)]),
        ],
    ),
    "FIFO: a task made ready by a dependency queues behind earlier ready tasks": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1), []),
            (submit(3), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 3)]),
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3"), dispatch(0, 2, (1, "r1"))]),
        ],
    ),
    "num_cpus=2 on a 4-CPU node: two at a time": (
        {"cpus": 4, "workers": 4},
        [
            (submit(1, resources=TWO_CPUS), [dispatch(0, 1)]),
            (submit(2, resources=TWO_CPUS), [dispatch(1, 2)]),
            (submit(3, resources=TWO_CPUS), []),
            (submit(4), []),  # no CPU left even for a unit task, though workers are idle
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 3)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), dispatch(1, 4)]),
        ],
    ),
    "a task needing more CPUs does not hold back unit tasks that fit": (
        {"cpus": 2, "workers": 2},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, resources=TWO_CPUS), []),
            (submit(3), [dispatch(1, 3)]),
        ],
    ),
    "custom resources: one GPU, one GPU task at a time": (
        {"cpus": 2, "workers": 2, "GPU": 1.0},
        [
            (submit(1, resources=GPU), [dispatch(0, 1)]),
            (submit(2, resources=GPU), []),
            (submit(3), [dispatch(1, 3)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2)]),
        ],
    ),
    "infeasible: more CPUs than the node has": (
        {"cpus": 4, "workers": 4},
        [(submit(1, resources=Resources(cpus=8.0)), [reject(1, ValueError)])],
    ),
    "infeasible: a custom resource the node lacks": (
        {"cpus": 2, "workers": 2},
        [(submit(1, resources=GPU), [reject(1, ValueError)])],
    ),
    "prefetch: one short task queued behind a busy worker, no deeper": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2), [dispatch(0, 2)]),
            (short(3), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 3)]),
        ],
    ),
    "prefetch: up to max_prefetch deep": (
        {"cpus": 1, "workers": 1, "max_prefetch": 3},
        [
            ([short(k) for k in (1, 2, 3, 4, 5)],
             [dispatch(0, 1), dispatch(0, 2), dispatch(0, 3), dispatch(0, 4)]),
        ],
    ),
    "prefetch: spread over workers, least loaded first": (
        {"cpus": 2, "workers": 2, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2), [dispatch(1, 2)]),
            (short(3), [dispatch(0, 3)]),
            (short(4), [dispatch(1, 4)]),
            (short(5), []),
        ],
    ),
    "prefetch: a task not known to be short is never queued behind a busy worker": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (submit(2), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2)]),
        ],
    ),
    "prefetch: nothing is queued behind a task not known to be short": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (short(2), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2)]),
        ],
    ),
    "prefetch: a task needing 2 CPUs is never queued behind a busy worker": (
        {"cpus": 2, "workers": 1, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, resources=TWO_CPUS), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2)]),
        ],
    ),
    "prefetch: a task handed back by its worker goes to another": (
        {"cpus": 2, "workers": 1, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2), [dispatch(0, 2)]),
            (WorkerJoined(1), []),
            (TaskReturned(1, 2), []),  # not that worker's task: ignored
            (TaskReturned(0, 2), [dispatch(1, 2)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2")]),
        ],
    ),
    "blocked task gives its CPU back, so another task runs; unblocked takes it again": (
        {"cpus": 1, "workers": 2},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2), []),  # an idle worker, but no CPU
            (WorkerBlocked(0, 1), [dispatch(1, 2)]),
            (WorkerUnblocked(0, 1), []),
            (submit(3), []),  # the CPU is taken again: 3 waits
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2")]),  # 1 still holds it
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 3)]),
        ],
    ),
    "a blocked worker runs its task's children, nested, and nothing else": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2), []),
            (WorkerBlocked(0, 1), []),  # the CPU is free, but 2 is not 1's child
            (WorkerBlocked(0, 1), []),  # blocking twice changes nothing
            (child(3, 1), [dispatch(0, 3)]),
            (child(4, 1), []),  # one at a time
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3"), dispatch(0, 4)]),
            (TaskFinished(4, 0, "r4"), [resolve(4, "r4")]),
            (WorkerUnblocked(0, 1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2)]),
        ],
    ),
    "nested blocking: only the top task's children run": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (WorkerBlocked(0, 1), []),
            (child(2, 1), [dispatch(0, 2)]),
            (WorkerBlocked(0, 2), []),
            (child(3, 1), []),  # 1 is not on top: its child waits
            (child(4, 2), [dispatch(0, 4)]),
            (TaskFinished(4, 0, "r4"), [resolve(4, "r4")]),
            (WorkerUnblocked(0, 2), []),
            (TaskFinished(2, 0, "r2"), [resolve(2, "r2"), dispatch(0, 3)]),
        ],
    ),
    "a child may also run on an idle worker": (
        {"cpus": 2, "workers": 2},
        [
            (submit(1), [dispatch(0, 1)]),
            (child(2, 1), [dispatch(1, 2)]),
        ],
    ),
    "worker death: a started task is retried, each retry used up": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1, max_retries=1), [dispatch(0, 1)]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL"), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 1)]),
            (WorkerDied(1, "pid 12 was killed by SIGKILL"), [reject(1, WorkerCrashedError),
                                                             ("start", 1)]),
        ],
    ),
    "chain: a short task waiting only for a running short task is queued behind it": (
        {"cpus": 2, "workers": 2},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),  # None: the worker has the value
            (short(3, 2), [dispatch(0, 3, (2, None))]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (TaskFinished(2, 0, "r2"), [resolve(2, "r2")]),
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3")]),
        ],
    ),
    "chain: nothing is queued behind a task not known to be short": (
        {"cpus": 2, "workers": 2},
        [
            (submit(1), [dispatch(0, 1)]),
            (short(2, 1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2, (1, "r1"))]),
        ],
    ),
    "chain: a task not known to be short is not queued behind its dependency": (
        {"cpus": 2, "workers": 2},
        [
            (short(1), [dispatch(0, 1)]),
            (submit(2, 1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2, (1, "r1"))]),
        ],
    ),
    "chain: a task with another unfinished dependency waits": (
        {"cpus": 2, "workers": 2},
        [
            (short(1), [dispatch(0, 1)]),
            (submit(2), [dispatch(1, 2)]),
            (short(3, 1, 2), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), dispatch(0, 3, (1, "r1"), (2, "r2"))]),
        ],
    ),
    "chain: grows as room frees on the worker, never past max_prefetch": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (short(3, 2), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 3, (2, None))]),
            (TaskFinished(2, 0, "r2"), [resolve(2, "r2")]),
        ],
    ),
    "chain: a task taken from the ready queue brings its waiting dependent along": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (short(2), []),
            (short(3, 2), []),
            (TaskFinished(1, 0, "r1"),
             [resolve(1, "r1"), dispatch(0, 2), dispatch(0, 3, (2, None))]),
        ],
    ),
    "chain: a fan-out queues one dependent behind the task; the others wait for its value": (
        {"cpus": 2, "workers": 2},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (short(3, 1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(1, 3, (1, "r1"))]),
        ],
    ),
    "chain: a failed dependency fails the queued task, which its worker hands back unrun": (
        {"cpus": 1, "workers": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (TaskFailed(1, 0, ValueError("x")), [reject(1, ValueError),
                                                 reject(2, DependencyFailedError)]),
            (short(3), [dispatch(0, 3)]),  # the worker is free again
            (TaskReturned(0, 2), []),  # the worker skipped it: nothing left to do
        ],
    ),
    "pass_errors: a failed dependency fails it with that error itself (num_returns parts)": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1, pass_errors=True), []),
            (submit(3, 1), []),
            (TaskFailed(1, 0, KeyError("x")), [reject(1, KeyError),
                                               reject(3, DependencyFailedError),
                                               reject(2, KeyError)]),
        ],
    ),
    "chain: a dependency retried after an exception; the queued task waits for it again": (
        {"cpus": 2, "workers": 2},
        [
            (short(1, retry_exceptions=True, max_retries=1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (TaskFailed(1, 0, ValueError("x")), [dispatch(1, 1)]),
            (TaskReturned(0, 2), []),
            (TaskFinished(1, 1, "r1"), [resolve(1, "r1"), dispatch(0, 2, (1, "r1"))]),
        ],
    ),
    "chain: worker death sends the queued task back to waiting behind its retried dependency": (
        {"cpus": 1, "workers": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL"), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 1)]),
            (TaskFinished(1, 1, "r1"), [resolve(1, "r1"), dispatch(1, 2, (1, "r1"))]),
        ],
    ),
    "chain: worker death with no retries left fails the dependency and the queued task": (
        {"cpus": 1, "workers": 1},
        [
            (short(1, max_retries=0), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL"),
             [reject(1, WorkerCrashedError), reject(2, DependencyFailedError), ("start", 0)]),
            (WorkerJoined(1), []),
        ],
    ),
    "chain: a queued task handed back while its dependency has finished becomes ready": (
        {"cpus": 1, "workers": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2, 1), [dispatch(0, 2, (1, None))]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (TaskReturned(0, 2), [dispatch(0, 2, (1, "r1"))]),
        ],
    ),
    "worker death: a prefetched task that never started is requeued without penalty": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (short(1, max_retries=0), [dispatch(0, 1)]),
            (short(2, max_retries=0), [dispatch(0, 2)]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL"), [reject(1, WorkerCrashedError),
                                                             ("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 2)]),
            (WorkerDied(1, "pid 12 exited with code 3"), [reject(2, WorkerCrashedError),
                                                          ("start", 1)]),
        ],
    ),
    "worker death: only the task executing is charged; finished-unreported ones rerun free": (
        {"cpus": 1, "workers": 1, "max_prefetch": 4},
        [
            (short(1, max_retries=0), [dispatch(0, 1)]),
            (short(2, max_retries=0), [dispatch(0, 2)]),
            (short(3, max_retries=0), [dispatch(0, 3)]),
            (short(4, max_retries=0), [dispatch(0, 4)]),
            # 1 and 2 finished (results batched, lost), 3 crashed it, 4 never started.
            (WorkerDied(0, "pid 11 exited with code 3", executing=3),
             [reject(3, WorkerCrashedError), ("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 1), dispatch(1, 2), dispatch(1, 4)]),
        ],
    ),
    "withdrawn: a queued task dropped by its worker is cancelled, the head is left alone": (
        {"cpus": 1, "workers": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2), [dispatch(0, 2)]),
            ([WithdrawRequested(1), WithdrawRequested(2)], [("withdraw", 0, 2)]),
            (TaskReturned(0, 2), [cancelled(2)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
        ],
    ),
    "withdrawn too late: a task that had started when its worker died is retried": (
        {"cpus": 1, "workers": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2), [dispatch(0, 2)]),
            (WithdrawRequested(2), [("withdraw", 0, 2)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL", executing=2), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 2)]),
        ],
    ),
    "worker death while executing nothing charges nobody": (
        {"cpus": 1, "workers": 1},
        [
            (short(1, max_retries=0), [dispatch(0, 1)]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL", executing=NO_TASK), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 1)]),
        ],
    ),
    "worker death naming a task it had reported: nothing was executing": (
        {"cpus": 1, "workers": 1},
        [
            (short(1, max_retries=0), [dispatch(0, 1)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (short(2, max_retries=0), [dispatch(0, 2)]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL", executing=1), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 2)]),
        ],
    ),
    "worker death: a blocked task and the nested task it waits for both started": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1, max_retries=0), [dispatch(0, 1)]),
            (WorkerBlocked(0, 1), []),
            (child(2, 1, max_retries=0), [dispatch(0, 2)]),
            (WorkerDied(0, "pid 11 was killed by SIGSEGV"),
             [reject(1, WorkerCrashedError), reject(2, WorkerCrashedError), ("start", 0)]),
        ],
    ),
    "worker death gives its resources back": (
        {"cpus": 2, "workers": 2},
        [
            (submit(1, resources=TWO_CPUS, max_retries=0), [dispatch(0, 1)]),
            (submit(2), []),
            (WorkerDied(0, "pid 11 exited with code 1"),
             [reject(1, WorkerCrashedError), ("start", 0), dispatch(1, 2)]),
        ],
    ),
    "late TaskFinished from a dead worker: its object is freed, not used": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL"), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 1)]),
            (TaskFinished(1, 0, "stale"), [free(1, "stale")]),
            (TaskFinished(1, 1, "fresh"), [resolve(1, "fresh")]),
            (TaskFinished(99, 1, "unknown"), [free(99, "unknown")]),
        ],
    ),
    "a TaskFailed from a worker that no longer runs the task is ignored": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (WorkerDied(0, "pid 11 was killed by SIGKILL"), [("start", 0)]),
            (WorkerJoined(1), [dispatch(1, 1)]),
            (TaskFailed(1, 0, ValueError("stale")), []),
            (TaskFinished(1, 1, "fresh"), [resolve(1, "fresh")]),
        ],
    ),
    "failed dependency: dependents and theirs are rejected, never dispatched": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1), []),
            (submit(3, 2), []),
            (submit(4), []),
            (TaskFailed(1, 0, ValueError("boom")), [
                reject(1, ValueError),
                reject(2, DependencyFailedError),
                reject(3, DependencyFailedError),
                dispatch(0, 4),
            ]),
            (submit(5, 1), [reject(5, DependencyFailedError)]),
        ],
    ),
    "cancelling a ready task rejects its waiting dependents": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2), []),  # READY, no CPU
            (submit(3, 2), []),
            (CancelRequested(2), [cancelled(2), reject(3, DependencyFailedError)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
        ],
    ),
    "user exception, no retry_exceptions: rejected even with retries left": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1, max_retries=3), [dispatch(0, 1)]),
            (TaskFailed(1, 0, ValueError("no")), [reject(1, ValueError)]),
        ],
    ),
    "retry_exceptions: user exceptions retried max_retries times": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1, max_retries=2, retry_exceptions=True), [dispatch(0, 1)]),
            (TaskFailed(1, 0, ValueError("1st")), [dispatch(0, 1)]),
            (TaskFailed(1, 0, ValueError("2nd")), [dispatch(0, 1)]),
            (TaskFailed(1, 0, ValueError("3rd")), [reject(1, ValueError)]),
        ],
    ),
    "retry_exceptions: a succeeding retry resolves": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1, max_retries=2, retry_exceptions=True), [dispatch(0, 1)]),
            (TaskFailed(1, 0, ValueError("1st")), [dispatch(0, 1)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
        ],
    ),
    "setup failure (no worker) is never retried": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, max_retries=2, retry_exceptions=True), []),
            (TaskFailed(2, None, TypeError("cannot set up")), [reject(2, TypeError)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),  # 2 is not dispatched after all
        ],
    ),
    "cancel: waiting and ready tasks, not running ones": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1), []),  # WAITING
            (submit(3), []),  # READY
            (CancelRequested(2), [cancelled(2)]),
            (CancelRequested(3), [cancelled(3)]),
            (CancelRequested(1), []),  # RUNNING: not cancelled
            (CancelRequested(1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),  # nothing left to dispatch
            (CancelRequested(1), []),  # finished: nothing to do
            (CancelRequested(42), []),  # unknown
        ],
    ),
    "cancel: a prefetched (sent, not started) task counts as running": (
        {"cpus": 1, "workers": 1, "max_prefetch": 1},
        [
            (short(1), [dispatch(0, 1)]),
            (short(2), [dispatch(0, 2)]),
            (CancelRequested(2), []),
        ],
    ),
    "cancel: dependents of a cancelled task fail": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1), []),
            (submit(3, 2), []),
            (CancelRequested(2), [cancelled(2), reject(3, DependencyFailedError)]),
        ],
    ),
    "free: released after finishing, exactly once": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (KeyReleased(1), [free(1, "r1")]),
            (KeyReleased(1), []),
        ],
    ),
    "free: released before finishing, freed when it finishes": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (KeyReleased(1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), free(1, "r1")]),
        ],
    ),
    "free: pending dependents keep an object until they finish": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1), []),
            (submit(3, 1), []),
            (KeyReleased(1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2, (1, "r1"))]),
            (TaskFinished(2, 0, "r2"), [resolve(2, "r2"), dispatch(0, 3, (1, "r1"))]),
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3"), free(1, "r1")]),
            ([KeyReleased(2), KeyReleased(3)], [free(2, "r2"), free(3, "r3")]),
        ],
    ),
    "free: a dependent that fails still lets go of its dependency": (
        {"cpus": 1, "workers": 1},
        [
            (submit(1), [dispatch(0, 1)]),
            (submit(2, 1), []),
            (KeyReleased(1), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 2, (1, "r1"))]),
            (TaskFailed(2, 0, ValueError("no")), [reject(2, ValueError), free(1, "r1")]),
            (KeyReleased(2), []),  # an error has no object to free
        ],
    ),
    "free: a cancelled dependent lets go of its dependency": (
        {"cpus": 1, "workers": 1},
        [
            (ObjectPut(1, "p1"), []),
            (submit(2), [dispatch(0, 2)]),
            (submit(3, 1), []),  # READY, no CPU
            (KeyReleased(1), []),
            (CancelRequested(3), [cancelled(3), free(1, "p1")]),
        ],
    ),
    "free: put objects with extra holders": (
        {"cpus": 1, "workers": 1},
        [
            (ObjectPut(1, "p1"), []),
            (KeyRetained(1), []),
            (KeyReleased(1), []),
            (KeyReleased(1), [free(1, "p1")]),
            (KeyReleased(1), []),
        ],
    ),
    "external task: a value produced elsewhere unblocks dependents": (
        {"cpus": 1, "workers": 1},
        [
            (ExternalTask(1), []),
            (submit(2, 1), []),
            (ObjectPut(1, "ext"), [resolve(1, "ext"), dispatch(0, 2, (1, "ext"))]),
        ],
    ),
    "external task that fails: dependents rejected": (
        {"cpus": 1, "workers": 1},
        [
            (ExternalTask(1), []),
            (submit(2, 1), []),
            (TaskFailed(1, None, KeyError("k")), [reject(1, KeyError),
                                                  reject(2, DependencyFailedError)]),
        ],
    ),
    "unknown dependency: rejected": (
        {"cpus": 1, "workers": 1},
        [(submit(2, 77), [reject(2, KeyError)])],
    ),
    # -- pipelining (the runtime's policy): one task queued behind each busy worker ----
    "pipeline: every worker busy, a task queues one deep behind a running one": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(k) for k in (1, 2, 3, 4, 5)],
             [dispatch(0, 1), dispatch(1, 2), dispatch(0, 3), dispatch(1, 4)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 5)]),
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3")]),
        ],
    ),
    "pipeline: a task queues behind the worker whose task was sent first": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), brief(2)], [dispatch(0, 1), dispatch(1, 2)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (brief(3), [dispatch(0, 3)]),
            (brief(4), [dispatch(1, 4)]),  # 2 was sent before 3: it likely ends first
        ],
    ),
    "pipeline: not a task unknown to be brief, nor behind one": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), submit(2)], [dispatch(0, 1), dispatch(1, 2)]),
            (brief(3), [dispatch(0, 3)]),  # behind 1, never behind 2
            (brief(4), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1"), dispatch(0, 4)]),
            (submit(5), []),  # not known to be brief: waits for an idle worker
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), dispatch(1, 5)]),
        ],
    ),
    "pipeline: not a task needing 2 CPUs, and nothing behind one": (
        {"cpus": 2, "workers": 1, "pipeline": True},
        [
            (brief(1, resources=TWO_CPUS), [dispatch(0, 1)]),
            (brief(2), [dispatch(0, 2)]),
            (brief(3, resources=TWO_CPUS), []),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (TaskFinished(2, 0, "r2"), [resolve(2, "r2"), dispatch(0, 3)]),
        ],
    ),
    "pipeline: a short task still prefetches deeper behind short ones": (
        {"cpus": 1, "workers": 1, "max_prefetch": 2, "pipeline": True},
        [
            ([short(1), short(2), short(3), short(4)],
             [dispatch(0, 1), dispatch(0, 2), dispatch(0, 3)]),
        ],
    ),
    "pipeline: a short task queues one deep behind a long one": (
        {"cpus": 1, "workers": 1, "pipeline": True},
        [
            ([brief(1), short(2), short(3)], [dispatch(0, 1), dispatch(0, 2)]),
        ],
    ),
    "pipeline: a worker left idle takes back a task queued behind a busy one": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), brief(2), brief(3)], [dispatch(0, 1), dispatch(1, 2), dispatch(0, 3)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), ("steal later",)]),
            (StealCheck(), [("withdraw", 0, 3)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),  # taken back: not asked twice
            (TaskReturned(0, 3), [dispatch(0, 3)]),  # both idle now: the first takes it
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3")]),
        ],
    ),
    "pipeline: a worker busy again by the check takes nothing back": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), brief(2), brief(3)], [dispatch(0, 1), dispatch(1, 2), dispatch(0, 3)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), ("steal later",)]),
            (brief(4), [dispatch(1, 4)]),  # the next task came first
            (StealCheck(), []),
            (TaskFinished(4, 1, "r4"), [resolve(4, "r4"), ("steal later",)]),  # idle again
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),  # 3 runs now: nothing to take
            (StealCheck(), []),
        ],
    ),
    "pipeline: a task asked back that had started answers as usual": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), brief(2), brief(3)], [dispatch(0, 1), dispatch(1, 2), dispatch(0, 3)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), ("steal later",)]),
            (StealCheck(), [("withdraw", 0, 3)]),
            (TaskFinished(1, 0, "r1"), [resolve(1, "r1")]),
            (TaskFinished(3, 0, "r3"), [resolve(3, "r3")]),
            (brief(4), [dispatch(0, 4)]),
        ],
    ),
    "pipeline: a task cancelled while asked back is cancelled when handed back": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), brief(2), brief(3)], [dispatch(0, 1), dispatch(1, 2), dispatch(0, 3)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), ("steal later",)]),
            (StealCheck(), [("withdraw", 0, 3)]),
            (WithdrawRequested(3), []),  # its DROP is on its way already
            (TaskReturned(0, 3), [cancelled(3)]),
        ],
    ),
    "pipeline: a worker that joins takes back a queued task": (
        {"cpus": 2, "workers": 1, "pipeline": True},
        [
            ([brief(1), brief(2)], [dispatch(0, 1), dispatch(0, 2)]),
            (WorkerJoined(1), [("steal later",)]),
            (StealCheck(), [("withdraw", 0, 2)]),
            (TaskReturned(0, 2), [dispatch(1, 2)]),
        ],
    ),
    "pipeline: a task queued behind one that dies runs again elsewhere": (
        {"cpus": 2, "workers": 2, "pipeline": True},
        [
            ([brief(1), brief(2), brief(3)], [dispatch(0, 1), dispatch(1, 2), dispatch(0, 3)]),
            # 1 crashed (it has retries) and 3 never ran: both go back, to the one worker left
            (WorkerDied(0, "pid 11 was killed by SIGKILL", executing=1, replace=False),
             [dispatch(1, 1)]),
            (TaskFinished(2, 1, "r2"), [resolve(2, "r2"), dispatch(1, 3)]),
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script(name: str) -> None:
    factory, steps = SCRIPTS[name]
    run_script(make_core(**factory), steps)


# -- what the table cannot say: messages, causes, counts, states ------------------------


def only(instructions: list[Any], kind: type) -> Any:
    matching = [i for i in instructions if isinstance(i, kind)]
    assert len(matching) == 1, instructions
    return matching[0]


def test_dispatch_carries_the_payload() -> None:
    core = make_core(cpus=1, workers=1)
    (instruction,) = core.handle(TaskSubmitted(1, payload={"fn": "f"}))
    assert instruction == Dispatch(0, 1, {"fn": "f"}, ())
    assert core.state_of(1) is TaskState.RUNNING


def test_no_worker_no_dispatch_until_one_joins() -> None:
    core = SchedulerCore({"CPU": 1.0})
    assert core.handle(submit(1)) == []
    assert core.state_of(1) is TaskState.READY
    assert [show(i) for i in core.handle(WorkerJoined(7))] == [dispatch(7, 1)]


@pytest.mark.parametrize(
    ("total", "resources", "words"),
    [
        ({"CPU": 4.0}, Resources(cpus=8.0), ["8", "CPU", "4"]),
        ({"CPU": 2.0}, GPU, ["1", "GPU", "0"]),
        ({"CPU": 2.0, "GPU": 1.0}, Resources(cpus=1.0, custom=(("GPU", 2.0),)), ["2", "GPU", "1"]),
    ],
)
def test_infeasible_task_is_rejected_with_a_clear_message(
    total: dict[str, float], resources: Resources, words: list[str]
) -> None:
    core = SchedulerCore(total)
    core.handle([WorkerJoined(0)])
    reject_ = only(core.handle(TaskSubmitted(1, resources=resources)), Reject)
    assert isinstance(reject_.error, ValueError) and not reject_.cancelled
    message = str(reject_.error)
    for word in words:
        assert word in message, message
    assert core.available == total  # nothing was reserved


def test_resources_are_reserved_and_released() -> None:
    core = make_core(cpus=4, workers=4, GPU=2.0)
    core.handle(TaskSubmitted(1, resources=Resources(cpus=2.0, custom=(("GPU", 1.0),))))
    assert core.available == {"CPU": 2.0, "GPU": 1.0}
    core.handle(submit(2))
    assert core.available == {"CPU": 1.0, "GPU": 1.0}
    core.handle(TaskFinished(1, 0, "r"))
    assert core.available == {"CPU": 3.0, "GPU": 2.0}
    core.handle(TaskFinished(2, 1, "r"))
    assert core.available == {"CPU": 4.0, "GPU": 2.0}


def test_prefetch_reserves_one_cpu_per_worker() -> None:
    core = make_core(cpus=1, workers=1, max_prefetch=1)
    core.handle([short(1), short(2)])
    assert core.workers() == {0: [1, 2]}
    assert core.available == {"CPU": 0.0}


def test_blocked_task_gives_its_cpu_back_and_takes_it_again() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle(submit(1))
    assert core.available == {"CPU": 0.0}
    assert core.handle(WorkerBlocked(0, 1)) == []
    assert core.available == {"CPU": 1.0}
    core.handle(WorkerUnblocked(0, 1))
    assert core.available == {"CPU": 0.0}
    core.handle(TaskFinished(1, 0, "r"))
    assert core.available == {"CPU": 1.0}


def test_blocked_task_finishing_while_its_nested_task_runs_keeps_accounting_right() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle(submit(1))
    core.handle(WorkerBlocked(0, 1))
    core.handle(child(2, 1))
    core.handle(TaskFinished(2, 0, "r2"))
    core.handle(WorkerUnblocked(0, 1))
    core.handle(TaskFinished(1, 0, "r1"))
    assert core.available == {"CPU": 1.0}
    assert core.workers() == {0: []}


def test_worker_crash_without_retries_names_the_reason() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle(TaskSubmitted(5, max_retries=0))
    out = core.handle(WorkerDied(0, "pid 4242 was killed by SIGKILL"))
    error = only(out, Reject).error
    assert isinstance(error, WorkerCrashedError)
    assert "pid 4242 was killed by SIGKILL" in str(error)
    assert "5" in str(error)
    assert only(out, StartWorker) == StartWorker(replaces=0)
    assert core.available == {"CPU": 1.0}


def test_worker_crash_with_retries_sends_the_task_back_to_ready() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle(TaskSubmitted(5, max_retries=3))
    core.handle(WorkerDied(0, "pid 1 was killed by SIGKILL"))
    assert core.state_of(5) is TaskState.READY
    assert core.available == {"CPU": 1.0}
    # Three retries (four attempts): the fourth death rejects it.
    for attempt in range(2):
        worker = 100 + attempt
        assert [show(i) for i in core.handle(WorkerJoined(worker))] == [dispatch(worker, 5)]
        out = core.handle(WorkerDied(worker, f"pid {worker} was killed by SIGKILL"))
        assert [show(i) for i in out] == [("start", worker)]
    core.handle(WorkerJoined(200))
    out = core.handle(WorkerDied(200, "pid 200 exited with code 3"))
    assert "pid 200 exited with code 3" in str(only(out, Reject).error)


def test_worker_death_keeps_submission_order_of_requeued_tasks() -> None:
    core = make_core(cpus=1, workers=1, max_prefetch=1)
    core.handle([short(1), short(2), short(3)])  # 1 running, 2 prefetched, 3 ready
    core.handle(WorkerDied(0, "pid 1 was killed by SIGKILL"))
    out = core.handle(WorkerJoined(1))
    assert [show(i) for i in out] == [dispatch(1, 1), dispatch(1, 2)]
    core.handle(TaskFinished(1, 1, "r1"))
    assert core.workers() == {1: [2, 3]}


def test_dependency_failure_cause_is_the_original_error_recursively() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle([submit(1), submit(2, 1), submit(3, 2)])
    original = ValueError("boom")
    out = core.handle(TaskFailed(1, 0, original))
    errors = {i.key: i.error for i in out if isinstance(i, Reject)}
    assert errors[1] is original
    assert isinstance(errors[2], DependencyFailedError)
    assert errors[2].__cause__ is original
    assert "boom" in str(errors[2]) and "1" in str(errors[2])
    assert isinstance(errors[3], DependencyFailedError)
    chain = []
    error: BaseException | None = errors[3]
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert chain[-1] is original
    assert all(core.state_of(k) is TaskState.ERRED for k in (1, 2, 3))


def test_dependent_of_a_cancelled_task_has_cancelled_error_as_cause() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle([submit(1), submit(2), submit(3, 2)])
    out = core.handle(CancelRequested(2))
    errors = {i.key: i for i in out if isinstance(i, Reject)}
    assert errors[2].cancelled and isinstance(errors[2].error, CancelledError)
    assert not errors[3].cancelled
    assert isinstance(errors[3].error, DependencyFailedError)
    assert isinstance(errors[3].error.__cause__, CancelledError)
    assert "cancelled" in str(errors[3].error)
    assert core.state_of(2) is TaskState.CANCELLED


def test_cancelled_ready_task_leaves_the_ready_queue() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle([submit(1), submit(2), submit(3)])
    core.handle(CancelRequested(2))
    out = core.handle(TaskFinished(1, 0, "r1"))
    assert [show(i) for i in out] == [resolve(1, "r1"), dispatch(0, 3)]


def test_records_are_dropped_once_nothing_needs_them() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle([submit(1), submit(2, 1)])
    core.handle(TaskFinished(1, 0, "r1"))
    core.handle(TaskFinished(2, 0, "r2"))
    core.handle([KeyReleased(1), KeyReleased(2)])
    assert 1 not in core and 2 not in core
    assert core.state_of(1) is None and core.outcome(1) is None
    assert sum(core.counts().values()) == 0


def test_every_object_is_freed_exactly_once_in_a_diamond() -> None:
    core = make_core(cpus=2, workers=2)
    out = []
    out += core.handle([submit(1), submit(2, 1), submit(3, 1), submit(4, 2, 3)])
    out += core.handle(KeyReleased(1))
    out += core.handle(TaskFinished(1, 0, "r1"))
    out += core.handle([KeyReleased(2), KeyReleased(3)])
    out += core.handle(TaskFinished(2, 0, "r2"))
    out += core.handle(TaskFinished(3, 1, "r3"))
    out += core.handle(TaskFinished(4, 0, "r4"))
    out += core.handle(KeyReleased(4))
    out += core.handle([KeyReleased(k) for k in (1, 2, 3, 4)])  # extra releases: no effect
    freed = sorted(show(i) for i in out if isinstance(i, FreeObject))
    assert freed == [free(1, "r1"), free(2, "r2"), free(3, "r3"), free(4, "r4")]
    assert sum(core.counts().values()) == 0


def test_outcome_reports_ref_and_error() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle([submit(1), submit(2)])
    core.handle(TaskFinished(1, 0, "r1"))
    error = ValueError("x")
    core.handle(TaskFailed(2, 0, error))
    assert core.outcome(1) == (TaskState.FINISHED, "r1", None)
    assert core.outcome(2) == (TaskState.ERRED, None, error)


def test_reusing_a_key_is_an_error() -> None:
    core = make_core(cpus=1, workers=1)
    core.handle(submit(1))
    with pytest.raises(ValueError, match="already in use"):
        core.handle(submit(1))


def test_a_batch_of_events_is_placed_once_in_order() -> None:
    core = make_core(cpus=2, workers=2)
    out = core.handle([submit(1), submit(2), submit(3)])
    assert [show(i) for i in out] == [dispatch(0, 1), dispatch(1, 2)]
    assert core.state_of(3) is TaskState.READY


# -- several nodes ----------------------------------------------------------------------------


def make_cluster(**nodes: dict[str, float]) -> SchedulerCore:
    """A core with no local node: node N (named ``nN``) joins with its resources and one
    worker per CPU, numbered N*10, N*10+1, ..."""
    core = SchedulerCore()
    for name, resources in nodes.items():
        node = int(name[1:])
        core.handle(NodeJoined(node, resources))
        core.handle([WorkerJoined(node * 10 + w, node) for w in range(int(resources["CPU"]))])
    return core


def test_a_task_fitting_the_cluster_but_no_single_node_fails_naming_the_largest_node() -> None:
    core = make_cluster(n1={"CPU": 2.0}, n2={"CPU": 3.0})
    assert core.total == {"CPU": 5.0}
    out = core.handle(TaskSubmitted(1, resources=Resources(cpus=4.0)))
    error = only(out, Reject).error
    assert isinstance(error, ValueError)
    assert "needs 4 CPU but the largest node (node 2) has 3" in str(error)


def test_a_task_goes_to_the_node_with_its_custom_resource() -> None:
    core = make_cluster(n1={"CPU": 2.0}, n2={"CPU": 1.0, "GPU": 1.0})
    assert [show(i) for i in core.handle(submit(1, resources=GPU))] == [dispatch(20, 1)]
    # The only GPU is taken: the next GPU task waits, though node 1 has idle CPUs.
    assert core.handle(submit(2, resources=GPU)) == []
    assert [show(i) for i in core.handle(TaskFinished(1, 20, "r1"))] == [
        resolve(1, "r1"), dispatch(20, 2)
    ]


def test_resources_are_reserved_in_the_node_of_the_worker() -> None:
    core = make_cluster(n1={"CPU": 2.0}, n2={"CPU": 2.0})
    core.handle(submit(1, resources=TWO_CPUS))
    assert {core.nodes[1].available["CPU"], core.nodes[2].available["CPU"]} == {0.0, 2.0}
    assert core.available == {"CPU": 2.0}


def test_a_task_is_placed_on_the_node_holding_most_of_its_input_bytes() -> None:
    core = make_cluster(n1={"CPU": 2.0}, n2={"CPU": 2.0})
    core.handle([ObjectPut(1, "big", nbytes=10_000_000, node=2), ObjectPut(2, "small", 10, node=1)])
    assert [show(i) for i in core.handle(submit(3, 1, 2))] == [
        dispatch(20, 3, (1, "big"), (2, "small"))
    ]
    core.handle([ObjectPut(4, "other", nbytes=10_000_000, node=1)])
    assert [show(i) for i in core.handle(submit(5, 4))] == [dispatch(10, 5, (4, "other"))]


def test_a_result_lives_on_its_workers_node_and_draws_its_dependents_there() -> None:
    core = make_cluster(n1={"CPU": 1.0}, n2={"CPU": 2.0})
    core.handle(submit(1))  # node 2 has the most CPUs free
    core.handle(TaskFinished(1, 20, "r1", nbytes=1 << 20))
    core.handle(submit(9))  # keeps a worker of node 2 busy; node 2 still has one idle
    assert [show(i) for i in core.handle(submit(2, 1))] == [dispatch(21, 2, (1, "r1"))]


def test_without_inputs_the_node_with_most_cpus_free_is_chosen() -> None:
    core = make_cluster(n1={"CPU": 1.0}, n2={"CPU": 3.0})
    placed = [only(core.handle(submit(key)), Dispatch).worker // 10 for key in range(1, 5)]
    assert placed == [2, 2, 1, 2]  # 3 free vs 1, 2 vs 1, 1 vs 1 (the first), then node 2


def test_a_node_that_leaves_has_its_tasks_rerun_elsewhere_and_is_never_chosen_again() -> None:
    core = make_cluster(n1={"CPU": 1.0}, n2={"CPU": 1.0})
    first = only(core.handle(submit(1)), Dispatch).worker
    gone = first // 10
    other = 3 - gone
    out = core.handle(NodeLeft(gone, "node silent for 5 s"))
    assert [show(i) for i in out] == [dispatch(other * 10, 1)]
    assert core.total == {"CPU": 1.0}
    assert core.handle(submit(2)) == []  # waits for the one node left, never the gone one
    with pytest.raises(ValueError, match="unknown"):
        core.handle(WorkerJoined(99, gone))


def test_results_lost_with_their_node_are_made_again_before_their_dependents_run() -> None:
    core = make_cluster(n1={"CPU": 1.0}, n2={"CPU": 1.0})
    first = only(core.handle(submit(1)), Dispatch).worker
    core.handle(TaskFinished(1, first, "r1", nbytes=1 << 20))
    core.handle([submit(9), submit(8)])  # both workers busy
    assert core.handle(submit(2, 1)) == [] and core.state_of(2) is TaskState.READY
    lost, survivor = first // 10, 3 - first // 10
    core.handle(NodeLeft(lost, "killed"))
    assert core.state_of(1) is TaskState.READY  # to run again, on the node left
    assert core.state_of(2) is TaskState.WAITING  # for it
    # The survivor finishes what it runs, then the task its dead peer ran, then 1, then 2.
    sent: list[Any] = []
    for _ in range(3):
        (busy,) = [k for keys in core.workers().values() for k in keys]
        out = core.handle(TaskFinished(busy, survivor * 10, f"r{busy}-again", nbytes=8))
        sent += [show(i) for i in out]
    assert resolve(1, "r1-again") in sent
    assert dispatch(survivor * 10, 2, (1, "r1-again")) in sent


def test_a_lost_result_whose_input_was_freed_is_not_made_again() -> None:
    core = make_cluster(n1={"CPU": 1.0, "X": 1.0}, n2={"CPU": 1.0, "GPU": 1.0})
    x = Resources(cpus=1.0, custom=(("X", 1.0),))
    assert [show(i) for i in core.handle(submit(1, resources=x))] == [dispatch(10, 1)]
    core.handle(TaskFinished(1, 10, "r1", nbytes=1 << 20))
    assert [show(i) for i in core.handle(submit(2, 1, resources=GPU))] == [
        dispatch(20, 2, (1, "r1"))
    ]
    core.handle(TaskFinished(2, 20, "r2", nbytes=1 << 20))
    assert [show(i) for i in core.handle(KeyReleased(1))] == [("free", 1, "r1")]
    assert core.handle(NodeLeft(2, "killed")) == []
    assert core.state_of(2) is TaskState.FINISHED  # 1 is gone: 2 cannot be made again


def test_a_task_whose_input_was_lost_in_transfer_waits_for_it_to_be_made_again() -> None:
    core = make_cluster(n1={"CPU": 1.0, "X": 1.0}, n2={"CPU": 1.0, "GPU": 1.0})
    x = Resources(cpus=1.0, custom=(("X", 1.0),))
    core.handle(submit(1, resources=x))
    core.handle(TaskFinished(1, 10, "r1", nbytes=1 << 20))
    core.handle(submit(2, 1, resources=GPU))  # sent to node 2; its pull from node 1 fails
    out = core.handle(TaskFailed(2, 20, ObjectLostError("gone"), lost_node=1))
    assert out == [] and core.state_of(2) is TaskState.WAITING  # not failed
    core.handle(NodeJoined(3, {"CPU": 1.0, "X": 1.0}))
    core.handle(WorkerJoined(30, 3))
    out = core.handle(NodeLeft(1, "killed"))  # 1 runs again, on node 3
    assert [show(i) for i in out] == [dispatch(30, 1)]
    out = core.handle(TaskFinished(1, 30, "r1-again", nbytes=1 << 20))
    assert [show(i) for i in out] == [resolve(1, "r1-again"), dispatch(20, 2, (1, "r1-again"))]


def test_a_task_whose_input_node_stays_tries_again_at_the_recheck() -> None:
    core = make_cluster(n1={"CPU": 1.0, "X": 1.0}, n2={"CPU": 1.0, "GPU": 1.0})
    x = Resources(cpus=1.0, custom=(("X", 1.0),))
    core.handle(submit(1, resources=x))
    core.handle(TaskFinished(1, 10, "r1", nbytes=1 << 20))
    core.handle(submit(2, 1, resources=GPU, max_retries=1))
    core.handle(TaskFailed(2, 20, ObjectLostError("blip"), lost_node=1))
    assert [show(i) for i in core.handle(LostInputRecheck(2))] == [dispatch(20, 2, (1, "r1"))]
    core.handle(TaskFailed(2, 20, ObjectLostError("blip"), lost_node=1))
    out = core.handle(LostInputRecheck(2))  # no retries left: it fails, naming the inputs
    assert [show(i) for i in out] == [reject(2, ObjectLostError)]


def test_an_actor_is_placed_on_a_node_that_has_its_resources() -> None:
    core = make_cluster(n1={"CPU": 2.0}, n2={"CPU": 1.0, "GPU": 1.0})
    out = core.handle(ActorRequested(7, Resources(cpus=0.0, custom=(("GPU", 1.0),))))
    assert out == [PlaceActor(7, 2)]
    assert core.nodes[2].available["GPU"] == 0.0


# -- runtime_env: tasks run only on workers of their env ---------------------------------------


def _restarts(instructions: list[Any]) -> list[tuple[int | None, Any]]:
    return [(i.replaces, i.env) for i in instructions if isinstance(i, StartWorker)]


def test_a_task_with_an_env_restarts_an_idle_worker_in_it_and_waits_for_it() -> None:
    core = make_core(cpus=2, workers=2)
    out = core.handle(TaskSubmitted(1, env="E"))
    assert _restarts(out) == [(0, "E")]
    assert not [i for i in out if isinstance(i, Dispatch)]
    assert core.state_of(1) is TaskState.READY
    # The new worker joins (as the runtime reports it at once): the task runs there.
    assert [show(i) for i in core.handle(WorkerJoined(5, env="E"))] == [dispatch(5, 1)]
    # A second task of the env reuses it once it is free; no restart.
    core.handle(TaskFinished(1, 5, "r"))
    assert [show(i) for i in core.handle(TaskSubmitted(2, env="E"))] == [dispatch(5, 2)]


def test_tasks_without_an_env_never_run_on_a_worker_with_one() -> None:
    core = make_core(cpus=1, workers=0)
    core.handle(WorkerJoined(3, env="E"))
    out = core.handle(submit(1))
    assert _restarts(out) == [(3, None)]
    assert [show(i) for i in core.handle(WorkerJoined(4))] == [dispatch(4, 1)]


def test_a_burst_of_env_tasks_restarts_one_worker_per_task_up_to_the_idle_ones() -> None:
    core = make_core(cpus=3, workers=3)
    core.handle(submit(1))  # worker 0 busy without an env
    out = core.handle([TaskSubmitted(k, env="E") for k in (2, 3, 4, 5)])
    assert sorted(_restarts(out)) == [(1, "E"), (2, "E")]
    out = core.handle([WorkerJoined(10, env="E"), WorkerJoined(11, env="E")])
    assert sorted(show(i) for i in out) == sorted([dispatch(10, 2), dispatch(11, 3)])
    assert core.state_of(4) is TaskState.READY  # waits for a worker of its env


def test_an_env_task_behind_a_busy_pool_does_not_block_a_task_that_fits_an_idle_worker() -> None:
    core = make_core(cpus=2, workers=0)
    core.handle([WorkerJoined(0, env="E"), WorkerJoined(1)])
    core.handle(TaskSubmitted(1, env="E"))  # takes worker 0
    out = core.handle([TaskSubmitted(2, env="E"), submit(3)])
    # Task 2 finds no free worker of E; worker 1 is idle and task 3 fits it: restarting
    # worker 1 for task 2 would steal it, but FIFO order gives it to task 2 first.
    assert _restarts(out) == [(1, "E")]
    assert core.state_of(3) is TaskState.READY
    core.handle(TaskFinished(1, 0, "r"))  # worker 0 (E) is free: task 2 goes there
    assert core.workers()[0] == [2]


def test_a_worker_replaced_after_a_crash_or_its_share_of_tasks_keeps_its_env() -> None:
    core = SchedulerCore({"CPU": 1.0}, max_tasks_per_worker=1)
    core.handle(WorkerJoined(0, env="E"))
    out = core.handle(TaskSubmitted(1, env="E"))
    out += core.handle(TaskFinished(1, 0, "r"))
    assert (0, "E") in _restarts(out)
    core2 = make_core(cpus=1, workers=0)
    core2.handle(WorkerJoined(0, env="E"))
    out = core2.handle(WorkerDied(0, "killed", NO_TASK, replace=True))
    assert _restarts(out) == [(0, "E")]


def test_nested_children_and_chains_stay_within_their_env() -> None:
    core = make_core(cpus=1, workers=0, max_prefetch=4)
    core.handle(WorkerJoined(0, env="E"))
    core.handle(TaskSubmitted(1, env="E"))
    core.handle(WorkerBlocked(0, 1))
    # A child of another env does not run nested on worker 0; one of E does.
    core.handle(TaskSubmitted(2, parent=1, env="F"))
    assert core.state_of(2) is TaskState.READY
    core.handle(TaskSubmitted(3, parent=1, env="E"))
    assert core.workers()[0] == [1, 3]
