"""Source lines travel with code pickled by value, so remote tracebacks can show them.

cloudpickle pickles by value the code of whatever it cannot import by name: functions,
lambdas and classes defined in ``__main__`` (a script, ``python -c``, a notebook) or in
modules registered for pickling by value. It sets their ``co_filename`` to
``"<dynamic-code>"``, so a traceback raised in a worker shows that name and no text
for those frames.

Here a code object is pickled as cloudpickle pickles it, plus its real file name and
the source lines it spans, read where it is pickled (``linecache``, which also holds
notebook cells; for ``python -c``, the command line). Loading it restores the name and
puts the lines into the loading process's ``linecache``, where ``traceback`` (and
``inspect``) look for them. Lines go once per pickle: a nested function's lines are
part of its parent's.

Cost: only code pickled by value pays, which happens when a function is sent for the
first time (functions are cached by key afterwards), or when an argument holds a lambda
or an instance of a class pickled by value. Each code object's lines are looked up once
per process; each further pickle of it costs a dictionary lookup, and its lines' bytes.
"""

from __future__ import annotations

import functools
import io
import linecache
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

__all__ = ["Spans", "dumps_function", "reduce_code", "restore_code"]

# What cloudpickle does with a code object; None if a future version stops doing it so.
_CODE_REDUCE: Callable[[types.CodeType], tuple[Any, tuple[Any, ...]]] | None = (
    cloudpickle.Pickler.dispatch_table.get(types.CodeType)
)
_linecache_lock = threading.Lock()
# id(code) -> (code, last line, lines): a class pickled by value with every task's arguments
# has its methods' source looked up once. Holds the code objects, so ids stay theirs.
_found: dict[int, tuple[types.CodeType, int, tuple[str, ...]]] = {}
_FOUND_KEPT = 4096
_found_lock = threading.Lock()

# filename -> line ranges (first, last) already in this pickle.
Spans = dict[str, list[tuple[int, int]]]


class _FunctionPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5)
        self._spans: Spans = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            return reduce_code(obj, self._spans)
        return super().reducer_override(obj)


def dumps_function(fn: Any) -> bytes:
    """``cloudpickle.dumps(fn, protocol=5)``, with the source of code pickled by value."""
    with io.BytesIO() as file:
        _FunctionPickler(file).dump(fn)
        return file.getvalue()


def reduce_code(code: types.CodeType, spans: Spans) -> Any:
    """A pickler's reduction of ``code``: cloudpickle's, plus its file name and lines."""
    if _CODE_REDUCE is None:
        return NotImplemented
    constructor, args = _CODE_REDUCE(code)
    first, lines = _lines_to_send(code, spans)
    return restore_code, (constructor, args, code.co_filename, first, lines)


def restore_code(
    constructor: Callable[..., types.CodeType], args: tuple[Any, ...], filename: str,
    first: int, lines: tuple[str, ...],
) -> types.CodeType:
    """Unpickle helper (referenced by name in pickle streams): see the module docstring."""
    code = constructor(*args)
    if code.co_filename != filename:
        code = code.replace(co_filename=filename)
    if lines:
        _remember(filename, first, lines)
    return code


def _lines_to_send(code: types.CodeType, spans: Spans) -> tuple[int, tuple[str, ...]]:
    first = code.co_firstlineno
    found = _found.get(id(code))
    if found is None or found[0] is not code:
        found = (code, *_find_lines(code))
        with _found_lock:
            if len(_found) >= _FOUND_KEPT:
                del _found[next(iter(_found))]
            _found[id(code)] = found
    _, last, lines = found
    if not lines:
        return first, ()
    sent = spans.setdefault(code.co_filename, [])
    if any(a <= first and last <= b for a, b in sent):
        return first, ()
    sent.append((first, last))
    return first, lines


def _find_lines(code: types.CodeType) -> tuple[int, tuple[str, ...]]:
    """(last line, the lines from the first) of ``code``'s source; no lines if not found."""
    source = _source(code.co_filename)
    if not source:
        return 0, ()
    first = code.co_firstlineno
    last = _last_line(code)
    lines = tuple(source[first - 1:last])
    if len(lines) != last - first + 1 or not _plausible(code.co_name, lines):
        return 0, ()  # not this code's source (a file changed since, an exec'd string)
    return last, lines


def _last_line(code: types.CodeType) -> int:
    last = code.co_firstlineno
    positions = getattr(code, "co_positions", None)  # Python 3.11+: multi-line statements too
    if positions is not None:
        for line, end, _, _ in positions():
            last = max(last, end or 0, line or 0)
    else:
        for _, _, line in code.co_lines():
            last = max(last, line or 0)
    return last


def _source(filename: str) -> list[str]:
    lines = linecache.getlines(filename)
    if not lines and filename == "<string>" and sys.argv[:1] == ["-c"]:
        return _command_lines()
    return lines


@functools.cache
def _command_lines() -> list[str]:
    """The program given with ``python -c`` (Python keeps only '-c' in ``sys.argv``)."""
    argv = getattr(sys, "orig_argv", [])
    try:
        return str(argv[argv.index("-c", 1) + 1]).splitlines(keepends=True)
    except (ValueError, IndexError):
        return []


def _plausible(name: str, lines: tuple[str, ...]) -> bool:
    """Whether ``lines`` can be the source of code named ``name``."""
    if name == "<lambda>":
        return any("lambda" in line for line in lines)
    if name.startswith("<"):  # comprehensions and the like: no name to look for
        return True
    return any(name in line for line in lines)


def _remember(filename: str, first: int, lines: tuple[str, ...]) -> None:
    end = first - 1 + len(lines)
    entry = linecache.cache.get(filename)
    if entry is not None and len(entry) == 4 and tuple(entry[2][first - 1:end]) == lines:
        return  # known already (arguments bring the same code with every task)
    with _linecache_lock:
        entry = linecache.cache.get(filename)
        known = list(entry[2]) if entry is not None and len(entry) == 4 else []
        if len(known) < end:
            known.extend("\n" for _ in range(end - len(known)))
        known[first - 1:end] = lines
        # No mtime: linecache.checkcache() then leaves the entry alone, as it does for
        # source that came from a module's loader.
        linecache.cache[filename] = (sum(map(len, known)), None, known, filename)
