"""What errors and worker output tell the user; each message names what went wrong and where.

- the runtime's errors are also the stdlib's: a SerializationError is a
  pickle.PicklingError, a WorkerCrashedError a BrokenProcessPool;
- a SIGKILLed worker's error points at the out-of-memory killer;
- an unserializable result names its function, the type and the place in the value;
- workers take the driver's multiprocessing authkey (Manager proxies work in tasks);
- worker output can pass through unprefixed (and does, under the Executor);
- remote tracebacks show the source of code that travelled by value.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

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


# -- a SIGKILLed worker's error points at the out-of-memory killer ----------------------------


def kill_self(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


@pytest.mark.parametrize("how", ["sigkill", "exit 3"])
def test_sigkill_message_suggests_the_oom_killer(rt: sc.Runtime, how: str) -> None:
    future = sc.remote(kill_self).options(max_retries=0).submit(how)
    with pytest.raises(WorkerCrashedError) as info:
        future.result(timeout=TIMEOUT)
    message = str(info.value)
    if how == "sigkill":
        assert "SIGKILL" in message and "out-of-memory" in message, message
        assert "dmesg" in message and "journalctl -k" in message, message
    else:
        assert "code 3" in message and "out-of-memory" not in message, message
    # The stdlib's crash errors catch it too.
    assert isinstance(info.value, BrokenProcessPool) and isinstance(info.value, BrokenExecutor)


# -- an unserializable result says whose result, which type and where -------------------------


def return_nested_lock() -> list[Any]:
    return [1, 2, {"key": threading.Lock()}]


def test_unserializable_result_names_function_type_and_place(rt: sc.Runtime) -> None:
    with pytest.raises(SerializationError) as info:
        sc.submit(return_nested_lock).result(timeout=TIMEOUT)
    message = str(info.value)
    assert f"result of {__name__}.return_nested_lock" in message, message
    assert "'_thread.lock'" in message and "result[2]['key']" in message, message
    assert isinstance(info.value, pickle.PicklingError) and isinstance(info.value, TypeError)
    assert sc.submit(len, "abc").result(timeout=TIMEOUT) == 3  # the worker is fine


# -- multiprocessing.Manager() proxies work in tasks ------------------------------------------


def fill(shared: Any, items: Any, key: str) -> int:
    shared[key] = os.getpid()
    items.append(key)
    return len(items)


def test_manager_proxies_work_as_task_arguments(rt: sc.Runtime) -> None:
    # The manager starts after the workers: they must have the driver's authkey already.
    # (Forked: a spawned one would leave multiprocessing's resource tracker running.)
    with multiprocessing.get_context("fork").Manager() as manager:
        shared, items = manager.dict(), manager.list()
        assert sc.submit(fill, shared, items, "a").result(timeout=TIMEOUT) == 1
        assert sc.submit(fill, shared, items, "b").result(timeout=TIMEOUT) == 2
        assert dict(shared).keys() == {"a", "b"}
        assert set(dict(shared).values()) <= set(rt.worker_pids())
        assert list(items) == ["a", "b"]


# -- worker output with or without the prefix -------------------------------------------------


def print_lines() -> None:
    print("first line")
    print("partial", end="", flush=True)
    print("to stderr", file=sys.stderr, flush=True)


def read_until(capfd: pytest.CaptureFixture[str], out_has: str, err_has: str) -> tuple[str, str]:
    out = err = ""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        captured = capfd.readouterr()
        out, err = out + captured.out, err + captured.err
        if out_has in out and err_has in err:
            break
        time.sleep(0.02)
    return out, err


def test_worker_output_without_prefix_is_passed_through(capfd: pytest.CaptureFixture[str]) -> None:
    with sc.Runtime(num_workers=1, worker_output_prefix=False):
        sc.submit(print_lines).result(timeout=TIMEOUT)
        out, err = read_until(capfd, "first line\npartial", "to stderr\n")
    captured = capfd.readouterr()
    assert out + captured.out == "first line\npartial"
    assert err + captured.err == "to stderr\n"


def test_worker_output_prefix_is_on_by_default(capfd: pytest.CaptureFixture[str]) -> None:
    with sc.Runtime(num_workers=1) as runtime:
        sc.submit(print_lines).result(timeout=TIMEOUT)
        pid = runtime.worker_pids()[0]
        out, err = read_until(capfd, "first line\n", "to stderr\n")
    out += capfd.readouterr().out
    assert out == f"(worker 0, pid {pid}) first line\n(worker 0, pid {pid}) partial\n"
    assert err == f"(worker 0, pid {pid}) to stderr\n"


def test_executor_workers_print_exactly_what_the_task_printed(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with sc.Executor(max_workers=1) as executor:
        executor.submit(print_lines).result(timeout=TIMEOUT)
        out, err = read_until(capfd, "first line\npartial", "to stderr\n")
    captured = capfd.readouterr()
    assert out + captured.out == "first line\npartial"
    assert err + captured.err == "to stderr\n"


# -- remote tracebacks show the source of code pickled by value -------------------------------

# Each case raises in a worker; the driver prints the remote traceback as JSON, by case.
DRIVER = """
import json, sys
import sharedcompute as sc

