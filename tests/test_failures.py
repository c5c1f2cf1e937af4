"""Failures, as a table of crash cases (in the manner of loky's ``crash_cases``).

Each case runs one task that raises, crashes its worker, or cannot be
(de)serialized somewhere on the way, and says what the caller must see. After
every case the same runtime must still run a trivial task on a full pool: a
failure belongs to one Future, never to the pool as a whole.

Task functions write their worker's pid to a file first, so a case can check
that the error names the process that died.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from _helpers import wait_until

import sharedcompute as sc
from sharedcompute.errors import RemoteTraceback, SerializationError, WorkerCrashedError

TIMEOUT = 60
NUM_WORKERS = 2


@pytest.fixture
def rt() -> Iterator[sc.Runtime]:
    with sc.Runtime(num_workers=NUM_WORKERS) as runtime:
        yield runtime


# -- task functions ------------------------------------------------------------------------


def note_pid(workdir: str) -> None:
    Path(workdir, "pid").write_text(str(os.getpid()))


def first_time(workdir: str) -> bool:
    """True on the first call for this workdir (across processes)."""
    try:
        fd = os.open(os.path.join(workdir, "attempted"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _segfault() -> None:
    ctypes.string_at(0)


CRASHES: dict[str, Callable[[], None]] = {
    "exit3": lambda: os._exit(3),
    "sigkill": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "segfault": _segfault,
    "sigsegv": lambda: os.kill(os.getpid(), signal.SIGSEGV),
}


def crash(workdir: str, how: str) -> None:
    note_pid(workdir)
    CRASHES[how]()


def crash_once(workdir: str, how: str) -> str:
    note_pid(workdir)
    if first_time(workdir):
        CRASHES[how]()
    return "survived"


def raise_value_error(workdir: str) -> None:
    note_pid(workdir)
    raise ValueError("bad value in task")


def return_value(workdir: str, value: Any) -> Any:
    note_pid(workdir)
    return value


def return_lock(workdir: str) -> Any:
    note_pid(workdir)
    return {"fine": 1, "lock": threading.Lock()}


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_unpicklable(workdir: str) -> None:
    note_pid(workdir)
    raise UnpicklableError()


class UnloadableError(Exception):
    """Pickles fine, but unpickling calls ``__init__`` with one argument too few."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(first)
        self.second = second


class BadStrError(Exception):
    """An exception whose ``str()`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def raise_bad_str(workdir: str) -> None:
    note_pid(workdir)
    raise BadStrError("x")


def raise_unloadable(workdir: str) -> None:
    note_pid(workdir)
    raise UnloadableError("first", "second")


def _refuse_in(pid: int) -> str:
    if os.getpid() == pid:
        raise RuntimeError(f"this value refuses to load in process {pid}")
    return "loaded"


class LoadsOnlyElsewhere:
    """Unpickling fails in the process given; it works anywhere else."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self) -> Any:
        return (_refuse_in, (self.pid,))


def return_unloadable(workdir: str, driver_pid: int) -> LoadsOnlyElsewhere:
    note_pid(workdir)
    return LoadsOnlyElsewhere(driver_pid)


class FailsToLoad:
    """Unpickling always fails."""

    def __reduce__(self) -> Any:
        return (_always_refuse, ())


def _always_refuse() -> None:
    raise RuntimeError("this argument refuses to load")


class CrashesOnLoad:
    def __reduce__(self) -> Any:
        return (os._exit, (7,))


def use_arg(workdir: str, value: Any) -> str:
    note_pid(workdir)
    return "used"


def flaky(workdir: str, failures: int) -> int:
    """Raise ValueError the first ``failures`` times; then return the attempt number."""
    counter = Path(workdir, "attempts")
    attempts = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(attempts))
    if attempts <= failures:
        raise ValueError(f"flaky failure {attempts}")
    return attempts


def square(x: int) -> int:
    return x * x


def getpid() -> int:
    return os.getpid()


# -- the table -------------------------------------------------------------------------------


