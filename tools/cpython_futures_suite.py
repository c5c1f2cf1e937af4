"""Run CPython 3.11's own ``test_concurrent_futures`` against ``sharedcompute.Executor``.

CPython tests ``ProcessPoolExecutor`` by mixing an executor class and a start method into
test mixins (``create_executor_tests``): ``ProcessPoolSpawnMixin`` sets ``executor_type``
and ``ctx = "spawn"``, and ``ExecutorMixin.setUp`` builds
``executor_type(max_workers=..., mp_context=get_context(), **executor_kwargs)``. This tool
does the same with ``executor_type = sharedcompute.Executor`` and the spawn context, for
these groups of CPython's test classes::

    as_completed  AsCompletedTests          wait      WaitTests
    shutdown      ProcessPoolShutdownTest   deadlock  ExecutorDeadlockTest
    executor      ProcessPoolExecutorTest   initializer  InitializerMixin, FailingInitializerMixin

    python tools/cpython_futures_suite.py                 # everything; exit 0 only if all pass
    python tools/cpython_futures_suite.py --list          # test ids, and what is left out and why
    python tools/cpython_futures_suite.py -k test_map     # unittest's -k: substring or fnmatch
    python tools/cpython_futures_suite.py --group wait --group shutdown

Finding the test file (never copied into this repository). CPython 3.11 ships it as
``Lib/test/test_concurrent_futures.py``; many interpreters (pyenv builds among them) strip it,
and on Debian it comes with the ``libpython3.11-testsuite`` package, under
``/usr/lib/python3.11/test/``. Looked for, in order: the file named by
``$SHAREDCOMPUTE_CPYTHON_FUTURES_TEST``; the running interpreter's own ``test`` package; that
Debian directory. Only Python 3.11 looks on its own, as the file is 3.11's.

Importing it. The file is imported as the top-level module ``test_concurrent_futures`` by
appending its directory to the *end* of ``sys.path``, and it uses the running interpreter's
own ``test.support``. Why not Debian's whole ``test`` package: tasks name their functions
by module (``test_concurrent_futures.mul``), so worker processes must import the same module,
and they receive the driver's ``sys.path``, not its imported packages; the only way to give
them Debian's ``test`` package would be Debian's stdlib directory on ``sys.path``, which would
shadow the interpreter's own stdlib (Debian's 3.11.2 under a 3.11.7, say). The helpers the
file uses (``import_helper``, ``threading_helper``, ``hashlib_helper``, ``script_helper``,
``SHORT_TIMEOUT``...) are stable within 3.11, and ``test.support`` matches the interpreter it
runs on. An interpreter without ``test.support`` gets exit status 3, as when no file is found.

What is adapted, and nothing else:

* tests that read ``ProcessPoolExecutor``'s private attributes (or are skipped by CPython
  for process pools) are left out, by name, in ``EXCLUDED`` with a reason each;
* the child scripts of ``test_interpreter_shutdown`` and ``test_submit_after_interpreter_
  shutdown`` say ``from concurrent.futures import <executor_type.__name__>`` and import
  ``test.test_concurrent_futures``: they get the executor under test and this module instead,
  and the driver's ``sys.path`` (they still run in isolated mode, ``-I``);
* ``ExecutorDeadlockTest._fail_on_deadlock`` (the harness's recovery when a test deadlocks,
  which terminates ``executor._processes``) shuts the executor down instead;
* ``support.verbose`` is 0, as under regrtest without ``-v``; before CPython's module cleanup
  (which waits for multiprocessing's resource tracker) whatever multiprocessing child a failed
  test left running, such as its ``Manager``, is stopped.

A watchdog, re-armed at each test's start and end, ends a run in which one test, or what runs
between two, takes longer than ``--per-test-timeout``: it prints every thread's stack, kills
this process's children, prints the summary so far and exits with status 1 (should it never get
the GIL, ``faulthandler.dump_traceback_later(exit=True)`` ends the process 30 s later).
Exit status: 0 all passed, 1 failures or a timeout, 2 no test selected, 3 the CPython test file
or ``test.support`` is not available here. ``main(argv, executor_type=...)`` runs the suite
against another ``Executor`` class (one the child scripts can import).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import types
import unittest
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

ROOT = Path(__file__).resolve().parent.parent
MODULE_NAME = "test_concurrent_futures"
FILE_ENV_VAR = "SHAREDCOMPUTE_CPYTHON_FUTURES_TEST"
DEBIAN_TEST_DIR = Path("/usr/lib/python3.11/test")
SUPPORT_HELPERS = ("import_helper", "threading_helper", "hashlib_helper", "script_helper")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

# group name -> CPython's test mixins that make it
GROUPS: dict[str, tuple[str, ...]] = {
    "as_completed": ("AsCompletedTests",),
    "wait": ("WaitTests",),
    "shutdown": ("ProcessPoolShutdownTest",),
    "deadlock": ("ExecutorDeadlockTest",),
    "executor": ("ProcessPoolExecutorTest",),
    "initializer": ("InitializerMixin", "FailingInitializerMixin"),
}

# "Mixin.test_name" -> why it is left out
EXCLUDED: dict[str, str] = {
    "ProcessPoolShutdownTest.test_processes_terminate":
        "counts and joins executor._processes",
    "ProcessPoolShutdownTest.test_context_manager_shutdown":
        "builds a ProcessPoolExecutor itself and joins its _processes",
    "ProcessPoolShutdownTest.test_del_shutdown":
        "builds a ProcessPoolExecutor itself; joins _processes, _call_queue, "
        "_executor_manager_thread",
    "ProcessPoolShutdownTest.test_shutdown_no_wait":
        "builds a ProcessPoolExecutor itself; joins _processes, _call_queue, "
        "_executor_manager_thread",
    "ProcessPoolShutdownTest.test_hang_gh83386":
        "CPython skips it for process pools (gh-83386); its child script uses multiprocessing "
        "without importing it",
    "ExecutorDeadlockTest.test_shutdown_deadlock_pickle":
        "joins executor._executor_manager_thread",
    "ProcessPoolExecutorTest.test_killed_child":
        "terminates a worker found in executor._processes",
    "ProcessPoolExecutorTest.test_saturation":
        "compares len(executor._processes) with executor._max_workers",
    "ProcessPoolExecutorTest.test_idle_process_reuse_one":
        "reads executor._max_workers and counts executor._processes",
    "ProcessPoolExecutorTest.test_idle_process_reuse_multiple":
        "reads executor._max_workers and counts executor._processes",
    "ProcessPoolExecutorTest.test_max_tasks_per_child":
        "counts executor._processes",
    "ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context":
        "reads executor._mp_context",
    "ProcessPoolExecutorTest.test_traceback":
        "requires the cause to be CPython's private concurrent.futures.process._RemoteTraceback;"
        " ours is sharedcompute.errors.RemoteTraceback with the same .tb text (tested in"
        " tests/test_error_messages.py)",
}


def _real_stderr() -> TextIO:
    """The process's stderr, even while a test captures ``sys.stderr``."""
    return sys.__stderr__ or sys.stderr