def main_function(x):
    y = x + 1
    raise ValueError("from main_function")

class Shapes:
    @classmethod
    def build(cls, x):
        raise KeyError("from Shapes.build")

def traceback_of(x):
    import traceback
    try:
        main_function(x)
    except ValueError:
        return traceback.format_exc()

def submits_nested(x):
    # A nested task's own remote traceback does not reach us: it brings back its text.
    raise RuntimeError(sc.submit(traceback_of, x).result(timeout=60))

def call_it(fn, x):
    return fn(x)

@sc.remote
class Tally:
    def add(self, x):
        raise RuntimeError("from Tally.add")

cases = {
    "function": lambda: sc.submit(main_function, 1),
    "lambda": lambda: sc.submit(lambda x: 1 / (x - x), 1),
    "classmethod": lambda: sc.submit(Shapes.build, 1),
    "nested submit": lambda: sc.submit(submits_nested, 1),
    "lambda as an argument": lambda: sc.submit(call_it, lambda x: [][x], 3),
    "actor method": lambda: Tally.remote().add.remote(1),
}
with sc.Runtime(num_workers=2):
    tracebacks = {}
    for name, start in cases.items():
        error = start().exception(timeout=60)
        tracebacks[name] = error.__cause__.tb
print(json.dumps(tracebacks))
"""

# The line each case's innermost frame must show.
EXPECTED_LINES = {
    "function": 'raise ValueError("from main_function")',
    "lambda": '"lambda": lambda: sc.submit(lambda x: 1 / (x - x), 1),',
    "classmethod": 'raise KeyError("from Shapes.build")',
    "nested submit": 'raise ValueError("from main_function")',
    "lambda as an argument": (
        '"lambda as an argument": lambda: sc.submit(call_it, lambda x: [][x], 3),'
    ),
    "actor method": 'raise RuntimeError("from Tally.add")',
}


def run_driver(args: list[str], cwd: Path) -> dict[str, str]:
    # The sharedcompute under test, whatever the script's directory puts first on sys.path.
    package_root = str(Path(sc.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT * 2, cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert proc.returncode == 0, proc.stderr
    tracebacks: dict[str, str] = json.loads(proc.stdout.splitlines()[-1])
    return tracebacks


@pytest.mark.parametrize("how", ["python script.py", "python -c"])
def test_remote_traceback_shows_source_of_code_pickled_by_value(tmp_path: Path, how: str) -> None:
    source = textwrap.dedent(DRIVER)
    if how == "python script.py":
        script = tmp_path / "script.py"
        script.write_text(source)
        tracebacks = run_driver([str(script)], tmp_path)
        filename = str(script)
    else:
        tracebacks = run_driver(["-c", source], tmp_path)  # no file anywhere to read
        filename = "<string>"
    assert set(tracebacks) == set(EXPECTED_LINES)
    for name, tb in tracebacks.items():
        assert "<dynamic-code>" not in tb, (name, tb)
        lines = tb.splitlines()
        frames = [i for i, line in enumerate(lines) if line.startswith(f'  File "{filename}"')]
        assert frames, (name, tb)
        innermost = lines[frames[-1] + 1].strip()
        assert innermost == EXPECTED_LINES[name], (name, tb)