@dataclass
class Case:
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    raises: type[BaseException] | None = None  # None: the task succeeds
    value: Any = None
    words: tuple[str, ...] = ()  # in the message; "{pid}" is the worker's pid
    at_submit: bool = False  # the error comes from submit() itself
    remote_traceback: bool = False  # __cause__ is a RemoteTraceback naming fn and pid


CASES: dict[str, Case] = {
    "task raises": Case(
        raise_value_error, raises=ValueError, words=("bad value in task",),
        remote_traceback=True,
    ),
    "exit code 3, no retries": Case(
        crash, ("exit3",), {"max_retries": 0}, WorkerCrashedError, words=("pid {pid}", "code 3"),
    ),
    "SIGKILL, no retries": Case(
        crash, ("sigkill",), {"max_retries": 0}, WorkerCrashedError, words=("pid {pid}", "SIGKILL"),
    ),
    "segfault (ctypes), no retries": Case(
        crash, ("segfault",), {"max_retries": 0}, WorkerCrashedError,
        words=("pid {pid}", "SIGSEGV"),
    ),
    "SIGSEGV (os.kill), no retries": Case(
        crash, ("sigsegv",), {"max_retries": 0}, WorkerCrashedError,
        words=("pid {pid}", "SIGSEGV"),
    ),
    "always crashes, default retries": Case(
        crash, ("exit3",), {}, WorkerCrashedError, words=("pid {pid}", "code 3"),
    ),
    "exit code 3 once, 2 retries": Case(
        crash_once, ("exit3",), {"max_retries": 2}, value="survived",
    ),
    "SIGKILL once, 2 retries": Case(
        crash_once, ("sigkill",), {"max_retries": 2}, value="survived",
    ),
    "segfault once, 2 retries": Case(
        crash_once, ("segfault",), {"max_retries": 2}, value="survived",
    ),
    "unpicklable argument": Case(
        use_arg, (threading.Lock(),), raises=SerializationError, words=("lock",), at_submit=True,
    ),
    "unpicklable argument nested in a list": Case(
        use_arg, ([1, {"k": threading.Lock()}],), raises=SerializationError, words=("lock",),
        at_submit=True,
    ),
    "argument fails to load in the worker": Case(
        use_arg, (FailsToLoad(),), raises=SerializationError, words=("refuses to load",),
    ),
    "argument crashes the worker while loading, no retries": Case(
        use_arg, (CrashesOnLoad(),), {"max_retries": 0}, WorkerCrashedError, words=("code 7",),
    ),
    "unpicklable return value": Case(
        return_lock, raises=SerializationError, words=("lock",),
    ),
    "return value fails to load in the driver": Case(
        return_unloadable, (os.getpid(),), raises=SerializationError, words=("refuses to load",),
    ),
    "exception cannot be pickled in the worker": Case(
        raise_unpicklable, raises=SerializationError, words=("UnpicklableError", "holds a lock"),
        remote_traceback=True,
    ),
    "exception cannot be unpickled in the driver": Case(
        raise_unloadable, raises=SerializationError, words=("UnloadableError",),
        remote_traceback=True,  # where it was raised is still worth showing
    ),
    "exception whose str() raises": Case(
        raise_bad_str, (), {"max_retries": 0}, BadStrError,
        remote_traceback=True,
    ),
    "large return value": Case(
        return_value, (np.arange(1_000_000),), value=np.arange(1_000_000),
    ),
}


def unpicklable_closure_case() -> Callable[[], Any]:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    return uses_lock