class Unavailable(Exception):
    """The CPython test file, or the test.support it needs, is not on this machine."""


# -- finding and importing CPython's tests ------------------------------------------------


def find_test_file() -> Path:
    """The CPython 3.11 ``test_concurrent_futures.py`` to run (see the module docstring)."""
    named = os.environ.get(FILE_ENV_VAR)
    if named:
        if not Path(named).is_file():
            raise Unavailable(f"${FILE_ENV_VAR} names {named}, which is not a file")
        return Path(named)
    if sys.version_info[:2] != (3, 11):
        raise Unavailable(
            f"this is Python {sys.version_info[0]}.{sys.version_info[1]}; the suite is "
            f"CPython 3.11's (name a file with ${FILE_ENV_VAR} to try it anyway)"
        )
    candidates = []
    try:
        import test

        candidates.append(Path(test.__file__).parent / f"{MODULE_NAME}.py")
    except ImportError:
        pass
    candidates.append(DEBIAN_TEST_DIR / f"{MODULE_NAME}.py")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise Unavailable(
        f"CPython's {MODULE_NAME}.py is in none of {[str(c) for c in candidates]}; on Debian: "
        "apt-get install libpython3.11-testsuite"
    )


def import_cpython_tests(path: Path) -> types.ModuleType:
    """Import ``path`` as ``test_concurrent_futures``, on the interpreter's ``test.support``."""
    for helper in SUPPORT_HELPERS:
        try:
            importlib.import_module(f"test.support.{helper}")
        except ImportError as exc:
            raise Unavailable(f"this interpreter lacks test.support.{helper}: {exc}") from exc
    # As regrtest without -v: ExecutorMixin.tearDown would print every test's time.
    support: Any = importlib.import_module("test.support")
    support.verbose = 0
    loaded = sys.modules.get(MODULE_NAME)
    if loaded is not None:
        if Path(loaded.__file__ or "").resolve() != path.resolve():
            raise Unavailable(f"another {MODULE_NAME} is already imported: {loaded.__file__}")
        return loaded
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.append(directory)  # last: only names found nowhere else come from there
    module = importlib.import_module(MODULE_NAME)
    if Path(module.__file__ or "").resolve() != path.resolve():
        raise Unavailable(f"importing {MODULE_NAME} found {module.__file__}, not {path}")
    return module


