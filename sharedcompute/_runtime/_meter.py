"""CPU and memory of worker processes, read with psutil where it is installed.

Two readers: a node, for the facts its heartbeat carries to the head, and the
dashboard, for the workers of its own process's pool. Both read the same
changing set of pids again and again, once a second or so.

State: one ``psutil.Process`` per pid read last time. ``cpu_percent(None)``
measures the CPU used since the previous call *on the same object*, so the
object is kept from one reading to the next; a pid not asked about (its worker
gone) is dropped, so the table never outgrows the pool. A process's first
reading has no CPU figure yet (None). Without psutil both figures are None.
No psutil error leaves a reading: a process that ended mid-read (or may not be
read) reads as (None, None) and is forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    import psutil
except ImportError:  # CPU and memory are then unknown (None)
    psutil = None

Reading = tuple[float | None, int | None]  # (CPU percent, RSS bytes)


class ProcessMeter:
    """CPU percent and RSS of processes read repeatedly (see the module docstring)."""

    def __init__(self) -> None:
        self._procs: dict[int, Any] = {}

    def read(self, pids: Iterable[int]) -> dict[int, Reading]:
        """Each pid's reading; the processes of pids left out are forgotten."""
        if psutil is None:
            return dict.fromkeys(pids, (None, None))
        kept: dict[int, Any] = {}
        readings = {pid: self._read(pid, kept) for pid in pids}
        self._procs = kept
        return readings

    def _read(self, pid: int, kept: dict[int, Any]) -> Reading:
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the measurement
                cpu = None
            else:
                cpu = float(proc.cpu_percent(None))
            rss = int(proc.memory_info().rss)
        except psutil.Error:
            return None, None
        kept[pid] = proc
        return cpu, rss