@pytest.mark.parametrize("name", list(CASES))
def test_crash_case(rt: sc.Runtime, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    workdir = str(tmp_path)
    task = sc.remote(case.fn).options(**case.options) if case.options else sc.remote(case.fn)
    if case.at_submit:
        assert case.raises is not None
        with pytest.raises(case.raises) as info:
            task.submit(workdir, *case.args)
    else:
        future = task.submit(workdir, *case.args)
        if case.raises is None:
            value = future.result(timeout=TIMEOUT)
            if isinstance(case.value, np.ndarray):
                np.testing.assert_array_equal(value, case.value)
            else:
                assert value == case.value
            info = None
        else:
            with pytest.raises(case.raises) as info:
                future.result(timeout=TIMEOUT)
    if info is not None:
        try:
            message = str(info.value)
        except RuntimeError:  # the case whose exception cannot say what it is
            message = ""
        pid_file = Path(workdir, "pid")
        pid = pid_file.read_text() if pid_file.exists() else "?"
        for word in case.words:
            assert word.format(pid=pid) in message, message
        if case.remote_traceback:
            cause = info.value.__cause__
            assert isinstance(cause, RemoteTraceback), cause
            assert case.fn.__name__ in cause.tb and f"pid {pid}" in cause.tb, cause.tb
    # The pool as a whole is unharmed: full strength, and it still runs tasks.
    assert sc.submit(square, 12).result(timeout=TIMEOUT) == 144
    wait_until(lambda: len(rt.worker_pids()) == NUM_WORKERS, what="a full pool")
    assert sc.gather(sc.map(square, range(6)), timeout=TIMEOUT) == [0, 1, 4, 9, 16, 25]


def test_unpicklable_function_is_refused_at_submit(rt: sc.Runtime) -> None:
    with pytest.raises(SerializationError, match="lock"):
        sc.submit(unpicklable_closure_case())
    assert sc.submit(square, 3).result(timeout=TIMEOUT) == 9


def test_remote_traceback_is_printed_as_the_cause(rt: sc.Runtime, tmp_path: Path) -> None:
    import traceback

    future = sc.submit(raise_value_error, str(tmp_path))
    with pytest.raises(ValueError) as info:
        future.result(timeout=TIMEOUT)
    text = "".join(traceback.format_exception(info.value))
    assert "The above exception was the direct cause" in text
    assert "raise_value_error" in text and "bad value in task" in text


def test_crash_does_not_touch_other_tasks(rt: sc.Runtime, tmp_path: Path) -> None:
    crashing = sc.remote(crash).options(max_retries=0).submit(str(tmp_path), "sigkill")
    others = [sc.submit(square, i) for i in range(20)]
    with pytest.raises(WorkerCrashedError):
        crashing.result(timeout=TIMEOUT)
    assert sc.gather(others, timeout=TIMEOUT) == [i * i for i in range(20)]


def link_dies_once(x: int, die_at: int, workdir: str) -> int:
    """A short chain link; at ``die_at`` its worker is killed, the first time only."""
    if x == die_at and first_time(workdir):
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


def test_worker_killed_in_the_middle_of_a_chain(rt: sc.Runtime, tmp_path: Path) -> None:
    # The links queued behind the running one on the dead worker never started: they wait
    # again for the retried link, and the chain completes with every value right.
    assert sc.submit(link_dies_once, 0, -1, str(tmp_path)).result(timeout=TIMEOUT) == 1
    futures = [sc.submit(link_dies_once, 0, 30, str(tmp_path))]
    for _ in range(99):
        futures.append(sc.submit(link_dies_once, futures[-1], 30, str(tmp_path)))
    assert sc.gather(futures, timeout=TIMEOUT) == list(range(1, 101))
    assert (tmp_path / "attempted").exists()
    wait_until(lambda: len(rt.worker_pids()) == NUM_WORKERS, timeout=TIMEOUT)


def test_worker_killed_while_idle_is_replaced(rt: sc.Runtime) -> None:
    wait_until(lambda: len(rt.worker_pids()) == NUM_WORKERS, what="a full pool")
    assert sc.submit(square, 2).result(timeout=TIMEOUT) == 4
    before = set(rt.worker_pids())
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in rt.worker_pids() and len(rt.worker_pids()) == NUM_WORKERS,
        what="a replacement worker",
    )
    after = set(rt.worker_pids())
    assert after != before and victim not in after
    pids = set(sc.gather([sc.submit(getpid) for _ in range(10)], timeout=TIMEOUT))
    assert pids <= after