# -- building the test classes -------------------------------------------------------------


def _strip_suffix(name: str) -> str:
    """The class-name stem CPython's create_executor_tests uses."""
    if name.endswith(("Mixin", "Tests")):
        return name[:-5]
    if name.endswith("Test"):
        return name[:-4]
    return name


def _fail_on_deadlock(self: unittest.TestCase, executor: Any) -> None:
    """Replaces CPython's, which terminates ``executor._processes`` before shutting down."""
    with tempfile.TemporaryFile(mode="w+") as dump:
        faulthandler.dump_traceback(file=dump)
        dump.seek(0)
        stacks = dump.read()
    executor.shutdown(wait=False, cancel_futures=True)
    print(f"\nTraceback:\n {stacks}", file=_real_stderr())
    self.fail(f"Executor deadlock:\n\n{stacks}")


def _adapt_child_script(script: str, executor_type: type, module: types.ModuleType) -> str:
    """A child script of CPython's, run with the executor under test and this module."""
    name = executor_type.__name__
    stdlib_import = f"from concurrent.futures import {name}"
    if stdlib_import not in script:
        raise AssertionError(f"child script no longer says {stdlib_import!r}:\n{script}")
    script = script.replace(
        stdlib_import,
        f"from {executor_type.__module__} import {executor_type.__qualname__} as {name}",
    )
    script = script.replace(
        "from test.test_concurrent_futures import", f"from {module.__name__} import"
    )
    return f"import sys; sys.path[:] = {sys.path!r}\n{script}"


def _patch_child_scripts(module: types.ModuleType, executor_type: type) -> None:
    run_child = module.assert_python_ok
    if getattr(run_child, "adapted_for", None) is not None:
        run_child = run_child.adapted_for

    def assert_python_ok(*args: str, **env_vars: Any) -> Any:
        argv = list(args)
        if "-c" in argv:
            at = argv.index("-c") + 1
            argv[at] = _adapt_child_script(argv[at], executor_type, module)
        return run_child(*argv, **env_vars)

    assert_python_ok.adapted_for = run_child  # type: ignore[attr-defined]
    module.assert_python_ok = assert_python_ok  # type: ignore[attr-defined]


@dataclass
class Suite:
    """The test classes built for one executor type, and what was left out."""

    module: types.ModuleType
    classes: dict[str, list[type[unittest.TestCase]]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # test id -> reason
    stale_exclusions: list[str] = field(default_factory=list)


def build_suite(module: types.ModuleType, executor_type: type) -> Suite:
    """One test class per CPython mixin: mixin + spawn + executor_type, as CPython builds them."""
    _patch_child_scripts(module, executor_type)
    _register_leftover_cleanup(module)
    # Not put in the module's namespace: a class a task needs (test_traceback submits a
    # classmethod) is then pickled by value, as workers cannot import a class built here.
    spawn_mixin = type(
        "SharedComputeSpawnMixin",
        (module.ProcessPoolSpawnMixin,),
        {"__module__": module.__name__, "executor_type": executor_type},
    )
    suite = Suite(module)
    seen: set[str] = set()
    loader = unittest.TestLoader()
    for group, mixin_names in GROUPS.items():
        for mixin_name in mixin_names:
            mixin = getattr(module, mixin_name)
            name = f"SharedComputeSpawn{_strip_suffix(mixin_name)}Test"
            namespace: dict[str, Any] = {"__module__": module.__name__}
            if mixin_name == "ExecutorDeadlockTest":
                namespace["_fail_on_deadlock"] = _fail_on_deadlock
            cls = type(name, (mixin, spawn_mixin, module.BaseTestCase), namespace)
            suite.classes.setdefault(group, []).append(cls)
            for test_name in loader.getTestCaseNames(cls):
                key = f"{mixin_name}.{test_name}"
                if key in EXCLUDED:
                    seen.add(key)
                    suite.excluded[f"{module.__name__}.{name}.{test_name}"] = EXCLUDED[key]
    suite.stale_exclusions = sorted(set(EXCLUDED) - seen)
    return suite


def select_tests(
    suite: Suite, groups: Sequence[str], patterns: Sequence[str]
) -> unittest.TestSuite:
    loader = unittest.TestLoader()
    # unittest's own -k: a pattern without wildcards matches as a substring of the test id
    loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in patterns] or None
    selected = unittest.TestSuite()
    for group in groups:
        for cls in suite.classes[group]:
            for test_name in loader.getTestCaseNames(cls):
                test = cls(test_name)
                if test.id() not in suite.excluded:
                    selected.addTest(test)
    return selected


