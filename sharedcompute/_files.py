"""Directories named after the process that made them, and the sweep of those left by the dead.

A process that keeps files of its own (spilled objects, unpacked runtime_env
packages) puts them in ``<prefix><pid>-<random>`` and removes it when it closes.
One killed before it could is found by the next process to make such a
directory there: its pid is dead. A live pid is never touched, even one the
kernel gave to another process since, so a second runtime running is safe.
"""

from __future__ import annotations

import os
import shutil
import tempfile


def make_own_dir(prefix: str, parent: str | None = None) -> str:
    """Sweep ``parent`` (default: the temp dir) of dead processes' ``prefix`` directories,
    then make this process's own."""
    parent = parent or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    sweep_dead(parent, prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def sweep_dead(directory: str, prefix: str) -> list[str]:
    """Remove ``directory``'s ``prefix<pid>-*`` directories whose pid is dead; their names."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    return True