def test_all_workers_killed_while_idle(rt: sc.Runtime) -> None:
    wait_until(lambda: len(rt.worker_pids()) == NUM_WORKERS, what="a full pool")
    assert sc.submit(square, 2).result(timeout=TIMEOUT) == 4
    before = set(rt.worker_pids())
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert sc.submit(square, 5).result(timeout=TIMEOUT) == 25
    wait_until(lambda: len(rt.worker_pids()) == NUM_WORKERS, what="a full pool")
    assert not before & set(rt.worker_pids())


@pytest.mark.parametrize(
    ("failures", "options", "raises", "attempts"),
    [
        (2, {"retry_exceptions": True, "max_retries": 2}, None, 3),
        (2, {"retry_exceptions": True, "max_retries": 1}, ValueError, 2),
        (1, {}, ValueError, 1),  # user exceptions are not retried by default
        (1, {"max_retries": 5}, ValueError, 1),
    ],
)
def test_retry_exceptions(
    rt: sc.Runtime, tmp_path: Path, failures: int, options: dict[str, Any],
    raises: type[BaseException] | None, attempts: int,
) -> None:
    future = sc.remote(flaky).options(**options).submit(str(tmp_path), failures)
    if raises is None:
        assert future.result(timeout=TIMEOUT) == attempts
    else:
        with pytest.raises(raises, match="flaky failure"):
            future.result(timeout=TIMEOUT)
    assert int(Path(tmp_path, "attempts").read_text()) == attempts


# -- the driver itself dies, or exits without shutdown() --------------------------------------


def shmem_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise AssertionError("no Shmem line in /proc/meminfo")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start_driver(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        _, err = proc.communicate(timeout=TIMEOUT)
        raise AssertionError(f"the driver printed nothing; stderr:\n{err}")
    return result[0]


DRIVER_THAT_WAITS = """
    import os, time
    import numpy as np
    import sharedcompute as sc

    rt = sc.init(num_workers=2)
    ref = sc.put(np.ones(100_000_000 // 8))  # 100 MB in shared memory
    # Both workers hold a view of it.
    sums = sc.get([sc.submit(np.sum, ref) for _ in range(4)], timeout=60)
    assert all(s == 100_000_000 // 8 for s in sums)
    while len(rt.worker_pids()) < 2:
        time.sleep(0.01)
    print(" ".join(map(str, rt.worker_pids())), flush=True)
    time.sleep(600)
"""


def test_sigkill_of_the_driver_ends_workers_and_frees_shared_memory() -> None:
    driver = start_driver(DRIVER_THAT_WAITS)
    try:
        worker_pids = [int(p) for p in read_line(driver).split()]
        assert len(worker_pids) == 2
        time.sleep(0.2)
        holding = shmem_kib()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=TIMEOUT)
        driver.stdout.close()  # type: ignore[union-attr]
        driver.stderr.close()  # type: ignore[union-attr]
    wait_until(lambda: all(gone(pid) for pid in worker_pids), 10, "the workers to exit")
    # The 100 MB object (and whatever else the store held) goes back to the system.
    wait_until(lambda: shmem_kib() < holding - 80_000, 10, "Shmem to drop by 80 MB")


def test_exit_without_shutdown_leaves_nothing_behind() -> None:
    driver = start_driver("""
        import os, sys
        import sharedcompute as sc

        rt = sc.init(num_workers=2)
        futures = [sc.submit(os.getpid) for _ in range(4)]
        assert all(isinstance(f.result(timeout=60), int) for f in futures)
        print(" ".join(map(str, rt.worker_pids())), flush=True)
        # No shutdown(): atexit must clean up.
    """)
    try:
        worker_pids = [int(p) for p in read_line(driver).split()]
        _, err = driver.communicate(timeout=TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=TIMEOUT)
    assert driver.returncode == 0, err
    assert worker_pids
    wait_until(lambda: all(gone(pid) for pid in worker_pids), 10, "the workers to exit")