# -- running -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str  # "FAIL" or "ERROR"
    test_id: str
    first_line: str


def _first_line(err: tuple[type[BaseException], BaseException, Any]) -> str:
    exc_type, exc, _ = err
    lines = str(exc).strip().splitlines()
    return f"{exc_type.__name__}: {lines[0]}" if lines else exc_type.__name__


class Watchdog:
    """Calls ``on_expiry`` (which must end the process) when one step runs past ``timeout``.

    A step is a test, or what runs between two (class and module fixtures). Should this
    thread never get the GIL back, faulthandler ends the process a little later on its own.
    """

    BACKSTOP_SECONDS = 30.0

    def __init__(self, timeout: float, on_expiry: Callable[[str], None]) -> None:
        self.timeout = timeout
        self._on_expiry = on_expiry
        self._changed = threading.Condition()
        self._deadline: float | None = None
        self._step = ""
        self._thread = threading.Thread(target=self._watch, name="suite-watchdog", daemon=True)

    def arm(self, step: str) -> None:
        with self._changed:
            self._deadline = time.monotonic() + self.timeout
            self._step = step
            self._changed.notify()
        faulthandler.dump_traceback_later(
            self.timeout + self.BACKSTOP_SECONDS, exit=True, file=_real_stderr()
        )
        if not self._thread.is_alive():
            self._thread.start()

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._changed:
            self._deadline = None
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._deadline is None:
                    self._changed.wait(self.timeout)
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            step = self._step
        self._on_expiry(step)


class GuardedResult(unittest.TextTestResult):
    """A verbose text result that keeps each error's first line and re-arms the watchdog."""

    def __init__(self, stream: Any, watchdog: Watchdog) -> None:
        super().__init__(stream, descriptions=True, verbosity=2)
        self.watchdog = watchdog
        self.problems: list[Problem] = []

    def startTest(self, test: unittest.TestCase) -> None:
        self.watchdog.arm(test.id())
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        self.watchdog.arm(f"what ran after {test.id()} (fixtures, cleanups)")

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self.problems.append(Problem("ERROR", test.id(), _first_line(err)))

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self.problems.append(Problem("FAIL", test.id(), _first_line(err)))

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "FAIL" if issubclass(err[0], test.failureException) else "ERROR"
            self.problems.append(Problem(kind, subtest.id(), _first_line(err)))


