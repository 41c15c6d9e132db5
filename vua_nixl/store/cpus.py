"""How many CPUs this process could put to work right now: the usable ones minus what others keep busy.

The I/O lanes and the checksum thread pay off only on a CPU nobody else is using. The load
average is a poor guide for that: tasks waiting on a disk (O_DIRECT, NFS) count in it, and this
process's own I/O threads raise it too, so a loaded-by-itself store would switch its lanes off
and on again. :class:`FreeCpus` instead reads, for the CPUs this process may run on, the busy
time in ``/proc/stat`` minus this process's own CPU time (every thread), over the last
half second. Where ``/proc/stat`` is missing it falls back to the load average.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

#: How long one measurement stands (reading /proc/stat costs tens of microseconds).
PERIOD_S = 0.5
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max", v1_dir: str = "/sys/fs/cgroup/cpu") -> Optional[float]:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``: "200000 100000" = 2 CPUs; v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 = none), or None when unlimited or unknown.
    A Kubernetes pod with ``limits.cpu: 2`` on a 64-CPU node sees 64 CPUs in its affinity mask
    but may use 2."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(int(quota) / int(period), 0.0)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{v1_dir}/cpu.cfs_quota_us") as fq, open(f"{v1_dir}/cpu.cfs_period_us") as fp:
            q, per = int(fq.read()), int(fp.read())
        return None if q <= 0 or per <= 0 else q / per
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(n, int(limit))) if limit is not None else n


def busy_seconds(cpus: set[int], path: str = "/proc/stat") -> Optional[float]:
    """Seconds the CPUs in ``cpus`` spent busy since boot (user, nice, system, irq, softirq,
    steal; idle and iowait count as free), or None where the kernel does not say."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    total = 0
    seen = False
    for line in lines:
        if not line.startswith(b"cpu") or line[3:4] == b" ":
            continue
        name, *fields = line.split()
        if int(name[3:]) in cpus and len(fields) >= 8:
            v = [int(x) for x in fields[:8]]
            total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            seen = True
    return total / _TICK if seen else None


class FreeCpus:
    """``free()``: usable CPUs minus the CPU time other processes used on them lately."""

    def __init__(self, period_s: float = PERIOD_S, stat_path: str = "/proc/stat"):
        self.period_s = period_s
        self.stat_path = stat_path
        self._lock = threading.Lock()
        self._last: Optional[tuple[float, float, float]] = None  # (monotonic, busy of all, ours)
        self._value = float(usable_cpus())  # optimistic until there is an interval to measure

    def free(self) -> float:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.period_s:
                return self._value
            cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
            busy, ours = busy_seconds(cpus, self.stat_path), time.process_time()
            if busy is None:
                try:  # the load average counts this process's running threads too: allow one
                    self._value = max(0.0, len(cpus) - max(0.0, os.getloadavg()[0] - 1.0))
                except OSError:
                    self._value = 1.0
            elif self._last is not None:
                others = max(0.0, (busy - self._last[1]) - (ours - self._last[2])) / max(now - self._last[0], 1e-3)
                self._value = max(0.0, min(len(cpus) - others, float(usable_cpus())))
            self._last = (now, busy if busy is not None else 0.0, ours)
            return self._value


_shared: Optional[FreeCpus] = None
_shared_lock = threading.Lock()


def shared() -> FreeCpus:
    """The process's gauge (one measurement serves every store in it)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = FreeCpus()
        return _shared