def _child_pids() -> list[int]:
    """This process's children (Linux's /proc; elsewhere the multiprocessing ones only)."""
    me = str(os.getpid())
    pids = []
    try:
        entries = [e for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return [p.pid for p in multiprocessing.active_children() if p.pid is not None]
    for entry in entries:
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if stat.rsplit(")", 1)[-1].split()[1] == me:  # "pid (comm) state ppid ..."
            pids.append(int(entry.name))
    return pids


def _kill_children() -> list[int]:
    """Kill this process's children, but for multiprocessing's resource tracker: it unlinks
    the named semaphores (``/dev/shm/sem.mp-*``) of a test's Queue once this process exits,
    and killed, it would leave them behind."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    pids = [pid for pid in _child_pids() if pid != tracker]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _stop_leftover_processes() -> None:
    """Stop what a failed test left running: CPython's own module cleanup would wait for it.

    (``multiprocessing.util._cleanup_tests`` waits for the resource tracker, which lives as
    long as any process holding its pipe, e.g. the Manager of a test that failed midway.)
    """
    for process in multiprocessing.active_children():
        print(f"warning: a test left {process!r} running; stopping it", file=sys.stderr)
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def _register_leftover_cleanup(module: types.ModuleType) -> None:
    set_up_module = module.setUpModule
    if getattr(set_up_module, "wrapped", None) is not None:
        return

    def setUpModule() -> None:
        set_up_module()
        # Module cleanups run last in, first out: this one runs before CPython's.
        unittest.addModuleCleanup(_stop_leftover_processes)

    setUpModule.wrapped = set_up_module  # type: ignore[attr-defined]
    module.setUpModule = setUpModule  # type: ignore[attr-defined]


def run_tests(
    tests: unittest.TestSuite, per_test_timeout: float, summarize: Callable[[GuardedResult], None]
) -> GuardedResult:
    """Run ``tests`` verbosely on stderr; on a timeout, summarize and exit here."""
    result: GuardedResult

    def on_timeout(step: str) -> None:
        err = _real_stderr()
        print(f"\n\nTIMEOUT: {step} ran past {per_test_timeout:.0f} s; every thread:",
              file=err, flush=True)
        faulthandler.dump_traceback(file=err, all_threads=True)
        killed = _kill_children()
        if killed:
            print(f"killed child processes {killed}", file=err, flush=True)
        result.problems.append(Problem("ERROR", step, f"timed out after {per_test_timeout} s"))
        summarize(result)
        sys.stdout.flush()
        os._exit(EXIT_FAILED)

    watchdog = Watchdog(per_test_timeout, on_timeout)
    result = GuardedResult(unittest.runner._WritelnDecorator(sys.stderr), watchdog)
    watchdog.arm("setUpModule")
    result.startTestRun()
    try:
        tests(result)
    finally:
        result.stopTestRun()
        watchdog.disarm()
    result.printErrors()
    sys.stderr.flush()
    return result


def print_summary(result: GuardedResult, excluded: int, seconds: float, out: TextIO) -> None:
    skipped = len(result.skipped)
    failed = sum(p.kind == "FAIL" for p in result.problems)
    errored = sum(p.kind == "ERROR" for p in result.problems)
    unexpected = len(result.unexpectedSuccesses)
    bad_tests = {p.test_id for p in result.problems if p.test_id.startswith(MODULE_NAME)}
    passed = result.testsRun - len(bad_tests) - skipped - unexpected
    print(f"\n== {result.testsRun} run in {seconds:.1f} s: passed {passed}, failed {failed}, "
          f"errored {errored}, skipped {skipped} ({excluded} left out, see --list)", file=out)
    for problem in result.problems:
        print(f"{problem.kind:5} {problem.test_id}: {problem.first_line}", file=out)
    for test in result.unexpectedSuccesses:
        print(f"UNEXPECTED SUCCESS {test.id()}", file=out)
    out.flush()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--list", action="store_true",
                        help="print the test ids and what is left out, run nothing")
    parser.add_argument("-k", dest="patterns", action="append", default=[], metavar="PATTERN",
                        help="only tests whose id matches (substring, or fnmatch with '*'); "
                             "repeatable")
    parser.add_argument("--group", dest="groups", action="append", choices=sorted(GROUPS),
                        help="only this group of tests; repeatable (default: all)")
    parser.add_argument("--per-test-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="dump every stack and exit 1 when a test runs longer (default 120)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, executor_type: type | None = None) -> int:
    """Run the suite against ``executor_type`` (default ``sharedcompute.Executor``)."""
    args = _parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the sharedcompute of the checkout this tool is in
    if executor_type is None:
        import sharedcompute

        executor_type = sharedcompute.Executor
    try:
        path = find_test_file()
        module = import_cpython_tests(path)
    except Unavailable as exc:
        print(f"cpython_futures_suite: unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    suite = build_suite(module, executor_type)
    for key in suite.stale_exclusions:
        print(f"warning: excluded test {key} is not in {path}", file=sys.stderr)
    tests = select_tests(suite, args.groups or list(GROUPS), args.patterns)
    if args.list:
        _print_listing(_iter_ids(tests), suite.excluded)
        return EXIT_OK
    if tests.countTestCases() == 0:
        print("cpython_futures_suite: no test matches", file=sys.stderr)
        return EXIT_USAGE
    package = sys.modules[executor_type.__module__.split(".")[0]]
    print(f"{executor_type.__module__}.{executor_type.__qualname__} ({package.__file__}) "
          f"vs {path}, Python {sys.version.split()[0]}", flush=True)
    started = time.monotonic()

    def summarize(result: GuardedResult) -> None:
        print_summary(result, len(suite.excluded), time.monotonic() - started, sys.stdout)

    result = run_tests(tests, args.per_test_timeout, summarize)
    summarize(result)
    ok = not result.problems and not result.unexpectedSuccesses
    return EXIT_OK if ok else EXIT_FAILED


def _iter_ids(tests: unittest.TestSuite) -> Iterable[str]:
    for test in cast("Iterable[unittest.TestCase | unittest.TestSuite]", tests):
        if isinstance(test, unittest.TestSuite):
            yield from _iter_ids(test)
        else:
            yield test.id()


def _print_listing(ids: Iterable[str], excluded: dict[str, str]) -> None:
    for test_id in ids:
        print(test_id)
    print(f"\nleft out ({len(excluded)}):")
    for test_id, reason in excluded.items():
        print(f"  {test_id}: {reason}")


if __name__ == "__main__":
    sys.exit(main())
